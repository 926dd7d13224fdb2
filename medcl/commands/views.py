"""`medcl views`: preview the augmented views a recipe makes."""
from .common import HelpFormatter, auto_base, config_args, pretrain_config, selection_args


def add_parser(sub, parent):
    p = sub.add_parser("views", help="preview the augmented views a recipe makes (PNG + TensorBoard)",
                       formatter_class=HelpFormatter, parents=[parent],
                       description="Before pretraining: a grid with one row per scan (the scan as medcl caches it, "
                                   "then view pairs made by the run's own view engine; middle slices of volumes), "
                                   "written as views.png and to TensorBoard, with the recipe as a MONAI transform "
                                   "list and the engine each transform runs in.",
                       epilog="examples:\n  medcl views scans/ --out runs/views\n  medcl views scans/ --out runs/views "
                              "--config views_mri --dims 3\n  tensorboard --logdir runs/views")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, help="output folder (views.png, recipe.yaml, engines.txt, tb/)")
    config_args(p)
    p.add_argument("--dims", type=int, choices=(2, 3), help="2D or 3D views (data.dims)")
    p.add_argument("--scans", dest="n_scans", type=int, default=6, help="rows: scans picked at random")
    p.add_argument("--pairs", dest="view_pairs", type=int, default=3, help="view pairs per scan")
    p.add_argument("--seed", type=int, default=0, help="which scans, and the views' randomness")
    selection_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(a, progress, started):
    from ..config import views_only
    from ..views.preview import preview

    # the settings `medcl pretrain` would use on this folder: the recipe, else the folder's auto settings
    cfg = pretrain_config(a, auto_base(a) if not a.config or views_only(a.config) else None)
    preview(a.data, a.out, cfg, a.n_scans, a.view_pairs, a.seed, a.overwrite, progress)
