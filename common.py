"""What the five method files share and no paper describes, for the algorithm's side: LARS and
the learning-rate schedule, data, backbone and evaluation. Run plumbing (flags, checkpoints,
torchrun) is in plumbing.py, the batched augmentation in augmentation.py. Neutral names here
(backbone, mlp, features); each method file uses its own paper's symbols.

Sections: optimization | data | backbone | evaluation.
"""
import copy
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F


def fail(message):
    """Stop with one line on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"error: {message}")


# ============================================================== optimization

def cosine_lr(step, total_steps, base_lr, warmup_steps=0):
    """Linear warm-up to base_lr, then cosine decay to 0 (SGDR without restarts)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, as SimCLR / BYOL
    use it): for each parameter tensor w with gradient g, g <- g + wd * w, then g is scaled by the
    trust ratio eta * ||w|| / ||g||, then v <- momentum * v + g and w <- w - lr * v. Groups with
    lars=False (biases and BN parameters, see exclude_bias_and_norm) skip both weight decay and
    the trust ratio: plain SGD with momentum. clip=True (LARC's clipping, as the CIFAR-10 recipes
    of BYOL and SwAV use it with eta 0.02): the trust ratio is capped at 1 / lr, so that no tensor
    takes a larger step than plain SGD would: w <- w - min(lr, eta * ||w|| / ||g||) * g."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001, clip=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, clip=clip,
                                      lars=True))

    @torch.no_grad()
    def step(self):
        # The rule above, for all tensors of a group at once (torch._foreach_*: a few fused kernel
        # launches instead of several per tensor); tests/test_lars.py checks it tensor by tensor.
        for group in self.param_groups:
            w = [p for p in group["params"] if p.grad is not None]
            if not w:
                continue
            g = [p.grad for p in w]
            if group["lars"]:
                g = torch._foreach_add(g, w, alpha=group["weight_decay"])
                w_norm, g_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(g))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0)
                if group["clip"] and group["lr"] > 0:
                    trust = (trust / group["lr"]).clamp(max=1.0)
                g = torch._foreach_mul(g, list(trust.unbind()))
            v = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in w]
            torch._foreach_mul_(v, group["momentum"])
            torch._foreach_add_(v, g)
            torch._foreach_add_(w, v, alpha=-group["lr"])


def exclude_bias_and_norm(*modules):
    """Parameter groups for LARS: weights adapted and decayed; biases and BN (1-d) parameters not."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0}]


# ====================================================================== data

@dataclasses.dataclass
class Data:
    """Images as uint8 N x 3 x H x W on the device, labels as int64."""
    ssl_x: torch.Tensor  # what self-supervised training draws from
    train_x: torch.Tensor  # labelled training set: the kNN memory bank and the probe's training set
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def __post_init__(self):
        x = self.train_x.float().div_(255)
        self.mean = x.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
        self.std = x.std(dim=(0, 2, 3)).view(1, 3, 1, 1)

    def normalize(self, x):
        """float images in [0, 1] -> per-channel standardized (statistics of the training set)."""
        return (x - self.mean) / self.std

    def steps_per_epoch(self, args):
        full = len(self.ssl_x) // args.batch_size
        return min(full, args.steps_per_epoch) if args.steps_per_epoch > 0 else full


DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif")


def load_data(args, device):
    """Decode the dataset once into uint8 tensors on the device."""
    name, root, size = args.dataset, args.data_dir, args.image_size
    if name == "synthetic":
        parts = synthetic_dataset(size)
    elif name in ("cifar10", "cifar100", "stl10"):
        parts = _torchvision_dataset(name, root)
    elif name == "folder":
        parts = folder_dataset(root, size)
    else:
        fail(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    ssl_x, train_x, train_y, test_x, test_y = parts
    ssl_x, train_x, test_x = (_resize(x, size) for x in (ssl_x, train_x, test_x))
    num_classes = int(train_y.max()) + 1
    return Data(ssl_x.to(device), train_x.to(device), train_y.to(device), test_x.to(device),
                test_y.to(device), num_classes)


def _resize(x, size):
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255)
           for c in x.split(1024)]
    return torch.cat(out).to(torch.uint8)


def _torchvision_dataset(name, root):
    import torchvision.datasets as tvd
    try:
        if name == "stl10":
            tr, te, un = (tvd.STL10(root, split=s, download=True) for s in ("train", "test", "unlabeled"))
            x = {k: torch.from_numpy(d.data) for k, d in (("tr", tr), ("te", te), ("un", un))}
            return (torch.cat([x["tr"], x["un"]]), x["tr"], torch.from_numpy(tr.labels).long(),
                    x["te"], torch.from_numpy(te.labels).long())
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as e:  # offline machines end here
        fail(f"could not download {name} to {root!r} ({type(e).__name__}); without network, unpack an "
             f"ImageFolder copy and use --dataset folder --data-dir <root with train/ and test/>")
    x_tr = torch.from_numpy(tr.data).permute(0, 3, 1, 2).contiguous()
    x_te = torch.from_numpy(te.data).permute(0, 3, 1, 2).contiguous()
    return x_tr, x_tr, torch.tensor(tr.targets), x_te, torch.tensor(te.targets)


def folder_dataset(root, size):
    """ImageFolder layout: root/train/<class>/*.jpg and root/test/<class>/ (or val/)."""
    layout = "<root>/train/<class>/<image> and <root>/test/<class>/<image> (or val/ instead of test/)"
    if not os.path.isdir(root):
        fail(f"--data-dir {root!r} does not exist; expected {layout}")
    test_dir = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test_dir is None:
        fail(f"--data-dir {root!r} is not in ImageFolder layout; expected {layout}")
    classes = sorted(d.name for d in os.scandir(os.path.join(root, "train")) if d.is_dir())
    if not classes:
        fail(f"{os.path.join(root, 'train')} has no class folders; expected {layout}")
    x_tr, y_tr = _read_split(os.path.join(root, "train"), classes, size)
    x_te, y_te = _read_split(test_dir, classes, size)
    return x_tr, x_tr, y_tr, x_te, y_te


def _read_split(split_dir, classes, size):
    files, labels = [], []
    for c, name in enumerate(classes):
        d = os.path.join(split_dir, name)
        if not os.path.isdir(d):
            fail(f"{split_dir} has no folder {name!r}; train/ and test/ must have the same class folders")
        found = sorted(e.path for e in os.scandir(d) if e.name.lower().endswith(IMAGE_EXTENSIONS))
        files += found
        labels += [c] * len(found)
    if not files:
        fail(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda p: _read_image(p, size), files))
    return torch.stack(images), torch.tensor(labels)


def _read_image(path, size):
    """Decode one file to uint8 3 x size x size: RGB, center square, resized (PIL, bicubic)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if (w, h) != (size, size):
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((size, size), Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except Exception as e:
        fail(f"cannot read image {path}: {e}; remove or replace the file")
    return data.view(size, size, 3).permute(2, 0, 1).contiguous()


def synthetic_dataset(size=32, n_train=2560, n_test=1000, seed=1234):
    """Gray gratings whose class is their orientation, 5 classes: 0, +-22.5, +-45, +-67.5 and 90
    degrees (a class holds theta and -theta, which a horizontal flip swaps). Each image has its own
    frequency (3-9 cycles across 32 px), phase, brightness, contrast and pixel noise. These
    nuisances dominate a random network's features: kNN 74-83% at 24 and 32 px, 83-86% at 16 px
    (BN statistics measured). The augmentations vary them between two views while the class
    survives: the crop changes frequency and phase, the colour jitter brightness and contrast, and
    the crop's aspect ratio (3/4 to 4/3) bends an orientation by at most about 8 degrees, less than
    half the 22.5 between classes. So learning invariance to the views raises kNN above the random
    network's."""
    g = torch.Generator().manual_seed(seed)
    classes = 5

    def draw(n):
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # noqa: E731
        y = torch.arange(n) % classes
        sign = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0)
        theta = sign * (y.float() * math.pi / 2 / (classes - 1)).view(n, 1, 1)
        coords = torch.linspace(0, 1, size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        cycles = u(3, 9) * size / 32
        along = xx * torch.cos(theta) + yy * torch.sin(theta)  # distance along the grating's normal
        wave = torch.sin(2 * math.pi * cycles * along + u(0, 2 * math.pi))
        img = (u(0.35, 0.65) + u(0.1, 0.3) * wave).unsqueeze(1).expand(n, 3, size, size)
        img = img + 0.05 * torch.randn(n, 3, size, size, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return x_tr, x_tr, y_tr, x_te, y_te


# ================================================================== backbone

ARCHS = ("resnet18", "resnet50", "small")


def backbone(arch, image_size):
    """A torchvision ResNet without its classifier: images -> features (B x .dim).
    Images of 64 px or less get the CIFAR stem (3x3 conv, stride 1, no max-pool).
    'small' is for CPU runs and tests: one BasicBlock per stage (ResNet-10) and a 3x3 stride-2
    stem, about 8x cheaper than the CIFAR ResNet-18."""
    from torchvision.models import resnet18, resnet50
    from torchvision.models.resnet import BasicBlock, ResNet
    if arch == "resnet18":
        net = resnet18()
    elif arch == "resnet50":
        net = resnet50()
    elif arch == "small":
        net = ResNet(BasicBlock, [1, 1, 1, 1])
    else:
        fail(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "small":
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.Identity()
    elif image_size <= 64:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


# ================================================================ evaluation

@torch.no_grad()
def embed(net, x, data, batch_size=1024):
    """Features of uint8 images, network in eval mode (BN running statistics), float32."""
    was_training = net.training
    net.eval()
    out = torch.cat([net(data.normalize(c.float().div_(255))).float() for c in x.split(batch_size)])
    net.train(was_training)
    return out


@torch.no_grad()
def knn_top1(train_f, train_y, test_f, test_y, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted kNN (InstDisc): cosine similarity to the memory bank, the k nearest vote with
    weight exp(s / t). Returns top-1 accuracy in percent."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for f, y in zip(test_f.split(chunk), test_y.split(chunk)):
        sim, idx = (f @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(f), num_classes, device=f.device)
        votes.scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += (votes.argmax(dim=1) == y).sum().item()
    return 100.0 * correct / len(test_f)


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs=100, batch_size=512, lr=0.1):
    """Linear classifier on frozen, standardized features (the fast variant: cached features,
    no augmentation), SGD momentum 0.9 with cosine decay. Returns test top-1 in percent."""
    if epochs <= 0:
        return float("nan")
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    clf = nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)
    steps, g = epochs * max(len(train_f) // batch_size, 1), torch.Generator(device=train_f.device).manual_seed(0)
    with torch.enable_grad():
        for s in range(steps):
            idx = torch.randint(len(train_f), (min(batch_size, len(train_f)),), device=train_f.device, generator=g)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(s, steps, lr)
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return 100.0 * (clf(test_f).argmax(1) == test_y).float().mean().item()


def output_std(z):
    """SimSiam Fig. 2: std over samples of each channel of l2-normalized z, averaged over
    channels. About 1/sqrt(d) when z spreads over the sphere, 0 when collapsed to a point."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean().item()


def spectrum(z):
    """Singular values (descending) of the covariance of l2-normalized embeddings (DirectCLR Fig.)."""
    z = F.normalize(z.float(), dim=1)
    z = z - z.mean(dim=0)
    cov = z.T @ z / len(z)
    return torch.linalg.svdvals(cov)


def effective_rank(s):
    """Roy & Vetterli (2007): exp of the entropy of the normalized singular values; between 1
    (all variance in one direction) and d (isotropic)."""
    if s.sum() < 1e-10:
        return 0.0  # no variance left above float32 round-off: complete collapse
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def evaluate(net, data, args, heads=None):
    """kNN top-1 on backbone features, and collapse diagnostics of the backbone features and of
    each head (e.g. {"z": projector}) on the test set. A network whose BN layers have never seen
    a batch (the network at initialization) is evaluated with statistics measured on training
    images: BN's initial ones (mean 0, variance 1) would distort its features and make the
    random-network baseline look worse than it is."""
    heads = heads or {}
    if any(m.num_batches_tracked == 0 for m in _bn_layers(net)):
        net, heads = measure_bn_statistics(net, heads, data)
    train_f, test_f = embed(net, data.train_x, data), embed(net, data.test_x, data)
    metrics = {"knn_top1": knn_top1(train_f, data.train_y, test_f, data.test_y, data.num_classes,
                                    args.knn_k, args.knn_t)}
    outputs = {"r": test_f}
    with torch.no_grad():
        for name, head in heads.items():
            was_training = head.training
            outputs[name] = head.eval()(test_f).float()
            head.train(was_training)
    for name, z in outputs.items():
        s = spectrum(z)
        metrics[f"std_{name}"] = output_std(z)
        metrics[f"rank_{name}"] = effective_rank(s)
        metrics[f"spectrum_{name}"] = [round(v, 8) for v in s.tolist()]
    return metrics


def _bn_layers(*modules):
    return [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def measure_bn_statistics(net, heads, data, n=5120, batch_size=256):
    """Copies of net and heads whose BN running statistics are averages over n random training
    images (unaugmented), the heads fed with the network's output as in training."""
    net, heads = copy.deepcopy(net).train(), {k: copy.deepcopy(h).train() for k, h in heads.items()}
    for m in _bn_layers(net, *heads.values()):
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))[:n]
    for i in idx.to(data.train_x.device).split(batch_size):
        r = net(data.normalize(data.train_x[i].float().div_(255)))
        for head in heads.values():
            head(r)
    return net, heads


def probe(net, data, args):
    train_f, test_f = embed(net, data.train_x, data), embed(net, data.test_x, data)
    return linear_probe(train_f, data.train_y, test_f, data.test_y, data.num_classes, args.probe_epochs)
