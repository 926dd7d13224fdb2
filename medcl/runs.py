"""Run folders: never overwrite without being asked, never write inside the user's data."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .errors import RunDirError


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


RESUME_OR_OVERWRITE = "--resume continues the run in --out and --overwrite replaces it: pass one of them"
OUT_MARKER = ".medcl"  # in every folder medcl creates for a run


# what a finished (or resumable) run leaves; a folder of medcl's without any of these holds nothing to lose
OUTPUTS = ("checkpoints/last.pt", "encoder.pt", "classifier.pt", "metrics.json", "embeddings.npz", "results.csv",
           "demo.json", "to_label.csv", "predictions.csv", "views.png")
MARKERS = (OUT_MARKER, "config.yaml", "settings.json", "runs.jsonl") + OUTPUTS


def holds_output(out: Path) -> bool:
    """Whether `out` holds anything a run produced: a checkpoint, a result, or an evaluation's finished rows."""
    runs = out / "runs.jsonl"
    return any((out / m).is_file() for m in OUTPUTS) or (runs.is_file() and runs.stat().st_size > 0)


NEVER_TRAINED = ("note: --resume: {out} never trained (its run stopped before its first checkpoint, e.g. on bad "
                 "input): starting it afresh with this command's settings")


def never_trained(out) -> bool:
    """A pretrain run folder whose run stopped before its first checkpoint (a failed start): nothing to resume."""
    out = Path(out)
    return (out / "config.yaml").is_file() and not holds_output(out)


def check_out_dir(out, data=None, resume: bool = False, overwrite: bool = False, marker: str = "config.yaml",
                  resumable: bool | None = None) -> str:
    """What prepare_out_dir would do, without touching anything (torch-free, so the CLI checks it in a second):
    'new', 'resume', 'reuse' (medcl's folder with no output yet: a failed start) or 'replace'. Raises RunDirError
    with what to do instead."""
    out = Path(out)
    if resume and overwrite:
        raise RunDirError(RESUME_OR_OVERWRITE)
    if data is not None:
        d = Path(data)
        if not d.exists():
            raise RunDirError(f"data not found: {d}")
        d = d if d.is_dir() else d.parent
        if _inside(out, d):
            raise RunDirError(f"--out {out} is inside the data folder {d}: medcl never writes into your data. "
                              "Choose an output folder elsewhere.")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder: choose a folder.")
    if resume:
        if not (out / marker).is_file():
            raise RunDirError(f"--resume: {out} holds no run to resume (no {marker}). Start it without --resume.")
        return "resume"
    if not out.exists() or not any(out.iterdir()):
        return "new"
    ours = any((out / m).is_file() for m in MARKERS)
    if ours and not holds_output(out):
        return "reuse"
    if not overwrite:
        resumable = marker == "config.yaml" if resumable is None else resumable
        again = "Pass --resume to continue that run, --overwrite to replace it" if resumable else \
            "Pass --overwrite to replace it"
        raise RunDirError(f"{out} already exists and is not empty. {again}, or choose another --out.")
    if not ours:
        raise RunDirError(f"--overwrite refused: {out} does not look like a medcl output folder; delete it yourself.")
    return "replace"


def prepare_out_dir(out, data=None, resume: bool = False, overwrite: bool = False, marker: str = "config.yaml",
                    resumable: bool | None = None, log=print) -> Path:
    """Create `out` for a new run, or check it for --resume. Raises RunDirError with what to do instead.
    resumable: whether the command has --resume to offer (default: pretrain runs, whose marker is config.yaml).
    A folder medcl made whose run failed before its first output is reused without --overwrite."""
    out = Path(out)
    action = check_out_dir(out, data, resume, overwrite, marker, resumable)
    if action == "resume":
        return out
    if action == "reuse":
        log(f"note: {out} holds only what a run that stopped before its first output left (no checkpoint or "
            f"result): reusing it")
    if action in ("reuse", "replace"):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # written first, so that a run stopped before its first output (a Ctrl-C while the cache builds) is still known
    # as medcl's, and the next command can reuse it
    (out / OUT_MARKER).write_text("written by medcl: this folder is a medcl output, which --overwrite may replace\n")
    return out


def _json_safe(v):
    """NaN/Inf -> null (JSON has no NaN), numpy scalars/arrays -> Python, tuples -> lists."""
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):  # numpy scalar or array
        return _json_safe(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path, obj) -> None:
    """Always valid JSON: an undefined metric (a single-class test set, say) is written as null, never NaN."""
    Path(path).write_text(json.dumps(_json_safe(obj), indent=2, allow_nan=False))


# each command's own output in --out (what --resume looks for, where a command offers it)
COMMAND_OUTPUTS = {"pretrain": "config.yaml", "evaluate": "results.csv", "finetune": "metrics.json",
                   "embed": "embeddings.npz", "select": "to_label.csv", "predict": "predictions.csv",
                   "views": "views.png", "demo": "demo.json"}


def folder_kind(p) -> str | None:
    """Which command's output a folder is ('pretrain', 'finetune', 'evaluate', ...), from its files; None if unknown.
    A run still in progress counts too (a checkpoint, an evaluation's settings)."""
    p = Path(p)
    if not p.is_dir():
        return None
    kinds = [("finetune", "classifier.pt"), ("pretrain", "encoder.pt"), ("pretrain", "checkpoints/last.pt"),
             ("evaluate", "settings.json")] + [(kind, name) for kind, name in COMMAND_OUTPUTS.items()]
    return next((kind for kind, name in kinds if (p / name).is_file()), None)


def check_checkpoint_path(ck, command: str) -> None:
    """--checkpoint must be a pretrain run folder (or an encoder file): name what was passed instead, torch-free."""
    p = Path(ck)
    if not p.is_dir() or (p / "encoder.pt").is_file():
        return
    kind = folder_kind(p)
    if kind == "finetune":
        also = f", or pass it as --classifier {p}" if command == "embed" else ""
        raise RunDirError(f"--checkpoint {p} is a finetune output folder (classifier.pt), not a pretrain run: pass "
                          f"the pretrain run it was trained from{also}.")
    if kind == "pretrain":
        raise RunDirError(f"--checkpoint {p} is a pretrain run that has not finished (no encoder.pt yet): let it "
                          f"finish, or continue it with `medcl pretrain DATA --out {p} --resume`.")
    what = f"a `medcl {kind}` output folder" if kind else "a folder without encoder.pt"
    raise RunDirError(f"--checkpoint {p} is {what}: pass a pretrain run folder (medcl pretrain --out) or its "
                      f"encoder.pt.")


def check_classifier_path(clf) -> None:
    """--classifier must be a finetune output folder (or its classifier.pt)."""
    p = Path(clf)
    if not p.is_dir() or (p / "classifier.pt").is_file():
        return
    kind = folder_kind(p)
    if kind == "pretrain":
        raise RunDirError(f"--classifier {p} is a pretrain run folder, not a classifier: pass its finetune folder "
                          f"(made by `medcl finetune --checkpoint {p} ... --out FT_DIR`).")
    what = f"a `medcl {kind}` output folder" if kind else "a folder without classifier.pt"
    raise RunDirError(f"--classifier {p} is {what}: pass a `medcl finetune` output folder.")
