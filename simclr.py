"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.
Ting Chen, Simon Kornblith, Mohammad Norouzi and Geoffrey Hinton, ICML 2020.
https://arxiv.org/abs/2002.05709

    python simclr.py                             # CIFAR-10 recipe of App. B.9 (ResNet-18)
    python simclr.py --smoke                     # a few steps on synthetic data, CPU, < 1 min
    torchrun --nproc_per_node=8 simclr.py        # 8 GPUs: DDP + SyncBN, --batch-size is global
    python simclr.py --resume runs/<run folder>  # go on after a stop, Ctrl-C or crash
    python simclr.py --dataset folder --data-dir /tmp/data/cifar10-jpeg
    python simclr.py --recipe imagenet --data-dir /data/imagenet  # Sec. 2.3: ResNet-50, 224 px
    python simclr.py --temperature 0.1           # App. B.9: tau matters on CIFAR (0.5 was best)
    python simclr.py --help                      # every hyper-parameter and its source

Paper -> code (Algorithm 1, in order):

    x~_2k-1, x~_2k = t(x_k), t'(x_k)  two augmentations of each example     batches(), augment()
    h = f(x~)                         representation (backbone)             f = backbone()
    z = g(h)                          projection, 2-layer MLP               g = projection_head()
    s_ij = z_i.z_j / (|z_i| |z_j|)    cosine similarity, all 2N x 2N pairs  nt_xent()
    l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau)           nt_xent() (Eq. 1)
    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]  mean over 2N anchors      nt_xent()
    update f and g to minimize L      LARS, linear warm-up + cosine decay   LARS, cosine_lr()
    return f, throw g away            evaluation uses h = f(x)              evaluate(f, ...)

In train(), lines marked `# run` are run plumbing (torchrun, progress lines, checkpoints,
--stop-epoch): delete them and the loop still trains on one GPU.

Evaluation (not part of the method): weighted kNN (k=200, t=0.1) on h = f(x) every --eval-every
epochs, with collapse diagnostics of h and z (std of l2-normalized outputs, spectrum and
effective rank; contrastive losses show dimensional collapse there, not complete collapse); a
linear probe on frozen h at the end.

Reference: about 91% linear top-1 on CIFAR-10 with ResNet-18 (SimSiam App. D: 91.1, 800
epochs; solo-learn: 90.7, 1000 epochs); the paper itself: 94.0% with ResNet-50, batch 1024, 1000
epochs (App. B.9). This file's measured numbers: README.md.

Deviations from the paper (none of them measured on a GPU yet):
  - Both views go through f in one pass of 2N images: BN over all views, as global BN (Sec. 2.2).
  - Augmentation batched on the device (streamed: crops cut by workers); ops equal torchvision's.
  - bf16 autocast on CUDA, the loss in float32: speed, no algorithmic change.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (LARS, Recipe, RunArgs, augment, autocast, backbone, batches, cosine_lr,
                    distribute, due, epoch_record, evaluate, exclude_bias_and_norm, finish,
                    gather_with_grad, load_data, log, log_step, parse_args, probe, rank, resume,
                    save_checkpoint, setup, steps_per_epoch, world_size)


@dataclass
class Args(RunArgs):
    dataset: str = "cifar10"  # App. B.9 (cifar10 | cifar100 | stl10 | folder | synthetic)
    arch: str = "resnet18"  # README CIFAR recipe: ResNet-18, CIFAR stem (App. B.9: resnet50)
    image_size: int = 32  # App. B.9 (ImageNet: 224)
    zero_init_residual: bool = True  # official code: blocks' last BN starts at 0
    epochs: int = 1000  # App. B.9 and README CIFAR recipe (ImageNet: 100, Sec. 2.3)
    batch_size: int = 512  # README CIFAR recipe (App. B.9: 256 to 4096; ImageNet: 4096)
    base_lr: float = 1.0  # README CIFAR recipe: lr = base_lr x batch_size / 256 (ImageNet: 0.3)
    weight_decay: float = 1e-4  # README CIFAR recipe (ImageNet: 1e-6, Sec. 2.3)
    momentum: float = 0.9  # LARS momentum
    warmup_epochs: int = 10  # Sec. 2.3: linear warm-up for 10 epochs, then cosine decay
    temperature: float = 0.5  # App. B.9 and README CIFAR recipe: tau of Eq. 1 (ImageNet: 0.1)
    proj_dim: int = 128  # Sec. 2.3: z is 128-d; the hidden layer of g is as wide as h
    crop_scale: tuple = (0.08, 1.0)  # App. A: random resized crop area
    jitter_strength: float = 0.5  # App. B.9: s = 0.5 on CIFAR (ImageNet: 1.0, App. A)
    jitter_p: float = 0.8  # App. A
    gray_p: float = 0.2  # App. A
    blur_p: float = 0.0  # App. B.9: no blur at 32x32 (ImageNet: 0.5, App. A)

# --recipe imagenet: Sec. 2.3, App. A and B.1 (ResNet-50, batch 4096, 100 epochs, tau 0.1,
# colour strength 1, blur 0.5); streamed; evaluation only at the end, cached (README: ImageNet)
IMAGENET = dict(dataset="folder", stream=True, eval_every=0, probe="cached", arch="resnet50",
                image_size=224, epochs=100, batch_size=4096, base_lr=0.3, weight_decay=1e-6,
                temperature=0.1, jitter_strength=1.0, blur_p=0.5)


def projection_head(dim, out_dim):
    """g (Sec. 2.1): z = W2 relu(W1 h), an MLP with one hidden layer as wide as h, z 128-d
    (Sec. 2.3, App. B.9)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(True), nn.Linear(dim, out_dim))


def nt_xent(z1, z2, tau):
    """L of Algorithm 1 (NT-Xent, Eq. 1): views z1[k], z2[k] of example k form the positive pair;
    each of the 2N views is an anchor whose 2N - 2 negatives are all views of the other examples;
    the mean over the 2N anchors. N is taken from the inputs, so any batch size works.
    Under torchrun the N examples are this rank's share: its 2N anchors are compared with the
    views of the whole global batch, gathered with gradient (common.gather_with_grad)."""
    N, z1, z2 = len(z1), z1.float(), z2.float()  # float32 before the gather: its gradient too
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # this rank's 2N anchors: k and k + N a pair
    z_all = F.normalize(torch.cat([gather_with_grad(z1), gather_with_grad(z2)]), dim=1)  # 2NW x d
    s = z @ z_all.T / tau  # s_ij / tau for every anchor i and every view j of the global batch
    M = N * world_size()  # global number of examples: view j of z_all pairs with j + M
    k = torch.arange(N, device=z.device)  # built on the device: no host copy per step
    own = torch.cat([k, k + M]) + rank() * N  # where anchor i sits in z_all
    s = s.scatter(1, own.view(-1, 1), float("-inf"))  # leave out k = i
    positive = (own + M) % (2 * M)  # anchor i's positive: the other view of the same example
    # l(i, j) = -log softmax over k != i of s_ik / tau, taken at the positive j
    return F.cross_entropy(s, positive)


def train(args):
    device, out, ckpt = setup(args)  # device, torchrun, seed, run folder, --resume's options
    data = load_data(args, device)
    f = backbone(args.arch, args.image_size, args.zero_init_residual).to(device)
    g = projection_head(f.dim, args.proj_dim).to(device)
    lr = args.base_lr * args.batch_size / 256
    optimizer = LARS(exclude_bias_and_norm(f, g), lr=lr, weight_decay=args.weight_decay,
                     momentum=args.momentum)
    s = args.jitter_strength  # App. A: brightness, contrast, saturation 0.8 s, hue 0.2 s
    view = Recipe(size=args.image_size, scale=args.crop_scale,
                  jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=args.jitter_p,
                  gray_p=args.gray_p, blur_p=args.blur_p, compile=args.compile)
    encoder, heads = f, {"z": g}  # evaluation: kNN on h = f(x), diagnostics of h and z
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
            # Alg. step: two augmentations t, t' ~ T of every example x_k (batches() cuts the
            # random crops, augment() does the rest)
            x1, x2 = data.normalize(augment(x1, view)), data.normalize(augment(x2, view))
            with autocast(device):
                # Alg. step: representations h = f(x~) of all 2N views (one pass: BN over all)
                h = f(torch.cat([x1, x2]))
                # Alg. step: projections z = g(h)
                z1, z2 = g(h).chunk(2)
            # Alg. step: pairwise similarities s_ij, L = mean over 2N anchors of l(i, j) (Eq. 1)
            L = nt_xent(z1, z2, args.temperature)
            # Alg. step: update f and g to minimize L
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

    # Alg. step: keep the encoder f, throw g away (evaluation uses h = f(x))
    if record.get("epoch") == args.epochs and args.probe_epochs:  # the run is complete
        record.update(probe(encoder, data, args))
    return finish(out, args, record, encoder)  # run: backbone.pt, final line


if __name__ == "__main__":
    train(parse_args(Args, recipes={"imagenet": IMAGENET}))
