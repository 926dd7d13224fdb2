"""`medcl config`: show the resolved config, or list the recipes."""
from .common import HelpFormatter, config_args, pretrain_config


def add_parser(sub, parent):
    p = sub.add_parser("config", help="show the resolved config with every key's meaning, or list the recipes",
                       formatter_class=HelpFormatter, parents=[parent],
                       description="`medcl config show` prints the config a run would use (defaults <- --config <- "
                                   "--set) with each key's meaning; `medcl config list` names the shipped recipes.",
                       epilog="examples:\n  medcl config show\n  medcl config show --config simclr_3d --set "
                              "train.epochs=50\n  medcl config list")
    p.add_argument("action", choices=("show", "list"))
    config_args(p)
    p.add_argument("--dims", type=int, choices=(2, 3), help="data.dims")


def run(a, progress, started):
    from ..config import describe, recipe_names

    if a.action == "list":
        from ..config import RECIPES

        print(f"recipes shipped with medcl ({RECIPES}); use as --config NAME:")
        print("\n".join(f"  {n}" for n in recipe_names()))
        return
    cfg = pretrain_config(a)
    print(describe(cfg), end="")
    if not cfg.views.transforms:
        from ..views import as_yaml, knob_transforms

        print(f"# views.transforms is empty, so the views are the knobs above; as MONAI transforms "
              f"({cfg.data.dims}D; `@spatial_size` is [data.size] * dims). Paste and edit to change them:")
        print(as_yaml(knob_transforms(cfg.views, cfg.data.dims)), end="")
