"""`medcl export`: a fine-tuned classifier as one `.pt2` file that plain PyTorch runs, without medcl.

torch.export rather than TorchScript: TorchScript is in maintenance in PyTorch 2.x, while an ExportedProgram is the
supported, serialisable form (torch.export.save / torch.export.load), with the batch dimension kept dynamic. The
file maps a preprocessed batch (N, C, *[size]*dims), intensities in [0, 1] as medcl prepares them, to class
probabilities (N, classes). What preprocessing, which classes, and which threshold are in the file's `medcl.json`
(torch.export.load(path, extra_files={"medcl.json": ""})).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import MedclError, RunDirError

EXPORT_FORMAT = "medcl-export-v1"


class Probabilities(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), 1)


def export_classifier(classifier, out, overwrite: bool = False, log=print) -> Path:
    from .predict import load_classifier

    out = Path(out)
    if out.suffix != ".pt2":
        raise MedclError(f"--out {out}: name the file *.pt2 (a torch.export program).")
    if out.exists() and not overwrite:
        raise RunDirError(f"{out} already exists. Pass --overwrite to replace it, or choose another --out.")
    clf = load_classifier(classifier)
    prep = clf.preprocessing
    dims, size, channels = prep.dims, prep.size, prep.channels
    module = Probabilities(clf.model).eval()
    example = torch.rand((2,) + prep.input_shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
    meta = {"format": EXPORT_FORMAT, "medcl_version": __version__, "classes": clf.classes,
            "threshold": clf.threshold, "threshold_rule": clf.threshold_rule, "operating_point": clf.operating_point,
            "input": {"shape": ["N", channels] + [size] * dims, "dims": dims, "size": size, "channels": channels,
                      "intensity": prep.intensity, "range": [0.0, 1.0]},
            "output": "probabilities (N, classes); the last class is the diseased one in a binary task"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.pt2")  # torch's loader wants the .pt2 ending; renamed when checked
    torch.export.save(program, tmp, extra_files={"medcl.json": json.dumps(meta)})
    # the file must give the classifier's probabilities: check it before it takes the name
    check = torch.rand((3, channels) + (size,) * dims, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((torch.export.load(tmp).module()(check) - module(check)).abs().max())
    if not np.isfinite(diff) or diff > 1e-5:
        tmp.unlink()
        raise MedclError(f"the exported program differs from the classifier by {diff:.2e}; nothing written.")
    os.replace(tmp, out)
    log(f"wrote {out} (torch.export; max difference from the classifier {diff:.1e}). Run it without medcl:\n"
        f"  import torch; m = torch.export.load('{out}').module(); probabilities = m(x)  "
        f"# x: float32 {meta['input']['shape']}, preprocessed as in medcl.json")
    return out
