"""Decode and loader throughput of the streamed ImageNet path (common.read_views / crops).

Measures, on full-size JPEGs (generated, or --data-dir with an ImageFolder tree):
  decode  images/s of ONE worker (one process, one torch thread, as a DataLoader worker runs)
          turning each file into its random-resized-crop views, by four paths: PIL through
          common.read_views with JPEG draft mode and without, torchvision.io.decode_jpeg on the
          CPU + v2.functional.resized_crop, and decode_jpeg on the GPU (only where CUDA is);
          for the SimSiam views (2 x 224, scale 0.2-1), SwAV's multi-crop (2 x 224 at 0.14-1
          + 6 x 96 at 0.05-0.14) and 2 x 96 px (scale 0.2-1; where draft mode can act);
  loader  images/s through common.crops as training calls it: streamed (ImageFiles, DataLoader
          with 0, 1, 2, ... workers) and in memory (uint8 224 px tensors, common.crop on the
          device), SimSiam views;
  workers per GPU = ceil(GPU images/s / one worker's images/s). The GPU rate is --gpu-images-per-s
          if given, else measured (torchvision ResNet-50, 2 views, bf16) where CUDA is; with
          neither, the table is left out (no GPU figure is ever assumed).
The files sit in the page cache: decode cost only, no disk reads. Writes loader.md and
loader.json to --out.

    python benchmarks/loader.py                       # ~3 min on 2 cores
    python benchmarks/loader.py --data-dir /data/imagenet --images 2000 --workers 0 4 8 16
    python benchmarks/loader.py --quick --out /tmp/lb  # seconds: tiny images, for the tests
"""
import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
import types
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402


def workloads(k=1):
    """name -> views (size, scale) of each image; k divides the sizes (--quick)."""
    big, small = 224 // k, 96 // k
    return {f"simsiam 2x{big}": [(big, (0.2, 1.0))] * 2,
            f"swav 2x{big}+6x{small}": [(big, (0.14, 1.0))] * 2 + [(small, (0.05, 0.14))] * 6,
            f"2x{small}": [(small, (0.2, 1.0))] * 2}

PATHS = ("pil-draft", "pil", "pil-resize", "tv-cpu", "tv-cuda")
CPU_PATHS = PATHS[:4]
PATH_NAMES = {
    "pil-draft": "common.read_views(draft=True): PIL decode, torch resized_crop",
    "pil": "common.read_views(draft=False): PIL decode, torch resized_crop",
    "pil-resize": "PIL decode (draft) + PIL resize (candidate, not in common.py)",
    "tv-cpu": "torchvision.io.decode_jpeg (CPU) + v2 resized_crop",
    "tv-cuda": "torchvision.io.decode_jpeg (cuda) + v2 resized_crop on the GPU",
}


# ------------------------------------------------------------------ images

def make_images(root, n_train, n_val, classes, long_side, seed=0, quality=90):
    """ImageFolder tree of JPEGs (quality 90): long side uniform in +-20% around long_side,
    aspect 4:3 (60%), 3:2 (25%) or 1:1, a quarter of them portrait. Content: a colour gradient and
    smooth noise at 48, 8, 2 and 1 px scales, so the files carry ImageNet-like entropy (about
    0.55 bytes per pixel: ~105 KB at 500 x 375; ImageNet's train set averages ~110 KB a file)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)

    def smooth(h, w, cell, amp):
        n = torch.randn(1, 3, h // cell + 2, w // cell + 2, generator=g)
        return F.interpolate(n, size=(h, w), mode="bicubic", align_corners=False)[0] * amp

    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            d = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(d, exist_ok=True)
            W = max(8, round(long_side * rnd.uniform(0.8, 1.2)))
            H = max(8, round(W / rnd.choices((4 / 3, 3 / 2, 1.0), (0.6, 0.25, 0.15))[0]))
            if rnd.random() < 0.25:
                W, H = H, W
            yy, xx = torch.linspace(0, 1, H).view(1, H, 1), torch.linspace(0, 1, W).view(1, 1, W)
            u = lambda lo, hi: lo + (hi - lo) * torch.rand(3, 1, 1, generator=g)  # noqa: E731
            x = u(0, 255) + u(-80, 80) * xx + u(-80, 80) * yy
            x = x + smooth(H, W, 48, 60) + smooth(H, W, 8, 30) + smooth(H, W, 2, 30)
            x = x + smooth(H, W, 1, 14)
            x = x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
            Image.frombytes("RGB", (W, H), x.numpy().tobytes()).save(
                os.path.join(d, f"{i:06d}.jpg"), quality=quality)


def describe_images(paths):
    from PIL import Image
    sizes = []
    for p in paths:
        with Image.open(p) as im:
            sizes.append(im.size)
    n = len(paths)
    return {"n": n, "mean_w": sum(w for w, _ in sizes) / n, "mean_h": sum(h for _, h in sizes) / n,
            "min_side": min(min(s) for s in sizes), "max_side": max(max(s) for s in sizes),
            "mean_kb": sum(os.path.getsize(p) for p in paths) / n / 1000}


# ------------------------------------------------------------------ decode, one worker

def recipes_of(views):
    return [common.Recipe(size=s, scale=sc) for s, sc in views]


def decode_tv(path, recipes, rng, device="cpu"):
    """torchvision's path: read_file + decode_jpeg, then each view's crop_box (drawn as
    read_views draws it) cut and resized with antialias, uint8."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF
    img = decode_jpeg(read_file(path), mode=ImageReadMode.RGB, device=device)
    _, H, W = img.shape
    return [TF.resized_crop(img, *common.crop_box(H, W, r.scale, r.ratio, rng), [r.size, r.size],
                            antialias=True) for r in recipes]


def decode_pil_resize(path, recipes, rng):
    """A candidate, not what common.py does (its previous version): PIL decodes (with read_views'
    draft rule) and PIL resizes each box (bilinear, antialiased, sub-pixel box), crop first."""
    from PIL import Image
    with Image.open(path) as im:
        W, H = im.size
        boxes = [common.crop_box(H, W, r.scale, r.ratio, rng) for r in recipes]
        k = min(min(h, w) / r.size for (_, _, h, w), r in zip(boxes, recipes))
        sx = sy = 1.0
        if im.format == "JPEG" and k >= 2:
            k = 8 if k >= 8 else 4 if k >= 4 else 2
            scaled = im.draft("RGB", (W // k, H // k))
            if scaled is not None:  # as read_views: a draft pixel is `scale` full pixels
                sx, sy = scaled[1][2] / W, scaled[1][3] / H
        im = im.convert("RGB")
        views = []
        for (top, left, h, w), r in zip(boxes, recipes):
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            outer = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
            v = im.crop(outer).resize((r.size, r.size), Image.BILINEAR, box=(
                box[0] - outer[0], box[1] - outer[1], box[2] - outer[0], box[3] - outer[1]))
            v = torch.frombuffer(bytearray(v.tobytes()), dtype=torch.uint8)
            views.append(v.view(r.size, r.size, 3).permute(2, 0, 1).contiguous())
    return views


def decode_tv_cuda_batch(paths, recipes, rng, device):
    """decode_jpeg on the GPU takes a list (nvjpeg batched decode); crops cut there."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF
    imgs = decode_jpeg([read_file(p) for p in paths], mode=ImageReadMode.RGB, device=device)
    out = []
    for img in imgs:
        _, H, W = img.shape
        out.append([TF.resized_crop(img, *common.crop_box(H, W, r.scale, r.ratio, rng),
                                    [r.size, r.size], antialias=True) for r in recipes])
    return out


def decode_rate(path_kind, paths, recipes, seconds, rounds=3, gpu_batch=64):
    """Median over rounds of images/s, each round cycling through paths for seconds / rounds."""
    rng = random.Random(0)
    if path_kind == "tv-cuda":
        dev = torch.device("cuda")
        decode_tv_cuda_batch(paths[:gpu_batch], recipes, rng, dev)  # warm-up: nvjpeg handles
        torch.cuda.synchronize()
    else:
        one = {"pil-draft": lambda p: common.read_views(p, recipes, 224, rng, draft=True),
               "pil": lambda p: common.read_views(p, recipes, 224, rng, draft=False),
               "tv-cpu": lambda p: decode_tv(p, recipes, rng),
               "pil-resize": lambda p: decode_pil_resize(p, recipes, rng)}[path_kind]
        for p in paths[:4]:
            one(p)
    rates, i = [], 0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / rounds:
            if path_kind == "tv-cuda":
                chunk = [paths[(i + j) % len(paths)] for j in range(gpu_batch)]
                decode_tv_cuda_batch(chunk, recipes, rng, dev)
                torch.cuda.synchronize()
                n, i = n + len(chunk), i + len(chunk)
            else:
                one(paths[i % len(paths)])
                n, i = n + 1, i + 1
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


# ------------------------------------------------------------------ loader

def loader_rate(paths, workers, batch, n_batches, recipes, device, seed=0):
    """images/s of one pass of common.crops over n_batches x batch streamed images (DataLoader
    start-up included, as each epoch pays it) and the seconds to the first batch."""
    files = common.ImageFiles(paths, 224, workers)
    data = types.SimpleNamespace(device=device)  # all that crops() reads of a Data
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(paths), (n_batches, batch), generator=g)
    t0, first = time.perf_counter(), None
    for views in common.crops(data, files, idx, recipes, seed):
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = first or time.perf_counter() - t0
    return n_batches * batch / (time.perf_counter() - t0), first


def in_memory_rate(x, batch, n_batches, recipes, device):
    """images/s of common.crops on uint8 images already in (device) memory."""
    data = types.SimpleNamespace(device=device)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(x), (n_batches, batch), generator=g)
    for _ in common.crops(data, x, idx[:1], recipes):  # warm-up
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for views in common.crops(data, x, idx, recipes):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_batches * batch / (time.perf_counter() - t0)


# ------------------------------------------------------------------ GPU side

def resnet50_rate(device, batch=256, size=224, steps=10, warmup=3):
    """Source images/s of a ResNet-50 training step on two views of each image: torchvision
    resnet50, forward + backward + SGD on 2 x batch images, bf16 autocast on CUDA, channels_last.
    No projector, predictor or loss: an upper bound of SimSiam's rate on this device."""
    import torchvision
    device = torch.device(device)
    model = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2 * batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    cast = (torch.autocast("cuda", torch.bfloat16) if device.type == "cuda"
            else torch.autocast("cpu", enabled=False))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with cast:
            loss = model(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


# ------------------------------------------------------------------ report

def cpu_info():
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        model = platform.processor() or model
    simd = [f for f in ("avx2", "avx512f") if f in flags]
    return f"{model}, {os.cpu_count()} cores" + (f" ({', '.join(simd)})" if simd else "")


def fmt(v):
    if isinstance(v, str):
        return v
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def markdown(r):
    env, im, g = r["environment"], r["images"], r["gpu_rate"]
    wrap = lambda text: textwrap.fill(text, 100, break_on_hyphens=False)  # noqa: E731
    wl = list(r["decode"][PATHS[0]])
    lines = [
        "# Loader benchmark (benchmarks/loader.py)", "",
        wrap(f"CPU: {env['cpu']}; GPU: {env['gpu']}; torch {env['torch']}, torchvision "
             f"{env['torchvision']}, Pillow {env['pillow']} (libjpeg-turbo: "
             f"{env['libjpeg_turbo']}); {env['date']}; load average (1, 5, 15 min) at start "
             f"{env['loadavg']}, at end {env['loadavg_end']}."), "",
        f"Command: `{r['command']}`", "",
        wrap(f"Images: {im['n']} JPEGs ({im['source']}), mean {im['mean_w']:.0f} x "
             f"{im['mean_h']:.0f} px (sides {im['min_side']}-{im['max_side']}), mean "
             f"{im['mean_kb']:.0f} KB; in the page cache (no disk reads)."), "",
        "## Decode: images/s of one worker (one process, one thread)", "",
        "| path | " + " | ".join(wl) + " |", "|---|" + "---|" * len(wl)]
    for p in PATHS:
        lines.append(f"| {PATH_NAMES[p]} | " + " | ".join(fmt(r["decode"][p][w]) for w in wl)
                     + " |")
    lines += ["", wrap("Views per image: " + "; ".join(
        f"{w}: " + " + ".join(f"{n} x {s} px (scale {sc[0]}-{sc[1]})"
                              for n, s, sc in _grouped(r["workloads"][w])) for w in wl)
        + ". Median of 3 rounds. The decode_jpeg (cuda) row is the main process + GPU, not a "
        "worker."), "",
        f"## Loader: common.crops, {r['loader_views']}, batch {r['batch']}, "
        f"{r['loader_images']} images per pass", "",
        "| data | workers | img/s | img/s per worker | s to first batch |", "|---|---|---|---|---|"]
    for row in r["loader"]:
        per = fmt(row["img_per_s"] / row["workers"]) if row["workers"] else "-"
        lines.append(f"| streamed (ImageFiles) | {row['workers']} | {fmt(row['img_per_s'])} | "
                     f"{per} | {row['first_batch_s']:.2f} |")
    mem = r["in_memory"]
    lines.append(f"| in memory (uint8 {mem['size']} px on {mem['device']}, common.crop, "
                 f"{mem['threads']} threads) | - | {fmt(mem['img_per_s'])} | - | - |")
    lines += ["", wrap("Streamed: one pass, DataLoader start-up included (each epoch pays it); "
                       "0 workers: decoded in the main process."), "",
              "## Workers per GPU (ResNet-50, SimSiam views)", ""]
    if g is None:
        lines += ["GPU rate: not measured (no GPU here; --gpu-images-per-s gives one)."]
        return "\n".join(lines) + "\n"
    lines += [wrap(f"GPU rate: {g['img_per_s']:.0f} source images/s per GPU ({g['source']})."),
              "", "| per-worker rate from | img/s per worker | workers per GPU |", "|---|---|---|"]
    for row in r["workers_per_gpu"]:
        lines.append(f"| {row['from']} | {fmt(row['img_per_s'])} | {row['workers']} |")
    lines += ["", "workers per GPU = ceil(GPU rate / img/s per worker)."]
    return "\n".join(lines) + "\n"


def _grouped(views):
    out = []
    for s, sc in views:
        if out and out[-1][1:] == (s, tuple(sc)):
            out[-1] = (out[-1][0] + 1, s, tuple(sc))
        else:
            out.append((1, s, tuple(sc)))
    return out


# ------------------------------------------------------------------ main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", help="ImageFolder root (train/<class>/); default: "
                        "generate JPEGs into a temporary folder")
    parser.add_argument("--images", type=int, default=512, help="images generated / used")
    parser.add_argument("--long-side", type=int, default=500,
                        help="mean long side of the generated images (4:3 mostly: ~500 x 375)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="time per decode measurement (3 rounds, median)")
    parser.add_argument("--workers", type=int, nargs="+",
                        default=list(range(0, min(2, os.cpu_count() or 1) + 1)),
                        help="DataLoader worker counts of the streamed loader")
    parser.add_argument("--batch", type=int, default=64, help="loader batch size")
    parser.add_argument("--loader-images", type=int, default=1024,
                        help="images per loader pass (rounded down to full batches)")
    parser.add_argument("--gpu-images-per-s", type=float,
                        help="source images/s one GPU trains at (e.g. the img/s a run logs with "
                        "data in memory); default: measured on CUDA, else none")
    parser.add_argument("--quick", action="store_true",
                        help="tiny images, few of them, short timings (a test: seconds)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "loader-cpu"))
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.long_side, args.seconds = 16, 64, 0.3
        args.batch, args.loader_images = 4, 16
        args.workers = [w for w in args.workers if w <= 1] or [0]
    warnings.filterwarnings("ignore", message=".*[Dd]eprecat.*")  # torchvision.io -> TorchCodec
    scale_down = 4 if args.quick else 1  # quick: views of 56 and 24 px from ~64 px images

    import PIL
    import torchvision
    from PIL import features
    cuda = torch.cuda.is_available()
    r = {"command": "python " + shlex.join(
        [os.path.relpath(sys.argv[0]) if argv is None else "benchmarks/loader.py",
         *(sys.argv[1:] if argv is None else argv)]),
         "environment": {
             "cpu": cpu_info(), "gpu": torch.cuda.get_device_name() if cuda else "none",
             "torch": torch.__version__, "torchvision": torchvision.__version__,
             "pillow": PIL.__version__, "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
             "date": datetime.datetime.now().isoformat(timespec="seconds"),
             "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
             "python": platform.python_version()},
         "quick": args.quick}

    with tempfile.TemporaryDirectory() as tmp:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a DataLoader worker's setting (and no spin-waiting pool)
        root = args.data_dir
        if root is None:
            root = tmp
            t0 = time.perf_counter()
            make_images(root, args.images, max(8, args.images // 8), 8, args.long_side)
            print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
        (paths, _), _ = common.folder_files(root)
        paths = paths[:args.images]
        r["images"] = {**describe_images(paths),
                       "source": args.data_dir or f"generated, long side ~{args.long_side} px, "
                       "4:3 / 3:2 / 1:1, quality 90, gradient + multi-scale smooth noise"}

        r["workloads"] = workloads(scale_down)
        r["decode"] = {p: {} for p in PATHS}
        for w, views in r["workloads"].items():
            recipes = recipes_of(views)
            for p in PATHS:
                if p == "tv-cuda" and not cuda:
                    r["decode"][p][w] = "not measured: no GPU"
                    continue
                r["decode"][p][w] = decode_rate(p, paths, recipes, args.seconds)
                print(f"decode {p:9s} {w:16s} {r['decode'][p][w]:8.1f} img/s", file=sys.stderr)
        torch.set_num_threads(threads)

        key = next(iter(r["workloads"]))  # SimSiam's views
        simsiam = recipes_of(r["workloads"][key])
        dev = torch.device("cuda" if cuda else "cpu")
        n_batches = max(1, args.loader_images // args.batch)
        r["batch"], r["loader_images"] = args.batch, n_batches * args.batch
        r["loader_views"] = f"2 x {simsiam[0].size} px (scale 0.2-1)"
        r["loader"] = []
        for workers in args.workers:
            ips, first = loader_rate(paths, workers, args.batch, n_batches, simsiam, dev)
            r["loader"].append({"workers": workers, "img_per_s": ips, "first_batch_s": first})
            print(f"loader {workers} workers {ips:8.1f} img/s", file=sys.stderr)
        x = torch.stack([common.read_views(p, [None], simsiam[0].size, None)[0]
                         for p in paths]).to(dev)
        r["in_memory"] = {"device": dev.type, "threads": threads, "size": simsiam[0].size,
                          "img_per_s": in_memory_rate(x, args.batch, n_batches, simsiam, dev)}

    if args.gpu_images_per_s:
        g = {"img_per_s": args.gpu_images_per_s, "source": "given: --gpu-images-per-s"}
    elif cuda and not args.quick:
        g = {"img_per_s": resnet50_rate("cuda"),
             "source": f"measured on {torch.cuda.get_device_name()}: torchvision ResNet-50 "
             "fwd+bwd+SGD, 2 views x batch 256, bf16, no projector/predictor (an upper bound)"}
    else:
        g = None
    r["gpu_rate"] = g
    rows = [{"from": f"decode, {PATH_NAMES[p]}", "img_per_s": r["decode"][p][key]}
            for p in CPU_PATHS]
    rows += [{"from": f"loader, streamed, {row['workers']} worker(s) (per worker)",
              "img_per_s": row["img_per_s"] / row["workers"]}
             for row in r["loader"] if row["workers"]]
    for row in rows:
        row["workers"] = math.ceil(g["img_per_s"] / row["img_per_s"]) if g else None
    r["workers_per_gpu"] = rows if g else []

    r["environment"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    text = markdown(r)
    with open(os.path.join(args.out, "loader.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "loader.json"), "w") as fh:
        json.dump(r, fh, indent=1)
    print(text)
    return r


if __name__ == "__main__":
    main()
