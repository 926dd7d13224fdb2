"""Everything that talks to torch.distributed: init from torchrun's environment, gather with gradients, rank 0."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_kind: str) -> bool:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1). NCCL on GPU, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return tdist.is_initialized()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend, timeout=timedelta(minutes=30))
    return True


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate t over ranks (rank order). Backward sums every rank's gradient into the local slice; combined with
    DDP's gradient averaging this gives exactly the single-process gradient of the global-batch loss."""
    if world_size() == 1:
        return t
    return _GatherWithGrad.apply(t.contiguous())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gradient of the gathered tensor over ranks and keeps the local slice.
    (Keeping only the local gradient without the sum is the classic bug: gradients off by the world size.)"""

    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(world_size())]
        tdist.all_gather(parts, t)
        ctx.n = t.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        r = rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks, queued on the device (no host wait on NCCL); the tensor itself with one process."""
    if world_size() == 1:
        return t
    t = t.detach().float().clone()
    tdist.all_reduce(t)
    return t / world_size()


def broadcast_ints(values: list, device) -> list:
    """Rank 0's integers on every rank (a host sync: for rare decisions, such as a time budget's plan)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    tdist.broadcast(t, src=0)
    return t.tolist()


def barrier():
    if world_size() > 1:
        tdist.barrier()


def cleanup():
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
