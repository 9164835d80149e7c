"""SimCLR: nt_xent against a literal reading of Algorithm 1, the command line, and learning."""
import math

import torch

import simclr
from clirun import check_help, check_smoke


def nt_xent_literal(z1, z2, tau):
    """Algorithm 1 written out: views z_{2k-1} = z1[k], z_{2k} = z2[k] (0-based: 2k, 2k+1),
    l(i, j) of Eq. 1 by a double loop, L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    N = len(z1)
    z = [v for k in range(N) for v in (z1[k].double(), z2[k].double())]
    s = [[(zi @ zj / (zi.norm() * zj.norm())).item() for zj in z] for zi in z]

    def l(i, j):
        denominator = sum(math.exp(s[i][k] / tau) for k in range(2 * N) if k != i)
        return -math.log(math.exp(s[i][j] / tau) / denominator)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(N)) / (2 * N)


def test_nt_xent_equals_the_literal_double_loop():
    g = torch.Generator().manual_seed(0)
    for N in (1, 2, 5, 17):  # N = 1: a short last batch of one image, no negatives, L = 0
        for tau in (0.1, 0.5, 1.0):
            z1, z2 = torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g)
            assert abs(simclr.nt_xent(z1, z2, tau).item() - nt_xent_literal(z1, z2, tau)) < 1e-5


def test_nt_xent_is_invariant_to_permuting_the_batch_and_swapping_views():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    perm = torch.randperm(32, generator=g)
    L = simclr.nt_xent(z1, z2, 0.5)
    torch.testing.assert_close(simclr.nt_xent(z1[perm], z2[perm], 0.5), L)
    torch.testing.assert_close(simclr.nt_xent(z2, z1, 0.5), L)


def test_gradient_reaches_both_views():
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    simclr.nt_xent(z1, z2, 0.5).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_help_lists_the_paper_hyperparameters():
    check_help("simclr", "--temperature", "--base-lr", "--warmup-epochs", "--jitter-strength", "App. B.9")


def test_smoke_runs_and_ends_with_a_knn_accuracy(tmp_path):
    check_smoke("simclr", tmp_path)


def test_projection_head_is_the_papers_mlp():
    """Sec. 2.1: z = W2 relu(W1 h), one hidden layer as wide as h (Sec. 2.3), 128-d z."""
    g = simclr.projection_head(512, 128)
    assert [type(m).__name__ for m in g] == ["Linear", "ReLU", "Linear"]
    assert (g[0].in_features, g[0].out_features, g[2].out_features) == (512, 512, 128)
