"""What the per-method test files share: a method file run as a command, as a user runs it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = {"args.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt"}


def run_cli(*args, timeout=300):
    """`python <args>` in the repository root; the finished process, its output as text."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def check_help(method, *expected):
    """`python <method>.py --help` exits 0 and mentions every text in `expected`."""
    out = run_cli(f"{method}.py", "--help")
    assert out.returncode == 0, out.stderr
    for text in expected:
        assert text in out.stdout, text


def check_smoke(method, out_dir, *flags):
    """`python <method>.py --smoke` exits 0, its last epoch line has a kNN accuracy and its run
    folder has every file a run writes. Returns (the process, the run folder)."""
    out = run_cli(f"{method}.py", "--smoke", *flags, "--out-dir", str(out_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "knn_top1" in out.stdout.splitlines()[-2]
    run_dir = next(Path(out_dir).iterdir())
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    return out, run_dir
