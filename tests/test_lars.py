"""LARS: excluded parameters get plain SGD with momentum; the others get weight decay and the
trust ratio, checked against a computation by hand."""
import torch

from common import LARS, exclude_bias_and_norm


def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    groups = exclude_bias_and_norm(net)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([4, 5])]
    assert len(groups[1]["params"]) == 3  # linear bias, BN weight and bias
    lr, wd, mom, eta = 0.5, 0.01, 0.9, 0.001
    opt = LARS(groups, lr=lr, weight_decay=wd, momentum=mom, eta=eta)
    before = [p.detach().clone() for p in net.parameters()]
    velocity = [torch.zeros_like(p) for p in net.parameters()]
    for _ in range(2):
        net(torch.randn(8, 5)).pow(2).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        expected = []
        for i, (w, g) in enumerate(zip(before, grads)):
            if w.ndim > 1:  # adapted: weight decay, then trust ratio
                g = g + wd * w
                g = g * (eta * w.norm() / g.norm())
            velocity[i] = mom * velocity[i] + g  # excluded: plain SGD with momentum
            expected.append(w - lr * velocity[i])
        opt.step()
        opt.zero_grad()
        for p, e in zip(net.parameters(), expected):
            torch.testing.assert_close(p.detach(), e)
        before = [p.detach().clone() for p in net.parameters()]
