"""SimSiam: Exploring Simple Siamese Representation Learning.
Xinlei Chen and Kaiming He, CVPR 2021. https://arxiv.org/abs/2011.10566

    python simsiam.py                             # CIFAR-10 recipe of App. D (ResNet-18)
    python simsiam.py --smoke                     # a few steps on synthetic data, CPU, < 1 min
    torchrun --nproc_per_node=8 simsiam.py        # 8 GPUs: DDP + SyncBN, --batch-size is global
    python simsiam.py --resume runs/<run folder>  # go on after a stop, Ctrl-C or crash
    python simsiam.py --dataset folder --data-dir /tmp/data/cifar10-jpeg
    python simsiam.py --recipe imagenet --data-dir /data/imagenet  # Sec. 4: ResNet-50, 224 px
    python simsiam.py --no-stop-grad              # Fig. 2: collapses
    python simsiam.py --help                      # every hyper-parameter and its source

Paper -> code (Algorithm 1, in order):

    x1, x2 = aug(x), aug(x)         two random augmentations of a batch   batches(), augment()
    z1, z2 = f(x1), f(x2)           f = backbone + projection MLP          f = Sequential(...)
    p1, p2 = h(z1), h(z2)           h = prediction MLP                     h = predictor()
    L = D(p1, z2)/2 + D(p2, z1)/2   symmetrized loss (Eq. 2)               D() below
    D(p, z) = -cos(p, stopgrad(z))  negative cosine, stop-gradient on z    D(), Eq. 1 and 3
    L.backward(); update(f, h)      SGD, cosine decay, no warm-up          SGD, cosine_lr()

In train(), lines marked `# run` are run plumbing (torchrun, progress lines, checkpoints,
--stop-epoch): delete them and the loop still trains on one GPU.

Evaluation (not part of the method): weighted kNN (k=200, t=0.1) on backbone features every
--eval-every epochs, with the collapse diagnostic of Fig. 2 (std of l2-normalized z: about
1/sqrt(2048) = 0.022 when healthy, 0 when collapsed) and the spectrum and effective rank of z and
of the backbone features; a linear probe on frozen features at the end.

Paper: 91.8% linear top-1 on CIFAR-10, ResNet-18, 800 epochs (App. D). This file's measured
numbers: README.md.

Deviations from the paper (none of them measured on a GPU yet):
  - Augmentation batched on the device (streamed: crops cut by workers); ops equal torchvision's.
  - bf16 autocast on CUDA, the loss in float32: speed, no algorithmic change.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Recipe, RunArgs, augment, autocast, backbone, batches, cosine_lr, distribute,
                    due, epoch_record, evaluate, finish, load_data, log, log_step, parse_args,
                    probe, resume, save_checkpoint, setup, steps_per_epoch)


@dataclass
class Args(RunArgs):
    dataset: str = "cifar10"  # App. D (cifar10 | cifar100 | stl10 | folder | synthetic)
    arch: str = "resnet18"  # App. D: ResNet-18, CIFAR stem (ImageNet: resnet50)
    image_size: int = 32  # App. D (ImageNet: 224)
    zero_init_residual: bool = True  # official code (ImageNet): blocks' last BN starts at 0
    epochs: int = 800  # App. D (ImageNet: 100)
    batch_size: int = 512  # App. D (ImageNet: 512)
    base_lr: float = 0.03  # App. D: lr = base_lr x batch_size / 256 (ImageNet: 0.05)
    weight_decay: float = 5e-4  # App. D (ImageNet: 1e-4)
    momentum: float = 0.9  # Sec. 4
    proj_dim: int = 2048  # App. D: projection MLP 2048 wide
    proj_layers: int = 2  # App. D: 2 layers on CIFAR (ImageNet: 3, Sec. 4)
    pred_hidden: int = 512  # Sec. 4: bottleneck predictor 2048 -> 512 -> 2048
    crop_scale: tuple = (0.2, 1.0)  # App. D: (0.08, 1) hurts on CIFAR
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # Sec. 4 / MoCo v2: brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # MoCo v2
    gray_p: float = 0.2  # MoCo v2
    blur_p: float = 0.0  # App. D: no blur at 32x32 (ImageNet: 0.5)
    stop_grad: bool = True  # --no-stop-grad: Fig. 2, collapses
    predictor: bool = True  # --no-predictor: Table 1a (h = identity), collapses
    fix_pred_lr: bool = False  # Table 1a: lr of h kept constant instead of decayed

# --recipe imagenet: Sec. 4 and 4.1 (ResNet-50, batch 512, 100 epochs); streamed (crops see the
# whole image); evaluation only at the end, cached (README: ImageNet)
IMAGENET = dict(dataset="folder", stream=True, eval_every=0, probe="cached", arch="resnet50",
                image_size=224, epochs=100, batch_size=512, base_lr=0.05, weight_decay=1e-4,
                proj_layers=3, crop_scale=(0.2, 1.0), blur_p=0.5)


def projector(in_dim, dim, layers=2):
    """Projection MLP: 2 layers on CIFAR (App. D), 3 on ImageNet (Sec. 4); BN on every layer,
    ReLU on all but the output, whose BN has no affine."""
    hidden = [m for i in range(layers - 1) for m in (
        nn.Linear(in_dim if i == 0 else dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(True))]
    return nn.Sequential(*hidden, nn.Linear(dim, dim, bias=False),
                         nn.BatchNorm1d(dim, affine=False))


def predictor(dim, hidden):
    """Prediction MLP h (Sec. 4): bottleneck, BN + ReLU in the hidden layer only."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(True),
                         nn.Linear(hidden, dim))


def D(p, z, stop_grad=True):
    """Eq. 1 with Eq. 3: negative cosine similarity of p and stopgrad(z), mean over the batch."""
    if stop_grad:
        z = z.detach()  # stop-gradient: z is a constant here
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(dim=1).mean()


def train(args):
    device, out, ckpt = setup(args)  # device, torchrun, seed, run folder, --resume's options
    data = load_data(args, device)
    encoder = backbone(args.arch, args.image_size, args.zero_init_residual)
    f = nn.Sequential(encoder, projector(encoder.dim, args.proj_dim, args.proj_layers)).to(device)
    h = (predictor(args.proj_dim, args.pred_hidden) if args.predictor else nn.Identity()).to(device)
    lr = args.base_lr * args.batch_size / 256
    optimizer = torch.optim.SGD([{"params": f.parameters(), "fixed_lr": False},
                                 {"params": h.parameters(), "fixed_lr": args.fix_pred_lr}],
                                lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                fused=device.type == "cuda" or None)  # one kernel for the update
    view = Recipe(size=args.image_size, scale=args.crop_scale, jitter=args.jitter,
                  jitter_p=args.jitter_p, gray_p=args.gray_p, blur_p=args.blur_p,
                  compile=args.compile)
    heads = {"z": f[1]}  # evaluation: kNN on the backbone, collapse diagnostics of z
    state = dict(f=f, h=h, optimizer=optimizer)  # what a checkpoint holds
    start, record = resume(args, ckpt, state)  # --resume: the epoch to go on from, else 0
    if start == 0 and args.eval_every:  # the network at initialization, as epoch 0
        record = log(out, {"epoch": 0, **evaluate(encoder, data, args, heads)})
    f, h = distribute(f, args), distribute(h, args)  # run: channels_last, DDP, --compile
    steps = steps_per_epoch(args, len(data.ssl_x))

    for epoch in range(start, args.epochs):
        t0, losses = time.time(), []
        for step, (x1, x2) in enumerate(batches(args, epoch, data, [view, view])):
            k = epoch * steps + step  # cosine decay per step; --fix-pred-lr: h keeps lr
            for group in optimizer.param_groups:
                group["lr"] = lr if group["fixed_lr"] else cosine_lr(k, args.epochs * steps, lr)
            # Alg. step: two randomly augmented views x1, x2 of the batch x (batches() cuts the
            # random crops, augment() does the rest of the recipe)
            x1, x2 = data.normalize(augment(x1, view)), data.normalize(augment(x2, view))
            with autocast(device):
                # Alg. step: projections z1, z2 = f(x1), f(x2)  (f = backbone + projection MLP)
                z1, z2 = f(x1), f(x2)
                # Alg. step: predictions p1, p2 = h(z1), h(z2)
                p1, p2 = h(z1), h(z2)
            # Alg. step: symmetrized loss L = D(p1, z2)/2 + D(p2, z1)/2, stop-gradient inside D
            L = D(p1, z2, args.stop_grad) / 2 + D(p2, z1, args.stop_grad) / 2
            # Alg. step: back-propagate and update f and h with SGD
            optimizer.zero_grad(set_to_none=True)
            L.backward()
            optimizer.step()
            losses.append(L.detach())
            log_step(out, args, epoch, step, steps, L, t0)  # run: progress line, nan/inf stop
        record = epoch_record(out, args, epoch, losses, t0)  # loss over ranks, img/s, ETA
        if due(args, epoch):
            record.update(evaluate(encoder, data, args, heads))
        log(out, record)
        save_checkpoint(out, args, epoch + 1, state, record)  # run: every rank's RNG too
        if epoch + 1 == args.stop_epoch:  # run: stop here, --resume goes on
            break  # run

    if record.get("epoch") == args.epochs and args.probe_epochs:  # the run is complete
        record.update(probe(encoder, data, args))
    return finish(out, args, record, encoder)  # run: backbone.pt, final line


if __name__ == "__main__":
    train(parse_args(Args, recipes={"imagenet": IMAGENET}))
