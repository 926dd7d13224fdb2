"""`medcl finetune`: train a classifier with few labels and test it."""
from .common import (CHECKPOINT_HELP, OP_HELP, HelpFormatter, config_args, pretrain_config, selection, selection_args,
                     task, task_args)

EPILOG = """examples:
  medcl finetune --checkpoint runs/simclr --data scans/ --labels labels.csv --out ft/1pct --label-fraction 0.01
  medcl finetune --checkpoint none --data scans/ --labels labels.csv --out ft/scratch --mode finetune \\
      --label-fraction 0.01
  medcl finetune --checkpoint runs/pm --data pneumoniamnist.npz --out ft/pm10 --labels-per-class 10

LABELS.csv: columns path,label (path relative to DATA), optional patient and split (train/val/test).
Without split, a patient-grouped, stratified test split is held out (seed 0) and saved as FT_DIR/splits.csv.
"""


def add_parser(sub, parent):
    from ..feature_heads import HEAD_TYPES

    p = sub.add_parser("finetune", help="train a classifier with few labels and test it", formatter_class=HelpFormatter,
                       parents=[parent],
                       description="Linear probe (frozen encoder) or full fine-tune on a labeled subset of the train "
                                   "split; evaluated on the held-out test split.", epilog=EPILOG)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP + "; 'none' = a random-init network (the "
                                                       "control with --mode probe, scratch with finetune)")
    p.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    p.add_argument("--labels", help="LABELS.csv (not needed for a MedMNIST .npz)")
    p.add_argument("--out", required=True, help="output folder (metrics.json, predictions.csv, TensorBoard events)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--label-fraction", type=float, help="share of the non-test scans' labels to use, e.g. 0.01 "
                                                        "(default: all); the other non-test scans are unlabeled")
    g.add_argument("--labels-per-class", type=int, help="labels per class to use, e.g. 10")
    p.add_argument("--mode", choices=("probe", "finetune", *(h for h in HEAD_TYPES if h != "linear")), default="probe",
                   help="probe: logistic regression on frozen features; finetune: train the whole network (a "
                        "pretrained encoder at a tenth of the head's learning rate); knn, mlp, proto (nearest class "
                        "mean): other frozen-feature heads; spread (label spreading on the kNN graph) and selftrain "
                        "(pseudo-labels): semi-supervised heads that also learn from the unlabeled non-test scans")
    p.add_argument("--seed", type=int, default=0, help="picks the labeled subset and seeds training")
    task_args(p)
    p.add_argument("--epochs", type=int, default=30, help="max epochs for --mode finetune (early stopping on each "
                                                          "cross-validation fold)")
    p.add_argument("--operating-point", default="youden", help=OP_HELP)
    p.add_argument("--allow-outside", action="store_true", help="let CSV paths point outside DATA")
    selection_args(p)
    config_args(p, for_finetune=True)
    p.add_argument("--dims", type=int, choices=(2, 3), help="with --checkpoint none: 2D or 3D network")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(a, progress, started):
    cfg = pretrain_config(a)
    from ..finetune import finetune

    finetune(a.checkpoint, a.data, a.labels, a.out, a.label_fraction, a.labels_per_class, a.mode, a.seed,
             task=task(a), cfg=cfg, overwrite=a.overwrite, epochs=a.epochs, allow_outside=a.allow_outside,
             progress=progress, select=selection(a))
