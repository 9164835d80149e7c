"""BYOL: the loss against its formula, the stop-gradient into the target, the target update and
its schedule, the command line, and learning."""
import copy

import torch

import byol
from clirun import check_help, check_smoke


def test_regression_loss_equals_the_squared_distance_of_normalized_vectors():
    g = torch.Generator().manual_seed(0)
    for n, d in [(1, 3), (7, 16), (32, 256)]:
        q, z = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        literal = 0.0
        for i in range(n):  # Eq. 2: || q / ||q|| - z' / ||z'|| ||^2, averaged over the batch
            literal += (q[i] / q[i].norm() - z[i] / z[i].norm()).pow(2).sum().item() / n
        assert abs(byol.regression_loss(q, z).item() - literal) < 1e-5
    assert abs(byol.regression_loss(q, 3 * q).item()) < 1e-5  # scale-free: 0 for aligned vectors
    assert abs(byol.regression_loss(q, -q).item() - 4) < 1e-5  # 4 for opposite ones


def test_no_gradient_reaches_the_target():
    torch.manual_seed(0)
    online, q = byol.mlp(8, 16, 4), byol.mlp(4, 16, 4)
    target = copy.deepcopy(online)  # even with requires_grad left on, the loss must not reach it
    x = torch.randn(10, 8)
    byol.regression_loss(q(online(x)), target(x)).backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in [*online.parameters(), *q.parameters()])


def test_ema_update_keeps_the_target_at_tau_1_and_copies_the_online_weights_at_tau_0():
    torch.manual_seed(0)
    online, target = byol.mlp(8, 16, 4), byol.mlp(8, 16, 4)
    online(torch.randn(10, 8))  # give the online BN running statistics of its own
    before = copy.deepcopy(target.state_dict())
    xi_before = [p.detach().clone() for p in target.parameters()]
    byol.ema_update(target, online, 1.0)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, before[name])
    byol.ema_update(target, online, 0.75)
    for xi, xi0, theta in zip(target.parameters(), xi_before, online.parameters()):
        torch.testing.assert_close(xi, 0.75 * xi0 + 0.25 * theta)
    byol.ema_update(target, online, 0.0)
    for xi, theta in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(xi, theta)
    # BN running statistics are not averaged: the target keeps those of its own forward passes
    torch.testing.assert_close(target[1].running_mean, before["1.running_mean"])
    assert not torch.equal(online[1].running_mean, target[1].running_mean)


def test_tau_schedule_ramps_from_tau_base_to_1():
    K = 1000
    taus = [byol.tau_schedule(k, K, 0.99) for k in range(K + 1)]
    assert abs(taus[0] - 0.99) < 1e-12 and abs(taus[K] - 1.0) < 1e-12
    assert abs(taus[K // 2] - 0.995) < 1e-12  # cosine: half-way at half the steps
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_defaults_are_the_cifar_recipe_with_asymmetric_views():
    args = byol.Args()
    assert (args.base_lr, args.weight_decay, args.batch_size, args.tau_base) == (1.0, 1e-5, 256, 0.99)
    assert args.blur_p == (0.0, 0.0) and args.solarize_p == (0.0, 0.2)  # T: never solarized, T': 20%


def test_help_lists_the_paper_hyperparameters():
    check_help("byol", "--tau-base", "--base-lr", "--warmup-epochs", "--solarize-p", "--blur-p", "Sec. 3.3")


def test_smoke_runs_and_checkpoints_the_target(tmp_path):
    _, run_dir = check_smoke("byol", tmp_path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert {"online", "q", "target", "optimizer", "rng", "epoch"} <= set(state)
