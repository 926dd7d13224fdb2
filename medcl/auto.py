"""Defaults from the folder's own properties, for `medcl pretrain DATA` without a recipe.

The rules are few and stated in the run's first lines: the same rules ran on every dataset of benchmarks/suite.py
(docs/results.md), none of which they were tuned to. Anything the user sets (--set, --dims, --epochs, --batch-size)
wins over them; a recipe (--config) replaces them.
"""
from __future__ import annotations

import numpy as np

from .data.discover import Selection, open_source
from .errors import MedclError

# views seen per pretraining run (each scan gives two per epoch), from the compute curve (benchmarks/budget.py,
# docs/results.md): 4x the old CPU budget (40k views in 2D) raised the gain over the random-init control at every
# label budget on 3 of the 5 suite datasets and left the other two flat (the median gain rose at 1%, 20 labels and
# every label), and 16x the old 3D one (8k) raised it again; where it rose it had not stopped, so the CPU budgets
# are those points, capped by what a user waits (2 idle CPU cores: 15.5 min on PneumoniaMNIST, 17.3 on
# VesselMNIST3D; 10-36 min on the other suite datasets with the cores shared). `--time` gives a folder any other
# budget. At 64x the old budget (PneumoniaMNIST, VesselMNIST3D) the every-label gain rose again, but the few-label
# one had stopped rising after 16x except through one head, for 16x the default's time: not a default. A GPU gets
# the published small-image budget (a MedMNIST SSL benchmark: 400 epochs of PneumoniaMNIST, ~3.8M views); its wall
# time is not yet measured in medcl (docs/gpu.md). Epochs = views / (2 x scans), within
# [EPOCHS_MIN, EPOCHS_MAX[device]].
VIEWS_BUDGET = {("cpu", 2): 160_000, ("cpu", 3): 128_000, ("cuda", 2): 4_000_000, ("cuda", 3): 400_000}
EPOCHS_MIN, EPOCHS_MAX = 3, {"cpu": 200, "cuda": 800}
PEEK = 12  # scans read to learn the folder's native size, channels and dimensionality


def folder_profile(data, select: Selection | None = None, dims: int | None = None, peek: int = PEEK) -> dict:
    """Number of scans, 2D/3D, native size (median longest side) and colour, from a few evenly spaced scans."""
    src = open_source(data, dims or 2, "train" if str(data).endswith(".npz") else "all", select)
    recs = src.records
    pick = [recs[i] for i in np.unique(np.linspace(0, len(recs) - 1, min(peek, len(recs))).astype(int))]
    sides, spatial, colour, unread = [], [], [], []
    for r in pick:
        try:
            arr, _ = src.read(r)
        except Exception as e:  # unreadable scans are reported (by path) when the cache is built, not here
            unread.append((r.path, getattr(e, "reason", str(e))))
            continue
        shape = [s for s in arr.shape[1:] if s > 1]
        spatial.append(len(shape))
        sides.append(max(shape) if shape else 0)
        colour.append(arr.shape[0] >= 3 and float(np.abs(arr[0] - arr[1]).mean() + np.abs(arr[1] - arr[2]).mean())
                      > 1e-3 * max(float(np.abs(arr).max()), 1e-6))
    if pick and not sides:  # a plan for a folder none of whose scans read would be nonsense: say so in one line
        path, reason = unread[0]
        raise MedclError(f"{data}: none of the {len(pick)} scans medcl looked at can be read ({path}: "
                         f"{reason.split(' (')[0]}). Is DATA a folder of scans (NIfTI, DICOM, PNG/JPEG/TIFF, .npy)?")
    found_dims = dims or (3 if spatial and np.median(spatial) >= 3 else 2)
    return {"n_scans": len(recs), "dims": int(found_dims), "native_size": int(np.median(sides)) if sides else 0,
            "colour": bool(colour and np.mean(colour) > 0.5), "peeked": len(sides)}


def auto_settings(profile: dict, device: str = "cpu") -> dict:
    """{section: {key: value}} for a folder profile on a device type ('cpu' or 'cuda')."""
    dims, n, native = profile["dims"], max(1, profile["n_scans"]), profile["native_size"] or 64
    gpu = device == "cuda"
    if dims == 2:
        size = native if native <= 64 else (128 if gpu else 64)
        batch = 256 if gpu else 128
        encoder = {"name": "resnet18", "stem": "auto", "widen_factor": 1.0 if gpu else 0.5}
    else:  # a stride-2 stem keeps a 3D step inside a CPU's memory (stride 1 at 32^3 and batch 128 needed > 24 GB)
        size = native if native <= 32 else (64 if gpu else 32)
        batch = 64 if gpu else 32
        encoder = {"name": "resnet18", "stem": "standard" if size > 32 or not gpu else "small",
                   "widen_factor": 1.0 if gpu else 0.5}
    size = max(size, 16)
    batch = int(max(2, min(batch, 2 ** int(np.log2(max(2, n // 4))))))
    dev = "cuda" if gpu else "cpu"
    epochs = int(np.clip(round(VIEWS_BUDGET[(dev, dims)] / (2 * n)), EPOCHS_MIN, EPOCHS_MAX[dev]))
    views = {"crop_scale": [0.35, 1.0], "rotate_deg": 10.0 if dims == 3 or size <= 32 else 15.0,
             "noise_std": 0.03 if size <= 32 else 0.05, "blur_prob": 0.2}
    return {"data": {"dims": dims, "size": int(size), "channels": 3 if profile["colour"] else 1},
            "views": views, "encoder": encoder, "method": {"name": "simclr", "temperature": 0.2},
            "optim": {"lr": 1e-3 * batch / 128 if not gpu else 2e-3, "warmup_epochs": 1.0},
            "train": {"epochs": epochs, "batch_size": batch}}


def describe_auto(profile: dict, cfg, device: str, typed: bool = False) -> str:
    """The run's first line: what the folder is and the settings the run will use (after any typed flags)."""
    what = (f"{profile['n_scans']} {profile['dims']}D scans, native ~{profile['native_size']} px, "
            f"{'colour' if profile['colour'] else 'grayscale'}")
    return (f"defaults for this folder ({what}; {device}){' with your flags' if typed else ''}: size {cfg.data.size}, "
            f"channels {cfg.data.channels}, {cfg.encoder.name} x{cfg.encoder.widen_factor:g} stem {cfg.encoder.stem}, "
            f"{cfg.method.name}, batch {cfg.train.batch_size}, "
            f"{f'time budget {cfg.train.time_budget}' if cfg.train.time_budget else f'{cfg.train.epochs} epochs'}; "
            f"set any of them with "
            f"--set/--epochs/--batch-size, or use a recipe (--config)")
