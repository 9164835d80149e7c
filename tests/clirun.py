"""What the per-method test files share: a method file run as a user runs it, `--help` and
`--smoke`, in this process (tests/test_training.py and test_errors.py run the files as commands)."""
import contextlib
import importlib
import io
from pathlib import Path

import pytest

from common import parse_args

RUN_FILES = {"args.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt"}


def check_help(method, *expected):
    """`python <method>.py --help` exits 0 and mentions every text in `expected`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        parse_args(importlib.import_module(method).Args, ["--help"])
    assert done.value.code == 0
    for text in expected:
        assert text in out.getvalue(), text


def check_smoke(method, out_dir, *flags):
    """`python <method>.py --smoke` ends with a kNN accuracy in its last epoch line and its run
    folder has every file a run writes. Returns (what it printed, the run folder)."""
    module, out = importlib.import_module(method), io.StringIO()
    with contextlib.redirect_stdout(out):
        module.train(parse_args(module.Args, ["--smoke", *flags, "--out-dir", str(out_dir)]))
    assert "knn_top1" in out.getvalue().splitlines()[-2]
    run_dir = next(Path(out_dir).iterdir())
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    return out.getvalue(), run_dir
