"""README's GPU results section, generated from the reports under benchmarks/results/ (never typed).

Each folder under benchmarks/results/ holds what one GPU session brought back, as it came back:
the commands it ran (*-command.sh), their logs, and the markdown tables the benchmark scripts
wrote. This script reads them and rewrites the part of README.md between the two markers
`<!-- results:begin -->` and `<!-- results:end -->`.

    python benchmarks/results.py            # rewrite README.md's section
    python benchmarks/results.py --check    # exit 1 if README.md is not what the reports give
"""
import argparse
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
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
    """What one session's folder gives: device line, smoke results, throughput per method and mode."""
    info = {"device": None, "smoke": {}, "eager": {}, "compile": {}, "conventional": []}
    for path in sorted(glob.glob(os.path.join(folder, "*.md"))):
        with open(path) as fh:
            text = fh.read()
        m = re.search(r"Device: ([^;]+); torch ([^;]+); (\d{4}-\d{2}-\d{2})", text)
        if m:
            info["device"] = m.groups()
        for row in re.findall(r"^\| conventional \(([^)]*)\) \| (\d+) \| (\w+) \| (\d+) \|", text, re.M):
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


def section():
    lines = []
    for folder in sorted(glob.glob(os.path.join(RESULTS, "*/"))):
        info, name = read_folder(folder), os.path.basename(os.path.normpath(folder))
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
        conv_txt = (f"{min(conv):.0f}-{max(conv):.0f}" if len(conv) > 1 else f"{conv[0]:.0f}") if conv else "-"
        lines += ["| method | img/s eager | s/epoch eager | img/s --compile | eager vs DataLoader |",
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
                  "significant digits). The conventional pipeline (torchvision transforms per image "
                  "in DataLoader workers, the same SimSiam step) ran once per `throughput.py` call; "
                  "the ratio spans its runs.", ""]
    if not lines:
        lines = ["No GPU report yet.", ""]
    lines += ["Published anchors (not measured here): lightly's CIFAR-10 benchmark, batch 512, kNN "
              "top-1 at 200 / 100 epochs: " + ", ".join(f"{m} {a} / {b}" for m, (a, b) in LIGHTLY.items())
              + "; about 26 s per epoch on an RTX A6000.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is current")
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = parser.parse_args()
    with open(args.readme) as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"error: {args.readme} has no {BEGIN} ... {END} markers; add them where the section goes")
    head, rest = text.split(BEGIN, 1)
    new = head + BEGIN + "\n" + section() + END + rest.split(END, 1)[1]
    if args.check:
        sys.exit(0 if new == text else f"{args.readme} is out of date; run python benchmarks/results.py")
    with open(args.readme, "w") as fh:
        fh.write(new)


if __name__ == "__main__":
    main()
