"""DirectCLR: Understanding Dimensional Collapse in Contrastive Self-supervised Learning.
Li Jing, Pascal Vincent, Yann LeCun and Yuandong Tian, ICLR 2022. https://arxiv.org/abs/2110.09348

    python directclr.py                           # CIFAR-10, ResNet-18, SimCLR's CIFAR recipe
    python directclr.py --smoke                   # a few steps on synthetic data, CPU, < 1 min
    torchrun --nproc_per_node=8 directclr.py      # 8 GPUs: DDP + SyncBN, --batch-size is global
    python directclr.py --resume runs/<run folder>  # go on after a stop, Ctrl-C or crash
    python directclr.py --projector mlp           # the comparison: direct | mlp | linear | none
    python directclr.py --dataset folder --data-dir /tmp/data/cifar10-jpeg
    python directclr.py --recipe imagenet --data-dir /data/imagenet  # Sec. 6: ResNet-50, 224 px
    python directclr.py --help                    # every hyper-parameter and its source

The paper is a finding as much as a method. The finding (Sec. 3-5): contrastive learning suffers
dimensional collapse -- many singular values of the covariance of the embeddings fall to zero --
driven by strong augmentation and by the implicit regularization of stacked (projector) layers;
the representation r before a projector escapes most of it. The method (Sec. 6): no trainable
projector; InfoNCE is applied directly to a fixed sub-vector r[:, :d0] of the representation, and
the rest of r is shaped through the shared layers (residual connections) below it. Reproduce both
by training each --projector value and comparing, in metrics.jsonl, kNN accuracy with the
spectrum and effective rank of r and z (ImageNet linear probe, ResNet-50, 100 epochs, Sec. 6):

    --projector none     SimCLR without a projector: the loss on r itself               51.5
    --projector linear   SimCLR with a 1-layer linear projector z = W r                 61.1
    --projector mlp      SimCLR's 2-layer projector z = BN(W2 ReLU(BN(W1 r)))           66.5
    --projector direct   DirectCLR: the loss on z = r[:, :d0], nothing to train          62.7

Paper -> code (Sec. 6; SimCLR's Alg. 1 for the rest), in order:

    x1, x2 = aug(x), aug(x)          two random augmentations of a batch x  batches(), augment()
    r1, r2 = f(x1), f(x2)            f = ResNet, r = its representation     f = backbone()
    z1, z2 = r1[:, :d0], r2[:, :d0]  DirectCLR: a fixed sub-vector of r,    directclr_loss()
                                     no trainable projector
      (baselines: z = g(r))          g: none, linear, or SimCLR's MLP       g = projector()
    L = InfoNCE(z1, z2)/2 + InfoNCE(z2, z1)/2, with                        directclr_loss()
      InfoNCE(a, b) = mean_i -log softmax_j( cos(a_i, b_j) / tau ) at j = i
    L.backward(); update f (and g)   LARS, linear warm-up + cosine decay    LARS, cosine_lr()

In train(), lines marked `# run` are run plumbing (torchrun, progress lines, checkpoints,
--stop-epoch): delete them and the loop still trains on one GPU.

Negatives: each anchor is compared with the N views of the OTHER side only -- its positive and the
N - 1 other images' other views -- as in the paper's official formulation. SimCLR's L (nt_xent in
simclr.py) also counts the N - 1 other views of the anchor's own side (2N - 2 negatives); the two
agree exactly once those same-side terms are removed from SimCLR's denominator
(tests/test_directclr.py). All four --projector values use this same loss, so only the projector
differs between them.

Choice of d0 (no CIFAR value is published): the official ImageNet run uses d0 = 360 of
ResNet-50's 2048 dimensions. We keep that fraction, d0 = round(360/2048 x dim r): 90 of
ResNet-18's (and the small backbone's) 512 dimensions, 360 for ResNet-50. The fraction, not the
count, is what we carry over: it fixes the share of r the loss shapes directly (the paper's
fixed low-rank diagonal projector) against the share left to follow through the shared layers.
--d0 sets it by hand; a CIFAR sweep of d0 has not been run.

Evaluation (not part of the method): weighted kNN (k=200, t=0.1) on r every --eval-every epochs,
with the paper's diagnostic: the singular values of the covariance of the l2-normalized embeddings
of the test set (metrics.jsonl: spectrum_r for r, spectrum_z for the projector output or for
r[:, :d0]; descending) and their effective rank (rank_r, rank_z); the paper's figure plots the
log of each spectrum against its index. A linear probe on frozen features at the end.

Paper: ImageNet only (above); no CIFAR-10 number has been published. This file's measured
numbers: README.md.

Deviations from the paper (none of them measured on a GPU yet):
  - Defaults: SimCLR's CIFAR-10 recipe (App. B.9: ResNet-18, batch 512, LARS, wd 1e-4, jitter
    0.5, no blur) with DirectCLR's tau 0.1: DirectCLR published ImageNet only.
  - d0 = 90 of a 512-d representation: the official 360 of 2048, rescaled (above).
  - The two views go through f in two passes (BN per view); SimCLR's code concatenates them.
  - Augmentation batched on the device (streamed: crops cut by workers); ops equal torchvision's.
  - bf16 autocast on CUDA, the loss in float32: speed, no algorithmic change.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (LARS, Recipe, RunArgs, augment, autocast, backbone, batches, cosine_lr,
                    distribute, due, epoch_record, evaluate, exclude_bias_and_norm, fail, finish,
                    gather_with_grad, load_data, log, log_step, parse_args, probe, rank, resume,
                    save_checkpoint, setup, steps_per_epoch)

PROJECTORS = ("direct", "mlp", "linear", "none")


@dataclass
class Args(RunArgs):
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic (paper: ImageNet)
    arch: str = "resnet18"  # SimCLR App. B.9: ResNet-18, CIFAR stem (DirectCLR ImageNet: resnet50)
    image_size: int = 32  # CIFAR (ImageNet: 224)
    zero_init_residual: bool = True  # official code: blocks' last BN starts at 0
    projector: str = "direct"  # Sec. 6: direct (DirectCLR) | mlp (SimCLR) | linear | none
    d0: int = 0  # direct: dims of r under the loss; 0: 360/2048 of dim r, the official ratio
    proj_dim: int = 128  # SimCLR Sec. 2.3: 128-d z, for linear and mlp (mlp hidden = dim r)
    epochs: int = 1000  # SimCLR App. B.9 (DirectCLR ImageNet: 100)
    batch_size: int = 512  # SimCLR App. B.9 (DirectCLR ImageNet: 4096)
    base_lr: float = 1.0  # SimCLR CIFAR README: lr = base_lr x batch_size / 256 (ImageNet: 4.8)
    weight_decay: float = 1e-4  # SimCLR CIFAR README (DirectCLR ImageNet: 1e-6)
    momentum: float = 0.9  # SimCLR: LARS momentum
    warmup_epochs: int = 10  # SimCLR Sec. 2.3 and DirectCLR: linear warm-up, then cosine decay
    tau: float = 0.1  # DirectCLR official temperature (SimCLR CIFAR: 0.5)
    crop_scale: tuple = (0.08, 1.0)  # SimCLR App. A: random resized crop area
    jitter_strength: float = 0.5  # SimCLR App. B.9: s = 0.5 on CIFAR (ImageNet: 1.0, App. A)
    jitter_p: float = 0.8  # SimCLR App. A
    gray_p: float = 0.2  # SimCLR App. A
    blur_p: float = 0.0  # SimCLR App. B.9: no blur on CIFAR (DirectCLR ImageNet: BYOL's 1.0 / 0.1)

# --recipe imagenet: Sec. 6 and the official code (ResNet-50, batch 4096, lr 4.8, 100 epochs,
# tau 0.1); its BYOL augmentation is asymmetric (blur 1.0 / 0.1): here one recipe, SimCLR's
# (blur 0.5, colour strength 1); streamed; evaluation only at the end, cached (README: ImageNet)
IMAGENET = dict(dataset="folder", stream=True, eval_every=0, probe="cached", arch="resnet50",
                image_size=224, epochs=100, batch_size=4096, base_lr=0.3, weight_decay=1e-6,
                jitter_strength=1.0, blur_p=0.5)


def projector(kind, dim, out_dim):
    """g of the comparison (Sec. 6), shaped as the official code's baselines. direct and none:
    nothing to train (z is read from r); linear: z = W r, bias-free; mlp: SimCLR's 2-layer
    projector, BN after each bias-free layer, ReLU after the hidden one (hidden = dim r)."""
    if kind == "linear":
        return nn.Linear(dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(True),
                             nn.Linear(dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))
    return nn.Identity()


class FirstDims(nn.Module):
    """z = r[:, :d0]: DirectCLR's fixed 'projector', the diagonal matrix with d0 ones (Sec. 6).
    Nothing to train; used to log the spectrum of the sub-vector the loss sees."""

    def __init__(self, d0):
        super().__init__()
        self.d0 = d0

    def forward(self, r):
        return r[:, :self.d0]


def directclr_loss(r1, r2, d0, tau):
    """DirectCLR's loss (Sec. 6): symmetrized InfoNCE on the first d0 dimensions of r.
    With z = r[:, :d0] / ||r[:, :d0]|| and s_ij = z1_i . z2_j / tau (one row per image, N rows):
        L = 1/(2N) sum_i [ -log( e^{s_ii} / sum_j e^{s_ij} ) - log( e^{s_ii} / sum_j e^{s_ji} ) ]
          = InfoNCE(z1, z2)/2 + InfoNCE(z2, z1)/2
    Each anchor: its positive and the N - 1 other images of the other side (no same-side
    negatives, unlike SimCLR's 2N - 2). Only r[:, :d0] receives gradient. Computed in float32.
    Under torchrun the rows are this rank's share and j runs over the whole global batch, whose
    other-side views are gathered with gradient (common.gather_with_grad)."""
    z1 = F.normalize(r1[:, :d0].float(), dim=1)
    z2 = F.normalize(r2[:, :d0].float(), dim=1)
    positives = torch.arange(len(z1), device=z1.device) + rank() * len(z1)  # i in the global batch
    s12 = z1 @ gather_with_grad(z2).T / tau  # s[i, j]: anchor i of view 1 against image j of view 2
    s21 = z2 @ gather_with_grad(z1).T / tau  # and the other way round
    return F.cross_entropy(s12, positives) / 2 + F.cross_entropy(s21, positives) / 2


def train(args):
    if args.projector not in PROJECTORS:
        fail(f"unknown --projector {args.projector!r}; choose one of {', '.join(PROJECTORS)}")
    device, out, ckpt = setup(args)  # device, torchrun, seed, run folder, --resume's options
    f = backbone(args.arch, args.image_size, args.zero_init_residual).to(device)
    d0 = args.d0 or round(f.dim * 360 / 2048)  # the official ratio, 360 of 2048 (see docstring)
    if not 0 < d0 <= f.dim:
        fail(f"--d0 {args.d0}: must be between 1 and {f.dim}, the dimension of r for --arch "
             f"{args.arch}")
    data = load_data(args, device)
    g = projector(args.projector, f.dim, args.proj_dim).to(device)
    # the loss reads the first d of z's dimensions: DirectCLR d0 of r; the baselines all of z
    d = {"direct": d0, "none": f.dim}.get(args.projector, args.proj_dim)
    lr = args.base_lr * args.batch_size / 256
    optimizer = LARS(exclude_bias_and_norm(f, g), lr=lr, weight_decay=args.weight_decay,
                     momentum=args.momentum)
    s = args.jitter_strength  # SimCLR App. A: brightness, contrast, saturation 0.8 s, hue 0.2 s
    view = Recipe(size=args.image_size, scale=args.crop_scale,
                  jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=args.jitter_p,
                  gray_p=args.gray_p, blur_p=args.blur_p, compile=args.compile)
    # evaluation: kNN and spectrum of r; z: the projector's output, or the sub-vector r[:, :d0]
    encoder, heads = f, {"direct": {"z": FirstDims(d0)}, "none": {}}.get(args.projector, {"z": g})
    state = dict(f=f, g=g, optimizer=optimizer)  # what a checkpoint holds
    start, record = resume(args, ckpt, state)  # --resume: the epoch to go on from, else 0
    if start == 0 and args.eval_every:  # the network at initialization, as epoch 0
        record = log(out, {"epoch": 0, **evaluate(encoder, data, args, heads)})
    f, g = distribute(f, args), distribute(g, args)  # run: channels_last, DDP, --compile
    steps = steps_per_epoch(args, len(data.ssl_x))
    total, warmup = args.epochs * steps, args.warmup_epochs * steps

    for epoch in range(start, args.epochs):
        t0, losses = time.time(), []
        for step, (x1, x2) in enumerate(batches(args, epoch, data, [view, view])):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(epoch * steps + step, total, lr, warmup)
            # Alg. step: two randomly augmented views x1, x2 of the batch x (batches() cuts the
            # random crops, augment() does the rest of the recipe)
            x1, x2 = data.normalize(augment(x1, view)), data.normalize(augment(x2, view))
            with autocast(device):
                # Alg. step: representations r1, r2 = f(x1), f(x2)
                r1, r2 = f(x1), f(x2)
                # Alg. step: DirectCLR has no trainable projector, z = r (baselines: z = g(r))
                z1, z2 = g(r1), g(r2)
            # Alg. step: L = InfoNCE(z1, z2)/2 + InfoNCE(z2, z1)/2 on the first d dimensions
            L = directclr_loss(z1, z2, d, args.tau)
            # Alg. step: back-propagate and update f (and g) with LARS
            optimizer.zero_grad(set_to_none=True)
            L.backward()
            optimizer.step()
            losses.append(L.detach())
            log_step(out, args, epoch, step, steps, L, t0)  # run: progress line, nan/inf stop
        record = epoch_record(out, args, epoch, losses, t0)  # loss over ranks, img/s, ETA
        record["d0"] = d0
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
