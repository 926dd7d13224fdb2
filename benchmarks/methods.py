"""Compare contrastive methods with the same budget on PneumoniaMNIST (../shared/data).

For each method: pretrain on the train split without labels (configs/pretrain/medmnist28.yaml, same epochs), then a
linear probe on 10% of the train labels (validation labels at the same budget), tested on the official test split.
SupCon uses the labels of the same 10% subset only (label -1 elsewhere).

Every method runs with its own defaults (heads, temperature: medcl.methods.HEADS/TEMPERATURES) and the recipe's
learning rate; MAE pretrains the `vit` encoder (patch 4), so its control is a random-init ViT. The first rows are the
controls: the same encoder with random weights and the same probe on the same labels.

Usage:  python benchmarks/methods.py [--epochs 10] [--methods simclr byol ...] [--data path.npz]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz"
ALL = ["simclr", "supcon", "pair", "triplet", "moco_v2", "moco_v3", "byol", "simsiam", "barlow", "vicreg", "dino",
       "mae", "monai_ssl"]
ENCODER = {"mae": ["encoder.name=vit", "encoder.patch_size=4"]}  # MAE masks patch tokens: a ViT


def feature_rank(checkpoint, data, cfg) -> float:
    """Effective rank (RankMe, Garrido et al. 2023) of the encoder's features on the test split: how many directions
    the features spread over. A random network spreads widely; a method that squeezes them loses what a probe reads."""
    import numpy as np
    import torch

    from medcl.finetune import load_encoder_or_scratch, load_labeled
    from medcl.monitors import collapse_metrics
    from medcl.runtime import encode

    enc, settings, _ = load_encoder_or_scratch(checkpoint, cfg)
    ld = load_labeled(data, None, settings, progress=False, log=lambda *x: None)
    test = np.flatnonzero(ld.split == "test")
    f = encode(enc, ld.scans.batch(test), torch.device("cpu"))
    return collapse_metrics(torch.as_tensor(f))["rankme"]


def main():
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np

    from medcl.config import load_config, parse_set
    from medcl.data.discover import open_npz
    from medcl.data.labels import labels_from_records, select_budget
    from medcl.finetune import finetune
    from medcl.train import pretrain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(NPZ))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=ALL)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not Path(a.data).is_file():
        print(f"skipped: {a.data} not found")
        return 0
    out = Path(a.out or tempfile.mkdtemp(prefix="medcl_methods_"))
    # SupCon's labels: the same 10% train subset the probe uses (seed 0), never val/test
    recs = open_npz(Path(a.data)).records
    table = labels_from_records(recs)
    y = table.y()
    train_rows = np.flatnonzero(np.array(table.splits) == "train")
    keep = set(select_budget(y, train_rows, 0.1, seed=0).tolist())
    table.splits = [s if (s != "train" or i in keep) else "test" for i, s in enumerate(table.splits)]  # hide the rest
    rows = []
    recipe = ROOT / "configs" / "pretrain" / "medmnist28.yaml"
    controls = [("control: random-init resnet18 x0.5", [])] + ([("control: random-init vit", ENCODER["mae"])]
                                                               if "mae" in a.methods else [])
    for label, extra in controls:  # the best control of the brief: random weights, the same probe and labels
        cfg = load_config(recipe, parse_set(a.set + extra))
        met = finetune("none", a.data, None, out / f"control_{len(rows)}", label_fraction=0.1, mode="probe", seed=0,
                       cfg=cfg, progress=False, log=lambda *x: None)
        rank = feature_rank("none", a.data, cfg)
        rows.append((label, 0.0, met["test"]["auc"], met["test"]["balanced_accuracy"], rank))
        print(f"  {label}: probe AUC {met['test']['auc']:.3f}, feature rank {rank:.1f}", flush=True)
    for m in a.methods:
        cfg = load_config(recipe, parse_set(a.set + ENCODER.get(m, []) + [f"method.name={m}"]))
        cfg.train.epochs = a.epochs
        t0 = time.perf_counter()
        pretrain(a.data, out / m, cfg, labels=table if m == "supcon" else None, progress=False, log=lambda *x: None)
        t_pre = time.perf_counter() - t0
        met = finetune(out / m, a.data, None, out / f"{m}_probe", label_fraction=0.1, mode="probe", seed=0,
                       progress=False, log=lambda *x: None)
        rank = feature_rank(out / m, a.data, cfg)
        rows.append((m, t_pre, met["test"]["auc"], met["test"]["balanced_accuracy"], rank))
        print(f"  {m}: pretrain {t_pre:.0f}s, probe AUC {met['test']['auc']:.3f}, feature rank {rank:.1f}", flush=True)
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nPneumoniaMNIST, {a.epochs} pretraining epochs each ({cfg.encoder.name} x{cfg.encoder.widen_factor}, "
          f"{cfg.data.size} px, batch {cfg.train.batch_size}) on {where}; linear probe with 10% of train labels; "
          "official test split (624)")
    print("| method | pretrain time (s) | test AUC | balanced accuracy | feature rank (RankMe) |")
    print("|---|---|---|---|---|")
    for m, t, auc, bacc, rank in rows:
        print(f"| {m} | {t:.0f} | {auc:.3f} | {bacc:.3f} | {rank:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
