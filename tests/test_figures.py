"""benchmarks/figures.py: the --tiny run draws all figures and the summary, redraws from its runs,
and without matplotlib stops with a one-line error before any training."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_NAMES = ("simsiam", "simsiam-no-stop-grad", "simsiam-no-predictor", "directclr-mlp", "directclr-linear",
             "directclr-none", "directclr-direct", "byol", "simclr", "swav")
FIGURES = ("simsiam.png", "spectrum.png", "collapse.png")


def figures(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "benchmarks/figures.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_run_draws_every_figure_and_redraws_from_its_runs(tmp_path):
    pytest.importorskip("matplotlib")
    out = figures("--tiny", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    for name in FIGURES:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = (tmp_path / "summary.md").read_text()
    for name in RUN_NAMES:
        assert f"| {name} | 1 |" in summary, name  # a row with the last evaluated epoch
    assert "torch" in summary and "hardware" in summary and "--tiny" in summary

    redraw = figures("--runs-from", str(tmp_path / "runs"), "--out", str(tmp_path / "redraw"))
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert all((tmp_path / "redraw" / name).stat().st_size > 0 for name in FIGURES)
    assert "redrawn" in (tmp_path / "redraw" / "summary.md").read_text()

    again = figures("--tiny", "--out", str(tmp_path))  # would mix new runs with old ones
    assert again.returncode != 0 and "holds runs already" in again.stderr


def test_without_matplotlib_one_line_error_and_no_training(tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: matplotlib is not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    out = figures("--tiny", "--out", str(tmp_path / "out"), env=env, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install matplotlib" in lines[0], out.stderr
    assert not (tmp_path / "out").exists()


def test_runs_from_a_missing_folder_is_a_one_line_error(tmp_path):
    pytest.importorskip("matplotlib")
    out = figures("--runs-from", str(tmp_path / "nothing"), timeout=60)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "not a folder" in out.stderr


def test_every_preset_setting_reaches_a_method():
    """flags() keeps only the settings a method's Args has: a renamed field must not vanish silently."""
    import dataclasses
    import importlib
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import figures
    fields = {m: {f.name for f in dataclasses.fields(importlib.import_module(m).Args)}
              for m in ("simsiam", "byol", "simclr", "swav", "directclr")}
    for preset in figures.PRESETS.values():
        for key, value in {**figures.COMMON, **preset}.items():
            if key in fields:  # a method's own settings
                assert set(value) <= fields[key], (key, value)
            elif key != "subset":
                assert any(key in f for f in fields.values()), key
