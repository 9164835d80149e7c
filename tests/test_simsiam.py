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
    """40 steps of SimSiam on the synthetic data at 24 px with the short-run settings of
    test_training.LIFT; returns the per-epoch metrics records."""
    import json
    args = parse_args(simsiam.Args, ["--dataset", "synthetic", "--arch", "small", "--image-size", "24",
                                     "--batch-size", "128", "--epochs", "2", "--steps-per-epoch", "20",
                                     "--eval-every", "2", "--base-lr", "1.0", "--proj-dim", "512",
                                     "--pred-hidden", "128", "--probe-epochs", "0", "--log-every", "1000",
                                     "--out-dir", str(tmp_path), *flags])
    simsiam.train(args)
    run_dir = next(tmp_path.iterdir())
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"final"' not in line]


def test_no_stop_grad_collapses(tmp_path):
    """The paper's Fig. 2 in small: the same run with and without stop-gradient. Without it the
    loss falls faster, the std of the l2-normalized output z falls toward 0 and kNN drops. Measured
    on this 2-core CPU: loss -0.84 vs -0.67, std_z 0.0009 vs 0.042, kNN 49.2 vs 68.2. (That the
    default run goes on to lift kNN above the network at initialization: test_training.py.)"""
    records = short_run(tmp_path / "sg")
    init, end = records[0], records[-1]
    end_bad = short_run(tmp_path / "nosg", "--no-stop-grad")[-1]
    print("loss", end["loss"], end_bad["loss"], "std_z", end["std_z"], end_bad["std_z"],
          "kNN", init["knn_top1"], end["knn_top1"], end_bad["knn_top1"])
    assert end_bad["loss"] < end["loss"] - 0.1, (end_bad["loss"], end["loss"])  # epoch means
    assert end_bad["std_z"] < 0.1 * end["std_z"], (end_bad["std_z"], end["std_z"])
    assert end["std_z"] > 0.5 / 512 ** 0.5  # the default stays spread (1/sqrt(d) when isotropic)
    assert end_bad["knn_top1"] < end["knn_top1"] - 10, (end_bad["knn_top1"], end["knn_top1"])
