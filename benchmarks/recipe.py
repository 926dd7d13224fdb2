"""A pretraining recipe from the literature, chosen on validation splits only (issue 31, item 2).

At a fixed budget (4x the CPU default's views), today's folder defaults against the published small-image settings,
one change at a time: crop scale 0.08-1, LARS with the learning rate scaled by batch, temperature 0.5, a 2048->128
projector, no blur, and a recipe with all of them. Each is scored by the VALIDATION AUC of a linear probe (logistic
regression on frozen features: fitted on the train split's labels, scored on the val split), averaged over datasets.
The test split is never read: pretraining sees the train split (an .npz) or the non-test scans (a folder), and the
scoring opens the train and val splits only (`validation_score` asserts it).

Usage:  nohup python benchmarks/recipe.py --out runs/recipe > runs/recipe.log 2>&1 &    (resumable: runs are kept)
        python benchmarks/recipe.py --out runs/recipe --report
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import DATASETS, ROOT, medcl, non_test_files  # noqa: E402

# one change at a time from the folder defaults (medcl/auto.py), then all of them together
VARIANTS = {
    "defaults": [],
    "crop 0.08-1": ["--set", "views.crop_scale=[0.08,1.0]"],
    "LARS, lr 0.3 x batch/256": ["--set", "optim.name=lars", "--set", "optim.lr=LARS_LR"],
    "temperature 0.5": ["--set", "method.temperature=0.5"],
    "projector 2048->128": ["--set", "method.proj_hidden=2048", "--set", "method.proj_dim=128"],
    "no blur": ["--set", "views.blur_prob=0.0"],
}
VARIANTS["all published"] = [a for k, v in VARIANTS.items() if k != "defaults" for a in v]
DEFAULT_DATASETS = ["pneumoniamnist", "retinamnist", "chest_xray_pneumonia_224", "isic"]
MULTIPLE = 4


def validation_features(run: Path, data, labels, task: list, random_init: bool = False) -> tuple:
    """({train, val} frozen features, {train, val} binary labels) of the encoder in `run` (or the same network at
    random weights, seeded as `medcl evaluate` seeds its control). Never opens a test scan."""
    import torch

    from medcl.data.cache import build_for_encoder
    from medcl.data.discover import open_source
    from medcl.encoders import Encoder, load_encoder
    from medcl.finetune import load_labeled
    from medcl.runtime import encode, seed_everything

    encoder, extra = load_encoder(run)
    if random_init:
        seed_everything(0)
        encoder = Encoder(**encoder.spec)
    settings = extra.get("data", {})
    positive = task[task.index("--positive") + 1] if "--positive" in task else None
    feats, ys = {}, {}
    if str(data).endswith(".npz"):
        for split in ("train", "val"):
            src = open_source(data, int(settings.get("dims", 2)), split)
            assert all(r.split == split for r in src.records)  # the test split is never opened
            scans = build_for_encoder(src, settings, run, progress=False, log=lambda *a: None)
            feats[split] = encode(encoder, scans, torch.device("cpu"))
            raw = np.array([r.label if not isinstance(r.label, tuple) else r.label[0] for r in scans.records])
            ys[split] = np.isin(raw.astype(str), (positive or "1").split(",")).astype(int)
    else:
        # the same patient-grouped split `medcl evaluate` makes; the test rows are dropped before any scan is read
        ld = load_labeled_without_test(load_labeled, data, labels, settings, positive)
        f = encode(encoder, ld.scans, torch.device("cpu"))
        feats = {s: f[ld.split == s] for s in ("train", "val")}
        ys = {s: ld.y[ld.split == s] for s in ("train", "val")}
    return feats, ys


def validation_score(run: Path, data, labels, task: list) -> float:
    """Linear-probe AUC on the validation split: fitted on train labels, scored on val. Never opens test scans."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    feats, ys = validation_features(run, data, labels, task)
    scaler = StandardScaler().fit(feats["train"])
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(feats["train"]), ys["train"])
    return float(roc_auc_score(ys["val"], clf.predict_proba(scaler.transform(feats["val"]))[:, 1]))


def load_labeled_without_test(load_labeled, data, labels, settings, positive):
    """load_labeled on the non-test scans only: the split is made from the labels CSV first (no scan read), and the
    test rows go into --files' complement, so their files are never decoded."""
    import tempfile

    from medcl.data.discover import Selection
    from medcl.data.labels import Task, make_splits, read_labels_csv

    table = read_labels_csv(labels, data, positive, multiclass=positive is None)
    split = make_splits(table.y(), np.array(table.patients, dtype=object), seed=0)
    keep = [k for k, s in zip(table.keys, split) if s != "test"]
    listed = Path(tempfile.mkdtemp()) / "non_test.txt"
    listed.write_text("\n".join(keep) + "\n")
    ld = load_labeled(data, labels, settings, Task(positive), progress=False, log=lambda *a: None,
                      select=Selection.make(files=str(listed)))
    assert {r.key for r in ld.scans.records} <= set(keep)  # no held-out test scan
    # load_labeled re-splits the non-test rows (seed 0); its own "test" part is validation data here, never the
    # held-out test split, which was dropped above
    ld.split = np.where(ld.split == "test", "val", ld.split)
    return ld


def run_variant(name: str, variant: str, out: Path, multiple: int = MULTIPLE) -> float | None:
    data, labels, task, _ = DATASETS[name]
    if not Path(data).exists():
        return None
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    base = d / "defaults_x1"
    if not (base / "encoder.pt").is_file():
        medcl(["pretrain", data, "--out", base, "--overwrite", *non_test_files(name, data, labels, d),
               "--set", "train.max_steps=1"], d / "defaults_x1.log")  # only its config: the default epochs
    import yaml

    cfg = yaml.safe_load((base / "config.yaml").read_text())
    epochs, batch = cfg["train"]["epochs"], cfg["train"]["batch_size"]
    run = d / variant.replace(" ", "_").replace(",", "").replace("/", "_").replace(">", "")
    scores = d / "scores.json"
    done = json.loads(scores.read_text()) if scores.is_file() else {}
    if variant in done:
        return done[variant]
    if not (run / "encoder.pt").is_file():
        extra = [a.replace("LARS_LR", f"{0.3 * batch / 256:.4g}") for a in VARIANTS[variant]]
        medcl(["pretrain", data, "--out", run, "--overwrite", "--epochs", multiple * epochs,
               *non_test_files(name, data, labels, d), *extra], d / f"{run.name}.log")
    done[variant] = validation_score(run, data, labels, task)
    scores.write_text(json.dumps(done, indent=1))
    print(f"{name} / {variant}: validation AUC {done[variant]:.3f}", flush=True)
    return done[variant]


def report(out: Path, datasets) -> str:
    rows = {n: json.loads((out / n / "scores.json").read_text()) for n in datasets if (out / n / "scores.json").is_file()}
    lines = ["| change (one at a time) | " + " | ".join(rows) + " | mean | vs defaults |",
             "|---|" + "---|" * (len(rows) + 2)]
    for v in VARIANTS:
        vals = [rows[n].get(v) for n in rows]
        if any(x is None for x in vals) or not vals:
            continue
        mean = float(np.mean(vals))
        ref = float(np.mean([rows[n]["defaults"] for n in rows])) if all("defaults" in rows[n] for n in rows) else mean
        lines.append(f"| {v} | " + " | ".join(f"{x:.3f}" for x in vals) + f" | {mean:.3f} | {mean - ref:+.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "recipe"))
    ap.add_argument("--datasets", nargs="*", default=DEFAULT_DATASETS, choices=list(DATASETS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--multiple", type=int, default=MULTIPLE, help="views as a multiple of the CPU default's")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if not a.report:
        for variant in a.variants:
            for name in a.datasets:
                run_variant(name, variant, out, a.multiple)
    print(report(out, a.datasets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
