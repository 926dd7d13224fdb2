"""`medcl evaluate`: the few-label protocol."""
from .common import CHECKPOINT_HELP, HelpFormatter, OP_HELP, selection, selection_args, task, task_args

EPILOG = """examples:
  medcl evaluate --checkpoint runs/pm --data pneumoniamnist.npz --out eval/pm
  medcl evaluate --checkpoint runs/simclr --data scans/ --labels labels.csv --out eval/x \\
      --fractions 0.01 0.1 1.0 --seeds 5 --heads knn linear mlp --baseline finetune
  medcl evaluate --checkpoint runs/pm --data pneumoniamnist.npz --out eval/sel --per-class 10 25 \\
      --selection centroid random --heads linear --baseline none      # does choosing the scans pay?
  medcl evaluate --checkpoint runs/pm --data pneumoniamnist.npz --out eval/pm --resume --seeds 10
      # after an interruption: runs only what is missing; here also seeds 5-9 for a finished 5-seed evaluation
"""


def add_parser(sub, parent):
    from ..feature_heads import DEFAULT_HEADS, head_names
    from ..select import STRATEGIES

    p = sub.add_parser("evaluate", help="few-label protocol: budgets x seeds x heads, against the random-init and "
                                        "from-scratch controls",
                       formatter_class=HelpFormatter, parents=[parent],
                       description="Run the few-label evaluation protocol and write results.csv, "
                       "summary.md, learning_curve.png and TensorBoard hparams. Every budget and seed also runs the "
                       "same heads on the network at random weights, and (unless --baseline none) the network trained "
                       "from scratch, on the same labeled subsets; summary.md reports the gain over the best control.",
                       epilog=EPILOG)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--compare", nargs="+", metavar="WEIGHTS", default=(),
                   help="other encoders as controls: each is frozen, fed the same scans and given the same heads on "
                        "the same subsets, named external:<name> in results.csv, summary.md and the learning curve "
                        "(files, medcl runs, or names such as torchvision:resnet18; docs/weights.md)")
    p.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    p.add_argument("--labels", help="LABELS.csv (not needed for a MedMNIST .npz)")
    p.add_argument("--out", required=True, help="output folder (results.csv, summary.md, learning_curve.png, tb/)")
    p.add_argument("--fractions", type=float, nargs="*", default=None,
                   help="label fractions (default: 0.01 0.05 0.1 0.25 1.0 unless --per-class is given)")
    p.add_argument("--per-class", type=int, nargs="*", default=None, help="labels-per-class budgets, e.g. 5 10 25 50")
    p.add_argument("--seeds", type=int, default=5,
                   help="random labeled subsets per budget. At 12-52 labels the subset noise is often larger than "
                        "the gain: over our suite 10 seeds decided twice as many cells as 5 (docs/results.md). "
                        "`--resume --seeds 10` adds five more to a finished 5-seed run")
    p.add_argument("--heads", nargs="*", default=list(DEFAULT_HEADS), choices=head_names(),
                   help="heads on the pretrained encoder (frozen-feature heads run on the random-init control too): "
                        "knn linear mlp proto, semi-supervised spread selftrain, and finetune")
    p.add_argument("--baseline", choices=("finetune", "none"), default="finetune",
                   help="train the same network from scratch on the same subsets, or skip it")
    p.add_argument("--finetune-max-labels", type=int, default=None,
                   help="train the network (the finetune head and the scratch baseline) only for budgets of at most "
                        "this many labels: it is the slow part on a CPU (default: every budget)")
    p.add_argument("--epochs", type=int, default=30, help="max epochs for finetune heads and the baseline")
    p.add_argument("--operating-point", default="youden", help=OP_HELP)
    p.add_argument("--selection", nargs="+", choices=STRATEGIES,
                   help="draw each seed's labeled subset label-blind with these `medcl select` strategies (from the "
                        "non-test scans, as a user choosing what to label would) instead of stratified at random; a "
                        "budget is then a count: --per-class K means K x classes labels. Several strategies run side "
                        "by side and summary.md compares each with random")
    task_args(p)
    selection_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the evaluation in --out: every finished budget x seed is kept as it finishes, and "
                        "only what is missing runs (also to add seeds, budgets or heads to a finished one); the "
                        "encoder, data and settings must be the same")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(a, progress, started):
    from ..evaluate import evaluate

    evaluate(a.checkpoint, a.data, a.labels, a.out, fractions=a.fractions, per_class=a.per_class, seeds=a.seeds,
             heads=a.heads, baseline=a.baseline, epochs=a.epochs, task=task(a), overwrite=a.overwrite,
             finetune_max_labels=a.finetune_max_labels, progress=progress, select=selection(a), selection=a.selection,
             resume=a.resume, compare=a.compare)
