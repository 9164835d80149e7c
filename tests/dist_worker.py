"""Run under torchrun by test_distributed.py: each rank takes its share of a fixed batch and saves
what it computed (loss, gradient w.r.t. its own embeddings, Sinkhorn codes) to <out>/rank<r>.pt."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import directclr  # noqa: E402
import simclr  # noqa: E402
import swav  # noqa: E402


def fixed_batch(B=8, d=16, K=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, d, generator=g), torch.randn(B, d, generator=g), torch.randn(B, K, generator=g)


def main(out):
    dist.init_process_group("gloo")
    r, W = dist.get_rank(), dist.get_world_size()
    z1, z2, scores = fixed_batch()
    n = len(z1) // W
    share = slice(r * n, (r + 1) * n)
    result = {}
    for name, loss_fn in (("nt_xent", lambda a, b: simclr.nt_xent(a, b, 0.5)),
                          ("directclr", lambda a, b: directclr.directclr_loss(a, b, 10, 0.1))):
        a, b = z1[share].clone().requires_grad_(), z2[share].clone().requires_grad_()
        loss = loss_fn(a, b)
        loss.backward()
        result[name] = (loss.detach(), a.grad, b.grad)
    result["sinkhorn"] = swav.sinkhorn(scores[share], 0.05, 3)
    torch.save(result, os.path.join(out, f"rank{r}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
