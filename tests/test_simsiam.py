"""SimSiam: the loss D against its formula, the stop-gradient, the command line (its learning
and its collapse without stop-gradient: test_training.py)."""

import torch

import simsiam
from clirun import check_help, check_smoke


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
