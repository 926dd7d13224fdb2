"""`medcl export`: a classifier as one .pt2 file, or an encoder or classifier as a MONAI bundle."""
from .common import HelpFormatter


def add_parser(sub, parent):
    p = sub.add_parser("export", help="save a classifier as one .pt2 file that plain PyTorch runs, or an encoder "
                                      "or classifier as a MONAI bundle",
                       formatter_class=HelpFormatter, parents=[parent],
                       description="Export a `medcl finetune` classifier with torch.export (--out F.pt2): the file "
                                   "maps a preprocessed batch to class probabilities and loads with "
                                   "torch.export.load(path).module(), without medcl. Its medcl.json (extra file) "
                                   "holds the classes, threshold and preprocessing. Or write a MONAI bundle "
                                   "(--bundle DIR) of a classifier or of a pretrain run's encoder: "
                                   "monai.bundle.ConfigParser builds it without medcl (ResNet encoders).",
                       epilog="examples:\n  medcl export --classifier ft/1pct --out models/pneumonia.pt2\n"
                              "  medcl export --checkpoint runs/pm --bundle models/pm_encoder_bundle")
    p.add_argument("--classifier", help="a finetune output folder (or its classifier.pt)")
    p.add_argument("--checkpoint", help="with --bundle: a pretrain run folder (or its encoder.pt)")
    p.add_argument("--out", help="the file to write, *.pt2 (a classifier)")
    p.add_argument("--bundle", metavar="DIR", help="write a MONAI bundle (Model Zoo layout) to this folder instead")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file or bundle")


def check(a):
    """Which of its inputs and outputs export was given, before torch loads."""
    from ..errors import MedclError

    if bool(a.classifier) == bool(a.checkpoint):
        raise MedclError("export needs one of --classifier FT_DIR or --checkpoint RUN_DIR (the latter with --bundle)")
    if bool(a.out) == bool(a.bundle):
        raise MedclError("export writes one thing: --out FILE.pt2 (a classifier) or --bundle DIR (a MONAI bundle)")
    if a.checkpoint and not a.bundle:
        raise MedclError("--checkpoint exports an encoder as a MONAI bundle: add --bundle DIR (a .pt2 file holds a "
                         "classifier: --classifier FT_DIR --out F.pt2)")


def run(a, progress, started):
    if a.bundle:
        from ..bundle import export_bundle

        export_bundle(a.bundle, a.checkpoint, a.classifier, a.overwrite)
    else:
        from ..export import export_classifier

        export_classifier(a.classifier, a.out, a.overwrite)
