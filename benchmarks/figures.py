"""Trains the runs below and draws, from their own metrics.jsonl (issue 9):

  simsiam.png    SimSiam Fig. 2: loss, std of l2-normalized z and kNN over training; with and
                 without stop-gradient, and without predictor
  spectrum.png   DirectCLR: log singular values of the embedding covariance at the end, for InfoNCE
                 with a 2-layer, a linear and no projector, and DirectCLR; effective rank and kNN
  collapse.png   all five methods: std of l2-normalized z and effective rank over training
  summary.md     per run at the end: kNN, rank_r, rank_z, std_z; command, hardware, torch, date

    python benchmarks/figures.py --preset cpu    # small backbone, 5k-image CIFAR-10 (JPEG)
                                                 # subset, ~100 steps
    python benchmarks/figures.py --preset gpu    # ResNet-18, full CIFAR-10 (JPEG), 100 epochs a run
    python benchmarks/figures.py --runs-from benchmarks/figures/runs   # redraw, no training
    python benchmarks/figures.py --preset cpu --epochs 12    # other flags go to every run

matplotlib is needed by this script only (pip install matplotlib), not by the methods. On a CPU
shared with other jobs, OMP_NUM_THREADS=1 runs several times faster (threads spin-waiting for each
other).
"""
import argparse
import dataclasses
import datetime
import glob
import importlib
import json
import math
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = {  # run name -> (method file, its flags)
    "simsiam": ("simsiam", []), "simsiam-no-stop-grad": ("simsiam", ["--no-stop-grad"]),
    "simsiam-no-predictor": ("simsiam", ["--no-predictor"]),
    **{f"directclr-{p}": ("directclr", ["--projector", p])
       for p in ("mlp", "linear", "none", "direct")},
    "byol": ("byol", []), "simclr": ("simclr", []), "swav": ("swav", []),
}
# Settings by Args field: each run takes those its method's Args has, then its method's own dict.
# subset (not a flag): the CIFAR-10 images per class (train, test) that the runs use.
COMMON = dict(probe_epochs=0, log_every=10**6)
PRESETS = {
    "cpu": dict(dataset="folder", subset=(500, 100), arch="small", batch_size=128, epochs=8,
                steps_per_epoch=12, eval_every=2, warmup_epochs=1, freeze_prototypes_epochs=1,
                # lr 0.06, the paper's CIFAR lr at batch 512: the collapse shows within ~100 steps
                simsiam=dict(base_lr=0.12)),
    "gpu": dict(dataset="folder", arch="resnet18", epochs=100, eval_every=10),
    "tiny": dict(dataset="synthetic", arch="small", image_size=8, small_size=4, batch_size=32,
                 epochs=1, steps_per_epoch=2, eval_every=1, warmup_epochs=0,
                 freeze_prototypes_epochs=0, proj_dim=64, pred_hidden=16, proj_hidden=64,
                 hidden_dim=64, feat_dim=32, n_prototypes=30),
}


def flags(Args, settings):
    """Settings -> command-line flags, keeping the fields this method's Args has."""
    names, out = {f.name for f in dataclasses.fields(Args)}, []
    for k, v in settings.items():
        if k in names:
            out += ["--" + k.replace("_", "-"), *map(str, v if isinstance(v, tuple) else [v])]
    return out


def make_subset(src, dest, n_train, n_test):
    """An ImageFolder of symbolic links to the first n images of each class of each split."""
    test = "test" if os.path.isdir(os.path.join(src, "test")) else "val"
    dest = os.path.join(dest, f"{os.path.basename(os.path.normpath(src))}-{n_train}-{n_test}")
    for split, n in (("train", n_train), (test, n_test)):
        for c in sorted(e.name for e in os.scandir(os.path.join(src, split)) if e.is_dir()):
            os.makedirs(os.path.join(dest, split, c), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(src, split, c)))[:n]:
                link = os.path.join(dest, split, c, name)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(src, split, c, name)), link)
    return dest


def train_all(opts, extra, runs_dir):
    """Train every run of RUNS into runs_dir/<name>/ and note how (runs_dir/info.json)."""
    if os.path.isdir(runs_dir) and os.listdir(runs_dir):
        sys.exit(f"error: {runs_dir} holds runs already; redraw them with --runs-from {runs_dir}, "
                 f"or delete it, or pass another --out")
    sys.path.insert(0, ROOT)
    import torch
    from common import parse_args
    from throughput import device_name
    if opts.preset == "gpu" and not opts.tiny and not torch.cuda.is_available():
        sys.exit("error: --preset gpu needs a CUDA GPU and none is visible; use --preset cpu")
    if opts.tiny:  # too small to gain from threads; on a busy machine they mostly wait for
        torch.set_num_threads(1)  # each other
    settings = {**COMMON, **PRESETS["tiny" if opts.tiny else opts.preset]}
    settings.update(dataset=opts.dataset or settings["dataset"], data_dir=opts.data_dir)
    if settings["dataset"] == "folder":
        if not os.path.isdir(os.path.join(opts.data_dir, "train")):
            sys.exit(f"error: no CIFAR-10 (JPEG) at --data-dir {opts.data_dir}; unpack it "
                     f"(README.md: python -m zipfile -e ../shared/data/cifar10-jpeg.zip /tmp/data) "
                     f"or pass --dataset synthetic")
        if "subset" in settings:
            settings["data_dir"] = make_subset(opts.data_dir, os.path.join(opts.out, "data"),
                                               *settings["subset"])
    jobs = []  # parse every run's flags first: a bad flag stops us before any training
    for name, (method, run_flags) in RUNS.items():
        m = importlib.import_module(method)
        out_dir = ["--out-dir", os.path.join(runs_dir, name)]
        own = flags(m.Args, {**settings, **settings.get(method, {})})
        jobs.append((name, m, parse_args(m.Args, own + run_flags + extra + out_dir)))
    info = dict(command=shlex.join(["python", *sys.argv]), hardware=device_name(),
                torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
                wall_s={},
                settings=" ".join(f"{k}={v}" for k, v in settings.items()) + " " + " ".join(extra))
    os.makedirs(runs_dir)
    for i, (name, m, args) in enumerate(jobs, 1):
        print(f"=== [{i}/{len(jobs)}] {name}", flush=True)
        t = time.time()
        m.train(args)
        info["wall_s"][name] = round(time.time() - t, 1)
        with open(os.path.join(runs_dir, "info.json"), "w") as fh:
            json.dump(info, fh, indent=1)


def load_runs(runs_dir):
    """name -> epoch records of the newest run in runs_dir/<name>/; runs without evaluations left
    out."""
    runs = {}
    for name in RUNS:
        files = sorted(glob.glob(os.path.join(runs_dir, name, "*", "metrics.jsonl")))
        records = [json.loads(line) for line in open(files[-1]) if line.strip()] if files else []
        records = [r for r in records if "epoch" in r and not r.get("final")]
        if evals(records):
            runs[name] = records
        else:
            print(f"note: no evaluated {name} run in {runs_dir}; left out", file=sys.stderr)
    return runs


def evals(records):
    return [r for r in records if "knn_top1" in r]


def plot(ax, records, key, i, label, style=".-"):
    ax.plot([r["epoch"] for r in records], [key(r) for r in records], style, color=f"C{i}",
            label=label)


def save(plt, fig, path, title):
    fig.suptitle(title)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs and indices
        ax.set_xlabel(ax.get_xlabel() or "epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def fig_simsiam(plt, runs, path):
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    d = None
    for i, (name, label) in enumerate((("simsiam", "with stop-grad"),
                                       ("simsiam-no-stop-grad", "w/o stop-grad"),
                                       ("simsiam-no-predictor", "w/o predictor (h = identity)"))):
        if name in runs:
            plot(ax[0], [r for r in runs[name] if r["epoch"] > 0], lambda r: r["loss"], i, label)
            plot(ax[1], evals(runs[name]), lambda r: r["std_z"], i, label)
            plot(ax[2], evals(runs[name]), lambda r: r["knn_top1"], i, label)
            d = len(evals(runs[name])[-1]["spectrum_z"])
    if d:
        ax[1].axhline(1 / math.sqrt(d), ls=":", color="gray", label=f"1/sqrt(d), d = {d}")
    ax[0].set(title="training loss (-cos, min -1)", ylabel="loss")
    ax[1].set(title="std of l2-normalized z (0: collapsed)", ylabel="std", ylim=(0, None))
    ax[2].set(title="kNN top-1 on backbone features", ylabel="accuracy (%)")
    save(plt, fig, path, "SimSiam Fig. 2: collapse without stop-gradient or predictor")


def fig_spectrum(plt, runs, path):
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8))
    variants = (("directclr-mlp", "2-layer projector"), ("directclr-linear", "linear projector"),
                ("directclr-none", "no projector (z = r)"),
                ("directclr-direct", "DirectCLR (z = r[:, :d0])"))
    epoch = None
    for i, (name, label) in enumerate(v for v in variants if v[0] in runs):
        end = evals(runs[name])[-1]
        epoch = end["epoch"]
        for a, key in zip(ax, ("r", "z" if "spectrum_z" in end else "r")):
            # stored to 8 decimals: 0 drawn at 1e-9
            s = [max(v, 1e-9) for v in end[f"spectrum_{key}"]]
            a.semilogy(range(1, len(s) + 1), s, color=f"C{i}",
                       label=f"{label}: rank {end[f'rank_{key}']:.1f}, kNN {end['knn_top1']:.1f}%")
    for a, title in zip(ax, ("representation r (backbone output)",
                             "embedding z (what the loss sees)")):
        a.set(title=title, xlabel="singular value index (descending)",
              ylabel="singular value (log)")
    save(plt, fig, path, f"DirectCLR: spectrum of the embedding covariance, epoch {epoch}; "
                         f"legend: effective rank")


def fig_collapse(plt, runs, path):
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (name, label) in enumerate((("simsiam", "SimSiam"), ("byol", "BYOL"),
                                       ("simclr", "SimCLR"), ("swav", "SwAV"),
                                       ("directclr-direct", "DirectCLR"))):
        if name in runs:
            ev, d = evals(runs[name]), len(evals(runs[name])[-1]["spectrum_z"])
            plot(ax[0], ev, lambda r: r["std_z"] * math.sqrt(d), i, f"{label} (d = {d})")
            plot(ax[1], ev, lambda r: r["rank_r"], i, f"{label}: r")
            plot(ax[1], ev, lambda r: r["rank_z"], i, f"{label}: z", ".--")
    ax[0].set(title="std of l2-normalized z x sqrt(d) (1: spread, 0: collapsed)",
              ylabel="std x sqrt(d)", ylim=(0, None))
    ax[1].set(title="effective rank of r (solid) and z (dashed)", ylabel="effective rank",
              yscale="log")
    save(plt, fig, path, "Collapse diagnostics across the five methods")


def write_summary(runs, runs_dir, out, drawn_by):
    path = os.path.join(runs_dir, "info.json")
    info = json.load(open(path)) if os.path.isfile(path) else {}
    lines = ["# Figures: SimSiam Fig. 2, DirectCLR spectra, collapse diagnostics", "",
             f"- command: `{info.get('command', 'unknown')}`"
             + (f" (redrawn: `{drawn_by}`)" if drawn_by != info.get("command") else ""),
             f"- hardware: {info.get('hardware', 'unknown')}; "
             f"torch {info.get('torch', 'unknown')}; date {info.get('date', 'unknown')}",
             f"- settings (each method takes those its Args has): "
             f"`{info.get('settings', 'unknown').strip()}`",
             f"- runs: `{runs_dir}`", "",
             "At the last evaluation (r: backbone features, z: head output; std of l2-normalized "
             "vectors):", "",
             "| run | epoch | kNN top-1 (%) | rank_r | rank_z | std_z | train s | wall s |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name in RUNS:
        e = evals(runs[name])[-1] if name in runs else {"epoch": "not run"}
        formats = (("knn_top1", ".1f"), ("rank_r", ".1f"), ("rank_z", ".1f"), ("std_z", ".4f"))
        # no rank_z: --projector none
        cells = [e["epoch"]] + [format(e[k], f) if k in e else "-" for k, f in formats]
        cells += [f"{sum(r.get('epoch_s', 0) for r in runs.get(name, [])):.0f}",
                  info.get("wall_s", {}).get(name, "-")]
        lines.append(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    ranked = sorted((evals(recs)[-1]["rank_r"], n[10:]) for n, recs in runs.items()
                    if n[:10] == "directclr-")
    lines += ["", "DirectCLR variants by effective rank of r: "
              + " < ".join(f"{n} ({r:.1f})" for r, n in ranked)]
    for png in ("simsiam", "spectrum", "collapse"):
        lines += ["", f"![{png}]({png}.png)"]
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out, 'summary.md')}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="Other --flags go to every run (all five must have them).")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="run sizes (see PRESETS)")
    p.add_argument("--tiny", action="store_true",
                   help="seconds-long runs on small synthetic images (tests)")
    p.add_argument("--dataset",
                   help="replaces the preset's dataset (folder | synthetic | cifar10 ...)")
    p.add_argument("--data-dir", default="/tmp/data/cifar10-jpeg",
                   help="CIFAR-10 (JPEG) ImageFolder root")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "figures"),
                   help="folder for the PNGs, summary.md and (when training) runs/")
    p.add_argument("--runs-from",
                   help="draw from the runs in this folder (an earlier --out's runs/), no training")
    opts, extra = p.parse_known_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: benchmarks/figures.py needs matplotlib to draw; install it with: "
                 "pip install matplotlib")
    if opts.runs_from and not os.path.isdir(opts.runs_from):
        sys.exit(f"error: --runs-from {opts.runs_from} is not a folder")
    if opts.runs_from and extra:
        sys.exit(f"error: --runs-from trains nothing, so {' '.join(extra)} would have no effect")
    runs_dir = opts.runs_from or os.path.join(opts.out, "runs")
    if not opts.runs_from:
        train_all(opts, extra, runs_dir)
    os.makedirs(opts.out, exist_ok=True)
    runs = load_runs(runs_dir)
    fig_simsiam(plt, runs, os.path.join(opts.out, "simsiam.png"))
    fig_spectrum(plt, runs, os.path.join(opts.out, "spectrum.png"))
    fig_collapse(plt, runs, os.path.join(opts.out, "collapse.png"))
    write_summary(runs, runs_dir, opts.out, shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
