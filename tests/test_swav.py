"""SwAV: sinkhorn and swav_loss against literal readings of Algorithm 1, the prototypes, the
queue, the command line, and learning."""
import json
import math

import torch
import torch.nn.functional as F

import swav
from clirun import check_help, check_smoke
from common import parse_args


def sinkhorn_literal(scores, eps, niters):
    """Alg. 1 as written, in float64: Q = exp(scores / eps)^T, total 1, then niters rounds of
    rows -> 1/K and columns -> 1/B, one row and one column at a time; columns scaled to sum 1."""
    Q = torch.exp(scores.double() / eps).T
    Q = Q / Q.sum()
    K, B = Q.shape
    for _ in range(niters):
        for k in range(K):
            Q[k] = Q[k] / Q[k].sum() / K
        for b in range(B):
            Q[:, b] = Q[:, b] / Q[:, b].sum() / B
    return (Q * B).T


def swav_loss_literal(scores, n_global, temperature, eps, niters):
    """The multi-crop loss with one loop over code crops i, one over predicting crops v != i,
    one over samples: mean of -sum_k q_i[b, k] log softmax(scores_v[b] / temperature)_k."""
    total, pairs = 0.0, 0
    for i in range(n_global):
        q = sinkhorn_literal(scores[i], eps, niters)
        for v in range(len(scores)):
            if v == i:
                continue
            for b in range(len(q)):
                p = torch.softmax(scores[v][b].double() / temperature, dim=0)
                total -= (q[b] * p.log()).sum().item() / len(q)
            pairs += 1
    return total / pairs


def test_sinkhorn_equals_the_literal_loop():
    g = torch.Generator().manual_seed(0)
    for B, K, eps, niters in [(1, 3, 0.05, 3), (8, 5, 0.05, 3), (32, 100, 0.05, 3), (16, 40, 0.5, 1), (64, 30, 0.03, 10)]:
        scores = F.normalize(torch.randn(B, 16, generator=g), dim=1) @ F.normalize(torch.randn(K, 16, generator=g), dim=1).T
        torch.testing.assert_close(swav.sinkhorn(scores, eps, niters).double(), sinkhorn_literal(scores, eps, niters),
                                   rtol=1e-4, atol=1e-6)


def test_sinkhorn_codes_are_distributions_with_uniform_prototype_marginals():
    g = torch.Generator().manual_seed(1)
    B, K, D = 256, 64, 128  # scores as in training: unit features against unit prototypes
    scores = F.normalize(torch.randn(B, D, generator=g), dim=1) @ F.normalize(torch.randn(K, D, generator=g), dim=1).T
    scores.requires_grad_(True)
    Q = swav.sinkhorn(scores, 0.05, 3)
    assert Q.shape == (B, K) and Q.dtype == torch.float32 and not Q.requires_grad  # codes: no gradient
    assert (Q >= 0).all()
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(B))  # each row a distribution
    # the batch is split (near) equally among the prototypes: each column sums to about B/K ...
    share = lambda Q: (Q.sum(dim=0) / (B / K) - 1).abs().max().item()  # noqa: E731
    assert share(torch.softmax(scores / 0.05, dim=1)) > 0.3  # (a plain softmax is far from it)
    assert share(Q) < 0.05
    assert share(swav.sinkhorn(scores, 0.05, 100)) < 1e-3  # ... and exactly in the limit


def test_sinkhorn_is_finite_for_large_scores_and_small_eps():
    g = torch.Generator().manual_seed(2)
    for scale, eps in [(1.0, 1e-3), (100.0, 0.05), (1e4, 0.01)]:
        scores = torch.randn(64, 30, generator=g) * scale
        Q = swav.sinkhorn(scores, eps, 3)
        assert torch.isfinite(Q).all() and (Q >= 0).all(), (scale, eps)
        torch.testing.assert_close(Q.sum(dim=1), torch.ones(64))
    with torch.autocast("cpu", torch.bfloat16):  # float32 even under autocast
        Q = swav.sinkhorn(torch.randn(16, 8).bfloat16(), 0.05, 3)
    assert Q.dtype == torch.float32 and torch.isfinite(Q).all()


def test_swav_loss_equals_the_literal_double_loop():
    g = torch.Generator().manual_seed(3)
    for n_global, n_crops, B, K in [(2, 2, 4, 6), (2, 6, 8, 10), (1, 3, 5, 7), (3, 5, 6, 9)]:
        scores = [torch.randn(B, K, generator=g) * 0.5 for _ in range(n_crops)]
        ours = swav.swav_loss(scores, n_global, 0.1, 0.05, 3).item()
        assert abs(ours - swav_loss_literal(scores, n_global, 0.1, 0.05, 3)) < 1e-4 * max(1, abs(ours))


def test_two_crops_give_the_symmetric_swapped_prediction():
    """Eq. 1: L(z_t, z_s) = l(z_t, q_s) + l(z_s, q_t); swav_loss is its mean over the 2 terms."""
    g = torch.Generator().manual_seed(4)
    s_t, s_s = torch.randn(16, 20, generator=g), torch.randn(16, 20, generator=g)
    q_t, q_s = swav.sinkhorn(s_t, 0.05, 3), swav.sinkhorn(s_s, 0.05, 3)
    l = lambda s, q: F.cross_entropy(s / 0.1, q)  # noqa: E731  Eq. 2 with soft targets q, mean over the batch
    expected = (l(s_t, q_s) + l(s_s, q_t)) / 2
    torch.testing.assert_close(swav.swav_loss([s_t, s_s], 2, 0.1, 0.05, 3), expected)
    torch.testing.assert_close(swav.swav_loss([s_s, s_t], 2, 0.1, 0.05, 3), expected)
    # uniform scores: uniform codes and predictions, the loss is ln K
    assert abs(swav.swav_loss([torch.zeros(16, 20)] * 2, 2).item() - math.log(20)) < 1e-5


def test_no_gradient_flows_through_the_codes():
    s_code, s_pred = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10, requires_grad=True)
    swav.swav_loss([s_code, s_pred], 1).backward()  # only crop 0 gives codes, only crop 1 predicts
    assert s_code.grad is None and s_pred.grad.abs().sum() > 0


def test_queue_is_first_in_first_out_and_joins_sinkhorn():
    queue = swav.Queue(n_global=2, length=6, dim=3)
    for t in range(5):  # batches of 2 features per global crop, valued by their step
        queue.push(torch.full((2, 2, 3), float(t)))
    assert queue.z.shape == (2, 6, 3)
    assert queue.z[0, :, 0].tolist() == [4, 4, 3, 3, 2, 2]  # newest first, steps 0 and 1 dropped
    restored = swav.Queue(2, 6, 3)  # loads the queue of this rank (one process: the only one)
    restored.load_state_dict(queue.state_dict())  # saved in checkpoints with the rest of the state
    assert torch.equal(restored.z, queue.z)
    # with the queue: Sinkhorn over batch + queue, only the batch's rows of Q are kept
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(4, 6, generator=g) for _ in range(3)]
    queued = [torch.randn(12, 6, generator=g) for _ in range(2)]
    L = swav.swav_loss(scores, 2, 0.1, 0.05, 3, queue_scores=queued)
    expected = 0
    for i in range(2):
        q = sinkhorn_literal(torch.cat([scores[i], queued[i]]), 0.05, 3)[:4].float()
        expected += sum(F.cross_entropy(scores[v] / 0.1, q) for v in range(3) if v != i) / 4
    torch.testing.assert_close(L, expected)
    assert (L - swav.swav_loss(scores, 2, 0.1, 0.05, 3)).abs() > 1e-3


def tiny_run(out, *flags):
    """One step per epoch on the synthetic data with a tiny head and large steps (mechanics only);
    returns the per-epoch metrics records, the checkpoint and the run folder."""
    args = parse_args(swav.Args, ["--dataset", "synthetic", "--arch", "small", "--batch-size", "16",
                                  "--steps-per-epoch", "1", "--eval-every", "0", "--probe-epochs", "0",
                                  "--hidden-dim", "64", "--feat-dim", "16", "--n-prototypes", "20",
                                  "--n-small", "1", "--jitter-p", "0", "--gray-p", "0", "--warmup-epochs", "0",
                                  "--base-lr", "4", "--lars-eta", "0.02", "--log-every", "1000",
                                  "--out-dir", str(out), *flags])
    try:
        swav.train(args)
    except SystemExit as e:  # --stop-epoch
        assert e.code == 0
    run_dir = next(out.iterdir())
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"final"' not in line]
    return records, torch.load(run_dir / "checkpoint.pt", weights_only=False), run_dir


def test_prototypes_frozen_then_updated_and_always_unit_norm(tmp_path):
    _, first, run_dir = tiny_run(tmp_path, "--epochs", "3", "--freeze-prototypes-epochs", "2", "--stop-epoch", "1")
    _, second, _ = tiny_run(tmp_path, "--stop-epoch", "2", "--resume", str(run_dir))
    _, third, _ = tiny_run(tmp_path, "--resume", str(run_dir))
    C1, C2, C3 = (s["C"]["weight"] for s in (first, second, third))
    torch.testing.assert_close(C2, C1, atol=1e-6, rtol=0)  # epoch 2: frozen
    assert (C3 - C2).abs().max() > 1e-4  # epoch 3: updated
    f1, f2 = first["f"]["0.conv1.weight"], second["f"]["0.conv1.weight"]
    assert (f2 - f1).abs().max() > 1e-4  # the network trained meanwhile
    for C in (C1, C2, C3):
        torch.testing.assert_close(C.norm(dim=1), torch.ones(len(C)))
    (queue,) = third["queue"]["_extra_state"]  # one process: one queue, saved with the run
    assert third["epoch"] == 3 and queue.shape == (2, 3 * 16, 16)  # grows with each batch


def test_queue_changes_the_codes_only_once_active(tmp_path):
    flags = ["--epochs", "2", "--freeze-prototypes-epochs", "0"]
    without, _, _ = tiny_run(tmp_path / "none", *flags, "--queue-length", "0")
    late, state, _ = tiny_run(tmp_path / "late", *flags, "--queue-length", "24", "--queue-start-epoch", "1")
    assert late[0]["loss"] == without[0]["loss"]  # epoch 1: queue filling, not used
    assert late[1]["loss"] != without[1]["loss"]  # epoch 2: the queue joins Sinkhorn
    assert state["queue"]["_extra_state"][0].shape == (2, 24, 16)  # 2 batches of 16, cut to 24


def test_help_lists_the_paper_hyperparameters():
    check_help("swav", "--eps", "--sinkhorn-iters", "--n-prototypes", "--freeze-prototypes-epochs", "--queue-length",
               "--queue-start-epoch", "--n-small", "--small-scale", "CIFAR recipe")


def test_smoke_runs_and_ends_with_a_knn_accuracy(tmp_path):
    check_smoke("swav", tmp_path)
