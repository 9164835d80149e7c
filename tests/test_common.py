"""Evaluation, diagnostics and data sources of common.py; argument parsing and unwrap of plumbing.py."""
import math

import torch
import torch.nn.functional as F
from PIL import Image

import common
import plumbing


def knn_literal(train_f, train_y, test_f, num_classes, k, t):
    """Weighted kNN written out sample by sample."""
    preds = []
    for f in test_f:
        sims = [(F.cosine_similarity(f, g, dim=0).item(), int(y)) for g, y in zip(train_f, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_matches_literal_and_is_exact_on_separable_classes():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    train_y = torch.randint(0, 5, (300,), generator=g)
    test_y = knn_literal(train_f, train_y, test_f, 5, k=20, t=0.1)
    assert common.knn_top1(train_f, train_y, test_f, test_y, 5, k=20, t=0.1, chunk=7) == 100.0
    wrong = (test_y + 1) % 5
    assert common.knn_top1(train_f, train_y, test_f, wrong, 5, k=20, t=0.1) == 0.0
    # separable: each class is a tight cluster around its own axis
    centers = torch.eye(8) * 5
    train_y, test_y = torch.arange(400) % 8, torch.arange(80) % 8
    train_f = centers[train_y] + 0.3 * torch.randn(400, 8, generator=g)
    test_f = centers[test_y] + 0.3 * torch.randn(80, 8, generator=g)
    assert common.knn_top1(train_f, train_y, test_f, test_y, 8) == 100.0
    assert common.linear_probe(train_f, train_y, test_f, test_y, 8, epochs=20) == 100.0


def test_std_spectrum_and_rank_on_collapsed_and_isotropic_inputs():
    d = 64
    collapsed = torch.randn(1, d).expand(1000, d)
    assert common.output_std(collapsed) < 1e-6
    assert common.spectrum(collapsed).max() < 1e-6
    assert common.effective_rank(common.spectrum(collapsed)) == 0.0
    iso = torch.randn(20000, d, generator=torch.Generator().manual_seed(0))
    assert abs(common.output_std(iso) - 1 / math.sqrt(d)) < 0.002
    s = common.spectrum(iso)
    assert s.shape == (d,) and (s[:-1] >= s[1:]).all()  # sorted, descending
    # covariance of the unit sphere is I/d; sampling spreads it by (1 +- sqrt(d/n))^2, about 12% here
    assert torch.allclose(s, torch.full((d,), 1 / d), rtol=0.15)
    assert d * 0.98 < common.effective_rank(s) <= d
    # rank k: exactly k non-zero singular values, effective rank k for equal ones
    assert abs(common.effective_rank(torch.tensor([2.0, 2.0, 2.0, 0.0])) - 3.0) < 1e-6
    low = torch.randn(5000, 3) @ torch.randn(3, d)
    s = common.spectrum(low)
    assert (s[3:] < 1e-6).all() and (s[:3] > 1e-3).all()
    assert 1 < common.effective_rank(s) <= 3


def test_folder_source_reads_an_imagefolder_tree(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split in ("train", "val"):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), colour).save(tmp_path / split / name / f"{i}.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "train" / "dog" / "gray.jpg")  # not RGB: converted
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")  # ignored
    args = plumbing.RunArgs(data_dir=str(tmp_path))
    args.dataset, args.image_size = "folder", 16
    data = common.load_data(args, torch.device("cpu"))
    assert data.train_x.shape == (7, 3, 16, 16) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (6, 3, 16, 16) and data.num_classes == 2
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1, 1]  # sorted class folders: cat, dog
    assert data.train_x[0, :, 8, 8].tolist() == [255, 0, 0]
    assert data.train_x[6, :, 8, 8].tolist() == [128, 128, 128]


def test_synthetic_data_has_balanced_classes():
    args = plumbing.RunArgs()
    args.dataset, args.image_size = "synthetic", 32
    data = common.load_data(args, torch.device("cpu"))
    assert data.ssl_x.shape[1:] == (3, 32, 32) and data.num_classes == 5
    assert (data.train_y.bincount() == len(data.train_y) // 5).all()


def test_parse_args_builds_flags_from_the_dataclass():
    import simsiam
    args = plumbing.parse_args(simsiam.Args, ["--epochs", "3", "--crop-scale", "0.3", "0.9", "--no-stop-grad"])
    assert args.epochs == 3 and args.crop_scale == (0.3, 0.9) and args.stop_grad is False
    assert isinstance(args.base_lr, float)
    smoke = plumbing.parse_args(simsiam.Args, ["--smoke"])
    assert smoke.dataset == "synthetic" and smoke.arch == "small"
    smoke = plumbing.parse_args(simsiam.Args, ["--smoke", "--epochs", "1"])  # explicit flags win
    assert smoke.epochs == 1 and smoke.dataset == "synthetic"


def test_backbone_state_dict_loads_into_torchvision_resnet():
    import torch.nn as nn
    from torchvision.models import resnet18
    net = common.backbone("resnet18", 32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    ref = resnet18()
    ref.conv1, ref.maxpool, ref.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    ref.load_state_dict(net.state_dict())


def test_unwrap_sees_through_compile_and_returns_plain_modules():
    net = torch.nn.Linear(3, 2)
    assert plumbing.unwrap(net) is net
    assert plumbing.unwrap(torch.compile(net)) is net  # wrapping only: nothing is compiled here
