"""`medcl pretrain`: contrastive pretraining on an unlabeled scan folder."""
from .common import HelpFormatter, auto_base, config_args, pretrain_config, selection_args, task_args

EPILOG = """examples:
  medcl pretrain scans/ --out runs/simclr                       # 2D folder, default SimCLR recipe
  medcl pretrain volumes/ --out runs/ct3d --dims 3 --epochs 50  # NIfTI/DICOM volumes
  medcl pretrain pneumoniamnist.npz --out runs/pm --config configs/pretrain/medmnist28.yaml
  medcl pretrain scans/ --out runs/byol --set method.name=byol --set optim.lr=3e-4
  medcl pretrain scans/ --out runs/simclr --resume               # continue an interrupted run
  torchrun --nproc_per_node 8 -m medcl pretrain scans/ --out runs/big --batch-size 2048   # 8 GPUs, global batch
"""


def add_parser(sub, parent):
    p = sub.add_parser("pretrain", help="contrastive pretraining on an unlabeled scan folder",
                       formatter_class=HelpFormatter, parents=[parent],
                       description="Pretrain an encoder without labels. DATA: a folder searched recursively for "
                                   "NIfTI, DICOM, PNG/JPEG/TIFF and .npy scans, or a MedMNIST .npz file.",
                       epilog=EPILOG)
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, help="run folder (config, checkpoints, encoder.pt, TensorBoard events)")
    config_args(p)
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
    selection_args(p)
    p.add_argument("--labels", help="labels CSV: used by method.name=supcon and positives=patient (test rows never)")
    p.add_argument("--probe-labels", help="labels CSV for the online kNN monitor (never trained on)")
    p.add_argument("--pairs", help="pairs CSV (path_a,path_b,similar) for --set method.name=pair: the listed pairs "
                                   "replace augmentation pairs")
    task_args(p, "--labels/--probe-labels")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable scan instead of skipping it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint; "
                   "flags equal to the saved config are fine, a different value is refused")
    p.add_argument("--allow-different-data", action="store_true",
                   help="with --resume: continue on DATA even though it is not the scans the run was trained on")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def run(a, progress, started):
    """The folder's defaults (or a recipe, or the saved run), typed flags over them."""
    from pathlib import Path

    from ..config import parse_set, saved_run, views_only
    from ..data.labels import labels_from_records, read_labels_csv, read_pairs_csv
    from ..errors import MedclError

    saved = Path(a.out) / "config.yaml"
    # resuming: what the user typed is applied to the saved config, so repeating the original flags is fine
    base = saved_run(saved)[0] if a.resume and saved.is_file() else None
    if base is None and (not a.config or views_only(a.config)):
        base = auto_base(a)
    cfg = pretrain_config(a, base)
    task = dict(negative=a.negative, multiclass=a.multiclass)
    labels = read_labels_csv(a.labels, a.data, a.positive, **task) if a.labels else None
    probe = read_labels_csv(a.probe_labels, a.data, a.positive, **task) if a.probe_labels else None
    if probe is None and str(a.data).endswith(".npz"):
        from ..data.discover import open_npz

        try:  # the monitor only needs classes: a graded .npz (RetinaMNIST) is fine without --positive
            probe = labels_from_records(open_npz(Path(a.data)).records, a.positive, a.negative,
                                        a.multiclass or not a.positive)
        except MedclError:
            probe = None
    pairs = read_pairs_csv(a.pairs, a.data) if a.pairs else None
    from ..train import pretrain

    pretrain(a.data, a.out, cfg, resume=a.resume, overwrite=a.overwrite, labels=labels, probe_labels=probe,
             pairs=pairs, progress=progress, allow_different_data=a.allow_different_data,
             add_time=bool(a.resume and a.time), started_at=started, typed=parse_set(a.set))
