"""Each batched augmentation op equals torchvision's functional op applied image by image."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import common

torch.manual_seed(0)
B = 6


def images(size=32, h=None):
    return torch.rand(B, 3, h or size, size)


def per_image(fn, x, *params):
    return torch.stack([fn(x[i], *[p[i] for p in params]) for i in range(len(x))])


@pytest.mark.parametrize("H,W,size", [(32, 32, 32), (40, 56, 24), (96, 96, 32), (20, 20, 48)])
def test_resized_crop_matches_torchvision(H, W, size):
    x = torch.rand(B, 3, H, W)
    boxes = common.crop_params(B, H, W, (0.08, 1.0), (3 / 4, 4 / 3), "cpu")
    ours = common.resized_crop(x, boxes, size)
    ref = torch.stack([TF.resized_crop(x[i], *boxes[i].tolist(), [size, size], antialias=True)
                       for i in range(B)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_flip_and_grayscale_and_solarize():
    x = images()
    mask = torch.tensor([True, False] * (B // 2))
    ref = torch.stack([TF.horizontal_flip(x[i]) if mask[i] else x[i] for i in range(B)])
    torch.testing.assert_close(common.hflip(x, mask), ref)
    torch.testing.assert_close(common.grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3))
    torch.testing.assert_close(common.solarize(x), TF.solarize(x, 0.5))


@pytest.mark.parametrize("ours,theirs,lo,hi", [
    (common.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (common.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (common.adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
    (common.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_color_ops_match_torchvision(ours, theirs, lo, hi):
    x = images()
    x[0] = x[0, :1].expand(3, -1, -1)  # a gray image: hue undefined
    f = torch.empty(B).uniform_(lo, hi)
    ref = torch.stack([theirs(x[i], f[i].item()) for i in range(B)])
    torch.testing.assert_close(ours(x, f), ref, atol=2e-6, rtol=0)


def test_color_jitter_applies_ops_in_each_images_order():
    x = images()
    factors, order = common.jitter_params(B, (0.4, 0.4, 0.4, 0.1), "cpu")
    theirs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    ref = []
    for i in range(B):
        y = x[i]
        for k in order[i].tolist():
            y = theirs[k](y, factors[k][i].item())
        ref.append(y)
    torch.testing.assert_close(common.color_jitter(x, factors, order), torch.stack(ref),
                               atol=2e-6, rtol=0)


@pytest.mark.parametrize("size", [32, 96])
def test_gaussian_blur_matches_torchvision(size):
    x = images(size)
    sigma = torch.empty(B).uniform_(0.1, 2.0)
    k = common.blur_kernel_size(size)
    ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2) for i in range(B)])
    torch.testing.assert_close(common.gaussian_blur(x, sigma, k), ref, atol=1e-5, rtol=0)


def test_random_parameters_follow_the_recipe():
    n = 20000
    boxes = common.crop_params(n, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), "cpu").float()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    # rounding of h and w to whole pixels widens the ranges by at most a pixel
    assert area.min() >= 0.2 * (1 - 2 / math.sqrt(0.2 * 1024)) - 1e-6 and area.max() <= 1.0
    assert (w / h).min() >= 3 / 4 * 0.8 and (w / h).max() <= 4 / 3 / 0.8
    # same distribution as torchvision's own sampler (which rejects boxes that do not fit)
    from torchvision.transforms import RandomResizedCrop
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 32, 32), [0.2, 1.0],
                                                     [3 / 4, 4 / 3])
                        for _ in range(5000)]).float()
    for ours_q, ref_q in [(area, ref[:, 2] * ref[:, 3] / 1024),
                          ((w / h).log(), (ref[:, 3] / ref[:, 2]).log())]:
        assert abs(ours_q.mean() - ref_q.mean()) < 0.015 and abs(ours_q.std() - ref_q.std()) < 0.015
    factors, order = common.jitter_params(n, (0.4, 0.4, 0.2, 0.1), "cpu")
    for f, (lo, hi) in zip(factors, [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert f.min() >= lo and f.max() <= hi and abs(f.mean().item() - (lo + hi) / 2) < 0.01
    assert (order.sort(dim=1).values == torch.arange(4)).all()  # a permutation per image
    # each op first 1/4 of the time
    assert abs((order[:, 0] == 3).float().mean().item() - 0.25) < 0.02

    # probabilities: a view of an image that is constant gray changes only by crop-invariant ops;
    # measure flip / grayscale / solarize rates through the pipeline on crafted inputs
    torch.manual_seed(1)
    r = common.Recipe(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5, jitter_p=0.0,
                      gray_p=0.2, blur_p=0.0, solarize_p=0.0)
    x = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    x[:, 0, :, :4] = 255  # red left half
    out = common.augment(x, r)
    flipped = (out[:, 0, 0, 7] > out[:, 0, 0, 0]).float().mean().item()
    gray = (out[:, 1].amax(dim=(1, 2)) > 0).float().mean().item()
    assert abs(flipped - 0.5) < 0.02 and abs(gray - 0.2) < 0.02
    r = common.Recipe(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                      gray_p=0.0, solarize_p=0.2)
    out = common.augment(torch.full((n, 3, 8, 8), 200, dtype=torch.uint8), r)
    assert abs((out[:, 0, 0, 0] < 0.5).float().mean().item() - 0.2) < 0.02
    checker = (torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)) % 2 * 255
    r = common.Recipe(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                      gray_p=0.0, blur_p=0.3, blur_sigma=(1.0, 2.0))
    out = common.augment(checker.to(torch.uint8).expand(n, 3, 8, 8), r)
    blurred = (out[:, 0] - checker / 255).abs().amax(dim=(1, 2)) > 0.1
    assert abs(blurred.float().mean().item() - 0.3) < 0.02
    r = common.Recipe(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter=(0.4, 0, 0, 0),
                      jitter_p=0.8, gray_p=0.0)
    out = common.augment(torch.full((n, 3, 8, 8), 100, dtype=torch.uint8), r)
    assert abs(((out[:, 0, 0, 0] - 100 / 255).abs() > 1e-6).float().mean().item() - 0.8) < 0.02


def test_augment_is_per_sample_random_and_in_range():
    x = (torch.rand(B, 3, 32, 32) * 255).to(torch.uint8)
    r = common.Recipe(blur_p=0.5, solarize_p=0.5)
    a, b = common.augment(x, r), common.augment(x, r)
    assert a.shape == (B, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, b)


def test_compiled_augmentation_is_one_graph_and_computes_the_eager_ops(monkeypatch):
    """--compile's path (Recipe.compile): crop() and augment() (of crop()'s float views and of
    streamed uint8 crops) each trace into one graph with no break, so the compiler may fuse all
    of it; the traced graphs, run by aot_eager, give the eager result for the same random state
    (inductor's own kernels: tests/test_training.py)."""
    r = common.Recipe(size=16, blur_p=0.5, solarize_p=0.5)  # every op on
    x = (torch.rand(B, 3, 24, 24) * 255).to(torch.uint8)
    views = common.crop(x, r)
    for fn, arg in ((common.crop, x), (common.augment, views),
                    (common.augment, views.mul(255).byte())):
        explained = torch._dynamo.explain(fn)(arg, r)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), fn.__name__
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(common, "_compiled", {})
    outputs = []
    for recipe in (r, common.Recipe(size=16, blur_p=0.5, solarize_p=0.5, compile=True)):
        torch.manual_seed(3)
        outputs.append(common.augment(common.crop(x, recipe), recipe))
    assert set(common._compiled) == {common.crop, common.augment}
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)
