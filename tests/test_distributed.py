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


@pytest.mark.parametrize("method", ["byol", "simclr"])
def test_torchrun_two_processes_smoke(method, tmp_path):
    """The full --smoke for SimCLR (evaluation on rank 0, broadcast to rank 1); training only for
    the others, to keep the suite short. One method per distributed mechanism: SimCLR gathers
    embeddings with gradient, BYOL keeps its target outside DDP (SwAV, which runs Sinkhorn over
    all ranks with a queue per rank: the resume test below). SimSiam (plain DDP) and DirectCLR
    (SimCLR's gather, its loss checked over two ranks above) add nothing new."""
    short = [] if method == "simclr" else ["--epochs", "1", "--eval-every", "0",
                                           "--probe-epochs", "0"]
    done = torchrun(f"{method}.py", "--smoke", *short, "--out-dir", str(tmp_path))
    # at each epoch end save_checkpoint() compares the ranks' networks and stops the run if
    # they differ (DDP and identical EMA updates must keep them equal)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == (2 if method == "simclr" else 1) and len(ckpt["rng"]) == W
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])  # own augmentations
    if method == "simclr":
        assert "knn_top1" in done.stdout and "linear_top1" in done.stdout


def test_swav_queue_is_split_over_the_ranks_and_resumes_exactly_on_each(tmp_path):
    """Two processes: each keeps queue_length / 2 features per global crop; the checkpoint holds
    both ranks' queues, and a run stopped after epoch 1 and resumed ends with the networks,
    optimizer and both queues of the uninterrupted run."""
    flags = ["--smoke", "--eval-every", "0", "--probe-epochs", "0", "--epochs", "2",
             "--steps-per-epoch", "2", "--queue-length", "96", "--queue-start-epoch", "1"]
    done = torchrun("swav.py", *flags, "--out-dir", str(tmp_path / "straight"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun("swav.py", *flags, "--stop-epoch", "1", "--out-dir", str(tmp_path / "stopped"))
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "stopped").iterdir()
    done = torchrun("swav.py", "--resume", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    (straight_dir,) = (tmp_path / "straight").iterdir()
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight_dir, run_dir))
    queues = a["queue"]["_extra_state"]
    assert len(queues) == W and all(q.shape[:2] == (2, 48) for q in queues)  # 96 / 2 each
    assert not torch.equal(queues[0], queues[1])  # each rank queues its own share of the batch
    for name in ("f", "C"):
        for key, t in a[name].items():
            assert torch.equal(t, b[name][key]), f"{name}.{key}"
    for qa, qb in zip(queues, b["queue"]["_extra_state"], strict=True):
        assert torch.equal(qa, qb)
    assert a["rng"][1]["cpu"].equal(b["rng"][1]["cpu"])  # rank 1's random state too
