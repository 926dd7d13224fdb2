"""`medcl select`: which scans to label first."""
from .common import CHECKPOINT_HELP, HelpFormatter, selection, selection_args

EPILOG = """examples:
  medcl select --checkpoint runs/simclr --data scans/ --budget 30 --out sel/round1
  # label sel/round1/to_label.csv (fill its label column), fine-tune, then ask for the next 20:
  medcl select --checkpoint runs/simclr --data scans/ --budget 20 --already-labeled labels.csv --out sel/round2
then: tensorboard --logdir sel/round1   (IMAGES: the contact sheet; PROJECTOR: colour by 'selection')
"""


def add_parser(sub, parent):
    from ..select import STRATEGIES

    p = sub.add_parser("select", help="choose which scans to label first, from the pretrained embeddings",
                       formatter_class=HelpFormatter, parents=[parent],
                       description="Cold-start label selection: encode DATA with the pretrained encoder and pick the "
                                   "BUDGET scans most worth labeling. centroid (default): the scan nearest the "
                                   "centre of each cluster of the embedding not yet covered, largest first; "
                                   "typiclust: the cluster's densest scan instead (TypiClust); kcenter: greedy "
                                   "coverage; random: the control. Labels are never read; test scans are "
                                   "never chosen; one scan per patient unless --allow-same-patient. Writes "
                                   "to_label.csv (fill in its label column, then use it as LABELS.csv), "
                                   "to_label.png and TensorBoard events.", epilog=EPILOG)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    p.add_argument("--budget", type=int, required=True, help="how many scans to choose")
    p.add_argument("--out", required=True, help="output folder (to_label.csv, to_label.png, selection.json, tb/)")
    p.add_argument("--strategy", choices=STRATEGIES, default="centroid",
                   help="how to choose")
    p.add_argument("--already-labeled", metavar="LABELS.csv", action="append", help="scans labeled so far (a path "
                   "column): the next BUDGET scans are those that add most to them (clusters not yet covered first); "
                   "repeat it for several rounds' lists")
    p.add_argument("--labels", metavar="CSV", help="a CSV with path and patient and/or split columns: patients to "
                   "respect, and test scans (split=test) that are never chosen; its labels are not read")
    p.add_argument("--embeddings", metavar="EMB_DIR", help="a `medcl embed` output of DATA with this checkpoint: "
                   "its features are used instead of encoding every scan again (later rounds on a large folder)")
    p.add_argument("--allow-same-patient", action="store_true", help="allow several scans of one patient")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds k-means (centroid, typiclust) or the draw (kcenter, random)")
    p.add_argument("--max-points", type=int, default=10000, help="projector subsample size (chosen scans always "
                                                                 "shown)")
    selection_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(a, progress, started):
    from ..select import select_scans

    select_scans(a.checkpoint, a.data, a.budget, a.out, a.strategy, a.already_labeled, a.seed, a.labels,
                 a.allow_same_patient, a.overwrite, max_points=a.max_points, progress=progress,
                 select=selection(a), embeddings=a.embeddings)
