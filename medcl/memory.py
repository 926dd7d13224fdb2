"""How much memory one pretraining step needs, measured before the first step, and the batch that fits.

A 3D run at 32 px with batch 128 and the stride-1 stem needs far more than a 24 GB machine has; without this check
the kernel kills it before its first step, with no message and no checkpoint. The estimate is a dry forward/backward
of the encoder and heads on PyTorch's `meta` device (shapes only, no arithmetic: well under a second even in 3D),
counting the bytes autograd keeps for backward. Those grow linearly with the batch.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from .errors import MedclError

HEADROOM = 0.8  # use at most this share of the free memory: the allocator, the views and the OS need the rest
# real peak / saved bytes was 0.79-1.16 on CPU (2D and 3D, 5 methods; see benchmarks/memory_estimate.py)
BACKWARD_FACTOR = 1.25


def available_bytes(device: torch.device) -> int:
    """Free memory now: the GPU's free memory, or the host's MemAvailable (Linux), else total physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def saved_bytes(method, item_shape, batch: int, amp: bool = False) -> int:
    """Bytes autograd keeps for backward in a training forward of `batch` items (two views each), measured on the
    meta device. The loss itself (a batch x batch similarity at most) is left out: it is small, and some losses use
    data-dependent ops that have no shape-only version."""
    probe = copy.deepcopy(method).to("meta").train()
    seen: dict = {}  # storage -> bytes: a tensor saved by several ops (conv output for BN and ReLU) counts once

    def pack(t):
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
        return t

    v = torch.empty((batch,) + tuple(item_shape), device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = torch.cat([probe.embed(v), probe.embed(v)])
    z.float().sum().backward()
    total = sum(seen.values())
    return total // 2 if amp else total  # bf16 activations take half the bytes


@dataclass
class StepMemory:
    fixed: float  # bytes: weights, gradients, optimizer state, what does not grow with the batch
    per_item: float  # bytes per item (two views) of activations kept for backward

    def at(self, batch: int) -> float:
        return self.fixed + self.per_item * batch

    def largest_batch(self, budget: float) -> int:
        return int((budget - self.fixed) // max(self.per_item, 1.0))


def measure_step(method: torch.nn.Module, item_shape, batch: int, amp: bool = False,
                 extra_views: float = 0.0) -> StepMemory:
    """The step's memory at `batch`, split into the part that grows with the batch and the part that does not.
    `extra_views`: multi-crop's local views, in units of a global view's pixels (activations scale with them)."""
    params = sum(p.numel() * p.element_size() for p in method.parameters())
    per_item = saved_bytes(method, item_shape, batch, amp) / batch * BACKWARD_FACTOR * (2 + extra_views) / 2
    per_item += 2 * 4 * int(torch.Size(item_shape).numel())  # the two views themselves
    return StepMemory(fixed=4 * params, per_item=per_item)  # weights + gradients + AdamW's two moments


def fit_batch(mem: StepMemory, batch: int, device, minimum: int = 2, limit_gb: float = 0.0, log=print) -> int:
    """`batch` if a step fits in the free memory (or `limit_gb`); else the largest batch that does, said so; else a
    one-line error naming the knobs."""
    free = limit_gb * 2 ** 30 if limit_gb > 0 else available_bytes(device)
    budget = free if limit_gb > 0 else HEADROOM * free
    if mem.at(batch) <= budget:
        return batch
    room = f"{gb(free)} allowed by train.memory_gb" if limit_gb > 0 else f"{gb(free)} free on {device}"
    fits = mem.largest_batch(budget)
    knobs = ("--batch-size, --set data.size=..., --set encoder.widen_factor=0.5, --set encoder.stem=standard "
             "(stride 2) or --set encoder.name=resnet10")
    if fits < minimum:
        raise MedclError(f"one step needs about {gb(mem.at(minimum))} even at batch {minimum}, but only {room}: "
                         f"make the step smaller with {knobs}.")
    fits = 2 ** (fits.bit_length() - 1) if fits >= 8 else fits  # a power of two keeps GPU kernels efficient
    log(f"note: batch {batch} needs about {gb(mem.at(batch))} per step (measured by a dry step), more than the "
        f"{room}; using batch {fits} (about {gb(mem.at(fits))}). Choose yourself with {knobs}.")
    return fits


def gb(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.2g} GB"
