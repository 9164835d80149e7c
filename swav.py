"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments.
Mathilde Caron, Ishan Misra, Julien Mairal, Priya Goyal, Piotr Bojanowski and Armand Joulin,
NeurIPS 2020. https://arxiv.org/abs/2006.09882

    python swav.py                                     # CIFAR-10 recipe (ResNet-18, 1000 epochs, 2x32 + 4x16 crops)
    python swav.py --smoke                             # a few steps on synthetic data, CPU, < 1 min
    torchrun --nproc_per_node=8 swav.py                # 8 GPUs: DDP + SyncBN, --batch-size is global
    python swav.py --resume runs/<run folder>          # go on after a stop, Ctrl-C or crash
    python swav.py --dataset folder --data-dir /tmp/data/cifar10-jpeg
    python swav.py --n-small 0 --global-scale 0.08 1   # the published 2-crop CIFAR-10 recipe
    python swav.py --help                              # every hyper-parameter and its source

Paper -> code (Algorithm 1, in order):

    x_1 .. x_(2+V) = crops(x)      2 full-resolution crops + V small crops    augment() in train()
    z = f(x) / ||f(x)||            f = backbone + projection head, z on the   f = Sequential(encoder, projector)
                                   unit sphere (D = 128)
    scores = z C                   C: K prototypes c_k of unit length         C = prototypes()
    q = sinkhorn(scores)           codes of the full-resolution crops only:   sinkhorn()  (Sec. 3.1)
                                   no gradient, the batch split equally
                                   among the K prototypes
    p = softmax(scores / tau)      every crop's prediction (Eq. 2)            swav_loss()
    L = -sum_k q log p, swapped    each crop predicts the codes of the other  swav_loss()  (Eq. 1, 2 and
                                   full-resolution crop(s), mean over pairs   the multi-crop loss, Sec. 3.2)
    L.backward(); update(f, C)     LARS, warm-up + cosine; C frozen at first  LARS, cosine_lr()
    C = normalize(C)               prototypes back to unit length             normalize_prototypes()
    queue (small batches, 3.1)     features of past batches join Sinkhorn;    enqueue(), queue_scores
                                   only the batch's rows of Q are used

Evaluation (not part of the method): weighted kNN (k=200, t=0.1) on backbone features every
--eval-every epochs, with the std of the l2-normalized projector output z (about 1/sqrt(128) =
0.088 when spread, 0 when collapsed) and the spectrum / effective rank of z and of the backbone
features; a linear probe on frozen features at the end.

A loss stuck at ln K (8.01 for K = 3000) means the features collapsed to one point and every code
is uniform. SwAV's authors suggest a smaller eps, a milder augmentation, fewer crops, prototypes
frozen longer. Measured on CPU: in short runs the defaults stick at ln K, while --eps 0.03, 2 crops,
--jitter 0.4 0.4 0.4 0.1, --global-scale 0.3 1 and --base-lr 1.2 learn (tests/test_training.py;
one CIFAR-10 epoch, small backbone: kNN 35.7 -> 41.1, loss 7.02).

Result reached by this file: not measured yet on a GPU (see README.md for measured numbers).
Published: 89.2% online linear top-1 on CIFAR-10, ResNet-18, 1000 epochs, 2 crops (solo-learn);
paper: 75.3% ImageNet linear top-1, ResNet-50, 800 epochs, 2x224 + 6x96 crops.

Deviations from the paper:
  - Augmentation runs batched on the device (augmentation.py); each op equals torchvision's.
  - Sinkhorn runs in float32 in the log domain: every normalization divides by a sum of exponentials,
    computed as a log-sum-exp that subtracts the max before exp. Same result as Alg. 1's loop
    (tested), but finite for any eps and score size. Alg. 1's first division by the total is
    left out: the first row normalization cancels it.
  - Scores z C and the loss are computed in float32 outside bf16 autocast (Sinkhorn divides the
    scores by eps = 0.05, which would magnify bf16 rounding 20 times).
  - The loss sums -q log p over the K prototypes (Eq. 2) and averages over samples and crop pairs;
    Alg. 1 writes mean() over all B x K entries, which only divides it by K.
  - Prototypes are re-normalized after each update and once at initialization (Alg. 1 does it at
    the top of each step: the same values), and are frozen for whole epochs (paper: the first epoch).
  - Defaults for 32x32 images: small crops of 16 px (half the side, as 96/224 on ImageNet; the
    CIFAR ResNet still ends on a 2x2 map), 4 of them so that they add half the cost of the two
    global crops, as 6 x 96 px add to 2 x 224 px. The published CIFAR-10 recipe used 2 crops only.
  - One queue per full-resolution crop; it fills from the first step and joins Sinkhorn from
    --queue-start-epoch (the queue's scores use the current prototypes).
  - LARS trust coefficient 0.001, unclipped, as in SwAV's own code, not the CIFAR recipe's 0.02
    with LARC clipping (`--lars-eta 0.02 --lars-clip` selects it). Unclipped 0.02 steps collapsed
    short runs to uniform codes (loss ln K); clipped, they made the features collapse to a line
    within 20 steps without warm-up in this repository's CPU tests (effective rank of z 1.6 vs
    11.6). Not the default until a GPU run shows it pays.
  - Cosine decay to 0 (SwAV: to base lr / 1000).
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from augmentation import Recipe, augment
from common import LARS, backbone, cosine_lr, evaluate, exclude_bias_and_norm, fail, load_data, probe
from plumbing import Run, RunArgs, all_reduce, parse_args, unwrap, world_size


@dataclass
class Args(RunArgs):
    dataset: str = "cifar10"  # CIFAR-10 recipe (cifar10 | cifar100 | stl10 | folder | synthetic)
    arch: str = "resnet18"  # CIFAR recipe: ResNet-18, CIFAR stem (ImageNet: resnet50)
    image_size: int = 32  # side of the full-resolution crops (ImageNet: 224)
    epochs: int = 1000  # CIFAR recipe (ImageNet: 800)
    batch_size: int = 256  # CIFAR recipe (ImageNet: 4096, or 256 with the queue)
    base_lr: float = 0.6  # CIFAR recipe: LARS lr = base_lr x batch_size / 256 (ImageNet: 4.8 at batch 4096)
    warmup_epochs: int = 10  # CIFAR recipe: linear warm-up, then cosine decay
    weight_decay: float = 1e-6  # CIFAR recipe and ImageNet
    momentum: float = 0.9  # LARS momentum
    lars_eta: float = 0.001  # LARS trust coefficient, SwAV's (the CIFAR recipe: 0.02 with --lars-clip; see Deviations)
    lars_clip: bool = False  # LARC clipping: no tensor steps further than SGD would (CIFAR recipe: on)
    hidden_dim: int = 2048  # projection head: 2-layer MLP, hidden 2048 with BN and ReLU
    feat_dim: int = 128  # D: output of the projection head and dimension of the prototypes
    n_prototypes: int = 3000  # K (CIFAR recipe and ImageNet)
    temperature: float = 0.1  # tau of Eq. 2, all runs of the paper
    eps: float = 0.05  # Sinkhorn entropy weight epsilon, all runs of the paper (try 0.03 if the loss sticks at ln K)
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations, Alg. 1
    freeze_prototypes_epochs: int = 2  # CIFAR recipe: C not updated during the first epochs (ImageNet: 1)
    queue_length: int = 3840  # Sec. 3.1 small batches; CIFAR recipe and ImageNet at batch 256 (0: no queue)
    queue_start_epoch: int = 50  # CIFAR recipe: the queue joins Sinkhorn from this epoch on (ImageNet: 15)
    n_global: int = 2  # Sec. 3.2: full-resolution crops, the only ones whose codes are computed
    global_scale: tuple = (0.14, 1.0)  # multi-crop: area fraction of the full-resolution crops (2 crops only: 0.08 1)
    n_small: int = 4  # V small crops (ImageNet: 6 of 96 px); 4 x 16 px add half the cost of 2 x 32 px
    small_size: int = 16  # side of the small crops: half of 32, as 96 is about half of 224
    small_scale: tuple = (0.05, 0.14)  # multi-crop: area fraction of the small crops
    jitter: tuple = (0.8, 0.8, 0.8, 0.2)  # colour distortion of strength 1: brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # SimCLR / SwAV colour distortion
    gray_p: float = 0.2  # SimCLR / SwAV colour distortion
    blur_p: float = 0.0  # no blur at 32x32 (ImageNet: 0.5)


def projector(in_dim, hidden, out):
    """Projection head of f, as in the paper: 2-layer MLP, BN and ReLU in the hidden layer."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


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
        log_Q = log_Q - log_sum(log_Q, dim=1, over_ranks=True) - math.log(K)  # every prototype gets 1/K
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
    each rank keeps its own."""

    def __init__(self, n_global, length, dim, device=None):
        super().__init__()
        self.length, self.z = length, torch.zeros(n_global, 0, dim, device=device)

    def push(self, z):
        """First in, first out: the batch's z (n_global x B x D) in front, beyond `length` the oldest out."""
        self.z = torch.cat([z.detach().float(), self.z], dim=1)[:, :self.length]

    def get_extra_state(self):
        return self.z

    def set_extra_state(self, z):
        self.z = z


def train(args):
    if args.n_global < 1 or args.n_global + args.n_small < 2:
        fail(f"--n-global {args.n_global} --n-small {args.n_small}: need at least 1 full-resolution crop and 2 crops")
    run = Run(args, "swav")
    dev = run.device
    data = load_data(args, dev)
    encoder = backbone(args.arch, args.image_size)
    f = nn.Sequential(encoder, projector(encoder.dim, args.hidden_dim, args.feat_dim)).to(dev)
    C = prototypes(args.feat_dim, args.n_prototypes).to(dev)
    lr = args.base_lr * args.batch_size / 256
    optimizer = LARS(exclude_bias_and_norm(f, C), lr=lr, weight_decay=args.weight_decay,
                     momentum=args.momentum, eta=args.lars_eta, clip=args.lars_clip)
    colour = dict(jitter=args.jitter, jitter_p=args.jitter_p, gray_p=args.gray_p, blur_p=args.blur_p)
    global_view = Recipe(size=args.image_size, scale=args.global_scale, **colour)
    small_view = Recipe(size=args.small_size, scale=args.small_scale, **colour)
    queue = Queue(args.n_global, args.queue_length, args.feat_dim, run.device)
    steps = run.steps_per_epoch(len(data.ssl_x))
    report = partial(evaluate, encoder, data, args, {"z": f[1]})  # kNN on the backbone, std of z
    start = run.start(encoder, report, f=f, C=C, queue=queue, optimizer=optimizer)
    f, C = run.distribute(f), run.distribute(C)

    for epoch in range(start, args.epochs):
        use_queue = args.queue_length > 0 and epoch >= args.queue_start_epoch
        for step, idx in run.batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(epoch * steps + step, args.epochs * steps, lr, args.warmup_epochs * steps)
            x, B = data.ssl_x[idx], len(idx)
            # Alg. step: multi-crop: n_global full-resolution crops and V small crops of each image
            x_global = torch.cat([data.normalize(augment(x, global_view)) for _ in range(args.n_global)])
            x_small = [data.normalize(augment(x, small_view)) for _ in range(args.n_small)]
            with run.autocast():
                # Alg. step: features f(x), one pass per resolution (Alg. 1 concatenates the crops)
                h = [f(x_global)] + ([f(torch.cat(x_small))] if x_small else [])
            # Alg. step: z = f(x) / ||f(x)||, on the unit sphere
            z = F.normalize(torch.cat(h).float(), dim=1)
            # Alg. step: scores z C against the prototypes, one B x K block per crop
            scores = list(C(z).split(B))
            with torch.no_grad():  # the queue: past features of each global crop, scored by today's C
                queue_scores = [unwrap(C)(past) for past in queue.z] if use_queue else None
            # Alg. step: codes q of the full-resolution crops (Sinkhorn, no gradient), predictions
            # p = softmax(scores / temperature), swapped-prediction loss over all crop pairs
            L = swav_loss(scores, args.n_global, args.temperature, args.eps, args.sinkhorn_iters, queue_scores)
            # Alg. step: back-propagate and update f and C with LARS (C frozen during the first epochs)
            optimizer.zero_grad(set_to_none=True)
            L.backward()
            if epoch < args.freeze_prototypes_epochs:
                unwrap(C).weight.grad = None  # no gradient: LARS leaves C as it is (no decay, no momentum)
            optimizer.step()
            # Alg. step: normalize the prototypes to unit length
            normalize_prototypes(unwrap(C))
            # the queue: this batch's features of the full-resolution crops in, the oldest out
            queue.push(z[:args.n_global * B].view(args.n_global, B, -1))
            run.step(L, B)
        run.end_epoch(epoch)

    return run.finish(partial(probe, encoder, data, args))


if __name__ == "__main__":
    train(parse_args(Args))
