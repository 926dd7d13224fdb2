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
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), 0)


def all_reduce_mean(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t)
    return float(t.item()) / world_size()


def barrier():
    if world_size() > 1:
        tdist.barrier()


def cleanup():
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
