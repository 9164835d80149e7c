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


def test_readme_results_section_is_generated_from_the_reports():
    """README's GPU section equals what benchmarks/results.py makes of benchmarks/results/."""
    run_script("benchmarks/results.py", "--check")


def test_results_reads_a_report_folder(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import results
    (tmp_path / "t.md").write_text(
        "Training throughput. Device: Some GPU; torch 9.9; 2030-01-02. Command: `x`\n\n"
        "| method | batch | arch | img/s | s/epoch (50k) | vs conventional |\n|---|---|---|---|---|---|\n"
        "| conventional (SimSiam, DataLoader, 8 workers) | 512 | resnet18 | 2000 | 25.0 | 1.00x |\n")
    (tmp_path / "compile.err").write_text("final True  epoch 2  loss 1  img_per_s 1.5e+04  epoch_s 1\n"
                                          "run folder: /tmp/x/byol-20300102-101010\n")
    (tmp_path / "log.txt").write_text("=== [0s] smoke simsiam\nepoch 1\nrc=0\n=== [9s] smoke swav\nrc=1\n")
    info = results.read_folder(str(tmp_path))
    assert info["device"] == ("Some GPU", "9.9", "2030-01-02")
    assert info["conventional"] == [("SimSiam, DataLoader, 8 workers", 2000.0)]
    assert info["compile"] == {"byol": [15000.0]} and info["eager"] == {}
    assert info["smoke"] == {"simsiam": 0, "swav": 1}
