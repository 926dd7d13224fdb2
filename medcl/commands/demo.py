"""`medcl demo`: run the whole journey on synthetic phantoms."""
from .common import DEMO3D_TIME, DEMO_TIME, HelpFormatter


def add_parser(sub, parent):
    p = sub.add_parser("demo", help="run the whole journey on synthetic phantoms (offline)",
                       formatter_class=HelpFormatter, parents=[parent],
                       description="Generate synthetic phantoms (healthy vs a small lesion; every acquisition "
                                   "with its own position, rotation, gain, contrast, bias field and noise, the factors "
                                   "contrastive views teach an encoder to ignore), pretrain, fit a linear probe with "
                                   "few labels; the controls: the same probe on a random-init encoder, and the "
                                   "same network trained from scratch on the same labels; embed; print the three "
                                   "test AUCs, the gain over the stronger control with its interval paired by test "
                                   "scan, and where to point TensorBoard.",
                       epilog=f"example: medcl demo --out runs/demo && tensorboard --logdir runs/demo\n"
                              f"time: {DEMO_TIME} (2D), {DEMO3D_TIME} (--dims 3), measured on 2 CPU cores")
    p.add_argument("--out", required=True, help="folder for everything the demo writes")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D images or 3D volumes")
    p.add_argument("--n", type=int, help="number of phantoms (default 400 in 2D, 320 in 3D)")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default 8 in 2D, 24 in 3D)")
    p.add_argument("--label-fraction", type=float, default=0.1, help="share of training labels for the probe")
    p.add_argument("--seed", type=int, default=0, help="phantoms, labeled subset and training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")


def run(a, progress, started):
    from ..demo import demo

    demo(a.out, a.dims, a.n, a.epochs, a.label_fraction, a.seed, a.overwrite, progress)
