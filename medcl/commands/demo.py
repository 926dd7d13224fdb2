"""`medcl demo`: run the whole journey on synthetic phantoms."""
from .common import DEMO2D_TIME, DEMO_TIME, HelpFormatter


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
                              f"time: {DEMO_TIME} (3D, the default), {DEMO2D_TIME} (--dims 2), measured on 2 CPU cores")
    p.add_argument("--out", required=True, help="folder for everything the demo writes")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3,
                   help="3D volumes (default: there pretraining beat both controls on every seed we ran) or 2D "
                        "images (there on 10 of 12 seeds, with smaller gains: docs/results.md, 'The demo')")
    p.add_argument("--n", type=int, help="number of phantoms (default 320 in 3D, 800 in 2D)")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default 24 in 3D, 8 in 2D)")
    p.add_argument("--label-fraction", type=float,
                   help="share of the training scans labeled for the probe (default 0.1 in 3D, 0.05 in 2D: 26 and 32)")
    p.add_argument("--seed", type=int, default=0, help="phantoms, labeled subset and training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="try another design: override one of the demo's settings, e.g. --set train.batch_size=24 "
                        "(repeatable; `medcl config show` lists the keys)")


def run(a, progress, started):
    from ..config import ConfigError, MedclConfig, apply_overrides, parse_set, validate

    overrides = parse_set(a.set)
    if "dims" in overrides.get("data", {}):
        raise ConfigError("choose 2D or 3D with --dims, not --set data.dims.")
    validate(apply_overrides(MedclConfig(), overrides, "--set"))  # a mistyped key fails here, before torch loads
    from ..demo import demo

    demo(a.out, a.dims, a.n, a.epochs, a.label_fraction, a.seed, a.overwrite, progress, overrides=overrides)
