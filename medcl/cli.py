"""medcl command line: parse, resolve the config, call one library function per command."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import MedclError
from .runs import check_checkpoint_path, check_classifier_path
from .weights import is_name
from .weights import resolve as resolve_weights

CHECKPOINT_HELP = ("pretrain run folder or its encoder.pt, or WEIGHTS from another tool: a ResNet file (torchvision, "
                   "timm, MedicalNet, lightly, solo-learn) or a name such as torchvision:resnet18 (docs/weights.md)")
# measured on 2 idle CPU cores (README, "Time"); one wording everywhere
DEMO_TIME = "under a minute"
DEMO3D_TIME = "about 2 minutes"

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
  medcl finetune --checkpoint none --data scans/ --labels labels.csv --out ft/scratch --mode finetune \\
      --label-fraction 0.01
  medcl finetune --checkpoint runs/pm --data pneumoniamnist.npz --out ft/pm10 --labels-per-class 10

LABELS.csv: columns path,label (path relative to DATA), optional patient and split (train/val/test).
Without split, a patient-grouped, stratified test split is held out (seed 0) and saved as FT_DIR/splits.csv.
"""
EPILOG_EMBED = """examples:
  medcl embed --checkpoint runs/simclr --data scans/ --labels labels.csv --out emb/
  medcl embed --checkpoint runs/simclr --data scans/ --classifier ft/1pct --out emb/   # adds predicted probability
then: tensorboard --logdir emb/   (PROJECTOR tab: colour by label, click through neighbours)
"""
EPILOG_SELECT = """examples:
  medcl select --checkpoint runs/simclr --data scans/ --budget 30 --out sel/round1
  # label sel/round1/to_label.csv (fill its label column), fine-tune, then ask for the next 20:
  medcl select --checkpoint runs/simclr --data scans/ --budget 20 --already-labeled labels.csv --out sel/round2
then: tensorboard --logdir sel/round1   (IMAGES: the contact sheet; PROJECTOR: colour by 'selection')
"""
EPILOG_PREDICT = """examples:
  medcl predict --classifier ft/1pct --data new_scans/ --out pred/week48
  medcl predict --classifier ft/1pct --data new_scans/ --out pred/week48 --operating-point sensitivity=0.95
  medcl predict --classifier ft/1pct --data held_out/ --labels held_out/labels.csv --out pred/check   # + metrics.json
in Python: clf = medcl.load_classifier("ft/1pct"); clf.predict(["a.png", array]) -> probabilities
"""
EPILOG_EVALUATE = """examples:
  medcl evaluate --checkpoint runs/pm --data pneumoniamnist.npz --out eval/pm
  medcl evaluate --checkpoint runs/simclr --data scans/ --labels labels.csv --out eval/x \\
      --fractions 0.01 0.1 1.0 --seeds 5 --heads knn linear mlp --baseline finetune
  medcl evaluate --checkpoint runs/pm --data pneumoniamnist.npz --out eval/sel --per-class 10 25 \\
      --selection centroid random --heads linear --baseline none      # does choosing the scans pay?
  medcl evaluate --checkpoint runs/pm --data pneumoniamnist.npz --out eval/pm --resume --seeds 10
      # after an interruption: runs only what is missing; here also seeds 5-9 for a finished 5-seed evaluation
"""


PROGRESS_HELP = ("progress: a bar on a terminal; otherwise (nohup, pipes, batch schedulers) one line per epoch or run "
                 "with elapsed time and ETA. MEDCL_PROGRESS=bar|lines|off overrides; --quiet turns it off.")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and the default of every option that has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if d in (None, False, argparse.SUPPRESS) or d == [] or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {' '.join(map(str, d)) if isinstance(d, list) else d})"


def _common_config_args(p, for_finetune=False):
    if for_finetune:
        p.add_argument("--config", help="with --checkpoint none: a recipe (file or shipped name, see `medcl config "
                                        "list`) whose data/encoder sections define the network trained from scratch; "
                                        "with a checkpoint, the encoder's own settings are used")
    else:
        p.add_argument("--config", action="append", help="YAML recipe: a file, or the name of a recipe that ships "
                       "with medcl (`medcl config list`); values there override the defaults. Repeatable (later "
                       "ones win), e.g. --config medmnist28 --config views_xray. A views-only recipe (views_*) "
                       "keeps the folder's own defaults for everything else")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set method.name=byol (repeatable; "
                        "`medcl config show` lists every key with its meaning)")


def _selection_args(p):
    p.add_argument("--include", action="append", metavar="GLOB", help="use only scans whose path (relative to "
                   "DATA) matches; `*` crosses folders, e.g. --include '*flair*' (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave out scans whose path matches, e.g. "
                   "--exclude '*mask*' --exclude '*seg*' (repeatable)")
    p.add_argument("--files", metavar="LIST.txt", help="use only the scans listed in this text file, one path "
                   "relative to DATA per line")


def _task_args(p, what="the task"):
    p.add_argument("--positive", help=f"diseased class(es) for {what} (default: 1, or one name such as diseased/"
                                      "abnormal/tumor/pneumonia); a comma list makes a binary task, e.g. 1,2,3,4")
    p.add_argument("--negative", help="healthy class(es), needed when --positive leaves more than one other class")
    p.add_argument("--multiclass", action="store_true", help="labels with 3+ classes: one output per class "
                   "(without it, a third class is an error that names its rows: usually a typo)")


OP_HELP = ("decision threshold, from out-of-fold predictions of the labeled scans (cross-validation inside the "
           "budget): youden, sensitivity=0.95 (the most specific threshold that keeps 95%% sensitivity), or "
           "specificity=0.9")


def _add_export_parser(sub, fmt, quiet):
    x = sub.add_parser("export", help="save a classifier as one .pt2 file that plain PyTorch runs, or an encoder "
                                      "or classifier as a MONAI bundle",
                       formatter_class=fmt, parents=[quiet],
                       description="Export a `medcl finetune` classifier with torch.export (--out F.pt2): the file "
                                   "maps a preprocessed batch to class probabilities and loads with "
                                   "torch.export.load(path).module(), without medcl. Its medcl.json (extra file) "
                                   "holds the classes, threshold and preprocessing. Or write a MONAI bundle "
                                   "(--bundle DIR) of a classifier or of a pretrain run's encoder: "
                                   "monai.bundle.ConfigParser builds it without medcl (ResNet encoders).",
                       epilog="examples:\n  medcl export --classifier ft/1pct --out models/pneumonia.pt2\n"
                              "  medcl export --checkpoint runs/pm --bundle models/pm_encoder_bundle")
    x.add_argument("--classifier", help="a finetune output folder (or its classifier.pt)")
    x.add_argument("--checkpoint", help="with --bundle: a pretrain run folder (or its encoder.pt)")
    x.add_argument("--out", help="the file to write, *.pt2 (a classifier)")
    x.add_argument("--bundle", metavar="DIR", help="write a MONAI bundle (Model Zoo layout) to this folder instead")
    x.add_argument("--overwrite", action="store_true", help="replace an existing file or bundle")


def build_parser() -> argparse.ArgumentParser:
    from .feature_heads import DEFAULT_HEADS, HEAD_TYPES, head_names
    from .select import STRATEGIES

    ap = argparse.ArgumentParser(prog="medcl", description="Contrastive pretraining for 2D/3D medical scans, "
                                 "few-label fine-tuning, and TensorBoard inspection.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="start here: medcl demo --out runs/demo   (no data needed; "
                                        f"{DEMO_TIME} on 2 CPU cores)\n\n{PROGRESS_HELP}")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    # --quiet after the command works too; SUPPRESS keeps a --quiet given before it
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars or progress lines")
    quiet.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR",
                       help="the scan cache shared by every command (decoded scans; default $MEDCL_CACHE, else "
                            "~/.cache/medcl; 'off' disables it). Never inside DATA. See `medcl cache info`.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    fmt = HelpFormatter

    d = sub.add_parser("demo", help="run the whole journey on synthetic phantoms (offline)", formatter_class=fmt,
                       parents=[quiet],
                       description="Generate synthetic phantoms (healthy vs a small lesion; in 2D every acquisition "
                                   "with its own position, rotation, gain, contrast, bias field and noise, the factors "
                                   "contrastive views teach an encoder to ignore), pretrain, fit a linear probe with "
                                   "few labels, run the same probe on a random-init encoder (the control), embed; "
                                   "print both test AUCs, the gain with its interval paired by test scan, and where "
                                   "to point TensorBoard.",
                       epilog=f"example: medcl demo --out runs/demo && tensorboard --logdir runs/demo\n"
                              f"time: {DEMO_TIME} (2D), {DEMO3D_TIME} (--dims 3), measured on 2 CPU cores")
    d.add_argument("--out", required=True, help="folder for everything the demo writes")
    d.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D images or 3D volumes")
    d.add_argument("--n", type=int, help="number of phantoms (default 400 in 2D, 160 in 3D)")
    d.add_argument("--epochs", type=int, help="pretraining epochs (default 8 in 2D, 6 in 3D)")
    d.add_argument("--label-fraction", type=float, default=0.1, help="share of training labels for the probe")
    d.add_argument("--seed", type=int, default=0, help="phantoms, labeled subset and training")
    d.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")

    p = sub.add_parser("pretrain", help="contrastive pretraining on an unlabeled scan folder", formatter_class=fmt,
                       parents=[quiet],
                       description="Pretrain an encoder without labels. DATA: a folder searched recursively for "
                                   "NIfTI, DICOM, PNG/JPEG/TIFF and .npy scans, or a MedMNIST .npz file.",
                       epilog=EPILOG_PRETRAIN)
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, help="run folder (config, checkpoints, encoder.pt, TensorBoard events)")
    _common_config_args(p)
    p.add_argument("--dims", type=int, choices=(2, 3), help="2D or 3D encoder (data.dims)")
    p.add_argument("--epochs", type=int, help="train.epochs (with --resume: train a finished run longer)")
    p.add_argument("--time", metavar="DURATION", help="train.time_budget: pretrain for this long, e.g. 20m, 1h30m "
                   "(the step count is set from the pace of the first steps and the schedule fitted to it; instead "
                   "of --epochs). With --resume: train this much longer")
    p.add_argument("--batch-size", type=int, help="train.batch_size (global, across GPUs)")
    p.add_argument("--init", metavar="WEIGHTS", help="encoder.init: start from existing weights, then pretrain: a "
                   "medcl run or encoder.pt, a torchvision/timm ResNet state dict, a MedicalNet .pth, a lightly or "
                   "solo-learn checkpoint, or a name (torchvision:resnet18|resnet50, medicalnet:resnet10|18|34|50) "
                   "found in the local torch/Hugging Face caches (never downloaded). The weights decide the "
                   "architecture; input channels adapt (docs/weights.md)")
    p.add_argument("--seed", type=int, help="train.seed")
    _selection_args(p)
    p.add_argument("--labels", help="labels CSV: used by method.name=supcon and positives=patient (test rows never)")
    p.add_argument("--probe-labels", help="labels CSV for the online kNN monitor (never trained on)")
    p.add_argument("--pairs", help="pairs CSV (path_a,path_b,similar) for --set method.name=pair: the listed pairs "
                                   "replace augmentation pairs")
    _task_args(p, "--labels/--probe-labels")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable scan instead of skipping it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint; "
                   "flags equal to the saved config are fine, a different value is refused")
    p.add_argument("--allow-different-data", action="store_true",
                   help="with --resume: continue on DATA even though it is not the scans the run was trained on")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")

    f = sub.add_parser("finetune", help="train a classifier with few labels and test it", formatter_class=fmt,
                       parents=[quiet],
                       description="Linear probe (frozen encoder) or full fine-tune on a labeled subset of the train "
                                   "split; evaluated on the held-out test split.", epilog=EPILOG_FINETUNE)
    f.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP + "; 'none' = a random-init network (the "
                                                       "control with --mode probe, scratch with finetune)")
    f.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    f.add_argument("--labels", help="LABELS.csv (not needed for a MedMNIST .npz)")
    f.add_argument("--out", required=True, help="output folder (metrics.json, predictions.csv, TensorBoard events)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--label-fraction", type=float, help="share of the non-test scans' labels to use, e.g. 0.01 "
                                                        "(default: all); the other non-test scans are unlabeled")
    g.add_argument("--labels-per-class", type=int, help="labels per class to use, e.g. 10")
    f.add_argument("--mode", choices=("probe", "finetune", *(h for h in HEAD_TYPES if h != "linear")), default="probe",
                   help="probe: logistic regression on frozen features; finetune: train the whole network (a "
                        "pretrained encoder at a tenth of the head's learning rate); knn, mlp, proto (nearest class "
                        "mean): other frozen-feature heads; spread (label spreading on the kNN graph) and selftrain "
                        "(pseudo-labels): semi-supervised heads that also learn from the unlabeled non-test scans")
    f.add_argument("--seed", type=int, default=0, help="picks the labeled subset and seeds training")
    _task_args(f)
    f.add_argument("--epochs", type=int, default=30, help="max epochs for --mode finetune (early stopping on each "
                                                          "cross-validation fold)")
    f.add_argument("--operating-point", default="youden", help=OP_HELP)
    f.add_argument("--allow-outside", action="store_true", help="let CSV paths point outside DATA")
    _selection_args(f)
    _common_config_args(f, for_finetune=True)
    f.add_argument("--dims", type=int, choices=(2, 3), help="with --checkpoint none: 2D or 3D network")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    e = sub.add_parser("embed", help="embeddings for the TensorBoard projector", formatter_class=fmt, parents=[quiet],
                       description="Encode every scan; write embeddings.npz, a projector with thumbnails and "
                                   "metadata, and a static map.png.", epilog=EPILOG_EMBED)
    e.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    e.add_argument("--classifier", help="a finetune output folder: its encoder is used, its probability shown, and "
                                        "the scans it trained/validated on marked (classifier_role)")
    e.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    e.add_argument("--labels", help="LABELS.csv for metadata (label, patient, split)")
    e.add_argument("--positive", help="diseased class, only to check the labels' task (labels are metadata here)")
    e.add_argument("--out", required=True, help="output folder (embeddings.npz, map.png, projector events)")
    e.add_argument("--max-points", type=int, default=10000, help="projector subsample size (all go to embeddings.npz)")
    _selection_args(e)
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    v = sub.add_parser("evaluate", help="few-label protocol: budgets x seeds x heads, against the random-init and "
                                        "from-scratch controls",
                       formatter_class=fmt, parents=[quiet],
                       description="Run the few-label evaluation protocol and write results.csv, "
                       "summary.md, learning_curve.png and TensorBoard hparams. Every budget and seed also runs the "
                       "same heads on the network at random weights, and (unless --baseline none) the network trained "
                       "from scratch, on the same labeled subsets; summary.md reports the gain over the best control.",
                       epilog=EPILOG_EVALUATE)
    v.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    v.add_argument("--compare", nargs="+", metavar="WEIGHTS", default=(),
                   help="other encoders as controls: each is frozen, fed the same scans and given the same heads on "
                        "the same subsets, named external:<name> in results.csv, summary.md and the learning curve "
                        "(files, medcl runs, or names such as torchvision:resnet18; docs/weights.md)")
    v.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    v.add_argument("--labels", help="LABELS.csv (not needed for a MedMNIST .npz)")
    v.add_argument("--out", required=True, help="output folder (results.csv, summary.md, learning_curve.png, tb/)")
    v.add_argument("--fractions", type=float, nargs="*", default=None,
                   help="label fractions (default: 0.01 0.05 0.1 0.25 1.0 unless --per-class is given)")
    v.add_argument("--per-class", type=int, nargs="*", default=None, help="labels-per-class budgets, e.g. 5 10 25 50")
    v.add_argument("--seeds", type=int, default=5, help="random labeled subsets per budget")
    v.add_argument("--heads", nargs="*", default=list(DEFAULT_HEADS), choices=head_names(),
                   help="heads on the pretrained encoder (frozen-feature heads run on the random-init control too): "
                        "knn linear mlp proto, semi-supervised spread selftrain, and finetune")
    v.add_argument("--baseline", choices=("finetune", "none"), default="finetune",
                   help="train the same network from scratch on the same subsets, or skip it")
    v.add_argument("--finetune-max-labels", type=int, default=None,
                   help="train the network (the finetune head and the scratch baseline) only for budgets of at most "
                        "this many labels: it is the slow part on a CPU (default: every budget)")
    v.add_argument("--epochs", type=int, default=30, help="max epochs for finetune heads and the baseline")
    v.add_argument("--operating-point", default="youden", help=OP_HELP)
    v.add_argument("--selection", nargs="+", choices=STRATEGIES,
                   help="draw each seed's labeled subset label-blind with these `medcl select` strategies (from the "
                        "non-test scans, as a user choosing what to label would) instead of stratified at random; a "
                        "budget is then a count: --per-class K means K x classes labels. Several strategies run side "
                        "by side and summary.md compares each with random")
    _task_args(v)
    _selection_args(v)
    v.add_argument("--resume", action="store_true",
                   help="continue the evaluation in --out: every finished budget x seed is kept as it finishes, and "
                        "only what is missing runs (also to add seeds, budgets or heads to a finished one); the "
                        "encoder, data and settings must be the same")
    v.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    s = sub.add_parser("select", help="choose which scans to label first, from the pretrained embeddings",
                       formatter_class=fmt, parents=[quiet],
                       description="Cold-start label selection: encode DATA with the pretrained encoder and pick the "
                                   "BUDGET scans most worth labeling. centroid (default): the scan nearest the "
                                   "centre of each cluster of the embedding not yet covered, largest first; "
                                   "typiclust: the cluster's densest scan instead (TypiClust); kcenter: greedy "
                                   "coverage; random: the control. Labels are never read; test scans are "
                                   "never chosen; one scan per patient unless --allow-same-patient. Writes "
                                   "to_label.csv (fill in its label column, then use it as LABELS.csv), "
                                   "to_label.png and TensorBoard events.", epilog=EPILOG_SELECT)
    s.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    s.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    s.add_argument("--budget", type=int, required=True, help="how many scans to choose")
    s.add_argument("--out", required=True, help="output folder (to_label.csv, to_label.png, selection.json, tb/)")
    s.add_argument("--strategy", choices=STRATEGIES, default="centroid",
                   help="how to choose")
    s.add_argument("--already-labeled", metavar="LABELS.csv", action="append", help="scans labeled so far (a path "
                   "column): the next BUDGET scans are those that add most to them (clusters not yet covered first); "
                   "repeat it for several rounds' lists")
    s.add_argument("--labels", metavar="CSV", help="a CSV with path and patient and/or split columns: patients to "
                   "respect, and test scans (split=test) that are never chosen; its labels are not read")
    s.add_argument("--embeddings", metavar="EMB_DIR", help="a `medcl embed` output of DATA with this checkpoint: "
                   "its features are used instead of encoding every scan again (later rounds on a large folder)")
    s.add_argument("--allow-same-patient", action="store_true", help="allow several scans of one patient")
    s.add_argument("--seed", type=int, default=0,
                   help="seeds k-means (centroid, typiclust) or the draw (kcenter, random)")
    s.add_argument("--max-points", type=int, default=10000, help="projector subsample size (chosen scans always "
                                                                 "shown)")
    _selection_args(s)
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    r = sub.add_parser("predict", help="run a fine-tuned classifier on new scans", formatter_class=fmt,
                       parents=[quiet],
                       description="Predict every scan of DATA with a classifier from `medcl finetune`, using the "
                                   "preprocessing and threshold it was trained with (or another operating point, "
                                   "chosen from its cross-validation predictions). Writes predictions.csv (path, "
                                   "probability, prediction, threshold, operating_point) and skipped.csv; with "
                                   "--labels also metrics.json.", epilog=EPILOG_PREDICT)
    r.add_argument("--classifier", required=True, help="a finetune output folder (or its classifier.pt)")
    r.add_argument("--data", required=True, help="scan folder, scan file or MedMNIST .npz")
    r.add_argument("--out", required=True, help="output folder (predictions.csv, skipped.csv[, metrics.json])")
    r.add_argument("--operating-point", help="youden, sensitivity=0.95 or specificity=0.9, chosen from the "
                                             "classifier's out-of-fold predictions (default: the one it was "
                                             "fine-tuned with)")
    r.add_argument("--labels", help="LABELS.csv of DATA: also score the predictions (metrics.json)")
    r.add_argument("--positive", help="diseased class in --labels (default: the classifier's)")
    r.add_argument("--saliency", metavar="K|all", help="saliency maps for the K scans most probably diseased (or "
                   "all): PNG overlays (3D: three central planes, plus a NIfTI heat map with the scan's affine) in "
                   "PRED_DIR/saliency, listed in saliency.csv, and in TensorBoard")
    r.add_argument("--saliency-method", choices=("occlusion", "gradcam"), default="occlusion",
                   help="occlusion sensitivity (what hiding each region costs the diseased probability) or Grad-CAM "
                        "on the encoder's last stage; docs/saliency.md compares them on lesion phantoms")
    r.add_argument("--strict", action="store_true", help="stop at the first unreadable scan instead of skipping it")
    _selection_args(r)
    r.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    _add_export_parser(sub, fmt, quiet)

    w = sub.add_parser("views", help="preview the augmented views a recipe makes (PNG + TensorBoard)",
                       formatter_class=fmt, parents=[quiet],
                       description="Before pretraining: a grid with one row per scan (the scan as medcl caches it, "
                                   "then view pairs made by the run's own view engine; middle slices of volumes), "
                                   "written as views.png and to TensorBoard, with the recipe as a MONAI transform "
                                   "list and the engine each transform runs in.",
                       epilog="examples:\n  medcl views scans/ --out runs/views\n  medcl views scans/ --out runs/views "
                              "--config views_mri --dims 3\n  tensorboard --logdir runs/views")
    w.add_argument("data", metavar="DATA")
    w.add_argument("--out", required=True, help="output folder (views.png, recipe.yaml, engines.txt, tb/)")
    _common_config_args(w)
    w.add_argument("--dims", type=int, choices=(2, 3), help="2D or 3D views (data.dims)")
    w.add_argument("--scans", dest="n_scans", type=int, default=6, help="rows: scans picked at random")
    w.add_argument("--pairs", dest="view_pairs", type=int, default=3, help="view pairs per scan")
    w.add_argument("--seed", type=int, default=0, help="which scans, and the views' randomness")
    _selection_args(w)
    w.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    c = sub.add_parser("config", help="show the resolved config with every key's meaning, or list the recipes",
                       formatter_class=fmt, parents=[quiet],
                       description="`medcl config show` prints the config a run would use (defaults <- --config <- "
                                   "--set) with each key's meaning; `medcl config list` names the shipped recipes.",
                       epilog="examples:\n  medcl config show\n  medcl config show --config simclr_3d --set "
                              "train.epochs=50\n  medcl config list")
    c.add_argument("action", choices=("show", "list"))
    _common_config_args(c)
    c.add_argument("--dims", type=int, choices=(2, 3), help="data.dims")

    k = sub.add_parser("cache", help="show or free the scan cache (decoded scans shared by every command)",
                       formatter_class=fmt, parents=[quiet],
                       description="Every command reads decoded scans from one cache, keyed by each file's path, size "
                                   "and modification time and by the preprocessing (dims, size, channels, intensity): "
                                   "a second command on the same folder starts without decoding it again; a changed "
                                   "file is decoded again. `info` lists what it holds, `clear` deletes it.",
                       epilog="examples:\n  medcl cache info\n  medcl cache clear --cache-dir /scratch/medcl_cache")
    k.add_argument("action", choices=("info", "clear"))
    return ap


def _selection(a):
    from .data.discover import Selection

    return Selection.make(a.include, a.exclude, a.files)


def _pretrain_config(a, base: dict | None = None):
    from .config import load_config, parse_set

    over = parse_set(a.set)
    for key, val in (("data.dims", a.dims), ("train.epochs", getattr(a, "epochs", None)),
                     ("encoder.init", getattr(a, "init", None)),
                     ("train.batch_size", getattr(a, "batch_size", None)), ("train.seed", getattr(a, "seed", None)),
                     ("train.time_budget", getattr(a, "time", None))):
        if val is not None:
            sec, k = key.split(".")
            over.setdefault(sec, {})[k] = val
    if getattr(a, "strict", False):
        over.setdefault("data", {})["strict"] = True
    for key in ("include", "exclude"):
        if getattr(a, key, None):
            over.setdefault("data", {})[key] = ",".join(getattr(a, key))
    if getattr(a, "files", None):  # absolute, so a --resume from another folder finds the same list
        from pathlib import Path

        over.setdefault("data", {})["files"] = str(Path(a.files).resolve())
    return load_config(a.config, over, base=base)


def _auto_base(a) -> dict:
    """No recipe: settings from the folder's own properties (medcl.auto), printed; typed flags still win."""
    from .auto import auto_settings, describe_auto, folder_profile
    from .config import parse_set

    _pretrain_config(a)  # a mistyped --set fails here, before torch is imported
    over = parse_set(a.set)
    profile = folder_profile(a.data, _selection(a), a.dims or over.get("data", {}).get("dims"))
    import torch

    device = over.get("train", {}).get("device", "auto")
    device = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    settings = auto_settings(profile, device)
    typed = bool(a.set or a.dims or getattr(a, "epochs", None) or getattr(a, "batch_size", None)
                 or a.seed is not None or getattr(a, "time", None))
    print(describe_auto(profile, _pretrain_config(a, settings), device, typed))
    return settings


def _check_path(path, what: str):
    from pathlib import Path

    if path is not None and not Path(path).exists():
        raise MedclError(f"{what} not found: {path}")


def _preflight_out(a):
    """--out checked as the command would (exists, inside DATA, a failed start), before torch loads."""
    from .runs import COMMAND_OUTPUTS, NEVER_TRAINED, check_out_dir, never_trained

    if a.command not in COMMAND_OUTPUTS:
        return
    resume = getattr(a, "resume", False)
    if a.command == "pretrain" and resume and never_trained(a.out):
        print(NEVER_TRAINED.format(out=a.out))
        a.resume = resume = False
    marker = "settings.json" if a.command == "evaluate" and resume else COMMAND_OUTPUTS[a.command]
    check_out_dir(a.out, getattr(a, "data", None), resume, getattr(a, "overwrite", False), marker,
                  resumable=a.command in ("pretrain", "evaluate"))


def _check_export(a):
    if a.command != "export":
        return
    if bool(a.classifier) == bool(a.checkpoint):
        raise MedclError("export needs one of --classifier FT_DIR or --checkpoint RUN_DIR (the latter with --bundle)")
    if bool(a.out) == bool(a.bundle):
        raise MedclError("export writes one thing: --out FILE.pt2 (a classifier) or --bundle DIR (a MONAI bundle)")
    if a.checkpoint and not a.bundle:
        raise MedclError("--checkpoint exports an encoder as a MONAI bundle: add --bundle DIR (a .pt2 file holds a "
                         "classifier: --classifier FT_DIR --out F.pt2)")


def _preflight(a):
    """Cheap checks before torch and MONAI are imported (half a minute on a cold machine): paths, CSVs, config."""
    _check_export(a)
    if getattr(a, "time", None) and getattr(a, "epochs", None):
        raise MedclError("--time and --epochs both set how long to pretrain: pass one of them")
    if getattr(a, "resume", False) and getattr(a, "overwrite", False):
        from .runs import RESUME_OR_OVERWRITE

        raise MedclError(RESUME_OR_OVERWRITE)
    for attr, what in (("data", "data"), ("labels", "labels file"), ("probe_labels", "labels file"),

                       ("pairs", "pairs file"), ("files", "--files list"), ("classifier", "classifier folder"),
                       ("embeddings", "--embeddings")):
        _check_path(getattr(a, attr, None), what)
    for path in getattr(a, "already_labeled", None) or []:
        _check_path(path, "--already-labeled file")
    ck = getattr(a, "checkpoint", None)
    if ck is not None and str(ck).lower() != "none":
        if is_name(ck):
            resolve_weights(ck, "--checkpoint")
        else:
            _check_path(ck, "checkpoint")
        check_checkpoint_path(ck, a.command)
    if getattr(a, "init", None):
        resolve_weights(a.init, "--init")
    for weights in getattr(a, "compare", None) or ():
        resolve_weights(weights, "--compare")
    if getattr(a, "classifier", None):
        check_classifier_path(a.classifier)
    _preflight_out(a)
    if a.command in ("finetune", "evaluate", "pretrain", "embed"):
        from .data.labels import read_labels_csv

        multiclass = getattr(a, "multiclass", False) or a.command == "embed" and not a.positive
        for attr in ("labels", "probe_labels"):
            if getattr(a, attr, None) and not str(a.data).endswith(".npz"):
                read_labels_csv(getattr(a, attr), a.data, a.positive, getattr(a, "allow_outside", False),
                                getattr(a, "negative", None), multiclass)
    if getattr(a, "pairs", None):
        from .data.labels import read_pairs_csv

        read_pairs_csv(a.pairs, a.data)
    if getattr(a, "files", None):
        from .data.discover import Selection

        Selection.make(files=a.files).listed()


def _cache_command(action: str) -> None:
    from .data import store

    root = store.default_root()
    if root is None:
        print(f"the scan cache is off ({store.ENV}={os.environ.get(store.ENV)})")
        return
    if action == "clear":
        freed = store.clear(root)
        print(f"cleared the scan cache {root}: {freed / 2**20:.1f} MiB freed")
        return
    parts = store.describe(root)
    print(f"scan cache: {root}" + ("" if parts else " (empty)"))
    for d in parts:
        st = d["settings"]
        what = (f"{st.get('dims', '?')}D, {st.get('size', '?')} px, {st.get('channels', '?')} channel(s), "
                f"intensity {st.get('intensity', '?')}")
        print(f"  {what}: {d['scans']} scans, {d['unusable']} unusable, {d['bytes'] / 2**20:.1f} MiB"
              + (f", {d['partial']} partial writes (from killed runs; ignored)" if d["partial"] else "")
              + f"  [{d['folder']}]")


def _run_pretrain(a, started: float, progress):
    """`medcl pretrain`: the folder's defaults (or a recipe, or the saved run), typed flags over them."""
    from pathlib import Path

    from .config import parse_set, saved_run, views_only
    from .data.labels import labels_from_records, read_labels_csv, read_pairs_csv

    saved = Path(a.out) / "config.yaml"
    # resuming: what the user typed is applied to the saved config, so repeating the original flags is fine
    base = saved_run(saved)[0] if a.resume and saved.is_file() else None
    if base is None and (not a.config or views_only(a.config)):
        base = _auto_base(a)
    cfg = _pretrain_config(a, base)
    task = dict(negative=a.negative, multiclass=a.multiclass)
    labels = read_labels_csv(a.labels, a.data, a.positive, **task) if a.labels else None
    probe = read_labels_csv(a.probe_labels, a.data, a.positive, **task) if a.probe_labels else None
    if probe is None and str(a.data).endswith(".npz"):
        from .data.discover import open_npz

        try:  # the monitor only needs classes: a graded .npz (RetinaMNIST) is fine without --positive
            probe = labels_from_records(open_npz(Path(a.data)).records, a.positive, a.negative,
                                        a.multiclass or not a.positive)
        except MedclError:
            probe = None
    pairs = read_pairs_csv(a.pairs, a.data) if a.pairs else None
    from .train import pretrain

    pretrain(a.data, a.out, cfg, resume=a.resume, overwrite=a.overwrite, labels=labels, probe_labels=probe,
             pairs=pairs, progress=progress, allow_different_data=a.allow_different_data,
             add_time=bool(a.resume and a.time), started_at=started, typed=parse_set(a.set))


def _run_export(a):
    if a.bundle:
        from .bundle import export_bundle

        export_bundle(a.bundle, a.checkpoint, a.classifier, a.overwrite)
    else:
        from .export import export_classifier

        export_classifier(a.classifier, a.out, a.overwrite)


def main(argv=None) -> int:
    from .timebudget import now

    started = now()  # `pretrain --time` counts from here: importing torch and decoding are part of the asked time
    warnings.filterwarnings("ignore", module="monai")
    ap = build_parser()
    a = ap.parse_args(argv)
    if not a.command:
        ap.print_help()
        return 1
    progress = "off" if a.quiet else True  # True: a bar on a terminal, lines elsewhere, or MEDCL_PROGRESS
    if getattr(a, "cache_dir", None):  # read by every command (and torchrun's other ranks) through the environment
        os.environ["MEDCL_CACHE"] = a.cache_dir
    try:
        _preflight(a)
        if a.command == "cache":
            _cache_command(a.action)
        elif a.command == "config":
            from .config import describe, recipe_names

            if a.action == "list":
                from .config import RECIPES

                print(f"recipes shipped with medcl ({RECIPES}); use as --config NAME:")
                print("\n".join(f"  {n}" for n in recipe_names()))
            else:
                cfg = _pretrain_config(a)
                print(describe(cfg), end="")
                if not cfg.views.transforms:
                    from .views import as_yaml, knob_transforms

                    print(f"# views.transforms is empty, so the views are the knobs above; as MONAI transforms "
                          f"({cfg.data.dims}D; `@spatial_size` is [data.size] * dims). Paste and edit to change them:")
                    print(as_yaml(knob_transforms(cfg.views, cfg.data.dims)), end="")
        elif a.command == "demo":
            from .demo import demo

            demo(a.out, a.dims, a.n, a.epochs, a.label_fraction, a.seed, a.overwrite, progress)
        elif a.command == "pretrain":
            _run_pretrain(a, started, progress)
        elif a.command == "finetune":
            cfg = _pretrain_config(a)
            from .finetune import finetune

            finetune(a.checkpoint, a.data, a.labels, a.out, a.label_fraction, a.labels_per_class, a.mode, a.seed,
                     a.positive, cfg, a.overwrite, a.epochs, a.operating_point, a.allow_outside, progress,
                     negative=a.negative, multiclass=a.multiclass, select=_selection(a))
        elif a.command == "views":
            from .config import views_only
            from .views.preview import preview

            # the settings `medcl pretrain` would use on this folder: the recipe, else the folder's auto settings
            cfg = _pretrain_config(a, _auto_base(a) if not a.config or views_only(a.config) else None)
            preview(a.data, a.out, cfg, a.n_scans, a.view_pairs, a.seed, a.overwrite, progress)
        elif a.command == "embed":
            if not a.checkpoint and not a.classifier:
                raise MedclError("embed needs --checkpoint RUN_DIR (or --classifier FT_DIR).")
            from .embed import embed

            embed(a.checkpoint, a.data, a.out, a.labels, a.classifier, a.max_points, a.positive, a.overwrite,
                  progress=progress, select=_selection(a))
        elif a.command == "evaluate":
            from .evaluate import evaluate

            evaluate(a.checkpoint, a.data, a.labels, a.out, fractions=a.fractions, per_class=a.per_class, seeds=a.seeds,
                     heads=a.heads, baseline=a.baseline, epochs=a.epochs, operating_point=a.operating_point,
                     positive=a.positive, overwrite=a.overwrite, finetune_max_labels=a.finetune_max_labels,
                     progress=progress, negative=a.negative, multiclass=a.multiclass, select=_selection(a),
                     selection=a.selection, resume=a.resume, compare=a.compare)
        elif a.command == "predict":
            from .predict import predict

            predict(a.classifier, a.data, a.out, a.operating_point, a.labels, a.positive, a.overwrite,
                    strict=a.strict, progress=progress, select=_selection(a), saliency=a.saliency,
                    saliency_method=a.saliency_method)
        elif a.command == "export":
            _run_export(a)
        elif a.command == "select":
            from .select import select_scans

            select_scans(a.checkpoint, a.data, a.budget, a.out, a.strategy, a.already_labeled, a.seed, a.labels,
                         a.allow_same_patient, a.overwrite, max_points=a.max_points, progress=progress,
                         select=_selection(a), embeddings=a.embeddings)
    except MedclError as e:
        print(f"medcl {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = {"pretrain": "; the run continues with --resume",
                 "evaluate": "; the finished budgets and seeds are kept: the same command with --resume runs the rest"}
        print(f"medcl {a.command}: interrupted{again.get(a.command, '')}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
