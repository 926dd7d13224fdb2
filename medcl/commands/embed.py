"""`medcl embed`: embeddings for the TensorBoard projector."""
from .common import CHECKPOINT_HELP, HelpFormatter, selection, selection_args

EPILOG = """examples:
  medcl embed --checkpoint runs/simclr --data scans/ --labels labels.csv --out emb/
  medcl embed --checkpoint runs/simclr --data scans/ --classifier ft/1pct --out emb/   # adds predicted probability
then: tensorboard --logdir emb/   (PROJECTOR tab: colour by label, click through neighbours)
"""


def add_parser(sub, parent):
    p = sub.add_parser("embed", help="embeddings for the TensorBoard projector", formatter_class=HelpFormatter,
                       parents=[parent],
                       description="Encode every scan; write embeddings.npz, a projector with thumbnails and "
                                   "metadata, and a static map.png.", epilog=EPILOG)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--classifier", help="a finetune output folder: its encoder is used, its probability shown, and "
                                        "the scans it trained/validated on marked (classifier_role)")
    p.add_argument("--data", required=True, help="scan folder or MedMNIST .npz")
    p.add_argument("--labels", help="LABELS.csv for metadata (label, patient, split)")
    p.add_argument("--positive", help="diseased class, only to check the labels' task (labels are metadata here)")
    p.add_argument("--out", required=True, help="output folder (embeddings.npz, map.png, projector events)")
    p.add_argument("--max-points", type=int, default=10000, help="projector subsample size (all go to embeddings.npz)")
    selection_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(a, progress, started):
    from ..errors import MedclError

    if not a.checkpoint and not a.classifier:
        raise MedclError("embed needs --checkpoint RUN_DIR (or --classifier FT_DIR).")
    from ..embed import embed

    embed(a.checkpoint, a.data, a.out, a.labels, a.classifier, a.max_points, a.positive, a.overwrite,
          progress=progress, select=selection(a))
