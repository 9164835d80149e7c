"""Evaluation, diagnostics and data sources of common.py; its argument parsing and unwrap."""
import math

import torch
import torch.nn.functional as F
from PIL import Image

import common


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
    # covariance of the unit sphere is I/d; sampling spreads it by (1 +- sqrt(d/n))^2: ~12% here
    assert torch.allclose(s, torch.full((d,), 1 / d, dtype=s.dtype), rtol=0.15)  # float64
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
    # not RGB: converted
    Image.new("L", (20, 20), 128).save(tmp_path / "train" / "dog" / "gray.jpg")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")  # ignored
    args = common.RunArgs(data_dir=str(tmp_path))
    args.dataset, args.image_size = "folder", 16
    data = common.load_data(args, torch.device("cpu"))
    assert data.train_x.shape == (7, 3, 16, 16) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (6, 3, 16, 16) and data.num_classes == 2
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1, 1]  # sorted class folders: cat, dog
    assert data.train_x[0, :, 8, 8].tolist() == [255, 0, 0]
    assert data.train_x[6, :, 8, 8].tolist() == [128, 128, 128]


def test_synthetic_data_has_balanced_classes():
    args = common.RunArgs()
    args.dataset, args.image_size = "synthetic", 32
    data = common.load_data(args, torch.device("cpu"))
    assert data.ssl_x.shape[1:] == (3, 32, 32) and data.num_classes == 5
    assert (data.train_y.bincount() == len(data.train_y) // 5).all()


def test_parse_args_builds_flags_from_the_dataclass():
    import simsiam
    args = common.parse_args(simsiam.Args,
                             ["--epochs", "3", "--crop-scale", "0.3", "0.9", "--no-stop-grad"])
    assert args.epochs == 3 and args.crop_scale == (0.3, 0.9) and args.stop_grad is False
    assert isinstance(args.base_lr, float)
    smoke = common.parse_args(simsiam.Args, ["--smoke"])
    assert smoke.dataset == "synthetic" and smoke.arch == "small"
    smoke = common.parse_args(simsiam.Args, ["--smoke", "--epochs", "1"])  # explicit flags win
    assert smoke.epochs == 1 and smoke.dataset == "synthetic"


def test_backbone_state_dict_loads_into_torchvision_resnet():
    import torch.nn as nn
    from torchvision.models import resnet18
    net = common.backbone("resnet18", 32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    ref = resnet18()
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool, ref.fc = nn.Identity(), nn.Identity()
    ref.load_state_dict(net.state_dict())


def test_unwrap_sees_through_compile_and_returns_plain_modules():
    net = torch.nn.Linear(3, 2)
    assert common.unwrap(net) is net
    assert common.unwrap(torch.compile(net)) is net  # wrapping only: nothing is compiled here


def test_spectrum_is_the_float64_eigenvalues_of_the_covariance():
    import numpy as np
    rng = np.random.default_rng(0)
    z = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8)) + 0.5  # correlated, off-centre
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    u = u - u.mean(axis=0)
    expected = np.linalg.eigvalsh(u.T @ u / len(u))[::-1]
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # reduced-precision float32 matmuls: unused
    try:
        s = common.spectrum(torch.from_numpy(z))
    finally:
        torch.set_float32_matmul_precision(precision)
    assert s.dtype == torch.float64 and (s[:-1] >= s[1:]).all()
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-12, atol=0)
    p = expected / expected.sum()
    assert abs(common.effective_rank(s) - math.exp(-(p * np.log(p)).sum())) < 1e-12


def test_zero_init_residual_makes_every_block_start_as_relu_of_its_shortcut():
    from torchvision.models.resnet import BasicBlock
    for arch in ("small", "resnet18"):
        for zero in (False, True):
            net = common.backbone(arch, 32, zero_init_residual=zero).eval()
            blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
            assert len(blocks) == (4 if arch == "small" else 8)
            for block in blocks:
                assert (block.bn2.weight == 0).all() if zero else (block.bn2.weight == 1).all()
                x = torch.randn(2, block.conv1.in_channels, 8, 8)
                shortcut = x if block.downsample is None else block.downsample(x)
                with torch.no_grad():
                    same = torch.equal(block(x), F.relu(shortcut))
                assert same == zero
    resnet50 = common.backbone("resnet50", 32, zero_init_residual=True)
    assert all((block.bn3.weight == 0).all() for block in resnet50.layer4)  # Bottleneck: bn3


def _tiny_data(size=16):
    x_tr, _, y_tr, x_te, y_te = common.synthetic_dataset(size, n_train=300, n_test=100)
    return common.Data(x_tr, x_tr, y_tr, x_te, y_te, 5)


def test_probe_protocols_return_top1_and_their_name():
    from types import SimpleNamespace
    torch.manual_seed(0)
    data = _tiny_data()
    net, _ = common.measure_bn_statistics(common.backbone("small", 16), {}, data)  # in train mode
    for protocol in ("augmented", "cached"):
        rng = torch.get_rng_state()
        out = common.probe(net, data, SimpleNamespace(probe=protocol, probe_epochs=1))
        assert out["linear_protocol"] == protocol and 0 <= out["linear_top1"] <= 100
        if protocol == "augmented":  # its own random stream: the same number again
            assert torch.equal(torch.get_rng_state(), rng)
            assert common.probe(net, data, SimpleNamespace(probe_epochs=1)) == out
    assert net.training  # left as it was
    assert math.isnan(common.probe(net, data, SimpleNamespace(probe_epochs=0))["linear_top1"])
