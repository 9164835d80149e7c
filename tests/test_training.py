"""Every method file as a training run: exact resume after a stop, a Ctrl-C mid-epoch and a
SIGKILL; --compile trains like eager; a diverging loss stops cleanly; a short run lifts kNN above
the network at initialization (SimSiam, SimCLR, SwAV, DirectCLR) or keeps class information
without collapse (BYOL)."""
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from plumbing import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["simsiam", "byol", "simclr", "swav", "directclr"]
# smoke-sized runs: synthetic data, small backbone, narrow heads; 2 epochs of 2 steps
TINY = ["--dataset", "synthetic", "--arch", "small", "--batch-size", "16", "--epochs", "2",
        "--steps-per-epoch", "2", "--eval-every", "0", "--probe-epochs", "0", "--log-every", "1000"]
NARROW = {"simsiam": ["--proj-dim", "64", "--pred-hidden", "16"],
          "byol": ["--proj-hidden", "64", "--pred-hidden", "64", "--proj-dim", "32"],
          "simclr": ["--proj-dim", "32"],
          "swav": ["--hidden-dim", "64", "--feat-dim", "16", "--n-prototypes", "20", "--n-small", "1",
                   "--queue-length", "32", "--queue-start-epoch", "1", "--freeze-prototypes-epochs", "1"],
          "directclr": []}


def train(method, out, *flags):
    """Run method in this process; returns its run folder (also after --stop-epoch)."""
    module = importlib.import_module(method)
    args = parse_args(module.Args, [*TINY, *NARROW[method], "--out-dir", str(out), *flags])
    try:
        module.train(args)
    except SystemExit as stop:
        assert stop.code == 0, stop.code
    return next(p for p in out.iterdir()) if not args.resume else args.resume


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)


def assert_same_state(a, b, path="checkpoint"):
    """Every tensor of two checkpoints equal (timings, args and metrics aside)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in ("args", "metrics"):
                assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("method", METHODS)
def test_stop_and_resume_follows_the_uninterrupted_run(method, tmp_path):
    straight = checkpoint(train(method, tmp_path / "straight"))
    run_dir = train(method, tmp_path / "stopped", "--stop-epoch", "1")
    assert checkpoint(run_dir)["epoch"] == 1
    resumed = checkpoint(train(method, tmp_path / "stopped", "--resume", str(run_dir)))
    assert resumed["epoch"] == straight["epoch"] == 2
    assert_same_state(straight, resumed)


def test_compile_changes_speed_not_the_algorithm(tmp_path):
    """--compile (torch.compile of the networks; inductor builds C++ kernels on CPU) ends the tiny
    SimSiam run with the weights of the eager run, up to float rounding."""
    eager = checkpoint(train("simsiam", tmp_path / "eager"))
    compiled = checkpoint(train("simsiam", tmp_path / "compiled", "--compile"))
    for net in ("f", "h"):
        assert eager[net].keys() == compiled[net].keys()  # no wrapper prefix in the checkpoint
        for name, t in eager[net].items():
            torch.testing.assert_close(compiled[net][name], t, rtol=1e-3, atol=1e-3, msg=f"{net}.{name}")


def cli(*args):
    return [sys.executable, *args]


def test_ctrl_c_saves_mid_epoch_and_resume_is_exact(tmp_path):
    flags = [*TINY, *NARROW["simclr"], "--steps-per-epoch", "12", "--log-every", "1"]
    straight = checkpoint(train("simclr", tmp_path / "straight", "--steps-per-epoch", "12"))
    proc = subprocess.Popen(cli("simclr.py", *flags, "--out-dir", str(tmp_path / "run")), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 2 step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in out and "Traceback" not in err
    run_dir = next((tmp_path / "run").iterdir())
    stopped = checkpoint(run_dir)
    assert stopped["epoch"] == 1 and 3 <= stopped["step"] < 12  # epoch 2 (index 1), mid-way
    done = subprocess.run(cli("simclr.py", "--resume", str(run_dir)), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_state(straight, checkpoint(run_dir))


def test_sigkill_loses_at_most_the_current_epoch(tmp_path):
    flags = [*TINY, *NARROW["simsiam"], "--epochs", "3", "--steps-per-epoch", "6"]
    straight = checkpoint(train("simsiam", tmp_path / "straight", "--epochs", "3", "--steps-per-epoch", "6"))
    proc = subprocess.Popen(cli("simsiam.py", *flags, "--out-dir", str(tmp_path / "run")), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "run").glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = next((tmp_path / "run").iterdir())
    assert checkpoint(run_dir)["epoch"] in (1, 2)  # the last epoch end before the kill
    done = subprocess.run(cli("simsiam.py", "--resume", str(run_dir)), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_state(straight, checkpoint(run_dir))


def test_a_diverging_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = train("simsiam", tmp_path, "--stop-epoch", "1")
    good = checkpoint(run_dir)
    done = subprocess.run(cli("simsiam.py", "--resume", str(run_dir), "--base-lr", "1e30"), cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line
    assert "loss became nan" in done.stderr and "last good checkpoint" in done.stderr
    assert_same_state(good, checkpoint(run_dir))  # untouched, and it loads


# Short-run settings per method: the file's algorithm, with settings that let it learn in 100-odd
# steps instead of hundreds of epochs (a larger step size, no or a short warm-up, narrower heads),
# and the number of epochs of 20 steps. SwAV: 2 crops (the published CIFAR-10 recipe), 100
# prototypes, no queue, and the remedies its authors give for a loss stuck at ln K: eps 0.03 and a
# milder augmentation (SimSiam's colour jitter, crops of at least 30% of the image). With eps 0.05
# it lifts less (83.0 -> 87.0); in 6 epochs it ends 91.5, too near the bar, so it gets 8.
LIFT = {"simsiam": (6, ["--base-lr", "1.0", "--proj-dim", "512", "--pred-hidden", "128"]),
        "simclr": (6, ["--warmup-epochs", "1", "--temperature", "0.2", "--proj-dim", "128"]),
        "swav": (8, ["--n-small", "0", "--n-prototypes", "100", "--feat-dim", "128", "--hidden-dim", "512",
                     "--queue-length", "0", "--warmup-epochs", "1", "--base-lr", "1.2", "--eps", "0.03",
                     "--jitter", "0.4", "0.4", "0.4", "0.1", "--global-scale", "0.3", "1"]),
        "directclr": (6, ["--warmup-epochs", "0"])}


@pytest.mark.parametrize("method", LIFT)
def test_short_run_lifts_knn_above_the_network_at_initialization(method, tmp_path):
    """A short run on the synthetic gratings (common.synthetic_dataset: class = orientation, a
    random network reaches 74-83% kNN) ends clearly above the same network at initialization,
    evaluated the same way (kNN on backbone features; for the network at initialization with BN
    statistics measured on training images), and without collapse. Batch 128, 24 px, 120 steps
    (160 for SwAV). Measured on this 2-core CPU, seed 0 (this test), 120 steps: SimSiam 83.0 ->
    96.6, SimCLR 98.8, DirectCLR 99.4; 160 steps, seed 0 / seed 1: SimSiam 83.0 -> 99.4 / 74.0 ->
    98.0, SimCLR 99.8 / 99.9, SwAV 96.5 / 96.0 (loss 3.16 / 3.24, ln K = 4.61), DirectCLR 99.9.
    BYOL does not climb this far this soon: see the next test."""
    epochs, flags = LIFT[method]
    run_dir = train(method, tmp_path, "--image-size", "24", "--batch-size", "128", "--epochs", str(epochs),
                    "--steps-per-epoch", "20", "--eval-every", str(epochs), *flags)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    init, end = records[0], records[-1]
    print(method, "kNN", init["knn_top1"], "->", end["knn_top1"], "rank_r", round(end["rank_r"], 1))
    assert init["epoch"] == 0 and end["epoch"] == epochs
    assert end["knn_top1"] > init["knn_top1"] + 8, (init["knn_top1"], end["knn_top1"])
    # not collapsed (std 0, effective rank 1); 5 classes need few dimensions, so a rank of 3-5 is healthy
    assert end["std_z"] > 0.2 / math.sqrt(len(end["spectrum_z"])) and end["rank_z"] > 2
    if method == "swav":  # the loss has left ln K, its value when every code is uniform (collapse)
        assert end["loss"] < math.log(checkpoint(run_dir)["args"]["n_prototypes"]) - 0.5, end["loss"]


@pytest.mark.parametrize("method", ["byol"])
def test_short_run_keeps_class_information_without_collapse(method, tmp_path):
    """20 steps on the synthetic data: the outputs stay spread (std of l2-normalized z well above
    0, effective rank well above 1) and kNN stays far above chance (20%). Not asserted: a rise over
    the network at initialization. Like the others, BYOL first loses kNN accuracy while the rank of
    its features falls; it climbs back, but not 8 points above the random network within a CPU
    test's budget. Measured on this 2-core CPU, 160 steps at batch 128, 24 px, seed 0 (init 83.0):
    83.0 -> 66.8 with the defaults (warm-up 1 epoch of 8); 83-89 with a target that follows fast
    (tau_base 0.5, base lr 2, heads 512 wide, crops of at least 30%, weight decay 5e-4), 89.2
    after 320 steps; seeds 1 and 2 of the same: 74.0 -> 85.2, 76.3 -> 72.6."""
    run_dir = train(method, tmp_path, "--batch-size", "64", "--steps-per-epoch", "10", "--eval-every", "2",
                    "--warmup-epochs", "0")
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    init, end = records[0], records[-1]
    dim = len(end["spectrum_z"])
    print(method, {k: round(end[k], 4) for k in ("knn_top1", "loss", "std_z", "rank_z")},
          "kNN at init", init["knn_top1"])
    assert math.isfinite(end["loss"]) and end["knn_top1"] > 40
    assert end["std_z"] > 0.2 / math.sqrt(dim) and end["rank_z"] > 10  # collapsed: 0 and 1
