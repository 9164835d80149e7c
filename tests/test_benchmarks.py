"""benchmarks/: each script runs end to end on a CPU with tiny settings and prints its table."""
import json
import math
import os
import re
import subprocess
import sys

ROOT = __file__.rsplit("/tests/", 1)[0]
TINY = ["--dataset", "synthetic", "--arch", "small", "--batch-size", "32"]


def run_script(*args):
    # One thread: where other processes share the cores, OpenMP's spin-waiting threads make these tiny
    # runs several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def table(text):
    """The rows of the markdown table in text, as dicts keyed by the header cells."""
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("|")]
    header, rows = lines[0], lines[2:]
    return [dict(zip(header, row)) for row in rows]


def test_throughput_prints_positive_images_per_second(tmp_path):
    out = run_script("benchmarks/throughput.py", *TINY, "--methods", "simsiam", "byol", "--steps-per-epoch", "2",
                     "--image-size", "16", "--workers", "2", "--out", str(tmp_path / "t.md"))
    assert "torch " in out and "`python benchmarks/throughput.py --dataset synthetic" in out
    rows = table(out)
    assert [r["method"] for r in rows] == ["simsiam", "byol", "conventional (SimSiam, DataLoader, 2 workers)"]
    for r in rows:
        ips = float(r["img/s"])
        assert math.isfinite(ips) and ips > 0
        assert r["batch"] == "32" and r["arch"] == "small"
        assert abs(float(r["s/epoch (50k)"]) * ips / 50_000 - 1) <= 0.5 / ips + 0.01  # img/s is rounded
    assert rows[-1]["vs conventional"] == "1.00x"
    assert (tmp_path / "t.md").read_text().strip() == out.strip()


def test_accuracy_prints_knn_and_linear_top1(tmp_path):
    out = run_script("benchmarks/accuracy.py", *TINY, "--methods", "simsiam", "--epochs", "1", "--probe-epochs", "1",
                     "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "a.md"),
                     "--", "--steps-per-epoch", "2", "--image-size", "16", "--proj-dim", "64", "--pred-hidden", "32")
    (row,) = table(out)
    assert (row["method"], row["arch"], row["epochs"], row["batch"]) == ("simsiam", "small", "1", "32")
    assert 0 <= float(row["kNN top-1"]) <= 100 and 0 <= float(row["linear top-1"]) <= 100
    assert re.fullmatch(r"\d+:\d\d:\d\d", row["wall time"])
    (run_dir,) = (tmp_path / "runs").iterdir()  # the flags after -- reached the method
    assert json.loads((run_dir / "args.json").read_text())["proj_dim"] == 64
    assert (tmp_path / "a.md").read_text().strip() == out.strip()
