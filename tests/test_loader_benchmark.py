"""benchmarks/loader.py --quick: runs end to end on a CPU and writes its table and JSON."""
import json
import math
import os
import subprocess
import sys

import torch

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_loader_benchmark_quick_writes_positive_rates(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: no spin-waiting thread pool
    out = subprocess.run([sys.executable, "benchmarks/loader.py", "--quick", "--out",
                          str(tmp_path), "--gpu-images-per-s", "1000"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "loader.md").read_text()
    r = json.loads((tmp_path / "loader.json").read_text())
    assert text in out.stdout and "| streamed (ImageFiles) | 0 |" in text
    assert r["command"].startswith("python benchmarks/loader.py --quick")
    assert r["environment"]["cpu"] and r["environment"]["torch"] == torch.__version__
    assert r["images"]["n"] == 16 and r["images"]["mean_kb"] > 0
    rates = [v for p in ("pil-draft", "pil", "pil-resize", "tv-cpu") for v in r["decode"][p].values()]
    assert len(rates) == 12
    if not torch.cuda.is_available():
        assert all(v == "not measured: no GPU" for v in r["decode"]["tv-cuda"].values())
    rates += [row["img_per_s"] for row in r["loader"]] + [r["in_memory"]["img_per_s"]]
    assert all(math.isfinite(v) and v > 0 for v in rates)
    assert [row["workers"] for row in r["loader"]] == [0, 1]
    g = r["gpu_rate"]
    assert g == {"img_per_s": 1000, "source": "given: --gpu-images-per-s"}
    for row in r["workers_per_gpu"]:
        assert row["workers"] == math.ceil(g["img_per_s"] / row["img_per_s"]) >= 1
