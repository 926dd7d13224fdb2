"""medcl command line: parse, check what is cheap to check, call one library function per command
(medcl/commands/: one module per command)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .commands import COMMANDS
from .commands.common import DEMO_TIME, PROGRESS_HELP
from .errors import MedclError
from .runs import check_checkpoint_path, check_classifier_path
from .weights import is_name
from .weights import resolve as resolve_weights

INTERRUPTED = {"pretrain": "; the run continues with --resume",
               "evaluate": "; the finished budgets and seeds are kept: the same command with --resume runs the rest"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medcl", description="Contrastive pretraining for 2D/3D medical scans, "
                                 "few-label fine-tuning, and TensorBoard inspection.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="start here: medcl demo --out runs/demo   (no data needed; "
                                        f"{DEMO_TIME} on 2 CPU cores)\n\n{PROGRESS_HELP}")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    # --quiet after the command works too; SUPPRESS keeps a --quiet given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or progress lines")
    common.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="the scan cache shared by every command (decoded scans; default $MEDCL_CACHE, else "
                             "~/.cache/medcl; 'off' disables it). Never inside DATA. See `medcl cache info`.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub, common)
    return ap


def _check_path(path, what: str):
    from pathlib import Path

    if path is not None and not Path(path).exists():
        raise MedclError(f"{what} not found: {path}")


def _preflight_out(a):
    """--out checked as the command would (exists, inside DATA, a failed start), before torch loads."""
    from .runs import COMMAND_OUTPUTS, NEVER_TRAINED, check_out_dir, never_trained

    if a.command not in COMMAND_OUTPUTS:
        return
    resume = getattr(a, "resume", False)
    if a.command == "pretrain" and resume and never_trained(a.out):
        print(NEVER_TRAINED.format(out=a.out))
        a.resume = resume = False
    marker = "settings.json" if a.command == "evaluate" and resume else COMMAND_OUTPUTS[a.command]
    check_out_dir(a.out, getattr(a, "data", None), resume, getattr(a, "overwrite", False), marker,
                  resumable=a.command in ("pretrain", "evaluate"))


def _preflight(a):
    """Cheap checks before torch and MONAI are imported (half a minute on a cold machine): paths, CSVs, config."""
    if a.command == "export":
        COMMANDS["export"].check(a)
    if getattr(a, "time", None) and getattr(a, "epochs", None):
        raise MedclError("--time and --epochs both set how long to pretrain: pass one of them")
    if getattr(a, "resume", False) and getattr(a, "overwrite", False):
        from .runs import RESUME_OR_OVERWRITE

        raise MedclError(RESUME_OR_OVERWRITE)
    for attr, what in (("data", "data"), ("labels", "labels file"), ("probe_labels", "labels file"),

                       ("pairs", "pairs file"), ("files", "--files list"), ("classifier", "classifier folder"),
                       ("embeddings", "--embeddings")):
        _check_path(getattr(a, attr, None), what)
    for path in getattr(a, "already_labeled", None) or []:
        _check_path(path, "--already-labeled file")
    ck = getattr(a, "checkpoint", None)
    if ck is not None and str(ck).lower() != "none":
        if is_name(ck):
            resolve_weights(ck, "--checkpoint")
        else:
            _check_path(ck, "checkpoint")
        check_checkpoint_path(ck, a.command)
    if getattr(a, "init", None):
        resolve_weights(a.init, "--init")
    for weights in getattr(a, "compare", None) or ():
        resolve_weights(weights, "--compare")
    if getattr(a, "classifier", None):
        check_classifier_path(a.classifier)
    _preflight_out(a)
    if a.command in ("finetune", "evaluate", "pretrain", "embed"):
        from .data.labels import read_labels_csv

        multiclass = getattr(a, "multiclass", False) or a.command == "embed" and not a.positive
        for attr in ("labels", "probe_labels"):
            if getattr(a, attr, None) and not str(a.data).endswith(".npz"):
                read_labels_csv(getattr(a, attr), a.data, a.positive, getattr(a, "allow_outside", False),
                                getattr(a, "negative", None), multiclass)
    if getattr(a, "pairs", None):
        from .data.labels import read_pairs_csv

        read_pairs_csv(a.pairs, a.data)
    if getattr(a, "files", None):
        from .data.discover import Selection

        Selection.make(files=a.files).listed()


def main(argv=None) -> int:
    from .timebudget import now

    started = now()  # `pretrain --time` counts from here: importing torch and decoding are part of the asked time
    warnings.filterwarnings("ignore", module="monai")
    ap = build_parser()
    a = ap.parse_args(argv)
    if not a.command:
        ap.print_help()
        return 1
    progress = "off" if a.quiet else True  # True: a bar on a terminal, lines elsewhere, or MEDCL_PROGRESS
    if getattr(a, "cache_dir", None):  # read by every command (and torchrun's other ranks) through the environment
        os.environ["MEDCL_CACHE"] = a.cache_dir
    try:
        _preflight(a)
        COMMANDS[a.command].run(a, progress, started)
    except MedclError as e:
        print(f"medcl {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medcl {a.command}: interrupted{INTERRUPTED.get(a.command, '')}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
