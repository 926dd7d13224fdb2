"""`medcl predict`: a fine-tuned classifier on new scans."""
from .common import HelpFormatter, selection, selection_args

EPILOG = """examples:
  medcl predict --classifier ft/1pct --data new_scans/ --out pred/week48
  medcl predict --classifier ft/1pct --data new_scans/ --out pred/week48 --operating-point sensitivity=0.95
  medcl predict --classifier ft/1pct --data held_out/ --labels held_out/labels.csv --out pred/check   # + metrics.json
in Python: clf = medcl.load_classifier("ft/1pct"); clf.predict(["a.png", array]) -> probabilities
"""


def add_parser(sub, parent):
    p = sub.add_parser("predict", help="run a fine-tuned classifier on new scans", formatter_class=HelpFormatter,
                       parents=[parent],
                       description="Predict every scan of DATA with a classifier from `medcl finetune`, using the "
                                   "preprocessing and threshold it was trained with (or another operating point, "
                                   "chosen from its cross-validation predictions). Writes predictions.csv (path, "
                                   "probability, prediction, threshold, operating_point) and skipped.csv; with "
                                   "--labels also metrics.json.", epilog=EPILOG)
    p.add_argument("--classifier", required=True, help="a finetune output folder (or its classifier.pt)")
    p.add_argument("--data", required=True, help="scan folder, scan file or MedMNIST .npz")
    p.add_argument("--out", required=True, help="output folder (predictions.csv, skipped.csv[, metrics.json])")
    p.add_argument("--operating-point", help="youden, sensitivity=0.95 or specificity=0.9, chosen from the "
                                             "classifier's out-of-fold predictions (default: the one it was "
                                             "fine-tuned with)")
    p.add_argument("--labels", help="LABELS.csv of DATA: also score the predictions (metrics.json)")
    p.add_argument("--positive", help="diseased class in --labels (default: the classifier's)")
    p.add_argument("--saliency", metavar="K|all", help="saliency maps for the K scans most probably diseased (or "
                   "all): PNG overlays (3D: three central planes, plus a NIfTI heat map with the scan's affine) in "
                   "PRED_DIR/saliency, listed in saliency.csv, and in TensorBoard")
    p.add_argument("--saliency-method", choices=("occlusion", "gradcam"), default="occlusion",
                   help="occlusion sensitivity (what hiding each region costs the diseased probability) or Grad-CAM "
                        "on the encoder's last stage; docs/saliency.md compares them on lesion phantoms")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable scan instead of skipping it")
    selection_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(a, progress, started):
    from ..predict import predict

    predict(a.classifier, a.data, a.out, a.operating_point, a.labels, a.positive, a.overwrite, strict=a.strict,
            progress=progress, select=selection(a), saliency=a.saliency, saliency_method=a.saliency_method)
