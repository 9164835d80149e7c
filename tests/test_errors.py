"""Bad input gets one line on stderr that says what to do, a non-zero exit and no traceback:
bad options, bad data folders, damaged checkpoints and image files. Every run writes under
pytest's tmp_path (--out-dir), never to ./runs/."""
import collections
import contextlib
import importlib
import io
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from common import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset", "synthetic", "--arch", "small", "--epochs", "1", "--steps-per-epoch", "1",
         "--batch-size", "16", "--eval-every", "0", "--probe-epochs", "0"]
# what a --resume may pass of SMALL (the rest is the run's own): no evaluation, no linear probe
RESUME_SMALL = ["--eval-every", "0", "--probe-epochs", "0"]


Done = collections.namedtuple("Done", "returncode stdout stderr")


def run(method, out_dir, *flags, cli=False):
    """`python <method>.py <flags> --out-dir <out_dir>`: as a command (cli=True), or in this
    process, where what the command would exit with and print is read off the SystemExit that
    common.fail raises (any other exception fails the test, as a traceback would)."""
    argv = [*flags, "--out-dir", str(out_dir)]
    if cli:
        return subprocess.run([sys.executable, f"{method}.py", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    module, out = importlib.import_module(method), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            module.train(parse_args(module.Args, argv))
    except SystemExit as stop:
        message = stop.code if isinstance(stop.code, str) else ""
        return Done(1 if message else stop.code, out.getvalue(), message + "\n" if message else "")
    return Done(0, out.getvalue(), "")


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
    (["--dataset", "imagenet"],
     ["unknown --dataset 'imagenet'", "cifar10, cifar100, stl10, folder, synthetic"]),
    (["--arch", "vit"], ["unknown --arch 'vit'", "resnet18, resnet50, small"]),
    (["--epochs", "0"], ["--epochs 0", "positive"]),
    (["--base-lr", "-0.1"], ["--base-lr -0.1", "positive"]),
    (["--batch-size", "0"], ["--batch-size 0", "positive"]),
    (["--batch-size", "4096"], ["--batch-size 4096 is larger than the dataset", "lower it"]),
    (["--resume", "/nonexistent/run"], ["no checkpoint there"]),
])
def test_bad_options(flags, words, tmp_path):
    assert_one_line_error(run("simsiam", tmp_path, *SMALL, *flags), *words)


def test_as_a_command_bad_input_is_one_line_on_stderr(real_run, tmp_path):
    """The in-process checks above, seen as a user sees them: stderr, exit status."""
    assert_one_line_error(run("simsiam", tmp_path, *SMALL, "--arch", "vit", cli=True),
                          "unknown --arch 'vit'")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert_one_line_error(run("simsiam", tmp_path, "--resume", str(tmp_path / "run"), cli=True),
                          UNREADABLE)


def test_missing_or_misshapen_data_dir(tmp_path):
    done = run("byol", tmp_path / "runs", *SMALL, "--dataset", "folder",
               "--data-dir", str(tmp_path / "none"))
    assert_one_line_error(done, "does not exist", "<root>/train/<class>/<image>")
    (tmp_path / "flat").mkdir()
    done = run("byol", tmp_path / "runs", *SMALL, "--dataset", "folder",
               "--data-dir", str(tmp_path / "flat"))
    assert_one_line_error(done, "not in ImageFolder layout")


def test_corrupt_image_is_named(tmp_path):
    root = folder_tree(tmp_path / "data", corrupt=True)
    done = run("simclr", tmp_path / "runs", *SMALL, "--dataset", "folder", "--data-dir", str(root),
               "--batch-size", "4")
    assert_one_line_error(done, "broken.jpg", "remove or replace")


def test_failed_download_points_to_the_folder_dataset(tmp_path):
    done = run("swav", tmp_path / "runs", *SMALL, "--dataset", "cifar10",
               "--data-dir", str(tmp_path))
    if done.returncode == 0:
        pytest.skip("this machine could download CIFAR-10")
    assert_one_line_error(done, "--dataset folder --data-dir")


# ------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """The folder of a tiny simsiam run stopped after its first of 2 epochs (one epoch left to
    resume), shared by the tests below; a test that changes it works on a copy."""
    out = tmp_path_factory.mktemp("real")
    done = run("simsiam", out, *SMALL, "--epochs", "2", "--stop-epoch", "1",
               "--proj-dim", "64", "--pred-hidden", "32")  # a small checkpoint: quick to copy
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = out.iterdir()
    return run_dir


def files(folder):
    """name -> bytes of every file in folder."""
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_resume_of_another_method_or_with_other_options(real_run, tmp_path):
    assert_one_line_error(run("byol", tmp_path, "--resume", str(real_run)),
                          "is a simsiam run, not byol", "simsiam.py")
    assert_one_line_error(run("simsiam", tmp_path, "--resume", str(real_run), "--proj-dim", "128"),
                          "that run used --proj-dim 64, not 128")


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


UNREADABLE = "cannot read it as a checkpoint"
OTHER_KIND = "not a checkpoint written by these files"


@pytest.mark.parametrize("damage, what, by", [
    (lambda real: b"", UNREADABLE, "folder"),  # empty
    (lambda real: real[:len(real) // 2], UNREADABLE, "file"),  # truncated
    (lambda real: random.Random(0).randbytes(4096), UNREADABLE, "folder"),  # garbage
    (lambda real: json.dumps({"method": "simsiam", "epoch": 1}).encode(), UNREADABLE, "file"),
    (lambda real: torch_bytes({"a": 1}), OTHER_KIND, "folder"),  # a torch file of another kind
    (lambda real: torch_bytes(torch.zeros(3)), OTHER_KIND, "file"),
], ids=["empty", "truncated", "garbage", "json", "torch-dict", "torch-tensor"])
def test_damaged_checkpoint_is_named_and_left_as_it_is(real_run, tmp_path, damage, what, by):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("args.json", "metrics.jsonl"):
        shutil.copy(real_run / name, run_dir / name)
    path = run_dir / "checkpoint.pt"
    path.write_bytes(damage((real_run / "checkpoint.pt").read_bytes()))
    before = files(run_dir)
    done = run("simsiam", tmp_path / "out", "--resume", str(run_dir if by == "folder" else path),
               *RESUME_SMALL)
    assert_one_line_error(done, f"--resume {path}:", what, "start a new run")
    assert files(run_dir) == before  # the damaged file as it was, nothing added
    assert not (tmp_path / "out").exists()  # no new run folder


def test_resume_reads_exactly_the_file_named(real_run, tmp_path):
    run_dir = shutil.copytree(real_run, tmp_path / "run")
    shutil.copy(run_dir / "checkpoint.pt", run_dir / "other.pt")
    (run_dir / "checkpoint.pt").write_bytes(b"damaged")
    done = run("simsiam", tmp_path / "out", "--resume", str(run_dir / "other.pt"), *RESUME_SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed {run_dir / 'other.pt'} after epoch 1" in done.stdout
    assert "final True  epoch 2 " in done.stdout
    # the run goes on in its own folder: its checkpoint.pt is written again, after epoch 2
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_an_option_unknown_to_the_code(real_run, tmp_path):
    ckpt = torch.load(real_run / "checkpoint.pt", weights_only=False)
    ckpt["args"]["bogus"] = 1
    path = tmp_path / "checkpoint.pt"
    torch.save(ckpt, path)
    done = run("simsiam", tmp_path / "out", "--resume", str(path), *RESUME_SMALL)
    assert_one_line_error(done, f"--resume {path}:", "'bogus'", "unknown", "start a new run")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ image folders

def noise_tree(root):
    """train/ and test/ with classes a and b of 4 random 8 x 8 images each: a folder that trains."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=g)
                Image.fromarray(pixels.numpy()).save(root / split / c / f"{i}.png")
    return root


def half_a_jpeg():
    pixels = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, "JPEG")
    return buf.getvalue()[:len(buf.getvalue()) // 2]


def empty_folder(folder):
    for p in folder.iterdir():
        p.unlink()


# each: change the tree, and the file or folder the error must name (relative to the root)
@pytest.mark.parametrize("damage, named, words", [
    (lambda r: (r / "train/b/empty.jpg").write_bytes(b""), "train/b/empty.jpg",
     ["remove or replace"]),
    (lambda r: (r / "train/a/half.jpg").write_bytes(half_a_jpeg()), "train/a/half.jpg",
     ["truncated", "remove or replace"]),
    (lambda r: (r / "test/a/notes.png").write_text("not an image\n"), "test/a/notes.png",
     ["remove or replace"]),
    (lambda r: shutil.rmtree(r / "test/b"), "test", ["'b'", "same class folders"]),
    (lambda r: [shutil.rmtree(r / "train" / c) for c in "ab"], "train",
     ["no class folders", "<root>/train/<class>/<image>"]),
    (lambda r: empty_folder(r / "train/a"), "train/a", ["has no images", "remove that class"]),
], ids=["empty-jpg", "truncated-jpg", "text-png", "class-missing-in-test", "no-class-folders",
        "class-without-images"])
def test_damaged_image_folder_is_named(tmp_path, damage, named, words):
    root = noise_tree(tmp_path / "data")
    damage(root)
    done = run("simsiam", tmp_path / "runs", *SMALL, "--dataset", "folder", "--data-dir", str(root),
               "--batch-size", "4")
    assert_one_line_error(done, str(root / named), *words)


def test_a_checkpoint_that_cannot_be_written_stops_with_one_line(tmp_path, monkeypatch):
    """The background writer's failure (here: a full disk) reaches the main thread as one line."""
    import common

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common, "save_atomic", full_disk)
    done = run("simsiam", tmp_path, *SMALL)
    assert_one_line_error(done, "could not write the checkpoint", "No space left on device")


def test_recipe_flag():
    """--recipe imagenet puts the file's ImageNet recipe in place of the defaults, flags given
    still win; an unknown recipe gets one line."""
    import simsiam
    args = parse_args(simsiam.Args, ["--recipe", "imagenet", "--epochs", "7"],
                      {"imagenet": simsiam.IMAGENET})
    assert (args.arch, args.image_size, args.proj_layers, args.stream) == ("resnet50", 224, 3, True)
    assert args.epochs == 7 and args.base_lr == 0.05
    with pytest.raises(SystemExit, match="unknown --recipe 'cifar'"):
        parse_args(simsiam.Args, ["--recipe", "cifar"], {"imagenet": simsiam.IMAGENET})
    for method in ("byol", "simclr", "swav", "directclr"):  # every field of each recipe exists
        module = importlib.import_module(method)
        assert set(module.IMAGENET) <= {f for f in module.Args.__dataclass_fields__}
