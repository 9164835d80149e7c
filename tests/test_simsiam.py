"""SimSiam: the loss D against its formula, the stop-gradient, the command line, and learning."""
import subprocess
import sys

import torch

import simsiam
from common import parse_args

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_D_equals_the_literal_formula():
    g = torch.Generator().manual_seed(0)
    for n, d in [(1, 3), (7, 16), (32, 2048)]:
        p, z = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        literal = 0.0
        for i in range(n):  # Eq. 1: -(p / ||p||) . (z / ||z||), averaged over the batch
            literal -= (p[i] / p[i].norm()).dot(z[i] / z[i].norm()).item() / n
        assert abs(simsiam.D(p, z).item() - literal) < 1e-5
    assert abs(simsiam.D(p, p).item() + 1) < 1e-5 and abs(simsiam.D(p, -p).item() - 1) < 1e-5


def test_no_gradient_reaches_z_through_D():
    p, z = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    simsiam.D(p, z).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0
    p.grad = None
    simsiam.D(p, z, stop_grad=False).backward()  # the --no-stop-grad ablation
    assert z.grad is not None and z.grad.abs().sum() > 0


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_paper_hyperparameters():
    out = run_cli("simsiam.py", "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--base-lr", "--no-stop-grad", "--no-predictor", "--fix-pred-lr", "--eval-every", "App. D"):
        assert flag in out.stdout


def test_smoke_runs_and_ends_with_a_knn_accuracy(tmp_path):
    out = run_cli("simsiam.py", "--smoke", "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "knn_top1" in out.stdout.splitlines()[-2]
    run_dir = next(tmp_path.iterdir())
    assert {"args.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt"} <= {p.name for p in run_dir.iterdir()}


def short_run(tmp_path, *flags):
    """A short SimSiam run on the synthetic data; returns the per-epoch metrics records."""
    import json
    args = parse_args(simsiam.Args, ["--dataset", "synthetic", "--arch", "small", "--batch-size", "64",
                                     "--probe-epochs", "0", "--log-every", "1000", "--out-dir", str(tmp_path),
                                     *flags])
    simsiam.train(args)
    run_dir = next(tmp_path.iterdir())
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"final"' not in line]


def test_no_stop_grad_collapses(tmp_path):
    """The paper's Fig. 2 in small: same run with and without stop-gradient. Without it the loss
    falls fast, the std of the l2-normalized output z falls toward 0 and kNN drops. (Measured on
    this CPU with the code before the epoch-0 BN fix of 2026-11-22: loss -0.62 vs -0.02, std_z
    0.0028 vs 0.021, kNN 54.6 vs 91.9.)
    Not asserted here: that these 120 steps lift kNN above the network at initialization. A
    --base-lr 0 control (weights fixed, only BN running statistics updated) reached kNN 90.8
    (same earlier code), so nearly all of the rise from 75.7 was BN statistics, not learning; the
    epoch-0 evaluation now measures BN statistics first (91.7 on this data)."""
    flags = ["--epochs", "3", "--steps-per-epoch", "40", "--eval-every", "3", "--base-lr", "0.12"]
    end = short_run(tmp_path / "sg", *flags)[-1]
    end_bad = short_run(tmp_path / "nosg", *flags, "--no-stop-grad")[-1]
    assert end_bad["knn_top1"] < end["knn_top1"] - 10, (end_bad["knn_top1"], end["knn_top1"])
    assert end_bad["loss"] < end["loss"] - 0.3, (end_bad["loss"], end["loss"])
    assert end_bad["std_z"] < 0.25 * end["std_z"], (end_bad["std_z"], end["std_z"])
