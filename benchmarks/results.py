"""README's GPU results section, generated from the reports under benchmarks/results/ (never
typed).

Each folder under benchmarks/results/ holds what one GPU session brought back, as it came back.
Either the files of benchmarks/gpu_check.py (results.json, report.md, log.txt, metrics.jsonl,
knn.png): its results.json is read; or, before gpu_check.py, the commands a session ran
(*-command.sh), their logs and the markdown tables the benchmark scripts wrote: those are parsed.
This script rewrites the part of README.md between the two markers `<!-- results:begin -->` and
`<!-- results:end -->`, and between `<!-- loader:begin -->` and `<!-- loader:end -->` the loader
figures of each loader.json (benchmarks/loader.py) under benchmarks/results/.

    python benchmarks/results.py            # rewrite README.md's section
    python benchmarks/results.py --check    # exit 1 if README.md is not what the reports give
"""
import argparse
import glob
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
LOADER_BEGIN, LOADER_END = "<!-- loader:begin -->", "<!-- loader:end -->"
METHODS = ("simsiam", "byol", "simclr", "swav", "directclr")
EPOCH = 50_000  # images in a CIFAR-10 epoch

# Published anchors, cited with their source (not measured here): lightly's CIFAR-10 benchmark,
# batch 512, kNN top-1 at 200 epochs (about 26 s per epoch on an RTX A6000) and at 100 epochs.
LIGHTLY = {"simsiam": (76.4, 68), "byol": (86.8, 76), "simclr": (84.8, 79), "swav": (84.2, 77)}


def runs_in_log(path):
    """(method, images/s) of each training run in a throughput log: the `final` line's img_per_s
    (the second, timed epoch of benchmarks/throughput.py) and the method from its run folder."""
    out, ips = [], None
    with open(path) as fh:
        for line in fh:
            m = re.match(r"final True\b.*\bimg_per_s (\S+)", line)
            if m:
                ips = float(m.group(1))
            m = re.match(r"run folder: .*/(\w+)-\d{8}-\d{6}", line)
            if m and ips is not None:
                out.append((m.group(1), ips))
                ips = None
    return out


def read_folder(folder):
    """What one session's folder gives: device line, smoke results, throughput per method and
    mode."""
    info = {"device": None, "smoke": {}, "eager": {}, "compile": {}, "conventional": []}
    for path in sorted(glob.glob(os.path.join(folder, "*.md"))):
        with open(path) as fh:
            text = fh.read()
        m = re.search(r"Device: ([^;]+); torch ([^;]+); (\d{4}-\d{2}-\d{2})", text)
        if m:
            info["device"] = m.groups()
        for row in re.findall(r"^\| conventional \(([^)]*)\) \| (\d+) \| (\w+) \| (\d+) \|",
                              text, re.M):
            info["conventional"].append((row[0], float(row[3])))
    for path in sorted(glob.glob(os.path.join(folder, "*.err"))):
        mode = "compile" if "compile" in os.path.basename(path) else "eager"
        for method, ips in runs_in_log(path):
            info[mode].setdefault(method, []).append(ips)
    for path in sorted(glob.glob(os.path.join(folder, "*log.txt"))):
        with open(path) as fh:
            text = fh.read()
        for method, rc in re.findall(r"=== \[\d+s\] smoke (\w+)\n(?:.*\n)*?rc=(\d+)", text):
            info["smoke"][method] = int(rc)
    return info


def section(results=RESULTS):
    lines = []
    for folder in sorted(glob.glob(os.path.join(results, "*/"))):
        if os.path.exists(os.path.join(folder, "results.json")):
            lines += render_gpu_check(folder)
            continue
        info = read_folder(folder)
        if info["device"] is None:
            continue
        device, torch_version, date = info["device"]
        rel = os.path.relpath(folder, ROOT)
        lines += [f"### {device}, torch {torch_version}, {date}", "",
                  f"Reports, logs and the exact commands: [{rel}]({rel}). CIFAR-10 (JPEG), "
                  f"ResNet-18, batch 512, 32 px, each method's own augmentation and step "
                  f"(`benchmarks/throughput.py`: the second of two 20-step epochs is timed).", ""]
        if info["smoke"]:
            ok = [m for m in METHODS if info["smoke"].get(m) == 0]
            bad = [m for m in METHODS if m in info["smoke"] and info["smoke"][m] != 0]
            lines += [f"`--smoke` on CUDA: {', '.join(ok) or 'none'} ran to the end"
                      + (f"; failed: {', '.join(bad)}" if bad else "") + ".", ""]
        conv = [ips for _, ips in info["conventional"]]
        conv_txt = ((f"{min(conv):.0f}-{max(conv):.0f}" if len(conv) > 1 else f"{conv[0]:.0f}")
                    if conv else "-")
        lines += ["| method | img/s eager | s/epoch eager | img/s --compile | "
                  "eager vs DataLoader |",
                  "|---|---|---|---|---|"]
        for m in METHODS:
            e, c = info["eager"].get(m), info["compile"].get(m)
            if not e and not c:
                continue
            e_txt = " / ".join(f"{v:.0f}" for v in e) if e else "-"
            s_txt = " / ".join(f"{EPOCH / v:.1f}" for v in e) if e else "-"
            c_txt = " / ".join(f"{v:.0f}" for v in c) if c else "not run"
            ratio = f"{min(e) / max(conv):.1f}-{max(e) / min(conv):.1f}x" if e and conv else "-"
            lines.append(f"| {m} | {e_txt} | {s_txt} | {c_txt} | {ratio} |")
        if conv:
            lines.append(f"| conventional ({info['conventional'][0][0]}) | {conv_txt} | "
                         f"{EPOCH / max(conv):.1f}-{EPOCH / min(conv):.1f} | | 1x |")
        lines.append("")
        lines += ["Several values in a cell: separate runs of the same command (logs give 4 "
                  "significant digits). The conventional pipeline (torchvision transforms per "
                  "image in DataLoader workers, the same SimSiam step) ran once per "
                  "`throughput.py` call; the ratio spans its runs.", ""]
    if not lines:
        lines = ["No GPU report yet.", ""]
    lines += ["Published anchors (not measured here): lightly's CIFAR-10 benchmark, batch 512, "
              "kNN top-1 at 200 / 100 epochs: "
              + ", ".join(f"{m} {a} / {b}" for m, (a, b) in LIGHTLY.items())
              + "; about 26 s per epoch on an RTX A6000.", ""]
    return "\n".join(lines)


def _num(x, fmt="{:.0f}"):
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return fmt.format(x) if ok else "-"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _run_state(r):
    """A gpu_check run's cell: ok, failed with its error line, skipped, not run."""
    if not r:
        return "not run"
    if r.get("ok"):
        return "ok"
    if r.get("ok") is None:  # skipped for the budget: the reason
        return _cell(r.get("error") or "not run")
    return f"failed: {_cell(r.get('error') or '?')}"


def render_gpu_check(folder):
    """The README lines for a folder written by benchmarks/gpu_check.py (its results.json):
    full-size table, throughput table, profile and stages lines, accuracy result with its kNN
    curve."""
    with open(os.path.join(folder, "results.json")) as fh:
        R = json.load(fh)
    rel = os.path.relpath(folder, ROOT)
    c, D = R.get("config", {}), R.get("data", {})
    data = ("synthetic data" if c.get("dataset") == "synthetic" else
            f"{c.get('dataset')} `{os.path.basename(str(D.get('root', '')))}`")
    lines = [f"### {R.get('device')}, torch {R.get('torch')}, {str(R.get('date'))[:10]}"
             + (" (dry run on CPU)" if R.get("dry_run") else ""), "",
             f"Report, log and the exact command: [{rel}]({rel}). `benchmarks/gpu_check.py`, "
             f"{_num(R.get('elapsed_s'))} s of a {_num(R.get('budget_s'))} s budget"
             + ("" if R.get("finished") else f", stopped: {_cell(R.get('stopped'))}") + ": "
             f"{data}, {c.get('arch')}, batch {c.get('batch_size')}, {c.get('image_size')} px, "
             f"each method's own recipe otherwise; each run is its own train() for 2 epochs of "
             f"{c.get('steps')} steps, the second timed.", ""]
    F = R.get("fullsize", {}).get("methods", {})
    if F:
        lines += ["| method | eager | loss | peak memory (GiB) | --compile |",
                  "|---|---|---|---|---|"]
        for m, modes in F.items():
            e = modes.get("eager") or {}
            lines.append(f"| {m} | {_run_state(e)} | {_num(e.get('loss'), '{:.4f}')} | "
                         f"{_num(e.get('peak_mem_gib'), '{:.2f}')} | "
                         f"{_run_state(modes.get('compile'))} |")
        lines.append("")
    T = R.get("throughput", {})
    conv = T.get("conventional") or {}
    if T.get("methods"):
        lines += ["| method | img/s eager | s/epoch | img/s --compile | vs DataLoader |",
                  "|---|---|---|---|---|"]
        for m, modes in T["methods"].items():
            e, k = modes.get("eager") or {}, modes.get("compile") or {}
            lines.append(f"| {m} | {_num(e.get('img_per_s'))} | "
                         f"{_num(e.get('epoch_s'), '{:.1f}')} | {_num(k.get('img_per_s'))} | "
                         f"{_num(e.get('vs_dataloader'), '{:.1f}x')} |")
        if conv.get("img_per_s"):
            lines.append(f"| conventional (SimSiam, DataLoader, {conv.get('workers')} workers) | "
                         f"{_num(conv['img_per_s'])} | {_num(conv.get('epoch_s'), '{:.1f}')} | | "
                         f"1x |")
        lines.append("")
    P = R.get("profile", {})
    if P.get("status") == "done":
        if P.get("device") == "cuda":
            detail = (f"{_num(P.get('step_ms'), '{:.1f}')} ms per step, kernels "
                      f"{_num(P.get('kernel_ms'), '{:.1f}')} ms, the host "
                      f"{_num(P.get('host_ms'), '{:.1f}')} ms to issue "
                      f"{_num(P.get('launches_per_step'))} launches "
                      f"({_num(P.get('launch_ms'), '{:.1f}')} ms in launch calls)")
        else:  # the verdict says it all
            detail = f"{_num(P.get('step_ms'), '{:.1f}')} ms per step"
        lines += [f"Profile of one SimSiam step (eager): {P.get('verdict')}; {detail}.", ""]
    S = R.get("stages", {})
    if S.get("status") == "done" and S.get("step_ms_eager") is not None:
        lines += [f"The step's stages timed alone (views, networks, update; eager, compiled, CUDA "
                  f"graphs): {S.get('verdict')}; summed {_num(S['step_ms_eager'], '{:.1f}')} ms "
                  f"eager, {_num(S.get('step_ms_best'), '{:.1f}')} ms with the fastest mode of "
                  f"each ({_num(S.get('epoch_s_best'), '{:.2f}')} s per 50k-image epoch).", ""]
    A = R.get("accuracy", {})
    if A.get("epochs"):
        lines += ["| method | epochs | kNN top-1 | linear top-1 | wall time |",
                  "|---|---|---|---|---|",
                  f"| {A.get('method')} | {A.get('epochs_done', 0)} of {A['epochs']} | "
                  f"{_num(A.get('knn_top1'), '{:.2f}')} | {_num(A.get('linear_top1'), '{:.2f}')} "
                  f"| {_hms(A.get('wall_s'))} |", ""]
        if A.get("png") and os.path.exists(os.path.join(folder, A["png"])):
            lines += [f"![kNN top-1 by epoch, {A.get('method')}]({rel}/{A['png']})", ""]
    elif A.get("status"):
        lines += [f"Accuracy run: {_cell(A['status'])}.", ""]
    return lines


def _hms(seconds):
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def loader_section(results=RESULTS):
    """README's loader figures: per loader.json, one worker's decode rate per path and the
    streamed loader's rate per worker count, with the hardware and command that gave them."""
    lines = []
    for path in sorted(glob.glob(os.path.join(results, "*", "loader.json"))):
        with open(path) as fh:
            r = json.load(fh)
        if r.get("quick"):
            continue
        env, rel = r["environment"], os.path.relpath(os.path.dirname(path), ROOT)
        wl = list(r["decode"]["pil-draft"])
        gpu = "no GPU" if env["gpu"] == "none" else env["gpu"]
        lines += [f"Loader figures measured on {env['cpu']}, {gpu}, torch "
                  f"{env['torch']}, Pillow {env['pillow']}, {env['date'][:10]}, by "
                  f"`{r['command']}` ([{rel}]({rel})): {r['images']['n']} JPEGs of mean "
                  f"{r['images']['mean_w']:.0f} x {r['images']['mean_h']:.0f} px, "
                  f"{r['images']['mean_kb']:.0f} KB, in the page cache.", "",
                  "| images/s of one worker | " + " | ".join(wl) + " |",
                  "|---|" + "---|" * len(wl)]
        names = {"pil-draft": "common.read_views (PIL decode with draft, torch resize)",
                 "pil-resize": "PIL decode and PIL resize",
                 "tv-cpu": "torchvision.io.decode_jpeg + resized_crop",
                 "tv-cuda": "torchvision.io.decode_jpeg on the GPU"}
        for key, name in names.items():
            lines.append(f"| {name} | " + " | ".join(
                _num(v) if isinstance(v, (int, float)) else v for v in r["decode"][key].values())
                + " |")
        lines += ["", f"| streamed loader ({r['loader_views']}), workers | "
                  + " | ".join(str(row["workers"]) for row in r["loader"]) + " |",
                  "|---|" + "---|" * len(r["loader"]),
                  "| images/s | " + " | ".join(_num(row["img_per_s"]) for row in r["loader"])
                  + " |", ""]
        d = {k: v[wl[0]] for k, v in r["decode"].items()}
        lines += [f"So one worker of this CPU feeds about {d['pil-draft']:.0f} images/s of "
                  f"{wl[0]} crops, and a run needs ceil(R / {d['pil-draft']:.0f}) workers per "
                  "GPU, R being the source images/s the GPU trains at (a run logs it; "
                  "`benchmarks/loader.py` on the GPU machine measures R for ResNet-50 and "
                  "prints the count). PIL's own resize is "
                  f"{d['pil-draft'] / d['pil-resize']:.1f}x slower than torch's; "
                  f"torchvision.io.decode_jpeg is {d['tv-cpu'] / d['pil-draft']:.1f}x faster "
                  "but deprecated since torchvision 0.29 (its successor, TorchCodec, would be a "
                  "new dependency), so common.py decodes with PIL.", ""]
    return "\n".join(lines or ["No loader report yet.", ""])


def rewrite(text, begin, end, body, readme):
    if begin not in text or end not in text:
        sys.exit(f"error: {readme} has no {begin} ... {end} markers; add them where the "
                 f"section goes")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + end + rest.split(end, 1)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that README.md is current")
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = parser.parse_args()
    with open(args.readme) as fh:
        text = fh.read()
    new = rewrite(text, BEGIN, END, section(), args.readme)
    new = rewrite(new, LOADER_BEGIN, LOADER_END, loader_section(), args.readme)
    if args.check:
        sys.exit(0 if new == text else
                 f"{args.readme} is out of date; run python benchmarks/results.py")
    with open(args.readme, "w") as fh:
        fh.write(new)


if __name__ == "__main__":
    main()
