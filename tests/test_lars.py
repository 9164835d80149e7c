"""LARS: excluded parameters get plain SGD with momentum; the others get weight decay and the
trust ratio (1 where a norm is 0; with clip=True the step is min(lr, eta ||w|| / ||g||) * g),
checked tensor by tensor against a computation by hand (the optimizer itself updates all tensors
of a group at once). Its momentum buffers are made once and resume exactly from a state_dict; the
operations of one step do not grow in number with the number of tensors."""
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import LARS, exclude_bias_and_norm


@pytest.mark.parametrize("clip", [False, True])
def test_lars_step_matches_hand_computation(clip):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    head = torch.nn.Linear(4, 2)  # reads the BN output; zero weight: trust ratio 1 at first
    unused = torch.nn.Linear(3, 2)  # no gradient, no update
    with torch.no_grad():
        head.weight.zero_()
    groups = exclude_bias_and_norm(net, head, unused)
    assert [p.shape for p in groups[0]["params"]] == [(4, 5), (3, 4), (2, 4), (2, 3)]
    assert len(groups[1]["params"]) == 6  # linear biases, BN weight and bias
    lr, wd, mom, eta = 0.5, 0.01, 0.9, 0.1 if clip else 0.001  # eta 0.1: the clip binds for some
    opt = LARS(groups, lr=lr, weight_decay=wd, momentum=mom, eta=eta, clip=clip)
    used = list(net.parameters()) + list(head.parameters())
    before = [p.detach().clone() for p in used]
    unused_before = [p.detach().clone() for p in unused.parameters()]
    velocity = [torch.zeros_like(p) for p in used]
    clipped = []
    for _ in range(3):
        h = net[:2](torch.randn(8, 5))
        (net[2](h).pow(2).sum() + head(h).sin().sum()).backward()
        grads = [p.grad.clone() for p in used]
        expected = []
        for i, (w, g) in enumerate(zip(before, grads)):
            if w.ndim > 1:  # adapted: weight decay, then trust ratio
                g = g + wd * w
                trust = eta * w.norm() / g.norm() if w.norm() > 0 and g.norm() > 0 else 1.0
                if clip:  # LARC: the step min(lr, eta ||w|| / ||g||) * g, never larger than SGD's
                    clipped.append(bool(trust > lr))
                    trust = min(trust, lr) / lr
                g = g * trust
            velocity[i] = mom * velocity[i] + g  # excluded: plain SGD with momentum
            expected.append(w - lr * velocity[i])
        opt.step()
        opt.zero_grad()
        for p, e in zip(used, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)
        before = [p.detach().clone() for p in used]
    assert before[4].norm() > 0  # the zero weight moved
    if clip:
        assert any(clipped) and not all(clipped)  # both cases were checked
    for p, u in zip(unused.parameters(), unused_before):
        assert torch.equal(p.detach(), u)


def _net_and_lars(layers=2, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              *[torch.nn.Linear(16 if i == 0 else 5, 5) for i in range(layers)])
    return net, LARS(exclude_bias_and_norm(net), lr=0.3, weight_decay=1e-3, eta=0.02, clip=True)


def _train(net, opt, inputs):
    for x in inputs:
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()


def test_momentum_buffers_are_made_once_and_resume_exactly_from_a_state_dict():
    inputs = list(torch.randn(6, 8, 3, 4, 4, generator=torch.Generator().manual_seed(1)))
    net, opt = _net_and_lars()
    _train(net, opt, inputs[:1])
    buffers = {p: opt.state[p]["momentum"] for p in net.parameters()}
    _train(net, opt, inputs[1:])  # uninterrupted run
    assert all(opt.state[p]["momentum"] is v for p, v in buffers.items())

    first, opt1 = _net_and_lars()
    _train(first, opt1, inputs[:3])
    file = io.BytesIO()
    torch.save({"net": first.state_dict(), "opt": opt1.state_dict()}, file)
    file.seek(0)
    ckpt = torch.load(file, weights_only=True)
    for with_state in (True, False):
        second, opt2 = _net_and_lars(seed=1)
        second.load_state_dict(ckpt["net"])
        if with_state:
            opt2.load_state_dict(ckpt["opt"])
        _train(second, opt2, inputs[3:])
        same = [torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                  second.state_dict().values())]
        assert all(same) if with_state else not all(same)  # without momentum: another run


def test_channels_last_weights_give_the_same_step():
    inputs = list(torch.randn(3, 8, 3, 4, 4, generator=torch.Generator().manual_seed(2)))
    net, opt = _net_and_lars()
    other, opt_other = _net_and_lars()
    other[0].to(memory_format=torch.channels_last)
    assert other[0].weight.is_contiguous(memory_format=torch.channels_last)
    _train(net, opt, inputs)
    _train(other, opt_other, inputs)
    for a, b in zip(net.parameters(), other.parameters()):
        torch.testing.assert_close(a, b)  # the convolution itself rounds differently
    assert other[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert opt_other.state[other[0].weight]["momentum"].is_contiguous(
        memory_format=torch.channels_last)


class _Ops(TorchDispatchMode):
    """The aten operations issued (views, which launch no kernel, left out); checks that each
    _foreach operation gets lists of tensors of equal shapes and strides: on CUDA that is the
    condition of its fused kernel (a list of 0-dim tensors falls back to one kernel per tensor)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func.name())
        if func.name().startswith("aten::_foreach"):
            lists = [a for a in args if isinstance(a, (list, tuple))
                     and all(isinstance(t, torch.Tensor) for t in a)]
            for other in lists[1:]:
                assert [(t.shape, t.stride()) for t in other] == \
                       [(t.shape, t.stride()) for t in lists[0]], func.name()
        return func(*args, **(kwargs or {}))


def test_one_step_issues_the_same_operations_for_any_number_of_tensors():
    counts = []
    for layers in (1, 6):
        net, opt = _net_and_lars(layers)
        net[0].to(memory_format=torch.channels_last)  # a layout of its own: kept, see _Ops
        x = torch.randn(2, 8, 3, 4, 4)
        _train(net, opt, x[:1])  # the first step also makes the momentum buffers
        opt.zero_grad()
        net(x[1]).pow(2).sum().backward()
        with _Ops() as mode:
            opt.step()
        counts.append(sorted(mode.ops))
    assert counts[0] == counts[1]
    assert counts[0].count("aten::mul.Tensor") + counts[0].count("aten::mul_.Tensor") <= 2
