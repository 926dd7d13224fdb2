"""Compare the pretraining methods with the same budget, against the untrained-encoder control, at few labels.

For each method: pretrain on the train split without labels (configs/pretrain/medmnist28.yaml: npz_split train; same
epochs for every method), then medcl's few-label protocol (`medcl evaluate`, the linear head): 5 seeds x label budgets
(a fixed 20 labels, 1% and 10% by default), each seed one stratified labeled subset, the official test split only ever
predicted. The control is evaluate's own: the same network with random weights and the same head on the same subsets,
so every gain is paired by seed and has a 95% t-interval. SupCon pretrains with the labels of a 10% train subset
(seed 0), so its few-label rows saw more labels than their budget: they are marked.

Every method runs with its own defaults (heads, temperature: medcl.methods.HEADS/TEMPERATURES) and the recipe's
learning rate; MAE pretrains the `vit` encoder (patch 4), so its control is a random-init ViT.

Usage:  python benchmarks/methods.py [--epochs 2] [--methods simclr byol ...] [--seeds 5]
        [--data path.npz --positive 1,2,3,4]   (any labeled .npz; RetinaMNIST: grades 1-4 vs 0)
        python benchmarks/methods.py --data path.npz --geometry-of RUN [RUN ...]   (only the geometry columns)
The recipe reads scans as grayscale: add `--set data.channels=3` for a colour set such as RetinaMNIST.
"""
from __future__ import annotations

import argparse
import json
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


def feature_geometry(checkpoint, data, cfg, positive=None) -> dict:
    """Where the encoder puts its feature variance, and whether the label lives there.
    - rank: RankMe (Garrido et al. 2023) of the L2-normalised features on the test split, as the collapse monitor
      computes it (singular values, not their squares, of uncentred features: a lenient measure);
    - top2_var: the share of the centred variance of the non-test features in their first two principal directions;
    - top2_auc: test AUC of a logistic regression on those two directions, fitted with every non-test label (a
      diagnostic of the geometry, not a few-label result): does the dominant variance carry the diagnosis?"""
    import torch
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from medcl.data.labels import Task
    from medcl.finetune import load_encoder_or_scratch, load_labeled
    from medcl.metrics import score
    from medcl.monitors import collapse_metrics
    from medcl.runtime import encode

    enc, settings, _ = load_encoder_or_scratch(checkpoint, cfg)
    ld = load_labeled(data, None, settings, Task(positive), progress=False, log=lambda *x: None)
    f = encode(enc, ld.scans, torch.device("cpu"))
    test = ld.split == "test"
    pca = PCA(2, random_state=0).fit(f[~test])
    z = pca.transform(f)
    clf = LogisticRegression(class_weight="balanced", max_iter=3000).fit(z[~test], ld.y[~test])
    return {"rank": collapse_metrics(torch.as_tensor(f[test]))["rankme"],
            "top2_var": float(pca.explained_variance_ratio_.sum()),
            "top2_auc": score(ld.y[test], clf.predict_proba(z[test]))["auc"]}


def geometry_text(g) -> str:
    return f"feature rank {g['rank']:.1f}, top-2 PCs {g['top2_var']:.0%} of the variance, AUC {g['top2_auc']:.3f}"


def read_results(path: Path) -> list:
    """results.csv of a finished `evaluate`, with the types evaluate gave them (to rebuild its summary)."""
    import csv

    ints, texts = {"seed", "n_labeled", "n_unlabeled", "n_test", "classes_labeled"}, {"budget_kind", "selection",
                                                                                        "subset", "encoder", "head"}
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            r = {k: (v if k in texts else int(v) if k in ints else float(v)) for k, v in r.items() if v != ""}
            r["budget"] = int(r["budget"]) if r["budget_kind"] == "per_class" else r["budget"]
            rows.append(r)
    return rows


def main():
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np

    from medcl.config import load_config, parse_set
    from medcl.data.discover import open_npz
    from medcl.data.labels import Task, labels_from_records, select_budget
    from medcl.evaluate import evaluate, gains_over_best_control, summarize
    from medcl.train import pretrain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(NPZ))
    ap.add_argument("--positive", default=None, help="classes counted as positive (e.g. 1,2,3,4 for RetinaMNIST)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=ALL)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--per-class", type=int, nargs="*", default=[10])
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.01, 0.1])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=None, help="work folder; finished pretraining runs in it are reused")
    ap.add_argument("--geometry-of", nargs="*", default=None, metavar="RUN",
                    help="only print the geometry columns of these pretraining runs (on --data) and of the same "
                         "network at random weights, then stop")
    a = ap.parse_args()
    if not Path(a.data).is_file():
        print(f"skipped: {a.data} not found")
        return 0
    for run in a.geometry_of or []:  # any run, e.g. the suite's: does its dominant variance carry the label?
        cfg = load_config(Path(run) / "config.yaml")
        for name, ck in (("pretrained", run), ("random-init", "none")):
            print(f"{run} {name}: {geometry_text(feature_geometry(ck, a.data, cfg, a.positive))}", flush=True)
    if a.geometry_of is not None:
        return 0
    out = Path(a.out or tempfile.mkdtemp(prefix="medcl_methods_"))
    # SupCon's labels: a 10% train subset (seed 0), never val/test
    recs = open_npz(Path(a.data)).records
    table = labels_from_records(recs, positive=a.positive)
    y = table.y()
    train_rows = np.flatnonzero(np.array(table.splits) == "train")
    keep = set(select_budget(y, train_rows, 0.1, seed=0).tolist())
    table.splits = [s if (s != "train" or i in keep) else "test" for i, s in enumerate(table.splits)]  # hide the rest
    budgets = [("per_class", k) for k in a.per_class] + [("fraction", f) for f in a.fractions]
    recipe = ROOT / "configs" / "pretrain" / "medmnist28.yaml"
    rows, controls = [], {}  # controls: encoder -> (AUC per budget, feature geometry)
    times = json.loads((out / "pretrain_seconds.json").read_text()) if (out / "pretrain_seconds.json").is_file() else {}
    for m in a.methods:
        cfg = load_config(recipe, parse_set(a.set + ENCODER.get(m, []) + [f"method.name={m}"]))
        cfg.train.epochs = a.epochs
        if (out / m / "encoder.pt").is_file():  # a finished run in --out from an interrupted benchmark: reuse it
            t_pre = times.get(m, float("nan"))
        else:
            t0 = time.perf_counter()
            pretrain(a.data, out / m, cfg, labels=table if m == "supcon" else None, progress=False,
                     log=lambda *x: None)
            t_pre = times[m] = time.perf_counter() - t0
            (out / "pretrain_seconds.json").write_text(json.dumps(times))
        done = out / f"{m}_eval" / "results.csv"
        ev = read_results(done) if done.is_file() else evaluate(
            out / m, a.data, None, out / f"{m}_eval", fractions=a.fractions, per_class=a.per_class, seeds=a.seeds,
            heads=("linear",), baseline="none", task=Task(a.positive), progress=False, log=lambda *x: None,
            overwrite=True)
        geo = feature_geometry(out / m, a.data, cfg, a.positive)
        # with one head and no scratch run, evaluate's "best pretrained vs best control" is pretrained/linear vs
        # random-init/linear on the same subsets, paired by seed
        gain = {(g["budget_kind"], g["budget"]): g for g in gains_over_best_control(ev, summarize(ev))}
        cells = {b: (gain[b]["best_auc"], gain[b]["control_auc"], gain[b]["gain_mean"], gain[b]["gain_ci95"])
                 for b in budgets}
        n_lab = {b: int(round(gain[b]["n_labeled"])) for b in budgets}
        enc = f"{cfg.encoder.name}" + ("" if m not in ENCODER else f" (patch {cfg.encoder.patch_size})")
        if enc not in controls:
            controls[enc] = ({b: cells[b][1] for b in budgets}, feature_geometry("none", a.data, cfg, a.positive))
        rows.append((m, enc, t_pre, cells, geo))
        print(f"  {m}: pretrain {t_pre:.0f} s, {geometry_text(geo)}; " + "; ".join(
            f"{n_lab[b]} labels AUC {c[0]:.3f} vs control {c[1]:.3f} ({c[2]:+.3f} ± {c[3]:.3f})"
            for b, c in cells.items()), flush=True)
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    names = [f"{n_lab[b]} labels ({100 * b[1]:g}%)" if b[0] == "fraction" else f"{n_lab[b]} labels ({b[1]}/class)"
             for b in budgets]
    print(f"\n{Path(a.data).name}, {a.epochs} pretraining epochs each ({cfg.data.size} px, batch "
          f"{cfg.train.batch_size}) on {where}; linear probe, {a.seeds} seeds (labeled subsets) per budget, "
          "official test split; cells: test AUC, and the gain over the random-init control paired by seed "
          "[95% t-interval]")
    print("| method | pretrain time (s) | " + " | ".join(names) + " | feature rank | top-2 PCs: variance, AUC |")
    print("|---|---|" + "---|" * len(names) + "---|---|")
    for enc, (ctrl, geo) in controls.items():
        print(f"| control: random-init {enc} | 0 | " + " | ".join(f"{ctrl[b]:.3f}" for b in budgets) +
              f" | {geo['rank']:.1f} | {geo['top2_var']:.2f}, {geo['top2_auc']:.3f} |")
    for m, enc, t, cells, geo in rows:
        mark = " (pretrained with 10% labels)" if m == "supcon" else ""
        print(f"| {m}{mark} | " + (f"{t:.0f}" if t == t else "reused") + " | " + " | ".join(
            f"{c[0]:.3f} ({c[2]:+.3f} [{c[2] - c[3]:+.3f}, {c[2] + c[3]:+.3f}])" for c in cells.values()) +
            f" | {geo['rank']:.1f} | {geo['top2_var']:.2f}, {geo['top2_auc']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
