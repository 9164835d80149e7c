"""Batched image augmentation on the device: every image of a batch gets its own random
parameters, and each op equals the torchvision.transforms.v2.functional op applied image by image
(tests/test_augment.py checks each against torchvision). The recipes of SimCLR, BYOL, SimSiam and
SwAV are all a Recipe: random resized crop, flip, colour jitter, grayscale, blur, solarize.

    view = Recipe(size=32, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), gray_p=0.2)
    x1 = augment(x_uint8, view)      # B x 3 x H x W uint8 -> B x 3 x size x size float in [0, 1]
"""
import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Recipe:
    """One view's augmentation, in the order SimCLR / BYOL / SimSiam apply it."""
    size: int = 32  # output side
    scale: tuple = (0.2, 1.0)  # random resized crop: area fraction
    ratio: tuple = (3 / 4, 4 / 3)  # and aspect ratio
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue strengths
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0


def augment(x, r):
    """uint8 batch -> one randomly augmented float view per image (before normalization)."""
    B, _, H, W = x.shape
    dev = x.device
    x = x.float().div_(255)
    x = resized_crop(x, crop_params(B, H, W, r.scale, r.ratio, dev), r.size)
    x = hflip(x, torch.rand(B, device=dev) < r.flip_p)
    if r.jitter_p > 0:
        apply = torch.rand(B, device=dev) < r.jitter_p
        x = torch.where(apply.view(B, 1, 1, 1), color_jitter(x, *jitter_params(B, r.jitter, dev)), x)
    if r.gray_p > 0:
        x = torch.where((torch.rand(B, device=dev) < r.gray_p).view(B, 1, 1, 1), grayscale(x), x)
    if r.blur_p > 0:
        sigma = torch.empty(B, device=dev).uniform_(*r.blur_sigma)
        blurred = gaussian_blur(x, sigma, blur_kernel_size(r.size))
        x = torch.where((torch.rand(B, device=dev) < r.blur_p).view(B, 1, 1, 1), blurred, x)
    if r.solarize_p > 0:
        x = torch.where((torch.rand(B, device=dev) < r.solarize_p).view(B, 1, 1, 1), solarize(x), x)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x  # see plumbing.Run.distribute


def crop_params(B, H, W, scale, ratio, device):
    """torchvision's RandomResizedCrop sampling, batched: 10 tries of (area, log-ratio), the first
    that fits wins, else the central crop. Returns B x 4 int (top, left, height, width)."""
    area = H * W * torch.empty(B, 10, device=device).uniform_(*scale)
    log_r = torch.empty(B, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * torch.exp(log_r)).round()
    h = torch.sqrt(area / torch.exp(log_r)).round()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.float().argmax(dim=1, keepdim=True)
    w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), ok.any(dim=1)
    if W / H < ratio[0]:
        fw, fh = W, round(W / ratio[0])
    elif W / H > ratio[1]:
        fw, fh = round(H * ratio[1]), H
    else:
        fw, fh = W, H
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.where(found, (torch.rand(B, device=device) * (H - h + 1)).floor(), float((H - fh) // 2))
    left = torch.where(found, (torch.rand(B, device=device) * (W - w + 1)).floor(), float((W - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def _resize_matrix(start, length, in_size, out_size):
    """B x out_size x in_size weights of an antialiased bilinear resize of the window
    [start, start + length) -- the triangle filter of torch's interpolate(antialias=True)."""
    start, length = start.float().view(-1, 1, 1), length.float().view(-1, 1, 1)
    scale = length / out_size  # input pixels per output pixel
    support = scale.clamp(min=1.0)  # widen the filter when downscaling (antialias)
    center = scale * (torch.arange(out_size, device=start.device).view(1, -1, 1) + 0.5)
    j = torch.arange(in_size, device=start.device).view(1, 1, -1) - start  # position inside window
    w = (1 - ((j - center + 0.5) / support).abs()).clamp(min=0)
    w = w * ((j >= 0) & (j < length))
    return w / w.sum(dim=2, keepdim=True)


def resized_crop(x, boxes, size):
    """Crop each image to its box (top, left, height, width) and resize to size x size."""
    B, _, H, W = x.shape
    Ry = _resize_matrix(boxes[:, 0], boxes[:, 2], H, size)  # B x size x H
    Rx = _resize_matrix(boxes[:, 1], boxes[:, 3], W, size)  # B x size x W
    return Ry.unsqueeze(1) @ x @ Rx.transpose(1, 2).unsqueeze(1)


def hflip(x, mask):
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def jitter_params(B, strengths, device):
    """Factors as torchvision's ColorJitter draws them, and a random order of the 4 ops per image."""
    b, c, s, h = strengths
    u = lambda lo, hi: torch.empty(B, device=device).uniform_(lo, hi)  # noqa: E731
    factors = (u(max(0, 1 - b), 1 + b), u(max(0, 1 - c), 1 + c), u(max(0, 1 - s), 1 + s), u(-h, h))
    order = torch.rand(B, 4, device=device).argsort(dim=1)
    return factors, order


def color_jitter(x, factors, order):
    """Brightness, contrast, saturation, hue, in each image's own random order."""
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for position in range(4):
        for k, op in enumerate(ops):
            chosen = (order[:, position] == k).view(-1, 1, 1, 1)  # no chosen.any(): a host sync
            x = torch.where(chosen, op(x, factors[k]), x)
    return x


def _gray(x):
    """ITU-R 601-2 luma, as torchvision: B x 1 x H x W."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x, other, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, _gray(x), f)


def adjust_hue(x, f):
    """Rotate the hue: RGB -> HSV, h <- (h + f) mod 1, HSV -> RGB."""
    r, g, b = x.unbind(1)
    v, _ = x.max(dim=1)
    delta = v - x.min(dim=1).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = delta / torch.where(v > 0, v, torch.ones_like(v))
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    i = torch.floor(h * 6)
    frac = h * 6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    sector = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, rgb in enumerate(sector):
        out = torch.where((i == k).unsqueeze(1), torch.stack(rgb, dim=1), out)
    return out


def grayscale(x):
    return _gray(x).expand_as(x)


def blur_kernel_size(size):
    """About 10% of the image side, odd (SimCLR App. A: 23 px at 224)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def gaussian_blur(x, sigma, k):
    """Separable Gaussian blur, per-image sigma, reflect padding (torchvision's convention)."""
    B, C, H, W = x.shape
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    kernel = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # B*C x k
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, k, 1), groups=B * C)
    y = F.conv2d(y, kernel.view(B * C, 1, 1, k), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)
