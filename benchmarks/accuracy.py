"""Accuracy of each method: kNN and linear-probe top-1 after training, with the wall time.

Trains each method (all five, or --methods) with its own train() and writes a markdown table:
method | arch | epochs | batch | kNN top-1 | linear top-1 | wall time, headed by the device, torch
version, date and command. Flags not given keep each method's own default (its paper's recipe:
epochs, batch size, probe epochs differ between methods); a flag given applies to all methods.
Anything after `--` goes verbatim to every method. Runs are kept under --runs-dir.

    python benchmarks/accuracy.py --dataset folder --data-dir /tmp/data/cifar10-jpeg \
        --out accuracy.md
    python benchmarks/accuracy.py --epochs 200 --batch-size 512          # GPU, same budget for all
    python benchmarks/accuracy.py --dataset synthetic --arch small --batch-size 64 --epochs 5 \\
        --probe-epochs 10 -- --steps-per-epoch 20                        # CPU, minutes
"""
import argparse
import contextlib
import datetime
import importlib
import math
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch  # noqa: E402

from common import parse_args  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
from throughput import device_name  # noqa: E402

METHODS = ("simsiam", "byol", "simclr", "swav", "directclr")


def hms(seconds):
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def percent(x):
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def run_method(name, args, extra):
    """Train one method; returns (its Args, final metrics, wall seconds)."""
    m = importlib.import_module(name)
    flags = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--out-dir", args.runs_dir]
    for flag in ("epochs", "arch", "batch_size", "probe_epochs"):
        if getattr(args, flag) is not None:
            flags += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    margs = parse_args(m.Args, flags + extra)
    t0 = time.time()
    # progress lines to stderr, the table alone on stdout
    with contextlib.redirect_stdout(sys.stderr):
        metrics = m.train(margs)
    return margs, metrics, time.time() - t0


def main():
    argv, extra = sys.argv[1:], []
    if "--" in argv:  # what follows goes verbatim to every method
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="default: all")
    parser.add_argument("--dataset", default="cifar10",
                        help="as the methods' --dataset (default: cifar10)")
    parser.add_argument("--data-dir", default="data",
                        help="as the methods' --data-dir (default: data)")
    parser.add_argument("--epochs", type=int, help="default: each method's own")
    parser.add_argument("--arch", help="resnet18 | resnet50 | small; default: each method's own")
    parser.add_argument("--batch-size", type=int, help="default: each method's own")
    parser.add_argument("--probe-epochs", type=int,
                        help="linear probe epochs (0: none); default: each method's own")
    parser.add_argument("--runs-dir", default=f"runs/accuracy-{time.strftime('%Y%m%d-%H%M%S')}",
                        help="the runs' folders (checkpoints, backbones, metrics.jsonl) go here "
                             "(default: runs/accuracy-<date>-<time>)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)

    lines = [f"Accuracy on {args.dataset}. Device: {device_name()}; torch {torch.__version__}; "
             f"{datetime.date.today().isoformat()}. Command: `python {shlex.join(sys.argv)}`", "",
             "| method | arch | epochs | batch | kNN top-1 | linear top-1 | wall time |",
             "|---|---|---|---|---|---|---|"]
    for name in args.methods:
        margs, metrics, secs = run_method(name, args, extra)
        lines.append(f"| {name} | {margs.arch} | {margs.epochs} | {margs.batch_size} | "
                     f"{percent(metrics.get('knn_top1'))} | "
                     f"{percent(metrics.get('linear_top1'))} | {hms(secs)} |")
        if args.out:  # after each method, so that a crash keeps the rows already measured
            with open(args.out, "w") as fh:
                fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
