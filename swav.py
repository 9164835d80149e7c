"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments.
Mathilde Caron, Ishan Misra, Julien Mairal, Priya Goyal, Piotr Bojanowski and Armand Joulin,
NeurIPS 2020. https://arxiv.org/abs/2006.09882

    python swav.py                              # CIFAR-10 recipe: ResNet-18, 2 crops of 32 px
    python swav.py --smoke                      # a few steps on synthetic data, CPU, < 1 min
    torchrun --nproc_per_node=8 swav.py         # 8 GPUs: DDP + SyncBN, --batch-size is global
    python swav.py --resume runs/<run folder>   # go on after a stop, Ctrl-C or crash
    python swav.py --dataset folder --data-dir /tmp/data/cifar10-jpeg
    python swav.py --n-small 4 --global-scale 0.14 1  # multi-crop: + 4 crops of 16 px
    python swav.py --recipe imagenet --data-dir /data/imagenet  # Sec. 4: 2x224 + 6x96 crops
    python swav.py --help                       # every hyper-parameter and its source

Paper -> code (Algorithm 1, in order):

    x_1 .. x_(2+V) = crops(x)    2 full-resolution + V small crops        batches(), augment()
    z = f(x) / ||f(x)||          f = backbone + projection head, z on     f = Sequential(...)
                                 the unit sphere (D = 128)
    scores = z C                 C: K prototypes c_k of unit length       C = prototypes()
    q = sinkhorn(scores)         codes of the full-resolution crops:      sinkhorn() (Sec. 3.1)
                                 no gradient, the batch split equally
                                 among the K prototypes
    p = softmax(scores / tau)    every crop's prediction (Eq. 2)          swav_loss()
    L = -sum_k q log p, swapped  each crop predicts the codes of the      swav_loss() (Eq. 1, 2;
                                 other full-resolution crop(s)            multi-crop, Sec. 3.2)
    L.backward(); update(f, C)   LARS, warm-up + cosine; C frozen first   LARS, cosine_lr()
    C = normalize(C)             prototypes back to unit length           normalize_prototypes()
    queue (small batches, 3.1)   past features join Sinkhorn; only the    Queue, queue_scores
                                 batch's rows of Q are used

In train(), lines marked `# run` are run plumbing (torchrun, progress lines, checkpoints,
--stop-epoch): delete them and the loop still trains on one GPU.

Evaluation (not part of the method): weighted kNN (k=200, t=0.1) on backbone features every
--eval-every epochs, with the std of the l2-normalized projector output z (about 1/sqrt(128) =
0.088 when spread, 0 when collapsed) and the spectrum / effective rank of z and of the backbone
features; a linear probe on frozen features at the end.

A loss stuck at ln K (8.01 for K = 3000): the features collapsed and every code is uniform; SwAV's
authors suggest a smaller eps, a milder augmentation, fewer crops or prototypes frozen longer.

Published: 89.2% online linear on CIFAR-10, ResNet-18, 1000 epochs, 2 crops (solo-learn); paper:
75.3% ImageNet linear, ResNet-50, 800 epochs, 2x224 + 6x96 crops. Measured numbers: README.md.

Deviations from the paper (none of them measured on a GPU yet):
  - Augmentation batched on the device (streamed: crops cut by workers); ops equal torchvision's.
  - Sinkhorn in float32 in the log domain (log-sum-exp): Alg. 1's result, finite for any eps.
  - Projection head, scores z C and loss in float32 outside bf16 autocast: Sinkhorn divides the
    scores by eps, magnifying bf16 rounding 20 times.
  - The loss sums over the K prototypes (Eq. 2); Alg. 1's mean() over B x K only divides by K.
  - Prototypes re-normalized after each update (Alg. 1: before; the same values), frozen for
    whole epochs.
  - Defaults: the published CIFAR-10 recipe, 2 crops (multi-crop: 16 px, half the side as 96).
  - One queue per full-resolution crop, filled from the first step, joining Sinkhorn from
    --queue-start-epoch, its scores by the current prototypes.
  - Under torchrun each rank keeps queue_length / processes features (as the official code),
    so the queue over all ranks keeps the recipe's length.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import (LARS, Recipe, RunArgs, all_reduce, augment, autocast, backbone, batches,
                    cosine_lr, distribute, due, epoch_record, evaluate, exclude_bias_and_norm,
                    fail, finish, load_data, log, log_step, parse_args, probe, rank, resume,
                    save_checkpoint, setup, steps_per_epoch, unwrap, world_size)


@dataclass
class Args(RunArgs):
    dataset: str = "cifar10"  # CIFAR-10 recipe (cifar10 | cifar100 | stl10 | folder | synthetic)
    arch: str = "resnet18"  # CIFAR recipe: ResNet-18, CIFAR stem (ImageNet: resnet50)
    image_size: int = 32  # side of the full-resolution crops (ImageNet: 224)
    zero_init_residual: bool = False  # official code: torchvision's default
    epochs: int = 1000  # CIFAR recipe (ImageNet: 800)
    batch_size: int = 256  # CIFAR recipe (ImageNet: 4096, or 256 with the queue)
    base_lr: float = 0.6  # CIFAR recipe: lr = base_lr x batch_size / 256 (ImageNet: 4.8 at 4096)
    warmup_epochs: int = 10  # CIFAR recipe: linear warm-up, then cosine decay
    weight_decay: float = 1e-6  # CIFAR recipe and ImageNet
    momentum: float = 0.9  # LARS momentum
    lars_eta: float = 0.02  # CIFAR recipe: LARS trust coefficient (SwAV's ImageNet code: 0.001)
    lars_clip: bool = True  # CIFAR recipe: LARC clipping, no step beyond SGD's (ImageNet: off)
    final_lr_ratio: float = 0.001  # CIFAR recipe and ImageNet: cosine decay to lr / 1000
    hidden_dim: int = 2048  # projection head: 2-layer MLP, hidden 2048 with BN and ReLU
    feat_dim: int = 128  # D: output of the projection head and dimension of the prototypes
    n_prototypes: int = 3000  # K (CIFAR recipe and ImageNet)
    temperature: float = 0.1  # tau of Eq. 2, all runs of the paper
    eps: float = 0.05  # Sinkhorn entropy weight, all runs of the paper (loss stuck at ln K: 0.03)
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations, Alg. 1
    freeze_prototypes_epochs: int = 2  # CIFAR recipe: C fixed for the first epochs (ImageNet: 1)
    queue_length: int = 3840  # Sec. 3.1 small batches; CIFAR recipe, ImageNet at 256 (0: none)
    queue_start_epoch: int = 50  # CIFAR recipe: the queue joins Sinkhorn here (ImageNet: 15)
    n_global: int = 2  # Sec. 3.2: full-resolution crops, the only ones whose codes are computed
    global_scale: tuple = (0.08, 1.0)  # CIFAR recipe (multi-crop: 0.14 1, Sec. 3.2)
    n_small: int = 0  # CIFAR recipe: 2 crops only (multi-crop: 4 of 16 px; ImageNet: 6 of 96)
    small_size: int = 16  # side of the small crops: half of 32, as 96 is about half of 224
    small_scale: tuple = (0.05, 0.14)  # multi-crop: area fraction of the small crops
    jitter: tuple = (0.8, 0.8, 0.8, 0.2)  # colour distortion of strength 1 (b, c, s, hue)
    jitter_p: float = 0.8  # SimCLR / SwAV colour distortion
    gray_p: float = 0.2  # SimCLR / SwAV colour distortion
    blur_p: float = 0.0  # no blur at 32x32 (ImageNet: 0.5)

# --recipe imagenet: Sec. 4 and App. A, the 800-epoch multi-crop run (2 x 224 + 6 x 96, batch
# 4096: lr 4.8, no queue, LARS 0.001 unclipped, C frozen 1 epoch); streamed; cached probe only
IMAGENET = dict(dataset="folder", stream=True, eval_every=0, probe="cached", arch="resnet50",
                image_size=224, epochs=800, batch_size=4096, base_lr=0.3, weight_decay=1e-6,
                lars_eta=0.001, lars_clip=False, freeze_prototypes_epochs=1, queue_length=0,
                global_scale=(0.14, 1.0), n_small=6, small_size=96, blur_p=0.5)


def projector(in_dim, hidden, out):
    """Projection head of f, as in the paper: 2-layer MLP, BN and ReLU in the hidden layer; run
    in float32 (its output becomes the scores that Sinkhorn divides by eps)."""
    return Float32(nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, out)))


class Float32(nn.Module):
    """Its module, run in float32 outside autocast."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())


def prototypes(dim, K):
    """C: the K prototypes c_k as a bias-free linear layer (its weight holds c_k as rows), so that
    C(z) = z C are the scores z . c_k; unit length from the start."""
    C = nn.Linear(dim, K, bias=False)
    normalize_prototypes(C)
    return C


@torch.no_grad()
def normalize_prototypes(C):
    """Put every prototype c_k back on the unit sphere (Alg. 1)."""
    C.weight.copy_(F.normalize(C.weight, dim=1))


def log_sum(log_x, dim, over_ranks=False):
    """log(sum(exp(log_x))) along dim, with the max subtracted before exp so that nothing
    overflows. over_ranks: the sum also runs over the rows of every rank (torchrun), for the sums
    over the samples of the global batch: the max and the sum are all-reduced."""
    m = log_x.amax(dim=dim, keepdim=True)
    if over_ranks:
        m = all_reduce(m, "max")
    total = (log_x - m).exp().sum(dim=dim, keepdim=True)
    if over_ranks:
        total = all_reduce(total)
    return m + total.log()


@torch.no_grad()
def sinkhorn(scores, eps=0.05, niters=3):
    """Codes Q for scores B x K (Sec. 3.1, Alg. 1): Q = Diag(u) exp(scores / eps)^T Diag(v), the
    Sinkhorn-Knopp iterations scale the rows (prototypes) to 1/K and the columns (samples) to 1/B,
    so that the batch is split equally among the prototypes. Returns B x K, each row a
    distribution over the prototypes. No gradient; float32 in the log domain (see log_sum).
    Under torchrun the B samples are this rank's share: the sums over samples and B itself run
    over the global batch, so the codes equal those of one process holding all the scores."""
    K, B = scores.shape[1], len(scores) * world_size()  # B: samples in the global batch
    log_Q = scores.float().T / eps  # K x B: Q = exp(scores / eps)^T, kept as log Q
    for _ in range(niters):
        log_Q = log_Q - log_sum(log_Q, dim=1, over_ranks=True) - math.log(K)  # prototypes: 1/K
        log_Q = log_Q - log_sum(log_Q, dim=0) - math.log(B)  # every sample gets 1/B
    return (log_Q + math.log(B)).exp().T  # times B: each sample's code sums to 1


def swav_loss(scores, n_global, temperature=0.1, eps=0.05, niters=3, queue_scores=None):
    """Swapped prediction (Eq. 1, 2) with multi-crop (Sec. 3.2). scores: one B x K tensor per crop,
    the first n_global from the full-resolution crops. The codes q_i of each full-resolution crop i
    are predicted from every other crop v by p_v = softmax(scores_v / temperature); the loss is
    the cross-entropy -sum_k q_i log p_v, averaged over the batch and the n_global x (crops - 1)
    pairs (i, v). queue_scores[i] (L x K): stored features of crop i against the prototypes; they
    join the Sinkhorn step and only the batch's rows of Q are kept."""
    B = len(scores[0])
    loss, pairs = 0.0, 0
    for i in range(n_global):
        s = scores[i] if queue_scores is None else torch.cat([scores[i], queue_scores[i]])
        q = sinkhorn(s, eps, niters)[:B]  # codes of crop i, no gradient
        for v in range(len(scores)):
            if v != i:
                log_p = F.log_softmax(scores[v].float() / temperature, dim=1)
                loss = loss - (q * log_p).sum(dim=1).mean()
                pairs += 1
    return loss / pairs


class Queue(nn.Module):
    """The queue (Sec. 3.1, small batches): the features z of the full-resolution crops of the
    last `length` samples, newest first, one queue per crop (n_global x L x D), L growing to
    `length`. A module so that checkpoints save it with the rest of the state. Under torchrun
    each rank keeps its own, and a checkpoint holds every rank's."""

    def __init__(self, n_global, length, dim, device=None):
        super().__init__()
        self.length, self.z = length, torch.zeros(n_global, 0, dim, device=device)

    def push(self, z):
        """First in, first out: the batch's z (n_global x B x D) in front, the oldest out."""
        self.z = torch.cat([z.detach().float(), self.z], dim=1)[:, :self.length]

    def get_extra_state(self):  # every rank's queue (all ranks call this: an all-gather)
        if world_size() == 1:
            return [self.z]
        queues = [None] * world_size()
        dist.all_gather_object(queues, self.z.cpu())
        return queues

    def set_extra_state(self, queues):  # this rank's
        self.z = queues[rank() % len(queues)].to(self.z.device)


def train(args):
    if args.n_global < 1 or args.n_global + args.n_small < 2:
        fail(f"--n-global {args.n_global} --n-small {args.n_small}: need at least 1 "
             f"full-resolution crop and 2 crops in all")
    device, out, ckpt = setup(args)  # device, torchrun, seed, run folder, --resume's options
    data = load_data(args, device)
    encoder = backbone(args.arch, args.image_size, args.zero_init_residual)
    f = nn.Sequential(encoder, projector(encoder.dim, args.hidden_dim, args.feat_dim)).to(device)
    C = prototypes(args.feat_dim, args.n_prototypes).to(device)
    lr = args.base_lr * args.batch_size / 256
    optimizer = LARS(exclude_bias_and_norm(f, C), lr=lr, weight_decay=args.weight_decay,
                     momentum=args.momentum, eta=args.lars_eta, clip=args.lars_clip)
    colour = dict(jitter=args.jitter, jitter_p=args.jitter_p, gray_p=args.gray_p,
                  blur_p=args.blur_p, compile=args.compile)
    global_view = Recipe(size=args.image_size, scale=args.global_scale, **colour)
    small_view = Recipe(size=args.small_size, scale=args.small_scale, **colour)
    recipes = [global_view] * args.n_global + [small_view] * args.n_small  # one per crop
    queue = Queue(args.n_global, args.queue_length // world_size(), args.feat_dim, device)
    heads = {"z": f[1]}  # evaluation: kNN on the backbone, collapse diagnostics of z
    state = dict(f=f, C=C, queue=queue, optimizer=optimizer)  # what a checkpoint holds
    start, record = resume(args, ckpt, state)  # --resume: the epoch to go on from, else 0
    if start == 0 and args.eval_every:  # the network at initialization, as epoch 0
        record = log(out, {"epoch": 0, **evaluate(encoder, data, args, heads)})
    f, C = distribute(f, args), distribute(C, args)  # run: channels_last, DDP, --compile
    steps = steps_per_epoch(args, len(data.ssl_x))
    total, warmup = args.epochs * steps, args.warmup_epochs * steps

    for epoch in range(start, args.epochs):
        t0, losses = time.time(), []
        use_queue = args.queue_length > 0 and epoch >= args.queue_start_epoch
        for step, x in enumerate(batches(args, epoch, data, recipes)):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(epoch * steps + step, total, lr, warmup,
                                        lr * args.final_lr_ratio)
            # Alg. step: multi-crop: n_global full-resolution crops and V small crops of each image
            # (batches() cuts them, augment() does the rest of each crop's recipe)
            x = [data.normalize(augment(c, r)) for c, r in zip(x, recipes)]
            x_global, x_small, B = x[:args.n_global], x[args.n_global:], len(x[0])
            with autocast(device):
                # Alg. step: features f(x), one pass per resolution (Alg. 1 concatenates crops)
                h = [f(torch.cat(x_global))] + ([f(torch.cat(x_small))] if x_small else [])
            # Alg. step: z = f(x) / ||f(x)||, on the unit sphere
            z = F.normalize(torch.cat(h).float(), dim=1)
            # Alg. step: scores z C against the prototypes, one B x K block per crop
            scores = list(C(z).split(B))
            with torch.no_grad():  # the queue: past features of each global crop, scored by C
                queue_scores = [unwrap(C)(past) for past in queue.z] if use_queue else None
            # Alg. step: codes q of the full-resolution crops (Sinkhorn, no gradient),
            # predictions p = softmax(scores / temperature), swapped prediction over crop pairs
            L = swav_loss(scores, args.n_global, args.temperature, args.eps, args.sinkhorn_iters,
                          queue_scores)
            # Alg. step: back-propagate and update f and C with LARS (C frozen at first)
            optimizer.zero_grad(set_to_none=True)
            L.backward()
            if epoch < args.freeze_prototypes_epochs:
                unwrap(C).weight.grad = None  # no gradient: LARS leaves C as it is
            optimizer.step()
            # Alg. step: normalize the prototypes to unit length
            normalize_prototypes(unwrap(C))
            # the queue: this batch's features of the full-resolution crops in, the oldest out
            queue.push(z[:args.n_global * B].view(args.n_global, B, -1))
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
