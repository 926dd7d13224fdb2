"""Optimisers and schedules of pretraining: AdamW or LARS without decay on biases and norms, warm-up then cosine, and
what the speed switches mean on a device."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from ..config import MedclConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017); biases and norms skip adaptation."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.02):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if g["lars"] and p.ndim > 1:
                    pn, un = torch.norm(p), torch.norm(dp)
                    trust = torch.where((pn > 0) & (un > 0), g["eta"] * pn / un, torch.ones_like(pn))
                    dp = dp.mul(trust)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(dp)
                p.add_(buf, alpha=-g["lr"])


@functools.cache  # the flags do not change while a process runs; speed_settings asks more than once per run
def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX), read from /proc/cpuinfo's flags. Arm's BF16 is
    left out, unmeasured; without these flags oneDNN may have no bf16 backward at all (pytorch#148861)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def speed_settings(cfg: MedclConfig, device: torch.device) -> dict:
    """What the speed switches of `cfg.train` mean on `device`: the one place the training loop and the throughput
    benchmark take them from. bf16 autocast by default on a GPU, and for 2D on a CPU with native bf16, where it cut
    an epoch by 31-43% and the few-label AUC moved within run-to-run spread (docs/gpu.md); in 3D on a CPU it
    diverged (NaN) within 31 steps."""
    t, cuda = cfg.train, device.type == "cuda"
    native = cuda or (device.type == "cpu" and cfg.data.dims == 2 and cpu_has_native_bf16())
    return {"amp": t.amp == "bf16" or (native and t.amp == "auto"),  # bf16 autocast
            "channels_last": cuda and cfg.data.dims == 2 and t.channels_last,
            "compile": t.compile,
            "cudnn_benchmark": cuda and t.cudnn_benchmark,
            "fused": cfg.optim.name == "adamw" and (t.fused_optimizer == "on"
                                                    or (cuda and t.fused_optimizer == "auto"))}


def build_optimizer(cfg, model, device, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (fused when `fused`, default: on a GPU) or LARS, without weight decay on biases and norm layers."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norm layers
    if cfg.name == "lars":
        return LARS([{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars": False}], lr=cfg.lr,
                    weight_decay=cfg.weight_decay)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda" if fused is None else fused)


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def fit_schedule(sched, method, total: int, schedule: tuple) -> int:
    """The cosine schedule (and a momentum method's own) made to end exactly at step `total`; returns it."""
    warm, min_ratio = schedule
    sched.lr_lambdas[0] = lr_lambda(min(warm, max(1, total // 10)), total, min_ratio)
    if method.uses_momentum:
        method.total_steps = total
    return total
