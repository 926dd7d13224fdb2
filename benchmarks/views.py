"""Which view recipe per modality: the default views against each modality's recipe, on the few-label suite's data.

Per dataset and recipe: `medcl pretrain DATA` with the folder's own defaults (no recipe, or a views-only recipe such
as `--config views_xray`, which changes the views and nothing else), the same epochs and seed for every recipe, on
the non-test scans only; then `medcl evaluate` with linear and kNN heads at 10 and 25 labels per class over seeds,
which also runs the same heads on the random-init encoder (the control) on the same labeled subsets.

Prints one table: test AUC (mean ± sd over seeds) of each recipe's best head, the paired difference against the
default recipe with its 95% t-interval, and the best control. Datasets missing from ../shared/data are skipped.

Usage:  python benchmarks/views.py [--out /tmp/medcl_views] [--datasets pneumoniamnist retinamnist ...] [--seeds 5]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from suite import DATASETS, medcl, non_test_files  # noqa: E402

# the modality recipe(s) each labeled dataset can judge, and a pretraining budget that fits a 2-core CPU
# (a name is a shipped recipe; VARIANTS are recipes measured but not shipped, under benchmarks/view_recipes/)
CANDIDATES = {"pneumoniamnist": ["views_xray"], "chest_xray_pneumonia_224": ["views_xray"],
              "retinamnist": ["views_fundus_derm", "fundus_colour_jitter"], "isic": ["views_fundus_derm"],
              "vesselmnist3d": ["views_mri", "views_ct"]}
VARIANTS = Path(__file__).parent / "view_recipes"
EPOCHS = {"pneumoniamnist": 3, "chest_xray_pneumonia_224": 2, "retinamnist": 10, "isic": 4, "vesselmnist3d": 5}


def results(ev: Path) -> list:
    with open(ev / "results.csv") as f:
        return list(csv.DictReader(f))


def by_seed(rows, encoder, head, budget) -> dict:
    return {r["seed"]: float(r["auc"]) for r in rows
            if r["encoder"] == encoder and r["head"] == head and r["budget"] == budget}


def ci95(d) -> float:
    import numpy as np
    from scipy import stats

    d = np.asarray(d, dtype=float)
    return float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def main():
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/medcl_views")
    ap.add_argument("--datasets", nargs="*", default=["pneumoniamnist", "retinamnist", "vesselmnist3d"],
                    choices=list(CANDIDATES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every dataset's pretraining epochs")
    a = ap.parse_args()
    table = ["| dataset | labels | recipe | best head | AUC (mean ± sd) | minus default [95% CI] | best control (random-init) |",
             "|---|---|---|---|---|---|---|"]
    for name in a.datasets:
        data, labels, task, _ = DATASETS[name]
        if not Path(data).exists():
            print(f"{name}: skipped ({data} not found)")
            continue
        out = Path(a.out) / name
        out.mkdir(parents=True, exist_ok=True)
        files = non_test_files(name, data, labels, out)
        epochs = max(1, round(EPOCHS[name] * a.epochs_scale))
        runs = {}
        for recipe in ["default"] + CANDIDATES[name]:
            pre, ev = out / recipe / "pretrain", out / recipe / "eval"
            (out / recipe).mkdir(exist_ok=True)
            timing = out / recipe / "timing.json"
            if not (ev / "results.csv").is_file():
                t0 = time.perf_counter()
                medcl(["pretrain", data, "--out", pre, "--overwrite", "--epochs", epochs, "--seed", 0, *files,
                       *([] if recipe == "default" else ["--config", VARIANTS / f"{recipe}.yaml"
                                                         if (VARIANTS / f"{recipe}.yaml").is_file() else recipe])],
                      out / recipe / "pretrain.log")
                t1 = time.perf_counter()
                medcl(["evaluate", "--checkpoint", pre, "--data", data, "--out", ev, "--overwrite", "--seeds", a.seeds,
                       "--per-class", 10, 25, "--heads", "linear", "knn", "--baseline", "none",
                       *(["--labels", labels] if labels else []), *task], out / recipe / "evaluate.log")
                timing.write_text(json.dumps({"pretrain_s": t1 - t0, "evaluate_s": time.perf_counter() - t1}))
            runs[recipe] = results(ev)
            t = json.loads(timing.read_text())
            print(f"{name} / {recipe}: pretrain {t['pretrain_s'] / 60:.1f} min ({epochs} epochs), "
                  f"evaluate {t['evaluate_s'] / 60:.1f} min", flush=True)
        budgets = sorted({r["budget"] for r in runs["default"]}, key=float)
        for budget in budgets:
            def best(rows, encoder):
                heads = {h: by_seed(rows, encoder, h, budget) for h in ("linear", "knn")}
                h = max(heads, key=lambda k: np.mean(list(heads[k].values())))
                return h, heads[h]
            _, base = best(runs["default"], "pretrained")
            ctrl_h, ctrl = best(runs["default"], "random-init")
            n_lab = next(r["n_labeled"] for r in runs["default"] if r["budget"] == budget)
            for recipe, rows in runs.items():
                h, got = best(rows, "pretrained")
                v = np.array(list(got.values()))
                diff = "—"
                if recipe != "default":
                    d = [got[s] - base[s] for s in got if s in base]
                    c = ci95(d)
                    diff = f"{np.mean(d):+.3f} [{np.mean(d) - c:+.3f}, {np.mean(d) + c:+.3f}]"
                table.append(f"| {name} | {n_lab} | {recipe} | {h} | {v.mean():.3f} ± {v.std(ddof=1):.3f} | {diff} | "
                             f"{np.mean(list(ctrl.values())):.3f} ({ctrl_h}) |")
        print("\n".join(table), flush=True)
    print()
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
