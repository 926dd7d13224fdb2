"""Few-label benchmark on PneumoniaMNIST (../shared/data): does pretraining pay?

1. pretrain SimCLR on the train split's 4708 images WITHOUT labels (configs/pretrain/medmnist28.yaml)
2. run the few-label protocol (medcl evaluate): label fractions x seeds, kNN / linear / MLP heads on frozen
   features, the same heads on the network at random weights (the control), and the same network trained from
   scratch on the same subsets; official test split (624 images)
3. print the summary and the published fully-supervised MedMNIST v2 baselines (Yang et al., Sci. Data 2023)

Usage:  python benchmarks/few_label.py [--out runs/bench_pm] [--epochs 20] [--seeds 5] [--fractions 0.01 0.1 1.0]
Fits in 60 minutes on a 2-core CPU with the defaults; much faster on a GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz"
PUBLISHED = [("ResNet-18 (28 px), all 4708 labels", 0.944, 0.854), ("ResNet-18 (224 px), all labels", 0.956, 0.864),
             ("ResNet-50 (224 px), all labels", 0.962, 0.884)]


def main():
    import warnings

    warnings.filterwarnings("ignore")
    from medcl.config import load_config, parse_set
    from medcl.evaluate import evaluate
    from medcl.train import pretrain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_pneumoniamnist"))
    ap.add_argument("--data", default=str(NPZ))
    ap.add_argument("--epochs", type=int, default=None, help="pretraining epochs (recipe default if omitted)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.01, 0.1, 1.0])
    ap.add_argument("--baseline-epochs", type=int, default=15)
    ap.add_argument("--finetune-max-labels", type=int, default=600,
                    help="network training rows (scratch baseline) up to this many labels (fully supervised numbers "
                         "are the published ones)")
    ap.add_argument("--set", action="append", default=[], help="extra pretraining config overrides")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    if not Path(a.data).is_file():
        print(f"skipped: {a.data} not found (the benchmark reads PneumoniaMNIST from ../shared/data)")
        return 0
    cfg = load_config(ROOT / "configs" / "pretrain" / "medmnist28.yaml", parse_set(a.set))
    if a.epochs:
        cfg.train.epochs = a.epochs
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        print(f"{out} exists: pass --overwrite or another --out")
        return 1
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    pretrain(a.data, out / "pretrain", cfg, progress=False)
    t_pre = time.perf_counter() - t0
    t1 = time.perf_counter()
    evaluate(out / "pretrain", a.data, None, out / "eval", fractions=a.fractions, seeds=a.seeds,
             heads=("knn", "linear", "mlp"), baseline="finetune", epochs=a.baseline_epochs,
             finetune_max_labels=a.finetune_max_labels, progress=False)
    t_eval = time.perf_counter() - t1
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print()
    print(f"PneumoniaMNIST few-label benchmark on {where}: pretraining {t_pre / 60:.1f} min "
          f"({cfg.train.epochs} epochs, {cfg.encoder.name} x{cfg.encoder.widen_factor}, {cfg.data.size} px, batch "
          f"{cfg.train.batch_size}), evaluation {t_eval / 60:.1f} min, total {(t_pre + t_eval) / 60:.1f} min")
    print((out / "eval" / "summary.md").read_text())
    print("Published fully-supervised baselines (MedMNIST v2, test split):")
    for name, auc, acc in PUBLISHED:
        print(f"  {name}: AUC {auc:.3f}, ACC {acc:.3f}")
    rows = list(csv.DictReader(open(out / "eval" / "results.csv")))

    def mean_auc(frac, enc, head):
        v = [float(r["auc"]) for r in rows if float(r["budget"]) == frac and r["encoder"] == enc and r["head"] == head]
        return sum(v) / len(v) if v else float("nan")

    print()
    print("Targets:")
    if 0.1 in a.fractions:
        v = mean_auc(0.1, "pretrained", "linear")
        print(f"  10% labels, linear probe AUC >= 0.944: {v:.3f} -> {'met' if v >= 0.944 else 'NOT met'}")
    if 0.01 in a.fractions:
        v = mean_auc(0.01, "pretrained", "linear")
        # against the best control on the same subsets (random-init features with the same probe, or scratch)
        ctrl = max((mean_auc(0.01, e, h) for e, h in (("random-init", "linear"), ("random-init", "knn"),
                                                      ("random-init", "mlp"), ("scratch", "finetune"))),
                   key=lambda x: -1 if x != x else x)
        print(f"  1% labels, linear probe AUC >= 0.90: {v:.3f} -> {'met' if v >= 0.90 else 'NOT met'}")
        print(f"  1% labels, >= 0.05 above the best control ({ctrl:.3f}): {v - ctrl:+.3f} -> "
              f"{'met' if v - ctrl >= 0.05 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
