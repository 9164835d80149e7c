"""DirectCLR: the loss against its formula, its gradient and symmetry, its relation to SimCLR's
nt_xent, the spectrum of the sub-vector r[:, :d0] and the command line for every --projector.
(Learning: test_training.py.)"""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import directclr
from clirun import RUN_FILES, check_help, check_smoke
from common import parse_args


def literal_loss(z1, z2, tau, same_side_negatives):
    """SimCLR's L written out view by view (PAPERS.md, SimCLR Alg. 1): the 2N views, s = cosine
    similarity, l(a) = -log( e^{s(a, positive)/tau} / sum_{k != a} e^{s(a, k)/tau} ), mean over
    the 2N anchors. same_side_negatives=False drops from each denominator the views of the anchor's
    own side, keeping its positive and the N - 1 other images of the other side: DirectCLR."""
    z1, z2 = z1.double(), z2.double()
    views = [(side, i, v) for i in range(len(z1)) for side, v in ((1, z1[i]), (2, z2[i]))]
    total = 0.0
    for side, i, v in views:
        e = {(s, j): math.exp(F.cosine_similarity(v, w, dim=0).item() / tau) for s, j, w in views}
        positive = e[(3 - side, i)]
        denominator = sum(val for (s, j), val in e.items()
                          if (s, j) != (side, i) and (same_side_negatives or s != side))
        total -= math.log(positive / denominator)
    return total / len(views)


def test_loss_equals_the_literal_formula():
    g = torch.Generator().manual_seed(0)
    for n, d, d0, tau in [(2, 3, 3, 0.1), (5, 16, 4, 0.1), (12, 64, 11, 0.5), (8, 512, 90, 0.1)]:
        r1, r2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        literal = literal_loss(r1[:, :d0], r2[:, :d0], tau, same_side_negatives=False)
        assert abs(directclr.directclr_loss(r1, r2, d0, tau).item() - literal) < 1e-4
    # known values: orthogonal images, identical views -> log(1 + (N - 1) e^{-1/tau});
    # everything collapsed to one point -> log N (the positive is one of N equal logits)
    n, tau = 6, 0.1
    eye = torch.eye(n, 10)
    expected = math.log(1 + (n - 1) * math.exp(-1 / tau))
    assert abs(directclr.directclr_loss(eye, eye, 10, tau).item() - expected) < 1e-6
    same = torch.randn(1, 10).expand(n, 10)
    assert abs(directclr.directclr_loss(same, same, 10, tau).item() - math.log(n)) < 1e-5


def test_gradient_reaches_only_the_first_d0_dimensions_of_r():
    g = torch.Generator().manual_seed(1)
    d0 = 90
    r1 = torch.randn(16, 512, generator=g, requires_grad=True)
    r2 = torch.randn(16, 512, generator=g, requires_grad=True)
    directclr.directclr_loss(r1, r2, d0, 0.1).backward()
    for r in (r1, r2):
        assert (r.grad[:, d0:] == 0).all()  # the rest of r is reached only through the layers below
        assert (r.grad[:, :d0].abs().sum(dim=1) > 0).all()  # every row receives gradient
    # and the value does not depend on r[:, d0:]
    other = torch.cat([r1[:, :d0], torch.randn(16, 512 - d0, generator=g)], dim=1)
    assert directclr.directclr_loss(other, r2, d0, 0.1).item() == pytest.approx(
        directclr.directclr_loss(r1, r2, d0, 0.1).item(), abs=1e-6)


def test_loss_is_symmetric_in_the_two_views():
    g = torch.Generator().manual_seed(2)
    r1, r2 = torch.randn(32, 128, generator=g), torch.randn(32, 128, generator=g)
    a, b = directclr.directclr_loss(r1, r2, 40, 0.1), directclr.directclr_loss(r2, r1, 40, 0.1)
    assert torch.allclose(a, b, atol=1e-6)
    # it is the mean of the two directions, InfoNCE(z1, z2)/2 + InfoNCE(z2, z1)/2
    z1, z2 = F.normalize(r1[:, :40], dim=1), F.normalize(r2[:, :40], dim=1)
    info_nce = lambda x, y: F.cross_entropy(x @ y.T / 0.1, torch.arange(32))  # noqa: E731
    assert torch.allclose(a, info_nce(z1, z2) / 2 + info_nce(z2, z1) / 2, atol=1e-5)


def test_directclr_and_simclr_differ_exactly_by_the_same_side_negatives():
    """Where the two InfoNCE copies agree and where they differ. SimCLR's nt_xent: per anchor 2N - 2
    negatives, the N - 1 other images of the other view AND of the anchor's own view. DirectCLR's
    loss with d0 = dim z: only the other view's N - 1. Remove the same-side terms from SimCLR's
    denominators and the two are equal (checked against the literal formula); with them, SimCLR's
    value is strictly larger (more terms in every denominator); at N = 1 both are 0."""
    simclr = pytest.importorskip("simclr", reason="simclr.py (nt_xent) not in the project yet")
    g = torch.Generator().manual_seed(3)
    for n, d, tau in [(4, 8, 0.5), (16, 128, 0.1)]:
        z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        with_same_side = literal_loss(z1, z2, tau, same_side_negatives=True)
        without = literal_loss(z1, z2, tau, same_side_negatives=False)
        assert abs(simclr.nt_xent(z1, z2, tau).item() - with_same_side) < 1e-4  # SimCLR's L, Eq. 1
        assert abs(directclr.directclr_loss(z1, z2, d, tau).item() - without) < 1e-4
        assert simclr.nt_xent(z1, z2, tau).item() > directclr.directclr_loss(z1, z2, d, tau).item()
    z1, z2 = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)  # N = 1: no negatives at all
    assert abs(simclr.nt_xent(z1, z2, 0.1).item()) < 1e-6
    assert abs(directclr.directclr_loss(z1, z2, 8, 0.1).item()) < 1e-6


def test_spectrum_of_r_and_of_its_first_d0_dimensions(tmp_path):
    """What evaluate() logs for --projector direct: spectrum_r over all of r, spectrum_z over
    r[:, :d0]. Here r = x M with M of known rank: 3 in the first d0 columns, 5 in the others."""
    g = torch.Generator().manual_seed(4)
    d0, dim, pixels = 90, 512, 3 * 8 * 8
    M = torch.cat([torch.randn(pixels, 3, generator=g) @ torch.randn(3, d0, generator=g),
                   torch.randn(pixels, 5, generator=g) @ torch.randn(5, dim - d0, generator=g)], dim=1)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, dim, bias=False))
    encoder[1].weight.data = M.T
    images = lambda n: torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)  # noqa: E731
    train_x, test_x = images(300), images(200)
    data = common.Data(train_x, train_x, torch.arange(300) % 2, test_x, torch.arange(200) % 2, 2)
    m = common.evaluate(encoder, data, directclr.Args(), {"z": directclr.FirstDims(d0)})
    s_r, s_z = torch.tensor(m["spectrum_r"]), torch.tensor(m["spectrum_z"])
    assert len(s_r) == dim and len(s_z) == d0
    assert (s_r[:8] > 1e-4).all() and (s_r[8:] < 1e-6).all()  # rank 3 + 5
    assert (s_z[:3] > 1e-4).all() and (s_z[3:] < 1e-6).all()  # rank 3
    assert 1 < m["rank_z"] <= 3 and 3 < m["rank_r"] <= 8


def test_help_lists_the_paper_hyperparameters():
    check_help("directclr", "--projector", "--d0", "--tau", "--proj-dim", "--warmup-epochs", "--base-lr",
               "direct", "mlp", "linear", "none", "SimCLR App. B.9", "360/2048")


@pytest.mark.parametrize("projector", directclr.PROJECTORS)
def test_help_and_parsing_for_each_projector(projector, capsys):
    assert parse_args(directclr.Args, ["--projector", projector, "--smoke"]).projector == projector
    with pytest.raises(SystemExit) as exit_:
        parse_args(directclr.Args, ["--projector", projector, "--help"])
    assert exit_.value.code == 0 and "--projector" in capsys.readouterr().out


def test_bad_projector_or_d0_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown --projector 'deep'; choose one of direct"):
        directclr.train(parse_args(directclr.Args, ["--smoke", "--projector", "deep", "--out-dir", str(tmp_path)]))
    with pytest.raises(SystemExit, match="--d0 600: must be between 1 and 512"):
        directclr.train(parse_args(directclr.Args, ["--smoke", "--d0", "600", "--out-dir", str(tmp_path)]))


def read_metrics(tmp_path):
    run_dir = next(tmp_path.iterdir())
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("projector, dim_z", [("mlp", 128), ("linear", 128), ("none", None)])
def test_smoke_runs_for_each_baseline_projector(projector, dim_z, tmp_path):
    # --smoke, shortened to one epoch of 2 steps without probe (in-process: common.parse_args lets
    # --smoke override explicit --epochs / --steps-per-epoch flags)
    args = parse_args(directclr.Args, ["--smoke", "--projector", projector, "--out-dir", str(tmp_path)])
    final = directclr.train(dataclasses.replace(args, epochs=1, steps_per_epoch=2, probe_epochs=0))
    assert 0 <= final["knn_top1"] <= 100 and math.isfinite(final["loss"])
    for record in read_metrics(tmp_path):  # epoch 0, epoch 1, final: spectrum and rank of r and z
        assert len(record["spectrum_r"]) == 512 and 0 < record["rank_r"] <= 512
        if dim_z:
            assert len(record["spectrum_z"]) == dim_z and 0 < record["rank_z"] <= dim_z
        else:
            assert "spectrum_z" not in record  # no projector: z is r itself


def test_smoke_directclr_logs_both_spectra_from_initialization_on(tmp_path):
    check_smoke("directclr", tmp_path)
    records = read_metrics(tmp_path)
    init, final = records[0], records[-1]
    assert init["epoch"] == 0 and final["d0"] == 90 and final["final"] is True
    assert len(init["spectrum_z"]) == 90 and len(init["spectrum_r"]) == 512
    assert len(final["spectrum_z"]) == 90 and len(final["spectrum_r"]) == 512


def test_baseline_projectors_have_the_official_shapes():
    """mlp: bias-free Linear, BN, ReLU, bias-free Linear, BN (output BN included); linear: one
    bias-free layer; direct and none: nothing to train."""
    mlp = directclr.projector("mlp", 512, 128)
    assert [type(m).__name__ for m in mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear",
                                               "BatchNorm1d"]
    assert mlp[0].bias is None and mlp[3].bias is None and mlp[4].num_features == 128
    linear = directclr.projector("linear", 512, 128)
    assert linear.bias is None and linear.weight.shape == (128, 512)
    for kind in ("direct", "none"):
        assert not list(directclr.projector(kind, 512, 128).parameters())
