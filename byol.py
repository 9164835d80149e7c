"""BYOL: Bootstrap Your Own Latent, a new approach to self-supervised learning.
Jean-Bastien Grill, Florian Strub, Florent Altche, Corentin Tallec, Pierre H. Richemond et al.,
NeurIPS 2020. https://arxiv.org/abs/2006.07733

    python byol.py                             # CIFAR-10 recipe (ResNet-18, 1000 epochs)
    python byol.py --smoke                     # a few steps on synthetic data, CPU, < 1 min
    torchrun --nproc_per_node=8 byol.py        # 8 GPUs: DDP + SyncBN, --batch-size is global
    python byol.py --resume runs/<run folder>  # go on after a stop, Ctrl-C or crash
    python byol.py --dataset folder --data-dir /tmp/data/cifar10-jpeg
    python byol.py --recipe imagenet --data-dir /data/imagenet  # Sec. 3.3: ResNet-50, 224 px
    python byol.py --tau-base 1                # Sec. 5: target never updated, stays random
    python byol.py --help                      # every hyper-parameter and its source

Paper -> code (Algorithm 1, in order):

    v, v' = t(x), t'(x)             t ~ T, t' ~ T' (asymmetric, Sec. 3.3)   augment(x, T)
    z = g_theta(f_theta(v))         online projections of both views        online = (f, g)
    q_theta(z)                      online predictions                      q = mlp()
    z' = g_xi(f_xi(v'))             target projections, no gradient         target = copy
    L = 2 - 2 cos(q_theta(z), z')   = ||q_bar - z'_bar||^2 (Eq. 2), plus    regression_loss()
                                    L~ with the views swapped
    theta <- opt(theta, dL/dtheta)  LARS, warm-up + cosine; theta only      LARS, cosine_lr()
    xi <- tau xi + (1 - tau) theta  target update after each step (Eq. 1)   ema_update()
    tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2  (Sec. 3.3)             tau_schedule()

In train(), lines marked `# run` are run plumbing (torchrun, progress lines, checkpoints,
--stop-epoch): delete them and the loop still trains on one GPU.

Evaluation (not part of the method): weighted kNN (k=200, t=0.1) on the online encoder's
features f_theta every --eval-every epochs, with collapse diagnostics (std of l2-normalized z,
about 1/sqrt(256) = 0.063 when healthy, 0 when collapsed; spectrum and effective rank); a linear
probe on frozen features at the end. The online encoder is the one the paper keeps.

Reference: 92.6% online linear top-1 on CIFAR-10, ResNet-18, 1000 epochs, with the recipe that
gives the defaults below (solo-learn's CIFAR-10 BYOL); the paper itself reports ImageNet only
(74.3% linear, ResNet-50, 1000 epochs). This file's measured numbers: README.md.

Deviations from the paper (none of them measured on a GPU yet):
  - CIFAR-10 defaults (the paper has none): batch 256, LARS lr 1.0 with trust coefficient 0.02
    and LARC clipping, wd 1e-5, tau_base 0.99, no blur; ImageNet values in the Args comments.
  - Augmentation batched on the device (streamed: crops cut by workers); ops equal torchvision's.
  - bf16 autocast on CUDA, the losses in float32: speed, no algorithmic change.
  - The target's BN running statistics are its own, not averaged: they never enter the loss.
  - Each view goes through each network in its own pass (BN statistics per view; the paper
    leaves this open).
"""
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (LARS, Recipe, RunArgs, augment, autocast, backbone, batches, cosine_lr,
                    distribute, due, epoch_record, evaluate, exclude_bias_and_norm, finish,
                    load_data, log, log_step, parse_args, probe, resume, save_checkpoint, setup,
                    steps_per_epoch)


@dataclass
class Args(RunArgs):
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    arch: str = "resnet18"  # CIFAR recipe: ResNet-18, CIFAR stem (ImageNet: resnet50)
    image_size: int = 32  # CIFAR recipe (ImageNet: 224)
    zero_init_residual: bool = False  # torchvision's default
    epochs: int = 1000  # CIFAR recipe (ImageNet: 1000, Sec. 3.3)
    batch_size: int = 256  # CIFAR recipe (ImageNet: 4096, Sec. 3.3)
    base_lr: float = 1.0  # CIFAR recipe: lr = base_lr x batch_size / 256 (ImageNet: 0.2, Sec. 3.3)
    weight_decay: float = 1e-5  # CIFAR recipe (ImageNet: 1.5e-6, Sec. 3.3)
    momentum: float = 0.9  # LARS momentum, as in the CIFAR recipe and SimCLR's LARS
    lars_eta: float = 0.02  # CIFAR recipe: LARS trust coefficient (ImageNet, Sec. 3.3: 0.001)
    lars_clip: bool = True  # CIFAR recipe: LARC clipping, no step beyond SGD's (ImageNet: off)
    warmup_epochs: int = 10  # CIFAR recipe and Sec. 3.3: linear warm-up, then cosine decay
    tau_base: float = 0.99  # CIFAR recipe: target decay at k=0, ramped to 1 (ImageNet: 0.996)
    proj_hidden: int = 4096  # Sec. 3.3: g = Linear(4096)-BN-ReLU-Linear(256)
    proj_dim: int = 256  # Sec. 3.3
    pred_hidden: int = 4096  # Sec. 3.3: q has the shape of g
    crop_scale: tuple = (0.08, 1.0)  # App. B: random resized crop area
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # App. B: brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # App. B
    gray_p: float = 0.2  # App. B
    blur_p: tuple = (0.0, 0.0)  # CIFAR recipe: no blur (ImageNet: 1.0 for T, 0.1 for T', App. B)
    solarize_p: tuple = (0.0, 0.2)  # CIFAR recipe and App. B: 0 for T, 0.2 for T'

# --recipe imagenet: Sec. 3.3 and App. B (ResNet-50, batch 4096, LARS eta 0.001 unclipped);
# streamed (crops see the whole image); evaluation only at the end, cached (README: ImageNet)
IMAGENET = dict(dataset="folder", stream=True, eval_every=0, probe="cached", arch="resnet50",
                image_size=224, epochs=1000, batch_size=4096, base_lr=0.2, weight_decay=1.5e-6,
                lars_eta=0.001, lars_clip=False, tau_base=0.996, blur_p=(1.0, 0.1),
                solarize_p=(0.0, 0.2))


def mlp(in_dim, hidden, out_dim):
    """Projector g and predictor q (Sec. 3.3): Linear-BN-ReLU-Linear, no BN on the output."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def regression_loss(q, z):
    """Eq. 2: ||q/||q|| - z'/||z'|| ||^2 = 2 - 2 cos(q, z'), mean over the batch. z' comes from
    the target network: it is a constant here (BYOL minimizes w.r.t. theta only)."""
    q, z = F.normalize(q.float(), dim=1), F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (q * z).sum(dim=1)).mean()


def tau_schedule(k, K, tau_base):
    """Sec. 3.3: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, tau_base at k=0 to 1 at k=K."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / K) + 1) / 2


@torch.no_grad()
def ema_update(target, online, tau):
    """Eq. 1 (Sec. 3.1): xi <- tau xi + (1 - tau) theta for every parameter. Buffers (BN running
    statistics) are left to the target's own forward passes (see the module docstring)."""
    xi, theta = list(target.parameters()), [p.detach() for p in online.parameters()]
    torch._foreach_mul_(xi, tau)  # all tensors at once (one kernel launch per op, not per tensor)
    torch._foreach_add_(xi, theta, alpha=1 - tau)


def train(args):
    device, out, ckpt = setup(args)  # device, torchrun, seed, run folder, --resume's options
    data = load_data(args, device)
    encoder = backbone(args.arch, args.image_size, args.zero_init_residual)
    # online network theta: encoder f, projector g (here), predictor q (below)
    online = nn.Sequential(encoder, mlp(encoder.dim, args.proj_hidden, args.proj_dim)).to(device)
    q = mlp(args.proj_dim, args.pred_hidden, args.proj_dim).to(device)
    # target network xi: encoder and projector, initialized as the online ones, never optimized
    target = copy.deepcopy(online).requires_grad_(False)
    lr = args.base_lr * args.batch_size / 256
    optimizer = LARS(exclude_bias_and_norm(online, q), lr=lr, weight_decay=args.weight_decay,
                     momentum=args.momentum, eta=args.lars_eta, clip=args.lars_clip)
    common_aug = dict(size=args.image_size, scale=args.crop_scale, jitter=args.jitter,
                      jitter_p=args.jitter_p, gray_p=args.gray_p, compile=args.compile)
    T = Recipe(**common_aug, blur_p=args.blur_p[0], solarize_p=args.solarize_p[0])
    T_prime = Recipe(**common_aug, blur_p=args.blur_p[1], solarize_p=args.solarize_p[1])
    heads = {"z": online[1]}  # evaluation: kNN on f_theta, collapse diagnostics of z
    state = dict(online=online, q=q, target=target, optimizer=optimizer)  # what a checkpoint holds
    start, record = resume(args, ckpt, state)  # --resume: the epoch to go on from, else 0
    if start == 0 and args.eval_every:  # the network at initialization, as epoch 0
        record = log(out, {"epoch": 0, **evaluate(encoder, data, args, heads)})
    # run: several GPUs: online and q average their gradients; the target (nothing to train)
    # stays outside DDP and, updated from identical online weights, stays identical too
    online, q, target = distribute(online, args), distribute(q, args), distribute(target, args)
    steps = steps_per_epoch(args, len(data.ssl_x))
    K, warmup = args.epochs * steps, args.warmup_epochs * steps

    for epoch in range(start, args.epochs):
        t0, losses = time.time(), []
        for step, (v, v_prime) in enumerate(batches(args, epoch, data, [T, T_prime])):
            k = epoch * steps + step
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(k, K, lr, warmup)
            # Alg. step: sample a batch x and views v = t(x), v' = t'(x) with t ~ T, t' ~ T'
            # (batches() cuts the random crops, augment() does the rest)
            v, v_prime = data.normalize(augment(v, T)), data.normalize(augment(v_prime, T_prime))
            with autocast(device):
                # Alg. step: online projections z = g_theta(f_theta(.)) of both views
                z1, z2 = online(v), online(v_prime)
                # Alg. step: online predictions q_theta(z)
                q1, q2 = q(z1), q(z2)
                # Alg. step: target projections z' = g_xi(f_xi(.)) of both views, no gradient
                with torch.no_grad():
                    z1_xi, z2_xi = target(v), target(v_prime)
            # Alg. step: L + L~ (Eq. 2, symmetrized): each view's prediction regresses the
            # target projection of the other view
            L = regression_loss(q1, z2_xi) + regression_loss(q2, z1_xi)
            # Alg. step: gradient w.r.t. theta only, optimizer step on the online network
            optimizer.zero_grad(set_to_none=True)
            L.backward()
            optimizer.step()
            # Alg. step: target update xi <- tau xi + (1 - tau) theta, tau ramped to 1
            ema_update(target, online, tau_schedule(k, K, args.tau_base))
            losses.append(L.detach())
            log_step(out, args, epoch, step, steps, L, t0)  # run: progress line, nan/inf stop
        record = epoch_record(out, args, epoch, losses, t0)  # loss over ranks, img/s, ETA
        record["tau"] = tau_schedule((epoch + 1) * steps, K, args.tau_base)
        if due(args, epoch):
            record.update(evaluate(encoder, data, args, heads))
        log(out, record)
        save_checkpoint(out, args, epoch + 1, state, record)  # run: every rank's RNG too
        if epoch + 1 == args.stop_epoch:  # run: stop here, --resume goes on
            break  # run

    if record.get("epoch") == args.epochs and args.probe_epochs:  # the run is complete
        record.update(probe(encoder, data, args))  # the online encoder, as the paper
    return finish(out, args, record, encoder)  # run: backbone.pt, final line


if __name__ == "__main__":
    train(parse_args(Args, recipes={"imagenet": IMAGENET}))
