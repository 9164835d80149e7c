"""benchmarks/: each script runs end to end on a CPU with tiny settings and prints its table."""
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch

ROOT = __file__.rsplit("/tests/", 1)[0]
TINY = ["--dataset", "synthetic", "--arch", "small", "--batch-size", "32"]


def run_script(*args):
    # One thread: where other processes share the cores, OpenMP's spin-waiting threads make these
    # tiny runs several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def table(text):
    """The rows of the markdown table in text, as dicts keyed by the header cells."""
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("|")]
    header, rows = lines[0], lines[2:]
    return [dict(zip(header, row)) for row in rows]


def test_throughput_prints_positive_images_per_second(tmp_path):
    out = run_script("benchmarks/throughput.py", *TINY, "--methods", "simsiam", "byol",
                     "--steps-per-epoch", "2", "--image-size", "16", "--workers", "2",
                     "--out", str(tmp_path / "t.md"))
    assert "torch " in out and "`python benchmarks/throughput.py --dataset synthetic" in out
    rows = table(out)
    assert [r["method"] for r in rows] == ["simsiam", "byol",
                                           "conventional (SimSiam, DataLoader, 2 workers)"]
    for r in rows:
        ips = float(r["img/s"])
        assert math.isfinite(ips) and ips > 0
        assert r["batch"] == "32" and r["arch"] == "small"
        # img/s is rounded
        assert abs(float(r["s/epoch (50k)"]) * ips / 50_000 - 1) <= 0.5 / ips + 0.01
    assert rows[-1]["vs conventional"] == "1.00x"
    assert (tmp_path / "t.md").read_text().strip() == out.strip()



def test_throughput_keeps_the_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    """--out is rewritten after each method: a run stopped in the conventional pipeline (a time
    limit) leaves the methods it measured, "-" where the ratio to the conventional one would be."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import throughput
    measured = {"simsiam": 1000.0, "byol": 500.0}

    def cut_short(args):
        assert len(table((tmp_path / "t.md").read_text())) == 2  # both methods written already
        raise KeyboardInterrupt

    monkeypatch.setattr(throughput, "method_throughput", lambda name, args, extra: measured[name])
    monkeypatch.setattr(throughput, "conventional_throughput", cut_short)
    monkeypatch.setattr(sys, "argv", ["benchmarks/throughput.py", "--methods", "simsiam", "byol",
                                      "--arch", "small", "--out", str(tmp_path / "t.md")])
    with pytest.raises(KeyboardInterrupt):
        throughput.main()
    rows = table((tmp_path / "t.md").read_text())
    assert [(r["method"], r["img/s"], r["vs conventional"]) for r in rows] == [
        ("simsiam", "1000", "-"), ("byol", "500", "-")]

def test_accuracy_prints_knn_and_linear_top1(tmp_path):
    out = run_script("benchmarks/accuracy.py", *TINY, "--methods", "simsiam", "--epochs", "1",
                     "--probe-epochs", "1", "--runs-dir", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "a.md"), "--", "--steps-per-epoch", "2",
                     "--image-size", "16", "--proj-dim", "64", "--pred-hidden", "32")
    (row,) = table(out)
    assert ((row["method"], row["arch"], row["epochs"], row["batch"])
            == ("simsiam", "small", "1", "32"))
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
        "| method | batch | arch | img/s | s/epoch (50k) | vs conventional |\n"
        "|---|---|---|---|---|---|\n"
        "| conventional (SimSiam, DataLoader, 8 workers) | 512 | resnet18 | 2000 | 25.0 | 1.00x |"
        "\n")
    (tmp_path / "compile.err").write_text(
        "final True  epoch 2  loss 1  img_per_s 1.5e+04  epoch_s 1\n"
        "run folder: /tmp/x/byol-20300102-101010\n")
    (tmp_path / "log.txt").write_text(
        "=== [0s] smoke simsiam\nepoch 1\nrc=0\n=== [9s] smoke swav\nrc=1\n")
    info = results.read_folder(str(tmp_path))
    assert info["device"] == ("Some GPU", "9.9", "2030-01-02")
    assert info["conventional"] == [("SimSiam, DataLoader, 8 workers", 2000.0)]
    assert info["compile"] == {"byol": [15000.0]} and info["eager"] == {}
    assert info["smoke"] == {"simsiam": 0, "swav": 1}


# ------------------------------------------------------------- benchmarks/gpu_check.py

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # gpu_check, results
GPU_CHECK_FILES = {"report.md", "results.json", "log.txt", "metrics.jsonl", "loader.md",
                   "loader.json"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `gpu_check.py --dry-run` for the tests below (the device check, rehearsed on CPU)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    t = time.time()
    run_script("benchmarks/gpu_check.py", "--dry-run", "--out", str(out))
    return out, time.time() - t


def numbers(obj):
    """Every number in a JSON value."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_gpu_check_dry_run_writes_every_part(dry_run):
    out, secs = dry_run
    assert secs < 180, f"the dry run took {secs:.0f} s"
    files = {p.name for p in out.iterdir()}
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert files == GPU_CHECK_FILES | ({"knn.png"} if has_mpl else set())
    assert len(files) < 8 and sum(p.stat().st_size for p in out.iterdir()) < 1_000_000
    R = json.loads((out / "results.json").read_text())
    assert R["dry_run"] and R["finished"] and R["stopped"] is None
    assert R["command"].startswith("python3 benchmarks/gpu_check.py --dry-run")
    assert all(math.isfinite(x) for x in numbers(R))
    methods = ("simsiam", "byol", "simclr", "swav", "directclr")
    for name in methods:
        for mode in ("eager", "compile"):
            run = R["fullsize"]["methods"][name][mode]
            assert run["ok"] and run["error"] is None and math.isfinite(run["loss"]), (name, mode)
            assert run["peak_mem_gib"] is None  # CPU: "-" in the report
            speed = R["throughput"]["methods"][name][mode]
            assert speed["img_per_s"] > 0 and speed["vs_dataloader"] > 0
            assert abs(speed["epoch_s"] * speed["img_per_s"] / 50_000 - 1) < 0.01
    assert R["throughput"]["conventional"]["img_per_s"] > 0
    P = R["profile"]
    assert P["status"] == "done" and P["device"] == "cpu" and P["steps"] == 2
    assert P["step_ms"] > 0 and P["ops_per_step"] > 0 and len(P["top"]) == 10
    S = R["stages"]
    assert S["status"] == "done" and list(S["rows"]) == ["views", "networks", "update"]
    for stage, modes in (("views", ["eager", "compiled"]), ("networks", ["eager", "compiled"]),
                         ("update", ["eager"])):
        assert all(S["rows"][stage][mode]["ms"] > 0 for mode in modes), stage
    assert S["rows"]["views"]["CUDA graphs"] == {"error": "CUDA only"}
    assert S["step_ms_eager"] == pytest.approx(sum(S["rows"][s]["eager"]["ms"] for s in S["rows"]))
    L = R["loader"]
    assert L["status"] == "done" and L["decode_img_per_s"] > 0
    assert L["gpu_img_per_s"] is None and L["workers_per_gpu"] is None  # no GPU figure assumed
    assert json.loads((out / "loader.json").read_text())["quick"]
    A = R["accuracy"]
    assert (A["status"], A["method"], A["epochs"], A["epochs_done"]) == ("done", "simsiam", 2, 2)
    assert 0 <= A["knn_top1"] <= 100 and 0 <= A["linear_top1"] <= 100
    assert [e for e, _ in A["curve"]] == [0, 2]  # kNN before training and after the last epoch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["final"] and records[-1]["knn_top1"] == A["knn_top1"]
    report = (out / "report.md").read_text()
    for head in ("| method | eager | loss | peak memory (GiB) | --compile |",
                 "| method | img/s eager | s/epoch | img/s --compile |",
                 "| operator | self CPU ms / step | calls / step |",
                 "| stage | eager | compiled | CUDA graphs | fastest |",
                 "| method | epochs | batch | kNN top-1 | linear top-1 | wall time |",
                 "## 5. Loader (benchmarks/loader.py)", "Tables in [loader.md](loader.md)."):
        assert head in report, head
    assert "torch " in report and "`python3 benchmarks/gpu_check.py --dry-run" in report
    assert "conventional (SimSiam, DataLoader, 2 workers)" in report
    assert ("![kNN top-1" in report) if has_mpl else ("matplotlib is missing" in report)
    log = (out / "log.txt").read_text()
    assert "=== profile" in log and "epoch 2" in log  # the runs' own lines are in the log too


def test_results_renders_a_gpu_check_folder(dry_run, tmp_path):
    import results
    out, _ = dry_run
    folder = tmp_path / "2030-01-02-cpu"
    shutil.copytree(out, folder)
    text = "\n".join(results.render_gpu_check(str(folder)))
    assert text.startswith("### ") and "(dry run on CPU)" in text
    tables = [table(block) for block in text.split("\n\n") if block.startswith("|")]
    full, speed, accuracy = tables
    assert [r["method"] for r in full] == ["simsiam", "byol", "simclr", "swav", "directclr"]
    assert all(r["eager"] == "ok" and r["--compile"] == "ok" for r in full)
    assert float(speed[0]["img/s eager"]) > 0 and speed[-1]["vs DataLoader"] == "1x"
    assert speed[-1]["method"].startswith("conventional")
    assert accuracy[0]["method"] == "simsiam" and accuracy[0]["epochs"] == "2 of 2"
    assert "Profile of one SimSiam step (eager): CPU:" in text
    assert "The step's stages timed alone (views, networks, update; eager, compiled, CUDA " \
           "graphs): compiling pays for " in text
    assert ("knn.png)" in text) == (folder / "knn.png").exists()
    assert results.section(str(tmp_path)).startswith("### ")  # the README section takes it


def test_gpu_check_summarizes_a_cuda_profile():
    """The CUDA branch (not reachable on CPU) on a hand-made Chrome trace: 2 steps of 10 ms,
    each 2 kernels (6 ms), 3 launch calls (1.5 ms) and a 3 ms wait for the GPU."""
    import gpu_check
    events = []
    for step in range(2):
        t = step * 10_000
        events += [
            {"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{3 + step}", "ts": t,
             "dur": 10_000},
            {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": t, "dur": 100},
            {"ph": "X", "cat": "kernel", "name": "conv_kernel", "ts": t + 1, "dur": 4_000},
            {"ph": "X", "cat": "kernel", "name": "relu_kernel", "ts": t + 2, "dur": 2_000},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t, "dur": 500},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t, "dur": 500},
            {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": t, "dur": 500},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": t,
             "dur": 3_000},
            {"ph": "s", "cat": "ac2g", "name": "flow", "ts": t}]
    P = gpu_check.summarize_profile(events, [], cuda=True)
    assert (P["steps"], P["step_ms"], P["kernel_ms"], P["launch_ms"]) == (2, 10.0, 6.0, 1.5)
    assert (P["host_ms"], P["sync_wait_ms"], P["launches_per_step"]) == (7.0, 3.0, 3.0)
    assert P["kernels_per_step"] == 2.0 and P["gpu_busy"] == 0.6 and P["ops_per_step"] == 1.0
    assert [(t["name"], t["ms_per_step"]) for t in P["top"]] == [("conv_kernel", 4.0),
                                                                  ("relu_kernel", 2.0)]
    assert P["verdict"].startswith("host-bound: the GPU idles 40%")


def test_gpu_check_chooses_a_mode_per_stage():
    """The stages' verdict on hand-made timings: the fastest mode per stage where it beats eager
    by 5% or more, else eager; the step as the sum of the chosen modes; the report's table."""
    import gpu_check

    def t(ms):
        return {"ms": ms, "first_s": 0.5}
    rows = {"views": {"eager": t(4.0), "compiled": t(2.0), "CUDA graphs": t(1.0)},
            "networks": {"eager": t(10.0), "compiled": t(9.8),
                         "CUDA graphs": {"error": "RuntimeError: no"}},
            "update": {"eager": t(1.0)}}
    S = gpu_check.summarize_stages(rows, batch_size=500)
    assert S["best"] == {"views": {"best": "CUDA graphs", "gain": 4.0},
                         "networks": {"best": "eager", "gain": 1.0},
                         "update": {"best": "eager", "gain": 1.0}}
    assert (S["step_ms_eager"], S["step_ms_best"]) == (15.0, 12.0)
    assert (S["epoch_s_eager"], S["epoch_s_best"]) == (1.5, 1.2)  # 100 steps of 500 images
    assert S["verdict"] == "compiling pays for views (CUDA graphs, 4.00x)"
    text = "\n".join(gpu_check.stages_report({"status": "done", "batch_size": 500, "warmup": 3,
                                              "timed": 10, "rows": rows, **S}))
    assert "| views | 4.00 (0.5 s) | 2.00 (0.5 s) | 1.00 (0.5 s) | CUDA graphs (4.00x) |" in text
    assert "| networks | 10.00 (0.5 s) | 9.80 (0.5 s) | RuntimeError: no | eager (1.00x) |" in text
    assert "15.0 ms eager (1.50 s per 50k-image epoch), 12.0 ms" in text
    rows["views"]["eager"]["ms"] = 1.0
    assert gpu_check.summarize_stages(rows, 500)["verdict"] == \
        "compiling pays for no stage (by 1.05x or more)"
    del rows["update"]["eager"]
    assert gpu_check.summarize_stages(rows, 500)["verdict"].startswith("no verdict")


def test_gpu_check_unpacks_and_decodes_a_zip_as_common_does(tmp_path):
    """--data: the zip is unpacked, its train/ test/ root found, and the parallel decoding gives
    common.load_data's tensors."""
    import gpu_check
    from PIL import Image
    import common
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            (tmp_path / "src" / "cifar" / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 36), (40 * c + i, 90, 9 * i)).save(
                    tmp_path / "src" / "cifar" / split / name / f"{i}.jpg")
    shutil.make_archive(str(tmp_path / "data"), "zip", tmp_path / "src")
    gpu_check.DATA_TMP = str(tmp_path / "unpacked")
    root = gpu_check.prepare_data(str(tmp_path / "data.zip"))
    assert root == str(tmp_path / "unpacked" / "data" / "cifar")
    assert gpu_check.prepare_data(str(tmp_path / "data.zip")) == root  # unpacked once
    args = types.SimpleNamespace(dataset="folder", data_dir=root, image_size=16, stream=False,
                                 workers=0, skip_bad_images=False)
    mine, theirs = gpu_check.read_folder_parallel(root, 16), common.load_data(args, "cpu")
    for field in ("ssl_x", "train_x", "train_y", "test_x", "test_y", "num_classes", "mean",
                  "std"):
        assert torch.equal(torch.as_tensor(getattr(mine, field)),
                           torch.as_tensor(getattr(theirs, field))), field
    assert gpu_check.cached_load_data(args, "cpu") is gpu_check.cached_load_data(args, "cpu")
    with pytest.raises(FileNotFoundError):
        gpu_check.prepare_data(str(tmp_path / "src" / "cifar" / "train"))


def test_gpu_check_records_a_crash_and_goes_on(tmp_path, monkeypatch):
    """A method whose run raises (an exception, or common.fail's SystemExit) gets its error's
    last line in results and report; the next method runs; a run that does not fit the budget
    is skipped with the reason."""
    import gpu_check
    import results
    ck = gpu_check.Check(gpu_check.parse(["--dry-run", "--out", str(tmp_path)]))
    errors = {"simsiam": RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"),
              "byol": SystemExit("error: the loss became nan in epoch 1")}

    def fake_train(name, flags):
        if name in errors:
            raise errors[name]
        return {"loss": 0.5, "img_per_s": 1000.0, "epoch_s": 0.1}, [{"epoch_s": 0.2}]

    monkeypatch.setattr(gpu_check, "train_method", fake_train)
    for name in ("simsiam", "byol", "simclr"):
        gpu_check.method_run(ck, name, "eager")
    ck.deadline = time.time() + 5  # 5 s left: a compiled run does not fit
    gpu_check.method_run(ck, "simclr", "compile")
    F = ck.R["fullsize"]["methods"]
    assert F["simsiam"]["eager"]["ok"] is False and F["simsiam"]["eager"]["error"] == (
        "RuntimeError: CUDA out of memory. ... Tried to allocate 2 GiB")
    assert F["byol"]["eager"]["error"] == "error: the loss became nan in epoch 1"
    assert F["simclr"]["eager"]["ok"] and ck.R["throughput"]["methods"]["simclr"]["eager"][
        "img_per_s"] == 1000.0
    assert F["simclr"]["compile"]["ok"] is None
    assert F["simclr"]["compile"]["error"].startswith("skipped: 5 s of the budget left")
    ck.save()
    report = (tmp_path / "report.md").read_text()
    assert "| simsiam | **failed**: RuntimeError: CUDA out of memory. ... Tried" in report
    assert "| byol | **failed**: error: the loss became nan in epoch 1 |" in report
    rows = table("\n".join(results.render_gpu_check(str(tmp_path))).split("\n\n")[2])
    assert rows[0]["eager"].startswith("failed: RuntimeError: CUDA out of memory.")
    assert rows[2]["eager"] == "ok" and rows[2]["--compile"].startswith("skipped: ")
