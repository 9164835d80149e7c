"""The streamed data path (--dataset folder --stream, issue "ImageNet scale"): every method trains
from images decoded by DataLoader workers; a streamed crop is torchvision's RandomResizedCrop;
the eval view is the in-memory decode; torchrun ranks read disjoint shards of each epoch; stop
and --resume equal the uninterrupted run; a damaged file stops the run with one line, or with
--skip-bad-images is named once and skipped. Everything writes under pytest's tmp folders."""
import contextlib
import importlib
import io
import json
import math
import random
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

import common
from clirun import check_smoke
from test_distributed import W, torchrun
from test_training import NARROW, assert_same_state, checkpoint, train

CLASSES = ("ant", "bee", "cat")
SIZE = 16  # --image-size of every run here


def picture(rng, W, H, c):
    """A smooth coloured pattern with some noise (so that draft decoding and resampling show)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    f = rng.uniform(4, 12)
    img = np.stack([255 * xx / W, 255 * yy / H, 128 + 100 * np.sin((xx + 2 * yy) / f)], -1)
    img[..., c] = 0.5 * img[..., c] + 120
    return (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)


def make_folder(root):
    """train/ (12 a class) and val/ (4 a class): RGB JPEGs of 40-300 px a side in any aspect
    ratio (a 300 x 40 and a 40 x 300 among them), grayscale JPEGs and RGBA PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                W, H = {0: (300, 40), 1: (40, 300)}.get(i, rng.integers(40, 301, 2))
                img = Image.fromarray(picture(rng, int(W), int(H), c))
                if i % 4 == 2:
                    img.convert("L").save(root / split / name / f"{i}.jpg", quality=90)
                elif i % 4 == 3:
                    alpha = Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8))
                    img.putalpha(alpha)
                    img.save(root / split / name / f"{i}.png")
                else:
                    img.save(root / split / name / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def damaged(folder, tmp_path_factory):
    """A copy of the folder with one file of garbage bytes named .jpg in train/. Returns (root,
    path of the damaged file)."""
    root = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(folder, root)
    bad = root / "train" / "bee" / "5b.jpg"
    bad.write_bytes(random.Random(0).randbytes(3000))
    return root, bad


def stream_flags(root, workers=0):
    return ["--dataset", "folder", "--data-dir", str(root), "--stream", "--workers", str(workers),
            "--image-size", str(SIZE)]


def folder_args(root, stream, workers=0, skip=False):
    return types.SimpleNamespace(dataset="folder", data_dir=str(root), image_size=SIZE,
                                 stream=stream, workers=workers, skip_bad_images=skip)


# ------------------------------------------------------------------ every method, streamed

SMOKE = ["--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "2", "--eval-every", "1",
         "--probe-epochs", "0", "--log-every", "1"]
OWN = {"simclr": ["--probe-epochs", "1"],  # the augmented probe reads streamed crops too
       "swav": ["--n-small", "2", "--small-size", "8"]}  # multi-crop: 2 crop sizes


@pytest.mark.parametrize("method, workers", [("simsiam", 0), ("byol", 0), ("simclr", 0),
                                             ("swav", 2), ("directclr", 0)])
def test_every_method_trains_streamed(method, workers, folder, tmp_path):
    """A few steps of each method from the streamed folder (SwAV with 2 worker processes and
    multi-crop): the run completes, its loss is finite and it was streamed, not decoded."""
    printed, run_dir = check_smoke(method, tmp_path, *stream_flags(folder, workers), *SMOKE,
                                   *NARROW[method], *OWN.get(method, []))
    assert "streaming 36 + 12 images" in printed
    assert "epoch 1 step 2/2" in printed  # both steps ran
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["epoch"] for r in records[:2]] == [0, 1]
    assert math.isfinite(records[1]["loss"]) and records[1]["knn_top1"] >= 0
    if method == "simclr":
        assert math.isfinite(records[-1]["linear_top1"])


# --------------------------------------------------------------- the crop is torchvision's

def test_streamed_crop_box_is_torchvisions_get_params():
    """crop_box draws as RandomResizedCrop.get_params: fed torch's draws in the order and form
    get_params makes them, it returns the same boxes, fallback central crops included (the
    ratio range does not fit a 300 x 40 image at scale 1)."""
    class TorchDraws:  # random.Random's interface, drawing as get_params does
        def uniform(self, lo, hi):
            return torch.empty(1).uniform_(lo, hi).item()

        def randint(self, lo, hi):
            return torch.randint(lo, hi + 1, size=(1,)).item()

    cases = [(H, W, scale, ratio) for H, W in ((180, 250), (40, 300), (300, 40), (7, 5))
             for scale in ((0.08, 1.0), (0.2, 1.0), (0.9, 1.0), (1.0, 1.0))
             for ratio in ((3 / 4, 4 / 3), (0.2, 5.0))]
    fallbacks = 0
    for H, W, scale, ratio in cases:
        for seed in range(40):
            torch.manual_seed(seed)
            theirs = RandomResizedCrop.get_params(torch.empty(3, H, W), scale, ratio)
            torch.manual_seed(seed)
            mine = common.crop_box(H, W, scale, ratio, TorchDraws())
            assert mine == tuple(theirs), (H, W, scale, ratio, seed)
            fallbacks += mine[2:] == (H, round(H * ratio[1])) and W / H > ratio[1]
    assert fallbacks > 0
    # the fallback itself: a central crop with the aspect ratio clamped into the range
    assert common.crop_box(40, 300, (1, 1), (3 / 4, 4 / 3), random.Random(0)) == (0, 123, 40, 53)
    assert common.crop_box(300, 40, (1, 1), (3 / 4, 4 / 3), random.Random(0)) == (123, 0, 53, 40)


def test_streamed_crop_boxes_lie_in_the_image_with_their_area_and_ratio():
    rng = random.Random(0)
    for H, W in ((180, 250), (64, 48), (300, 290)):
        areas, ratios = [], []
        for _ in range(2000):
            top, left, h, w = common.crop_box(H, W, (0.2, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
            areas.append(h * w / (H * W))
            ratios.append(w / h)
        slack = 2 / min(H, W)  # w and h are rounded to whole pixels
        assert 0.2 - slack <= min(areas) and max(areas) <= 1
        assert 3 / 4 - slack <= min(ratios) and max(ratios) <= 4 / 3 + slack
        assert min(areas) < 0.22 and max(areas) > 0.9  # the whole range is drawn


def reference_crop(path, box, size, pil=False):
    """torchvision: RandomResizedCrop's functional, bilinear with antialias, on the image in RGB
    as a uint8 tensor (pil: on the PIL image, torchvision's classic path)."""
    top, left, h, w = box
    im = Image.open(path).convert("RGB")
    if pil:
        return TF.pil_to_tensor(TF.resized_crop(im, top, left, h, w, [size, size], antialias=True))
    return TF.resized_crop(TF.pil_to_tensor(im), top, left, h, w, [size, size], antialias=True)


def test_streamed_crop_equals_torchvision_resized_crop(folder):
    """read_views's crop (no draft decoding: a PNG with alpha, an RGB and a grayscale JPEG) is
    torchvision's resized_crop of the decoded image with the same box, to the pixel, and close to
    the same crop of the PIL image (PIL's resampling rounds differently)."""
    files = [folder / "train" / "ant" / n for n in ("3.png", "4.jpg", "2.jpg")]
    diffs = []
    for path in files:
        for seed in range(30):
            for size, scale in ((SIZE, (0.08, 1.0)), (32, (0.2, 1.0))):
                recipe = common.Recipe(size=size, scale=scale)
                mine = common.read_views(str(path), [recipe], SIZE, random.Random(seed),
                                         draft=False)[0]
                W, H = Image.open(path).size
                box = common.crop_box(H, W, scale, recipe.ratio, random.Random(seed))
                theirs = reference_crop(path, box, size)
                assert mine.dtype == torch.uint8 and mine.shape == theirs.shape == (3, size, size)
                assert torch.equal(mine, theirs), (path.name, seed, size)
                diffs.append((mine.int() - reference_crop(path, box, size, pil=True)).abs())
    assert max(d.max().item() for d in diffs) <= 2
    assert np.mean([d.float().mean().item() for d in diffs]) < 0.5


def draft_box(box, d, H, W):
    """A box on the full image as read_views cuts it from a draft decode at 1/d scale: rounded
    to whole draft pixels (d x d full ones), clipped to the image."""
    top, left, h, w = box
    y0, x0 = round(top / d), round(left / d)
    y1, x1 = max(y0 + 1, round((top + h) / d)), max(x0 + 1, round((left + w) / d))
    y1, x1 = min(y1 * d, H), min(x1 * d, W)
    return y0 * d, x0 * d, y1 - y0 * d, x1 - x0 * d


@pytest.mark.parametrize("W, H", [(800, 600), (803, 601), (1003, 517)])
def test_draft_decoding_cuts_the_same_box_as_the_full_decode(W, H, tmp_path):
    """A large JPEG decoded at 1/2 to 1/8 scale (draft) gives crops and eval views close to the
    full decode's resized crop of the same box (rounded to whole draft pixels), whatever the
    image's size: the box is mapped by the draft's true scale. The rest is DCT scaling against
    antialiased resizing."""
    path = tmp_path / "large.jpg"
    Image.fromarray(picture(np.random.default_rng(1), W, H, 0)).save(path, quality=90)
    full = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    diffs, scales = [], set()
    for size, scale in ((32, (0.2, 1.0)), (64, (0.08, 1.0)), (96, (0.2, 1.0))):
        recipe = common.Recipe(size=size, scale=scale)
        for seed in range(20):
            mine = common.read_views(str(path), [recipe, None], size, random.Random(seed))
            s = min(W, H)
            boxes = [common.crop_box(H, W, scale, recipe.ratio, random.Random(seed)),
                     ((H - s) // 2, (W - s) // 2, s, s)]
            k = min(min(b[2:]) for b in boxes) / size
            d = 8 if k >= 8 else 4 if k >= 4 else 2 if k >= 2 else 1
            scales.add(d)
            for view, box, mode in zip(mine, boxes, ("bilinear", "bicubic")):
                ref = TF.resized_crop(full, *draft_box(box, d, H, W), [size, size],
                                      getattr(TF.InterpolationMode, mode.upper()), antialias=True)
                diffs.append((view.float() - ref.float()).abs().mean().item())
    assert scales == {2, 4, 8}
    assert np.mean(diffs) < 1.5 and max(diffs) < 4.5, (np.mean(diffs), max(diffs))
    with Image.open(path) as im:  # and draft decoding does shrink this file
        im.draft("RGB", (W // 8, H // 8))
        assert im.size == (-(-W // 8), -(-H // 8))


# ---------------------------------------------------------------- the eval view is the same

def test_streamed_eval_view_equals_the_in_memory_decode(folder):
    """load_data decoding the folder into memory, and streaming it: the same uint8 images for
    evaluation (center square, bicubic), train and test, and the same channel statistics."""
    cpu = torch.device("cpu")
    mem = common.load_data(folder_args(folder, stream=False), cpu)
    with contextlib.redirect_stdout(io.StringIO()):
        streamed = common.load_data(folder_args(folder, stream=True), cpu)
    assert isinstance(streamed.train_x, common.ImageFiles) and torch.is_tensor(mem.train_x)
    assert streamed.size == mem.size == SIZE and streamed.num_classes == mem.num_classes == 3
    for a, b in ((streamed.train_x, mem.train_x), (streamed.test_x, mem.test_x)):
        idx = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))
        x = torch.cat([v for v, in common.crops(streamed, a, idx.split(8), [None])])
        assert x.dtype == torch.uint8 and torch.equal(x, b[idx])
    assert torch.equal(streamed.train_y, mem.train_y) and torch.equal(streamed.test_y, mem.test_y)
    torch.testing.assert_close(streamed.mean, mem.mean)
    torch.testing.assert_close(streamed.std, mem.std)


# ---------------------------------------------------------- torchrun ranks: disjoint shards

def rank_indices(monkeypatch, args, seed, n, world):
    out = []
    for r in range(world):
        monkeypatch.setattr(common, "world_size", lambda: world)
        monkeypatch.setattr(common, "rank", lambda r=r: r)
        out.append(common.epoch_indices(args, seed, n))
    return out


def test_ranks_read_disjoint_shards_that_cover_the_epoch(monkeypatch):
    """Under 2 processes each rank's steps are its half of each global batch: together the
    epoch's permutation prefix (steps x --batch-size), no image twice; one process reads the
    same global batches. The order depends on (seed, epoch) only."""
    args, n = types.SimpleNamespace(batch_size=16, steps_per_epoch=0, seed=3), 100
    seed = args.seed * 1_000_003 + 1
    r0, r1 = rank_indices(monkeypatch, args, seed, n, 2)
    (one,) = rank_indices(monkeypatch, args, seed, n, 1)
    assert r0.shape == r1.shape == (6, 8)  # 100 // 16 full global batches
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:96]
    assert torch.equal(torch.cat([r0, r1], dim=1).flatten(), perm)
    assert not set(r0.flatten().tolist()) & set(r1.flatten().tolist())
    assert torch.equal(one, torch.cat([r0, r1], dim=1))
    # batches(): the permutation of (seed, epoch), the same each call, another each epoch
    monkeypatch.setattr(common, "crops", lambda data, x, idx, recipes, seed: (idx, seed))
    data = types.SimpleNamespace(ssl_x=range(n))
    (e1, s1), (again, _), (e2, s2) = (common.batches(args, e, data, []) for e in (1, 1, 2))
    assert torch.equal(e1, again) and torch.equal(e1, one) and s1 == seed and s2 != s1
    assert not torch.equal(e1, e2) and sorted(e1.flatten()) != sorted(e2.flatten())
    args.steps_per_epoch = 2  # shorter epochs: the first 2 global batches of the permutation
    r0, r1 = rank_indices(monkeypatch, args, seed, n, 2)
    assert torch.equal(torch.cat([r0, r1], dim=1).flatten(), perm[:32])


def test_streamed_crops_depend_on_image_and_seed_only(folder):
    """A streamed crop is drawn from (seed, image index): the same whether the image is read by
    worker processes or the main one, and wherever it sits in a batch (so ranks and --workers
    do not change what a run computes); another seed, another crop."""
    with contextlib.redirect_stdout(io.StringIO()):
        data = common.load_data(folder_args(folder, stream=True), torch.device("cpu"))
    recipe = common.Recipe(size=SIZE)
    idx = torch.arange(16)
    x = data.train_x

    def views(batches, seed, workers=0):
        files = common.ImageFiles(x.paths, x.size, workers)
        return torch.cat([v for v, in common.crops(data, files, batches, [recipe], seed)])

    base = views(idx.view(2, 8), 5)
    assert torch.equal(base, views(idx.view(4, 4), 5, workers=2))
    assert torch.equal(base[idx.flip(0)], views(idx.flip(0).view(2, 8), 5))
    assert not torch.equal(base, views(idx.view(2, 8), 6))


def test_torchrun_two_processes_streamed(folder, tmp_path):
    """A real 2-process torchrun (gloo) of SimSiam from the streamed folder, one worker each;
    save_checkpoint() checks that the ranks' networks stayed equal."""
    done = torchrun("simsiam.py", "--smoke", *stream_flags(folder, workers=1), "--epochs", "1",
                    "--steps-per-epoch", "2", "--batch-size", "16", "--eval-every", "0",
                    "--probe-epochs", "0", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]) == W
    assert "streaming 36 + 12 images" in done.stdout


# ------------------------------------------------------------------------- stop and resume

def test_streamed_stop_and_resume_follows_the_uninterrupted_run(folder, tmp_path):
    """SimSiam streamed, 2 epochs straight vs --stop-epoch 1 then --resume (with 2 workers, which
    a resume may change): the same weights, optimizer and random state."""
    flags = stream_flags(folder)
    straight = checkpoint(train("simsiam", tmp_path / "straight", *flags))
    run_dir = train("simsiam", tmp_path / "stopped", *flags, "--stop-epoch", "1")
    assert checkpoint(run_dir)["epoch"] == 1
    resumed = checkpoint(train("simsiam", tmp_path / "stopped", *stream_flags(folder, workers=2),
                               "--resume", str(run_dir)))
    assert resumed["epoch"] == straight["epoch"] == 2
    assert resumed["args"]["stream"] and resumed["args"]["workers"] == 2
    assert_same_state(straight, resumed)


# ------------------------------------------------------------------------------ damaged file

def run_streamed(root, tmp_path, *flags):
    module = importlib.import_module("simclr")
    argv = [*stream_flags(root, workers=2), "--arch", "small", "--batch-size", "16",
            "--epochs", "1", "--steps-per-epoch", "2", "--eval-every", "1", "--probe-epochs", "0",
            "--proj-dim", "32", "--out-dir", str(tmp_path), *flags]
    with contextlib.redirect_stdout(io.StringIO()):
        module.train(common.parse_args(module.Args, argv))
    return next(tmp_path.iterdir())


def test_damaged_file_stops_the_run_with_one_line_naming_it(damaged, tmp_path, capfd):
    """Without --skip-bad-images: exit with one line that names the file and the way out, no
    traceback (not from the worker processes either)."""
    root, bad = damaged
    with pytest.raises(SystemExit) as stop:
        run_streamed(root, tmp_path)
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith("error: ")
    assert str(bad) in message and "--skip-bad-images" in message
    assert "Traceback" not in capfd.readouterr().err


def test_damaged_file_is_skipped_and_named_once(damaged, tmp_path, capfd):
    """--skip-bad-images: the run completes and stderr names the file once, though the channel
    statistics and both evaluations read every training image."""
    root, bad = damaged
    run_dir = run_streamed(root, tmp_path, "--skip-bad-images")
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert records[1]["epoch"] == 1 and math.isfinite(records[1]["loss"])
    err = capfd.readouterr().err
    named = [line for line in err.splitlines() if str(bad) in line]
    assert len(named) == 1 and named[0].startswith("skipping damaged image"), err
    assert "Traceback" not in err
