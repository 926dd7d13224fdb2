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


def prepare_out_dir(out, data=None, resume: bool = False, overwrite: bool = False, marker: str = "config.yaml",
                    resumable: bool | None = None) -> Path:
    """Create `out` for a new run, or check it for --resume. Raises RunDirError with what to do instead.
    resumable: whether the command has --resume to offer (default: pretrain runs, whose marker is config.yaml)."""
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
    if resume:
        if not (out / marker).is_file():
            raise RunDirError(f"--resume: {out} holds no run to resume (no {marker}). Start it without --resume.")
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            resumable = marker == "config.yaml" if resumable is None else resumable
            again = "Pass --resume to continue that run, --overwrite to replace it" if resumable else \
                "Pass --overwrite to replace it"
            raise RunDirError(f"{out} already exists and is not empty. {again}, or choose another --out.")
        if any((out / m).is_file() for m in (OUT_MARKER, "config.yaml", "metrics.json", "embeddings.npz", "results.csv",
                                         "demo.json", "to_label.csv", "predictions.csv", "views.png", "runs.jsonl")):
            shutil.rmtree(out)
        else:
            raise RunDirError(f"--overwrite refused: {out} does not look like a medcl output folder; delete it yourself.")
    out.mkdir(parents=True, exist_ok=True)
    # written first, so that a run stopped before its first output (a Ctrl-C while the cache builds) is still known
    # as medcl's, and --overwrite can replace it
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
