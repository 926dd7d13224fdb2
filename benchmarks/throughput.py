"""Pretraining throughput: samples/s (1 sample = 2 views) of one SimCLR step, three ways, on one machine.

  (a) model only: random view tensors already on the device (the bound)
  (b) medcl's pipeline: decoded-scan cache -> batched views on the training device -> step
  (b') the same through the real `medcl pretrain` loop (an .npz of random scans; logging and loss reading included)
  (c) peer-style: MONAI transforms per sample in CPU DataLoader workers (as many as cores) -> step

The "medical views" rows add RandBiasField, RandHistogramShift and RandCoarseDropout (p=0.5 each) to the default
recipe, so the cost of the medical transforms shows beside the plain rows. Prints a table with b/a, b'/a and b/c and
the peak GPU memory. Usage:
  python benchmarks/throughput.py            # GPU cases if a GPU is visible, else small CPU cases
  python benchmarks/throughput.py --cpu      # force the CPU cases
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")

from medcl.config import MedclConfig, apply_overrides  # noqa: E402
from medcl.data.cache import ScanSet  # noqa: E402
from medcl.encoders import build_encoder  # noqa: E402
from medcl.methods import build_method  # noqa: E402
from medcl.train import BatchStream, build_optimizer, speed_settings  # noqa: E402
from medcl.views import TwoViewDataset, monai_transform  # noqa: E402

# the medical rows: the default views plus the three cheap medical transforms the batched engine adds
MEDICAL = [{"_target_": "RandBiasField", "prob": 0.5},
           {"_target_": "RandHistogramShift", "prob": 0.5, "num_control_points": [5, 10]},
           {"_target_": "RandCoarseDropout", "prob": 0.5, "holes": 1, "max_holes": 4, "spatial_size": "$@size // 8",
            "max_spatial_size": "$@size // 4"}]
GPU_CASES = [("2D ResNet-18 128^2", 2, 128, "resnet18", 512), ("2D ResNet-50 224^2", 2, 224, "resnet50", 128),
             ("3D ResNet-18 96^3", 3, 96, "resnet18", 16),
             ("2D ResNet-18 128^2, medical views", 2, 128, "resnet18", 512, MEDICAL),
             ("3D ResNet-18 96^3, medical views", 3, 96, "resnet18", 16, MEDICAL)]
CPU_CASES = [("2D ResNet-18 64^2", 2, 64, "resnet18", 64), ("3D ResNet-18 48^3 (standard stem)", 3, 48, "resnet18", 8),
             ("2D ResNet-18 64^2, medical views", 2, 64, "resnet18", 64, MEDICAL),
             ("3D ResNet-18 48^3, medical views", 3, 48, "resnet18", 8, MEDICAL)]


def make_cfg(dims, size, name, batch, extra_views=None):
    from medcl.views import knob_transforms

    cfg = apply_overrides(MedclConfig(), {"data": {"dims": dims, "size": size},
                                          "encoder": {"name": name, "stem": "standard" if dims == 3 else "auto"},
                                          "train": {"batch_size": batch}})
    if extra_views:
        cfg.views.transforms = knob_transforms(cfg.views, dims) + list(extra_views)
    return cfg


def setup(dims, size, name, batch, device, extra_views=None):
    cfg = make_cfg(dims, size, name, batch, extra_views)
    speed = speed_settings(cfg, device)  # the training loop's own speed switches, at their defaults
    torch.manual_seed(0)
    method = build_method("simclr", build_encoder(cfg), cfg.method).to(device)
    if speed["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = speed["cudnn_benchmark"]
    opt = build_optimizer(cfg.optim, method, device, fused=speed["fused"])
    return cfg, method, opt, speed


def step(method, opt, v1, v2, device, speed):
    if speed["channels_last"]:
        v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=speed["amp"]):
        loss = method(v1, v2)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def pretrain_loop(dims, size, name, batch, device, steps, tmp, extra_views=None):
    """(b') the real `medcl pretrain` on an .npz of random scans: one epoch of 2*steps steps, scalars logged every
    `steps` steps; the samples/s it logs for the second half (the first half is warm-up) is the figure."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medcl.train import pretrain

    n = batch * 2 * steps
    rng = np.random.default_rng(1)
    (Path(tmp) / "data").mkdir()
    npz = Path(tmp) / "data" / f"random_{dims}d_{size}.npz"
    np.savez(npz, train_images=rng.integers(0, 256, (n,) + (size,) * dims, dtype=np.uint8))
    cfg = make_cfg(dims, size, name, batch, extra_views)
    cfg = apply_overrides(cfg, {"train": {"epochs": 1, "log_every": steps, "device": device.type},
                                "data": {"cache_max_gb": 64.0}})
    out = Path(tmp) / f"run_{dims}d_{size}"
    pretrain(npz, out, cfg, overwrite=True, progress=False, log=lambda *a: None)
    acc = EventAccumulator(str(out / "tb")).Reload()
    return acc.Scalars("pretrain/images_per_s")[-1].value


def timed(it, method, opt, device, speed, warmup, steps, batch):
    for _ in range(warmup):
        v1, v2 = next(it)[:2]
        step(method, opt, v1, v2, device, speed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        v1, v2 = next(it)[:2]
        step(method, opt, v1, v2, device, speed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def run_case(label, dims, size, name, batch, device, warmup, steps, workers, rounds, loop, extra_views=None):
    cfg, method, opt, speed = setup(dims, size, name, batch, device, extra_views)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    shape = (batch, 1) + (size,) * dims

    def model_only():
        while True:
            yield torch.rand(shape, device=device), torch.rand(shape, device=device)

    n_items = batch * (warmup + steps + 1)
    rng = np.random.default_rng(0)
    scans = ScanSet(rng.random((n_items, 1) + (size,) * dims, dtype=np.float32), list(range(n_items)))
    cfg.views.backend = "batched"
    stream = BatchStream(scans, cfg, device, batch, warmup + steps + 1)

    def medcl_batches():
        for ep in itertools.count():
            for _, v1, v2, _, _ in stream.epoch(ep):
                yield v1, v2

    ds = TwoViewDataset(scans, monai_transform(cfg.views, dims, size), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         prefetch_factor=2 if workers > 0 else None)

    def monai_batches():
        while True:
            for v1, v2, _ in loader:
                yield v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)

    # (a), (b), (c) take turns for `rounds` rounds and each reports its median: a shared machine's slow spells
    # then hit all three alike instead of whichever ran during them
    its = {"a": model_only(), "b": medcl_batches(), "c": monai_batches()}
    got = {k: [] for k in its}
    for r in range(rounds):
        for k, it in its.items():
            # (c) warms up past the workers' prefetched batches, so it is the steady state, not a drained queue
            w = warmup + (2 * workers if k == "c" else 0) if r == 0 else max(1, warmup // 2)
            got[k].append(timed(it, method, opt, device, speed, w, steps, batch))
    a, b, c = (float(np.median(got[k])) for k in "abc")
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    # augmentation alone, one process: batched views on the device vs MONAI per sample on CPU (views/s)
    x = torch.as_tensor(scans.images[:batch]).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    stream.batched(x, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        stream.batched(x, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    d = 3 * batch / (time.perf_counter() - t)
    tr = ds.transform
    k = min(batch, 32)
    t = time.perf_counter()
    for i in range(k):
        tr(torch.as_tensor(scans.images[i]))
    e = k / (time.perf_counter() - t)
    spread = {k: (min(v), max(v)) for k, v in got.items()}
    bl = float("nan")
    if loop:
        del stream, loader, its, x, method, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as tmp:
            bl = pretrain_loop(dims, size, name, batch, device, steps, tmp, extra_views)
    return dict(case=label, batch=batch, a=a, b=b, bl=bl, c=c, mem=mem, d=d, e=e, spread=spread)


def fmt(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="(a), (b), (c) take turns this many times; medians")
    ap.add_argument("--cases", nargs="*", help="substrings of case names to run")
    ap.add_argument("--no-loop", action="store_true", help="skip (b'), the real `medcl pretrain` loop")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cudnn.benchmark = True
    cases = GPU_CASES if gpu else CPU_CASES
    if args.cases:
        cases = [c for c in cases if any(s in c[0] for s in args.cases)]
    workers = os.cpu_count() or 1
    warmup = args.warmup or (5 if gpu else 2)
    steps = args.steps or (15 if gpu else 6)
    where = torch.cuda.get_device_name() if gpu else f"CPU ({workers} cores)"
    print(f"device: {where}; torch {torch.__version__}; SimCLR step, AdamW{', bf16 autocast, channels_last (2D)' if gpu else ''}; "
          f"(c) uses {workers} DataLoader workers; {steps} timed steps after {warmup} warm-up, "
          f"median of {args.rounds} interleaved rounds")
    rows = []
    for case in cases:
        label, dims, size, name, batch, *extra = case
        r = run_case(label, dims, size, name, batch, device, warmup, steps, workers, args.rounds, not args.no_loop,
                     extra[0] if extra else None)
        rows.append(r)
        print(f"  done {r['case']}", flush=True)
    print()
    print("samples/s (1 sample = 2 views); (b') is one run of the real `medcl pretrain` loop (logging, loss reading,")
    print("checkpoints included), the others medians of the interleaved rounds:")
    print("| case | batch | (a) model only | (b) medcl batched views | (b') medcl pretrain | (c) MONAI CPU workers "
          "| b/a | b'/a | b/c | peak GPU mem (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {fmt(r['a'])} | {fmt(r['b'])} | {fmt(r['bl'])} | {fmt(r['c'])} | "
              f"{r['b'] / r['a']:.2f} | {r['bl'] / r['a']:.2f} | {r['b'] / r['c']:.2f} | {r['mem']:.1f} |")
    print()
    print("spread over rounds (min-max samples/s):")
    for r in rows:
        print(f"  {r['case']}: " + ", ".join(f"({k}) {fmt(lo)}-{fmt(hi)}" for k, (lo, hi) in r["spread"].items()))
    print()
    print("augmentation alone, one process, views/s:")
    print("| case | batched views on the training device | MONAI per sample (CPU) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {fmt(r['d'])} | {fmt(r['e'])} | {r['d'] / r['e']:.1f} |")


if __name__ == "__main__":
    main()
