"""medcl command line: parse, resolve the config, call one library function per command."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import MedclError

EPILOG_PRETRAIN = """examples:
  medcl pretrain scans/ --out runs/simclr                       # 2D folder, default SimCLR recipe
  medcl pretrain volumes/ --out runs/ct3d --dims 3 --epochs 50  # NIfTI/DICOM volumes
  medcl pretrain pneumoniamnist.npz --out runs/pm --config configs/pretrain/medmnist28.yaml
  medcl pretrain scans/ --out runs/byol --set method.name=byol --set optim.lr=3e-4
  medcl pretrain scans/ --out runs/simclr --resume               # continue an interrupted run
  torchrun --nproc_per_node 8 -m medcl pretrain scans/ --out runs/big --batch-size 2048   # 8 GPUs, global batch
"""
EPILOG_FINETUNE = """examples:
  medcl finetune --checkpoint runs/simclr --data scans/ --labels labels.csv --out ft/1pct --label-fraction 0.01
  medcl finetune --checkpoint none --data scans/ --labels labels.csv --out ft/scratch --mode finetune --label-fraction 0.01
  medcl finetune --checkpoint runs/pm --data pneumoniamnist.npz --out ft/pm10 --labels-per-class 10

LABELS.csv: columns path,label (path relative to DATA), optional patient and split (train/val/test).
Without split, a patient-grouped, stratified test split is held out (seed 0) and saved as FT_DIR/splits.csv.
"""
EPILOG_EMBED = """examples:
  medcl embed --checkpoint runs/simclr --data scans/ --labels labels.csv --out emb/
  medcl embed --checkpoint runs/simclr --data scans/ --classifier ft/1pct --out emb/   # adds predicted probability
then: tensorboard --logdir emb/   (PROJECTOR tab: colour by label, click through neighbours)
"""
EPILOG_EVALUATE = """examples:
  medcl evaluate --checkpoint runs/pm --data pneumoniamnist.npz --out eval/pm
  medcl evaluate --checkpoint runs/simclr --data scans/ --labels labels.csv --out eval/x \\
      --fractions 0.01 0.1 1.0 --seeds 5 --heads knn linear mlp --baseline finetune
"""


def _common_config_args(p):
    p.add_argument("--config", help="YAML recipe (see configs/pretrain/); values there override the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set method.name=byol (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medcl", description="Contrastive pretraining for 2D/3D medical scans, "
                                 "few-label fine-tuning, and TensorBoard inspection.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="start here: medcl demo --out runs/demo   (no data needed, a few minutes on CPU)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    d = sub.add_parser("demo", help="run the whole journey on synthetic phantoms (offline)", formatter_class=fmt,
                       description="Generate synthetic phantoms (healthy vs lesion), pretrain, fine-tune with few "
                                   "labels, embed; print the test AUC and where to point TensorBoard.",
                       epilog="example: medcl demo --out runs/demo && tensorboard --logdir runs/demo")
    d.add_argument("--out", required=True, help="folder for everything the demo writes")
    d.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D images (default) or 3D volumes")
    d.add_argument("--n", type=int, help="number of phantoms (default 400 in 2D, 160 in 3D)")
    d.add_argument("--epochs", type=int, help="pretraining epochs (default 8 in 2D, 6 in 3D)")
    d.add_argument("--label-fraction", type=float, default=0.1, help="share of training labels for the probe")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")

    p = sub.add_parser("pretrain", help="contrastive pretraining on an unlabeled scan folder", formatter_class=fmt,
                       description="Pretrain an encoder without labels. DATA: a folder searched recursively for "
                                   "NIfTI, DICOM, PNG/JPEG/TIFF and .npy scans, or a MedMNIST .npz file.",
                       epilog=EPILOG_PRETRAIN)
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, help="run folder (config, checkpoints, encoder.pt, TensorBoard events)")
    _common_config_args(p)
    p.add_argument("--dims", type=int, choices=(2, 3), help="2D or 3D encoder (data.dims)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--batch-size", type=int, help="train.batch_size (global, across GPUs)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--labels", help="labels CSV: used by method.name=supcon and positives=patient (test rows never)")
    p.add_argument("--probe-labels", help="labels CSV for the online kNN monitor (never trained on)")
    p.add_argument("--pairs", help="pairs CSV (path_a,path_b,similar) for --set method.name=pair: the listed pairs "
                                   "replace augmentation pairs")
    p.add_argument("--positive", help="diseased class name(s) for --labels/--probe-labels")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable scan instead of skipping it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")

    f = sub.add_parser("finetune", help="train a classifier with few labels and test it", formatter_class=fmt,
                       description="Linear probe (frozen encoder) or full fine-tune on a labeled subset of the train "
                                   "split; evaluated on the held-out test split.", epilog=EPILOG_FINETUNE)
    f.add_argument("--checkpoint", required=True, help="pretrain run folder or its encoder.pt; 'none' = from scratch")
    f.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    f.add_argument("--labels", help="LABELS.csv (not needed for a MedMNIST .npz)")
    f.add_argument("--out", required=True, help="output folder (metrics.json, predictions.csv, TensorBoard events)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--label-fraction", type=float, help="share of the train split's labels to use, e.g. 0.01")
    g.add_argument("--labels-per-class", type=int, help="labels per class to use, e.g. 10")
    f.add_argument("--mode", choices=("probe", "finetune"), default="probe",
                   help="probe: logistic regression on frozen features (default); finetune: train the whole network")
    f.add_argument("--seed", type=int, default=0, help="picks the labeled subset and seeds training")
    f.add_argument("--positive", help="diseased class (default: 1, or a name like diseased/abnormal/tumor); "
                                      "a comma list makes a binary task, e.g. --positive 1,2,3,4")
    f.add_argument("--epochs", type=int, default=30, help="max epochs for --mode finetune (early stopping on val)")
    f.add_argument("--val-labels", choices=("budget", "all"), default="budget",
                   help="validation labels for model selection: the same budget as training (default) or all")
    f.add_argument("--allow-outside", action="store_true", help="let CSV paths point outside DATA")
    _common_config_args(f)
    f.add_argument("--dims", type=int, choices=(2, 3), help="with --checkpoint none: 2D or 3D network")
    f.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("embed", help="embeddings for the TensorBoard projector", formatter_class=fmt,
                       description="Encode every scan; write embeddings.npz, a projector with thumbnails and "
                                   "metadata, and a static map.png.", epilog=EPILOG_EMBED)
    e.add_argument("--checkpoint", help="pretrain run folder or encoder.pt")
    e.add_argument("--classifier", help="a finetune output folder: its encoder is used and its probability shown")
    e.add_argument("--data", required=True)
    e.add_argument("--labels", help="LABELS.csv for metadata (label, patient, split)")
    e.add_argument("--positive")
    e.add_argument("--out", required=True)
    e.add_argument("--max-points", type=int, default=10000, help="projector subsample size (all go to embeddings.npz)")
    e.add_argument("--overwrite", action="store_true")

    v = sub.add_parser("evaluate", help="few-label protocol: budgets x seeds x heads, with a from-scratch baseline",
                       formatter_class=fmt, description="Run the few-label evaluation protocol and write results.csv, "
                       "summary.md, learning_curve.png and TensorBoard hparams.", epilog=EPILOG_EVALUATE)
    v.add_argument("--checkpoint", required=True, help="pretrain run folder or encoder.pt")
    v.add_argument("--data", required=True)
    v.add_argument("--labels")
    v.add_argument("--out", required=True)
    v.add_argument("--fractions", type=float, nargs="*", default=None, help="label fractions (default 0.01 0.05 0.1 0.25 1.0)")
    v.add_argument("--per-class", type=int, nargs="*", default=None, help="labels-per-class budgets, e.g. 5 10 25 50")
    v.add_argument("--seeds", type=int, default=5, help="random labeled subsets per budget")
    v.add_argument("--heads", nargs="*", default=["knn", "linear", "mlp"], help="knn linear mlp finetune")
    v.add_argument("--baseline", choices=("finetune", "none"), default="finetune",
                   help="train the same network from scratch on the same subsets (default) or skip it")
    v.add_argument("--baseline-max-fraction", type=float, default=1.0,
                   help="run the from-scratch baseline only up to this label fraction (it is the slow part on CPU)")
    v.add_argument("--epochs", type=int, default=30, help="max epochs for finetune heads and the baseline")
    v.add_argument("--val-labels", choices=("budget", "all"), default="budget")
    v.add_argument("--positive")
    v.add_argument("--overwrite", action="store_true")
    return ap


def _pretrain_config(a):
    from .config import load_config, parse_set

    over = parse_set(a.set)
    for key, val in (("data.dims", a.dims), ("train.epochs", getattr(a, "epochs", None)),
                     ("train.batch_size", getattr(a, "batch_size", None)), ("train.seed", getattr(a, "seed", None))):
        if val is not None:
            sec, k = key.split(".")
            over.setdefault(sec, {})[k] = val
    if getattr(a, "strict", False):
        over.setdefault("data", {})["strict"] = True
    return load_config(a.config, over)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", module="monai")
    ap = build_parser()
    a = ap.parse_args(argv)
    if not a.command:
        ap.print_help()
        return 1
    progress = not a.quiet and sys.stderr.isatty() or os.environ.get("MEDCL_PROGRESS") == "1"
    try:
        if a.command == "demo":
            from .demo import demo

            demo(a.out, a.dims, a.n, a.epochs, a.label_fraction, a.seed, a.overwrite, progress)
        elif a.command == "pretrain":
            from .data.labels import read_labels_csv
            from .train import pretrain

            cfg = _pretrain_config(a)
            labels = read_labels_csv(a.labels, a.data, a.positive) if a.labels else None
            probe = read_labels_csv(a.probe_labels, a.data, a.positive) if a.probe_labels else None
            if probe is None and str(a.data).endswith(".npz"):
                from .data.discover import open_npz
                from .data.labels import labels_from_records
                from pathlib import Path

                try:
                    probe = labels_from_records(open_npz(Path(a.data)).records, a.positive)
                except MedclError:
                    probe = None
            if a.resume and (a.config or a.set or a.dims or a.batch_size or a.seed is not None):
                raise MedclError("--resume continues the run with its saved config.yaml; only --epochs may change it.")
            from .data.labels import read_pairs_csv

            pairs = read_pairs_csv(a.pairs, a.data) if a.pairs else None
            pretrain(a.data, a.out, cfg, resume=a.resume, overwrite=a.overwrite, labels=labels, probe_labels=probe,
                     epochs=a.epochs, pairs=pairs, progress=progress)
        elif a.command == "finetune":
            from .finetune import finetune

            cfg = _pretrain_config(a)
            finetune(a.checkpoint, a.data, a.labels, a.out, a.label_fraction, a.labels_per_class, a.mode, a.seed,
                     a.positive, cfg, a.overwrite, a.epochs, a.val_labels, a.allow_outside, progress)
        elif a.command == "embed":
            from .embed import embed

            if not a.checkpoint and not a.classifier:
                raise MedclError("embed needs --checkpoint RUN_DIR (or --classifier FT_DIR).")
            embed(a.checkpoint, a.data, a.out, a.labels, a.classifier, a.max_points, a.positive, a.overwrite,
                  progress=progress)
        elif a.command == "evaluate":
            from .evaluate import evaluate

            evaluate(a.checkpoint, a.data, a.labels, a.out, fractions=a.fractions, per_class=a.per_class,
                     seeds=a.seeds, heads=a.heads, baseline=a.baseline, epochs=a.epochs, val_labels=a.val_labels,
                     positive=a.positive, overwrite=a.overwrite, baseline_max_fraction=a.baseline_max_fraction,
                     progress=progress)
    except MedclError as e:
        print(f"medcl {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medcl {a.command}: interrupted; a pretrain run continues with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
