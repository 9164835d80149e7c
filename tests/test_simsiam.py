"""SimSiam: the loss D against its formula, the stop-gradient, the command line, and learning."""

import torch

import simsiam
from clirun import check_help, check_smoke
from plumbing import parse_args


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


def test_help_lists_the_paper_hyperparameters():
    check_help("simsiam", "--base-lr", "--no-stop-grad", "--no-predictor", "--fix-pred-lr", "--eval-every", "App. D")


def test_smoke_runs_and_ends_with_a_knn_accuracy(tmp_path):
    check_smoke("simsiam", tmp_path)


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
    falls fast, the std of the l2-normalized output z falls toward 0 and kNN drops. Measured on
    this 2-core CPU (60 steps, base lr 0.5 to see it this soon): loss -0.67 vs -0.03, std_z
    0.0010 vs 0.0214, kNN 55.5 vs 92.1.
    Not asserted: that these 60 steps lift kNN above the network at initialization. On this
    synthetic data a random network (BN statistics measured) already has about 92%. On CIFAR-10
    (small backbone, paper recipe, this CPU) SimSiam fell from the random network's 35.7% to 33.2%
    in epoch 1 and passed it in epoch 3 (36.6%)."""
    flags = ["--epochs", "2", "--steps-per-epoch", "30", "--eval-every", "2", "--base-lr", "0.5"]
    end = short_run(tmp_path / "sg", *flags)[-1]
    end_bad = short_run(tmp_path / "nosg", *flags, "--no-stop-grad")[-1]
    assert end_bad["knn_top1"] < end["knn_top1"] - 10, (end_bad["knn_top1"], end["knn_top1"])
    assert end_bad["loss"] < end["loss"] - 0.3, (end_bad["loss"], end["loss"])
    assert end_bad["std_z"] < 0.25 * end["std_z"], (end_bad["std_z"], end["std_z"])
