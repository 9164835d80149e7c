"""Several processes (torchrun, gloo on CPU) against one: the losses that gather embeddings across
ranks, distributed Sinkhorn, and every method file under `torchrun --nproc_per_node=2 --smoke`."""
import os
import subprocess
import sys

import pytest
import torch

import directclr
import simclr
import swav
from dist_worker import fixed_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = 2


def torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W),
                           "--standalone", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    done = torchrun("tests/dist_worker.py", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(W)]


@pytest.mark.parametrize("name", ["nt_xent", "directclr"])
def test_loss_and_gradients_over_two_ranks_equal_one_process(ranks, name):
    """Each rank: loss over its B/2 anchors against the gathered global batch. Their mean is the
    loss of one process on all B; the gradient a rank gets for its own embeddings, divided by W
    (DistributedDataParallel averages gradients over ranks), is the one-process gradient."""
    z1, z2, _ = fixed_batch()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = simclr.nt_xent(a, b, 0.5) if name == "nt_xent" else directclr.directclr_loss(a, b, 10, 0.1)
    loss.backward()
    torch.testing.assert_close(sum(r[name][0] for r in ranks) / W, loss.detach())
    n = len(z1) // W
    for r, result in enumerate(ranks):
        torch.testing.assert_close(result[name][1] / W, a.grad[r * n:(r + 1) * n])
        torch.testing.assert_close(result[name][2] / W, b.grad[r * n:(r + 1) * n])


def test_distributed_sinkhorn_equals_one_process_on_the_concatenated_scores(ranks):
    _, _, scores = fixed_batch()
    torch.testing.assert_close(torch.cat([r["sinkhorn"] for r in ranks]), swav.sinkhorn(scores, 0.05, 3))


@pytest.mark.parametrize("method", ["byol", "simclr", "swav"])
def test_torchrun_two_processes_smoke(method, tmp_path):
    """The full --smoke for SimCLR (evaluation on rank 0, broadcast to rank 1); training only for
    the others, to keep the suite short. One method per distributed mechanism: SimCLR gathers
    embeddings with gradient, BYOL keeps its target outside DDP, SwAV runs Sinkhorn over all
    ranks with a queue per rank. SimSiam (plain DDP) and DirectCLR (SimCLR's gather, its loss
    checked over two ranks above) add nothing new and took 25 s."""
    short = [] if method == "simclr" else ["--eval-every", "0", "--probe-epochs", "0"]
    done = torchrun(f"{method}.py", "--smoke", *short, "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"parameters identical on all {W} ranks" in done.stdout
    if method == "simclr":
        assert "knn_top1" in done.stdout and "linear_top1" in done.stdout
