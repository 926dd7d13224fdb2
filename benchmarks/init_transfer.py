"""Starting from other weights (issue 33): does `pretrain --init` from an in-domain medcl run beat the random start?

The one start we can measure offline: a medcl run pretrained on the 224 px chest X-rays (chest_xray_pneumonia_224) as
the start of PneumoniaMNIST pretraining, against PneumoniaMNIST pretrained from random weights at the same budget.
1. source: `medcl pretrain chest_xray_pneumonia_224 --set data.size=28` (28 px, so the architecture is the one the
   PneumoniaMNIST defaults pick: with --init the weights decide it). PneumoniaMNIST's scans are these X-rays
   center-cropped to 28 px, so the source must not see the originals of PneumoniaMNIST's test scans: each test scan is
   matched to its original (normalised correlation over center crops of several aspect ratios) and the original, with
   every image of its patient, is left out of the source (listed in source_excluded.txt);
2. random start: `medcl pretrain pneumoniamnist.npz` (the folder defaults; reused from --random-start if given);
3. init start: the same command with `--init SOURCE` (same epochs);
4. `medcl evaluate --checkpoint INIT --compare RANDOM` at 1%, 20 labels and every label, 3 seeds, heads knn linear proto
   spread selftrain, against the random-init control and the random start on the same subsets.

Every step is kept when it finishes; run again after an interruption and only what is missing runs.
    nohup python benchmarks/init_transfer.py --out runs/init > runs/init.log 2>&1 &
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import DATA, medcl  # noqa: E402

from medcl.train.resume import finished  # noqa: E402

CXR = DATA / "chest_xray_pneumonia_224"
PM = DATA / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz"
RATIOS = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0)  # original width / height of the X-rays, unknown per image


def _unit(a):
    a = a - a.mean(1, keepdims=True)
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-6)


def originals_of_test_scans(rows) -> tuple[set, np.ndarray]:
    """(the X-ray paths that PneumoniaMNIST's test scans were made from, each test scan's best correlation)."""
    from PIL import Image

    test = _unit(np.load(PM)["test_images"].reshape(-1, 28 * 28).astype(np.float32))
    images = [np.asarray(Image.open(CXR / r["path"]).convert("L"), dtype=np.float32) for r in rows]
    best = np.full((len(rows), len(test)), -1.0, dtype=np.float32)
    for ratio in RATIOS:  # the 224 px files squash the original; PneumoniaMNIST center-cropped it to a square
        w = int(round(224 / ratio))
        x0 = (224 - w) // 2
        thumbs = np.stack([np.asarray(Image.fromarray(im[:, x0:x0 + w]).resize((28, 28), Image.BILINEAR))
                           for im in images]).reshape(len(images), -1)
        best = np.maximum(best, _unit(thumbs) @ test.T)
    return {rows[i]["path"] for i in best.argmax(0)}, best.max(0)


def source_files(out: Path) -> Path:
    listed = out / "source_files.txt"
    if listed.is_file():
        return listed
    rows = list(csv.DictReader(open(CXR / "labels.csv")))
    originals, corr = originals_of_test_scans(rows)
    patients = {r["patient"] for r in rows if r["path"] in originals}
    keep = [r["path"] for r in rows if r["patient"] not in patients]
    (out / "source_excluded.txt").write_text("\n".join(r["path"] for r in rows if r["patient"] in patients) + "\n")
    listed.write_text("\n".join(keep) + "\n")
    print(f"source: {len(keep)} of {len(rows)} X-rays; left out {len(rows) - len(keep)} ({len(originals)} matched to "
          f"PneumoniaMNIST's 624 test scans, median correlation {np.median(corr):.3f}, {int((corr > 0.95).sum())} "
          f"above 0.95, and every image of their {len(patients)} patients)", flush=True)
    return listed


def pretrain(args, run: Path, log: Path):
    if not finished(run):
        resume = (run / "checkpoints" / "last.pt").is_file()
        seconds = medcl(["pretrain", *args, "--out", run] + (["--resume"] if resume else ["--overwrite"]), log)
        print(f"{run.name}: {seconds / 60:.1f} min", flush=True)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/init")
    ap.add_argument("--random-start", help="a finished `medcl pretrain pneumoniamnist.npz` run to reuse")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    source = pretrain([CXR, "--files", source_files(out), "--set", "data.size=28"], out / "source_cxr28",
                      out / "source.log")
    random_start = Path(a.random_start) if a.random_start else pretrain([PM], out / "random_start",
                                                                       out / "random_start.log")
    import yaml

    epochs = yaml.safe_load((random_start / "config.yaml").read_text())["train"]["epochs"]
    init = pretrain([PM, "--init", source, "--epochs", epochs], out / "init_start", out / "init_start.log")
    ev = out / "eval"
    while not finished(random_start):  # a --random-start still training in another process
        print(f"waiting for {random_start} to finish", flush=True)
        time.sleep(60)
    if not (ev / "protocol.json").is_file():
        medcl(["evaluate", "--checkpoint", init, "--compare", random_start, "--data", PM, "--out", ev,
               "--seeds", a.seeds, "--fractions", "0.01", "1.0", "--per-class", "10", "--heads", "knn", "linear",
               "proto", "spread", "selftrain", "--baseline", "none", "--overwrite"], out / "eval.log")
    gains = json.loads((ev / "protocol.json").read_text())["gain_over_best_control"]
    print("| budget | labels | best --init row | AUC | best control | AUC | gain [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for g in gains:
        ci = g["gain_ci95"]
        print(f"| {g['budget_kind']} {g['budget']} | {g['n_labeled']:.0f} | {g['best']} | {g['best_auc']:.3f} | "
              f"{g['control']} | {g['control_auc']:.3f} | {g['gain_mean']:+.3f} [{g['gain_mean'] - ci:+.3f}, "
              f"{g['gain_mean'] + ci:+.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
