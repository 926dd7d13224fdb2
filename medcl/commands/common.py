"""What the commands share: the help formatter, the wording of shared options, and the config a command's flags
resolve to (a recipe, the folder's own defaults, typed flags over them)."""
from __future__ import annotations

import argparse

CHECKPOINT_HELP = ("pretrain run folder or its encoder.pt, or WEIGHTS from another tool: a ResNet file (torchvision, "
                   "timm, MedicalNet, lightly, solo-learn) or a name such as torchvision:resnet18 (docs/weights.md)")
# measured on 2 idle x86_64 CPU cores, seeds 0-5 (docs/results.md, "The demo"); one wording everywhere
DEMO_TIME = "61-82 s"  # the 3D demo, the default
DEMO2D_TIME = "43-52 s"


PROGRESS_HELP = ("progress: a bar on a terminal; otherwise (nohup, pipes, batch schedulers) one line per epoch or run "
                 "with elapsed time and ETA. MEDCL_PROGRESS=bar|lines|off overrides; --quiet turns it off.")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and the default of every option that has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if d in (None, False, argparse.SUPPRESS) or d == [] or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {' '.join(map(str, d)) if isinstance(d, list) else d})"


def config_args(p, for_finetune=False):
    if for_finetune:
        p.add_argument("--config", help="with --checkpoint none: a recipe (file or shipped name, see `medcl config "
                                        "list`) whose data/encoder sections define the network trained from scratch; "
                                        "with a checkpoint, the encoder's own settings are used")
    else:
        p.add_argument("--config", action="append", help="YAML recipe: a file, or the name of a recipe that ships "
                       "with medcl (`medcl config list`); values there override the defaults. Repeatable (later "
                       "ones win), e.g. --config medmnist28 --config views_xray. A views-only recipe (views_*) "
                       "keeps the folder's own defaults for everything else")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set method.name=byol (repeatable; "
                        "`medcl config show` lists every key with its meaning)")


def selection_args(p):
    p.add_argument("--include", action="append", metavar="GLOB", help="use only scans whose path (relative to "
                   "DATA) matches; `*` crosses folders, e.g. --include '*flair*' (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave out scans whose path matches, e.g. "
                   "--exclude '*mask*' --exclude '*seg*' (repeatable)")
    p.add_argument("--files", metavar="LIST.txt", help="use only the scans listed in this text file, one path "
                   "relative to DATA per line")


def task_args(p, what="the task"):
    p.add_argument("--positive", help=f"diseased class(es) for {what} (default: 1, or one name such as diseased/"
                                      "abnormal/tumor/pneumonia); a comma list makes a binary task, e.g. 1,2,3,4")
    p.add_argument("--negative", help="healthy class(es), needed when --positive leaves more than one other class")
    p.add_argument("--multiclass", action="store_true", help="labels with 3+ classes: one output per class "
                   "(without it, a third class is an error that names its rows: usually a typo)")


OP_HELP = ("decision threshold, from out-of-fold predictions of the labeled scans (cross-validation inside the "
           "budget): youden, sensitivity=0.95 (the most specific threshold that keeps 95%% sensitivity), or "
           "specificity=0.9")


def task(a):
    """The labels' task from --positive/--negative/--multiclass and --operating-point."""
    from ..data.labels import Task

    return Task(a.positive, a.negative, a.multiclass, a.operating_point)


def selection(a):
    from ..data.discover import Selection

    return Selection.make(a.include, a.exclude, a.files)


def pretrain_config(a, base: dict | None = None):
    from ..config import load_config, parse_set

    over = parse_set(a.set)
    for key, val in (("data.dims", a.dims), ("train.epochs", getattr(a, "epochs", None)),
                     ("encoder.init", getattr(a, "init", None)),
                     ("train.batch_size", getattr(a, "batch_size", None)), ("train.seed", getattr(a, "seed", None)),
                     ("train.time_budget", getattr(a, "time", None))):
        if val is not None:
            sec, k = key.split(".")
            over.setdefault(sec, {})[k] = val
    if getattr(a, "strict", False):
        over.setdefault("data", {})["strict"] = True
    for key in ("include", "exclude"):
        if getattr(a, key, None):
            over.setdefault("data", {})[key] = ",".join(getattr(a, key))
    if getattr(a, "files", None):  # absolute, so a --resume from another folder finds the same list
        from pathlib import Path

        over.setdefault("data", {})["files"] = str(Path(a.files).resolve())
    return load_config(a.config, over, base=base)


def auto_base(a) -> dict:
    """No recipe: settings from the folder's own properties (medcl.auto), printed; typed flags still win."""
    from ..auto import auto_settings, describe_auto, folder_profile
    from ..config import parse_set

    pretrain_config(a)  # a mistyped --set fails here, before torch is imported
    over = parse_set(a.set)
    profile = folder_profile(a.data, selection(a), a.dims or over.get("data", {}).get("dims"))
    import torch

    device = over.get("train", {}).get("device", "auto")
    device = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    settings = auto_settings(profile, device)
    typed = bool(a.set or a.dims or getattr(a, "epochs", None) or getattr(a, "batch_size", None)
                 or a.seed is not None or getattr(a, "time", None) or getattr(a, "init", None))
    print(describe_auto(profile, pretrain_config(a, settings), device, typed))
    return settings
