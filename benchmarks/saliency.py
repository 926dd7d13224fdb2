"""Saliency on lesion phantoms, where the lesions are known: how often does each map's peak lie in a lesion?

1. 400 2D phantoms (48 px): pretrain with the demo's settings, fit the demo's linear probe (10% of the labels), and
   also train the network end to end (`--mode finetune`, all training labels);
2. 100 fresh phantoms with their lesion masks; for every diseased one, Grad-CAM and occlusion sensitivity maps of
   each classifier (medcl.saliency), mapped back to the scan's grid;
3. print the share of maps whose peak lies in a lesion, the chance level (lesion share of the body), and seconds
   per scan.

Usage:  python benchmarks/saliency.py [--out runs/saliency]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
ROOT = Path(__file__).resolve().parents[1]


def main():
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from medcl.config import MedclConfig, apply_overrides
    from medcl.data.labels import Task
    from medcl.data.readers import read_scan
    from medcl.data.synthetic import make_phantoms
    from medcl.demo import DEMO_SETTINGS
    from medcl.finetune import finetune
    from medcl.predict import load_classifier
    from medcl.saliency import METHODS, peak_in, saliency_maps, to_native
    from medcl.train import pretrain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "saliency"))
    a = ap.parse_args()
    out = Path(a.out)
    quiet = dict(progress=False, log=lambda *x: None)
    if not (out / "probe" / "classifier.pt").is_file():
        data = make_phantoms(out / "train", n=400, dims=2, size=48, seed=0)
        cfg = apply_overrides(MedclConfig(), DEMO_SETTINGS[2], "demo settings")
        pretrain(data, out / "pretrain", cfg, overwrite=True, **quiet)
        finetune(out / "pretrain", data, data / "labels.csv", out / "probe", label_fraction=0.1, task=Task("diseased"),
                 overwrite=True, **quiet)
        finetune(out / "pretrain", data, data / "labels.csv", out / "network", mode="finetune", task=Task("diseased"),
                 overwrite=True, epochs=15, **quiet)
    new = make_phantoms(out / "new", n=100, dims=2, size=48, seed=5, masks_to=out / "masks")
    rows = [ln.split(",") for ln in (new / "labels.csv").read_text().splitlines()[1:]]
    sick = [r[0] for r in rows if r[1] == "diseased"]
    masks = [np.load(out / "masks" / f"{p}.npy") for p in sick]
    bodies = [read_scan(new / p)[0][0] > 0.05 for p in sick]
    chance = np.mean([m.sum() / max(1, b.sum()) for m, b in zip(masks, bodies)])
    print(f"{len(sick)} diseased phantoms; chance that a random point of the body is in a lesion: {chance:.3f}\n")
    print("| classifier | test AUC | method | peak in lesion | seconds per scan |")
    print("|---|---|---|---|---|")
    for name in ("probe", "network"):
        clf = load_classifier(out / name)
        auc = __import__("json").loads((out / name / "metrics.json").read_text())["test"]["auc"]
        x = torch.as_tensor(np.stack([clf.preprocess(new / p) for p in sick]))
        for method in METHODS:
            t0 = time.perf_counter()
            maps = saliency_maps(clf.model, x, method)
            sec = (time.perf_counter() - t0) / len(sick)
            hits = [peak_in(to_native(s, m.shape, None, clf.data["size"]), m) for s, m in zip(maps, masks)]
            print(f"| {name} | {auc:.3f} | {method} | {np.mean(hits):.2f} ({sum(hits)}/{len(hits)}) | {sec:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
