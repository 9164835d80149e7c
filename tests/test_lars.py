"""LARS: excluded parameters get plain SGD with momentum; the others get weight decay and the
trust ratio (1 where a norm is 0; with clip=True at most 1 / lr), checked tensor by tensor against
a computation by hand (the optimizer itself updates all tensors of a group at once with
torch._foreach ops)."""
import pytest
import torch

from common import LARS, exclude_bias_and_norm


@pytest.mark.parametrize("clip", [False, True])
def test_lars_step_matches_hand_computation(clip):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3),
                              torch.nn.Linear(3, 2))  # the last layer is unused: no gradient, no update
    with torch.no_grad():
        net[2].weight.zero_()  # ||w|| = 0 at the first step: trust ratio 1
    groups = exclude_bias_and_norm(net)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 5]), torch.Size([3, 4]), torch.Size([2, 3])]
    assert len(groups[1]["params"]) == 5  # linear biases, BN weight and bias
    lr, wd, mom, eta = 0.5, 0.01, 0.9, 0.3 if clip else 0.001  # eta 0.3: the clip binds for some tensors
    opt = LARS(groups, lr=lr, weight_decay=wd, momentum=mom, eta=eta, clip=clip)
    used = list(net[:3].parameters())
    before = [p.detach().clone() for p in used]
    unused = [p.detach().clone() for p in net[3].parameters()]
    velocity = [torch.zeros_like(p) for p in used]
    clipped = []
    for _ in range(3):
        net[:3](torch.randn(8, 5)).pow(2).sum().backward()
        grads = [p.grad.clone() for p in used]
        expected = []
        for i, (w, g) in enumerate(zip(before, grads)):
            if w.ndim > 1:  # adapted: weight decay, then trust ratio
                g = g + wd * w
                trust = eta * w.norm() / g.norm() if w.norm() > 0 and g.norm() > 0 else torch.tensor(1.0)
                if clip:  # LARC: the step min(lr, eta ||w|| / ||g||) * g, never larger than SGD's
                    clipped.append(bool(trust > 1 / lr))
                    trust = torch.clamp(trust * lr, max=lr) / lr
                g = g * trust
            velocity[i] = mom * velocity[i] + g  # excluded: plain SGD with momentum
            expected.append(w - lr * velocity[i])
        opt.step()
        opt.zero_grad()
        for p, e in zip(used, expected):
            torch.testing.assert_close(p.detach(), e)
        before = [p.detach().clone() for p in used]
    assert before[2].norm() > 0  # the zero weight moved
    if clip:
        assert any(clipped) and not all(clipped)  # both cases were checked
    for p, u in zip(net[3].parameters(), unused):
        assert torch.equal(p.detach(), u)
