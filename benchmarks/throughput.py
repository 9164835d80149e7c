"""Training throughput of each method's own code path, against a conventional pipeline (issue 8).

For each method, `train` runs for 2 short epochs (--steps-per-epoch steps each, no kNN, no probe);
the second epoch's images/s (source images, two views each; the first epoch is warm-up) is
reported with the seconds an epoch of 50,000 images would take. The reference is the same SimSiam
model and SGD step fed the conventional way: a torch DataLoader with --workers worker processes
whose Dataset augments one PIL image at a time with torchvision.transforms.v2 (the SimSiam CIFAR
recipe, two views), on the same device, bf16 autocast on CUDA. "vs conventional" is the ratio of
images/s. Prints a markdown table with the device, torch version, date and command; --out also
writes it to a file, rewritten after each method (a run cut short keeps the rows it finished).

    python benchmarks/throughput.py      # GPU: ResNet-18, batch 512, CIFAR-10
    python benchmarks/throughput.py --dataset folder --data-dir /tmp/data/cifar10-jpeg \
        --out throughput.md
    python benchmarks/throughput.py --arch small --batch-size 64 --dataset synthetic \
        --workers 2                      # CPU
    python benchmarks/throughput.py --methods simsiam byol -- --seed 1   # after --: to every method
"""
import argparse
import contextlib
import datetime
import importlib
import json
import os
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import common  # noqa: E402
import simsiam  # noqa: E402

METHODS = ("simsiam", "byol", "simclr", "swav", "directclr")
EPOCH = 50_000  # images in a CIFAR-10 epoch


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model} (CPU, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


def shared_flags(args):
    """The methods' flags for what this script sets: data, backbone, image size, batch size."""
    return ["--dataset", args.dataset, "--data-dir", args.data_dir, "--arch", args.arch,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]


def method_throughput(name, args, extra):
    """images/s of the second of two short epochs of the method's own train()."""
    m = importlib.import_module(name)
    with tempfile.TemporaryDirectory() as out:
        flags = [*shared_flags(args), "--epochs", "2", "--steps-per-epoch",
                 str(args.steps_per_epoch), "--eval-every", "0", "--probe-epochs", "0",
                 "--log-every", "1000000", "--out-dir", out, *extra]
        # progress lines to stderr, the table alone on stdout
        with contextlib.redirect_stdout(sys.stderr):
            m.train(common.parse_args(m.Args, flags))
        (run_dir,) = os.listdir(out)
        with open(os.path.join(out, run_dir, "metrics.jsonl")) as fh:
            records = [json.loads(line) for line in fh]
    return next(r["img_per_s"] for r in records if r.get("epoch") == 2)


class TwoViews(torch.utils.data.Dataset):
    """PIL images -> two independently augmented views, one image at a time (the usual recipe)."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.transform(self.images[i])


def conventional_throughput(args):
    """images/s of SimSiam's step fed by a DataLoader with per-image torchvision augmentation."""
    from torchvision.transforms import v2
    a = common.parse_args(simsiam.Args, shared_flags(args))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":  # as common.setup sets it up for the methods
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    data = common.load_data(a, "cpu")
    images = [v2.functional.to_pil_image(x) for x in data.ssl_x]
    transform = v2.Compose([
        v2.RandomResizedCrop(a.image_size, scale=a.crop_scale), v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(*a.jitter)], p=a.jitter_p), v2.RandomGrayscale(a.gray_p),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(data.mean.flatten().tolist(), data.std.flatten().tolist())])
    loader = torch.utils.data.DataLoader(TwoViews(images, transform), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True, num_workers=args.workers,
                                         pin_memory=dev.type == "cuda",
                                         persistent_workers=args.workers > 0)
    encoder = common.backbone(a.arch, a.image_size)
    f = nn.Sequential(encoder, simsiam.projector(encoder.dim, a.proj_dim)).to(dev)
    h = simsiam.predictor(a.proj_dim, a.pred_hidden).to(dev)
    optimizer = torch.optim.SGD([*f.parameters(), *h.parameters()],
                                lr=a.base_lr * args.batch_size / 256, momentum=a.momentum,
                                weight_decay=a.weight_decay)
    autocast = (torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda"
                else contextlib.nullcontext())

    def batches():
        while True:
            yield from loader

    steps, t0 = args.steps_per_epoch, 0.0
    for i, (x1, x2) in enumerate(batches()):
        if i == steps:  # the first `steps` steps are warm-up, as the methods' first epoch
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
        if i == 2 * steps:
            break
        x1, x2 = x1.to(dev, non_blocking=True), x2.to(dev, non_blocking=True)
        with autocast:
            z1, z2 = f(x1), f(x2)
            p1, p2 = h(z1), h(z2)
        loss = simsiam.D(p1, z2) / 2 + simsiam.D(p2, z1) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()  # waits for the device
    return steps * args.batch_size / (time.time() - t0)


def main():
    argv, extra = sys.argv[1:], []
    if "--" in argv:  # what follows goes verbatim to every method
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dataset", default="cifar10", help="as the methods' --dataset")
    parser.add_argument("--data-dir", default="data", help="as the methods' --data-dir")
    parser.add_argument("--arch", default="resnet18", help="resnet18 | resnet50 | small")
    parser.add_argument("--image-size", type=int, default=32,
                        help="images are resized to this side")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps-per-epoch", type=int, default=20,
                        help="steps of each of the 2 epochs timed")
    parser.add_argument("--workers", type=int, default=8,
                        help="DataLoader workers of the conventional pipeline")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.steps_per_epoch < 1:
        parser.error("--steps-per-epoch must be at least 1")

    head = [f"Training throughput. Device: {device_name()}; torch {torch.__version__}; "
            f"{datetime.date.today().isoformat()}. Command: `python {shlex.join(sys.argv)}`", "",
            "| method | batch | arch | img/s | s/epoch (50k) | vs conventional |",
            "|---|---|---|---|---|---|"]

    def table(rows, conventional=None):
        """The table of the rows so far ("-" vs conventional until that is measured), also
        written to --out: rewritten after each method, so that a run cut short keeps them."""
        lines = list(head)
        for name, ips in rows:
            ratio = "-" if conventional is None else f"{ips / conventional:.2f}x"
            lines.append(f"| {name} | {args.batch_size} | {args.arch} | {ips:.0f} | "
                         f"{EPOCH / ips:.1f} | {ratio} |")
        text = "\n".join(lines)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
        return text

    rows = []
    for name in args.methods:
        rows.append((name, method_throughput(name, args, extra)))
        table(rows)
    conventional = conventional_throughput(args)  # last: its worker processes end with it
    rows.append((f"conventional (SimSiam, DataLoader, {args.workers} workers)", conventional))
    print(table(rows, conventional))


if __name__ == "__main__":
    main()
