"""Bad input gets one line on stderr that says what to do, a non-zero exit and no traceback."""
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset", "synthetic", "--arch", "small", "--epochs", "1", "--steps-per-epoch", "1",
         "--batch-size", "16", "--eval-every", "0", "--probe-epochs", "0"]


def run(method, *flags):
    return subprocess.run([sys.executable, f"{method}.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(done, *words):
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


def folder_tree(root, corrupt=False):
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / c / f"{i}.png")
    if corrupt:
        (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.mark.parametrize("flags, words", [
    (["--dataset", "imagenet"], ["unknown --dataset 'imagenet'", "cifar10, cifar100, stl10, folder, synthetic"]),
    (["--arch", "vit"], ["unknown --arch 'vit'", "resnet18, resnet50, small"]),
    (["--epochs", "0"], ["--epochs 0", "positive"]),
    (["--base-lr", "-0.1"], ["--base-lr -0.1", "positive"]),
    (["--batch-size", "0"], ["--batch-size 0", "positive"]),
    (["--batch-size", "4096"], ["--batch-size 4096 is larger than the dataset", "lower it"]),
    (["--resume", "/nonexistent/run"], ["no checkpoint there"]),
])
def test_bad_options(flags, words):
    assert_one_line_error(run("simsiam", *SMALL, *flags), *words)


def test_missing_or_misshapen_data_dir(tmp_path):
    assert_one_line_error(run("byol", *SMALL, "--dataset", "folder", "--data-dir", str(tmp_path / "none")),
                          "does not exist", "<root>/train/<class>/<image>")
    (tmp_path / "flat").mkdir()
    assert_one_line_error(run("byol", *SMALL, "--dataset", "folder", "--data-dir", str(tmp_path / "flat")),
                          "not in ImageFolder layout")


def test_corrupt_image_is_named(tmp_path):
    root = folder_tree(tmp_path / "data", corrupt=True)
    assert_one_line_error(run("simclr", *SMALL, "--dataset", "folder", "--data-dir", str(root), "--batch-size", "4"),
                          "broken.jpg", "remove or replace")


def test_failed_download_points_to_the_folder_dataset(tmp_path):
    done = run("swav", *SMALL, "--dataset", "cifar10", "--data-dir", str(tmp_path))
    if done.returncode == 0:
        pytest.skip("this machine could download CIFAR-10")
    assert_one_line_error(done, "--dataset folder --data-dir")


def test_resume_of_another_method_or_with_other_options(tmp_path):
    assert run("simsiam", *SMALL, "--out-dir", str(tmp_path)).returncode == 0
    run_dir = str(next(tmp_path.iterdir()))
    assert_one_line_error(run("byol", "--resume", run_dir), "is a simsiam run, not byol", "simsiam.py")
    assert_one_line_error(run("simsiam", "--resume", run_dir, "--proj-dim", "128"),
                          "that run used --proj-dim 2048, not 128")
