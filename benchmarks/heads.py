"""Few-label heads on validation splits: which head cashes in a better encoder at 1% and at 20 labels? (issue 31)

For one pretrained run per dataset: frozen features of the train and validation splits, from the pretrained encoder
and from the same network at random weights (the control `medcl evaluate` uses). Labeled subsets are drawn from the
train split as `medcl evaluate` draws them (stratified, at least 2 per class; 10 per class for "20 labels"), the
rest of the train split is the unlabeled pool, and every head is scored by its AUC on the VALIDATION split. The test
split is never opened, so a head chosen from this table is not chosen on test data.

Usage:  python benchmarks/heads.py --run pneumoniamnist=RUN [--run vesselmnist3d=RUN ...] --seeds 10 --out DIR
Features are kept in DIR (features_NAME.npz), so a second call only re-fits the heads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipe import validation_features  # noqa: E402
from suite import DATASETS  # noqa: E402

HEADS = ["linear", "knn", "proto", "spread", "selftrain"]
BUDGETS = {"1%": (0.01, None), "20 labels": (None, 10)}


def features(name: str, run: Path, out: Path) -> dict:
    cache = out / f"features_{name}.npz"
    if not cache.is_file():
        data, labels, task, _ = DATASETS[name]
        arrays = {}
        for enc in ("pretrained", "random-init"):
            f, y = validation_features(run, data, labels, task, random_init=enc == "random-init")
            arrays.update({f"{enc}_train": f["train"], f"{enc}_val": f["val"], "y_train": y["train"],
                           "y_val": y["val"]})
        np.savez(cache, **arrays)
    return dict(np.load(cache))


def scores(name: str, feats: dict, heads, seeds: int) -> list:
    from sklearn.metrics import roc_auc_score

    from medcl.data.labels import select_budget
    from medcl.feature_heads import fit_feature_head

    y_tr, y_va = feats["y_train"], feats["y_val"]
    rows = []
    for budget, (fraction, per_class) in BUDGETS.items():
        for seed in range(seeds):
            lab = select_budget(y_tr, np.arange(len(y_tr)), fraction, per_class, seed, min_per_class=2,
                                cap=per_class is None)
            pool = np.setdiff1d(np.arange(len(y_tr)), lab)
            for enc in ("pretrained", "random-init"):
                f = feats[f"{enc}_train"]
                for head in heads:
                    fit = fit_feature_head(head, f, y_tr, lab, pool, None, 2, seed)
                    auc = roc_auc_score(y_va, fit.predict(feats[f"{enc}_val"])[:, 1])
                    rows.append({"dataset": name, "budget": budget, "n_labeled": len(lab), "seed": seed,
                                 "encoder": enc, "head": head, "val_auc": float(auc)})
    return rows


def table(rows) -> str:
    from medcl.metrics import mean_ci

    lines = ["| dataset | budget | head | pretrained | random-init | gain [95% CI, paired by seed] |",
             "|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["dataset"], r["budget"], r["head"]) for r in rows)
    for d, b, h in keys:
        by = {e: {r["seed"]: r["val_auc"] for r in rows if (r["dataset"], r["budget"], r["head"], r["encoder"]) ==
                  (d, b, h, e)} for e in ("pretrained", "random-init")}
        seeds = sorted(by["pretrained"])
        gain = [by["pretrained"][s] - by["random-init"][s] for s in seeds]
        m, _, ci = mean_ci(gain)
        lines.append(f"| {d} | {b} | {h} | {np.mean(list(by['pretrained'].values())):.3f} | "
                     f"{np.mean(list(by['random-init'].values())):.3f} | {m:+.3f} [{m - ci:+.3f}, {m + ci:+.3f}] |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="DATASET=PRETRAIN_RUN (a suite dataset name)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--heads", nargs="*", default=HEADS)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.run:
        name, run = spec.split("=", 1)
        rows += scores(name, features(name, Path(run), out), a.heads, a.seeds)
    (out / "heads.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
