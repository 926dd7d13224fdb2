"""`medcl views`: what the encoder will be asked to match, before any GPU hour is spent.

A grid with one row per scan: the scan as the cache holds it, then N view pairs made by the run's own view engine
(middle slices in three orientations for volumes). Written as views.png and to TensorBoard, with the recipe as its
MONAI list and the engine each transform runs in.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .. import tensorboard as tb
from ..config import MedclConfig
from ..data.cache import build_cache
from ..data.discover import open_source, selection_of
from ..errors import MedclError
from ..runs import prepare_out_dir
from . import BatchedViews, _seed, as_yaml, engine_report, monai_transform, recipe_list


def preview(data, out, cfg: MedclConfig, n_scans: int = 6, n_pairs: int = 3, seed: int = 0, overwrite: bool = False,
            progress: bool = True, log=print) -> Path:
    out = prepare_out_dir(out, data, overwrite=overwrite, marker="views.png")
    d, size = cfg.data.dims, cfg.data.size
    source = open_source(data, d, cfg.data.npz_split, selection_of(cfg.data))
    rng = np.random.default_rng(seed)
    n = len(source.records)
    pick = np.sort(rng.choice(n, size=min(n_scans * 2, n), replace=False))  # spares for scans that cannot be read
    source = dataclasses.replace(source, records=[source.records[i] for i in pick])
    scans = build_cache(source, d, size, cfg.data.channels, cfg.data.intensity, strict=cfg.data.strict,
                        max_bad_fraction=1.0, progress=progress, log=log)
    if not len(scans):
        raise MedclError(f"{data}: none of the scans picked for the preview could be read (see the messages above).")
    keep = list(range(min(n_scans, len(scans))))
    x = torch.as_tensor(scans.batch(np.array(keep)))
    if cfg.views.backend == "monai":
        t = monai_transform(cfg.views, d, size)
        t.set_random_state(seed=_seed(seed, 1))
        report = engine_report(cfg.views, d, size, "monai")

        def make(batch, k):
            return torch.stack([torch.as_tensor(t(xi)).float() for xi in batch])
    else:
        bv = BatchedViews(cfg.views, d, size)
        report = bv.report

        def make(batch, k):
            return bv(batch, torch.Generator().manual_seed(_seed(seed, k)))
    views = [make(x, k) for k in range(2 * n_pairs)]  # view k of every scan
    rows = [[x[i]] + [v[i] for v in views] for i in range(len(keep))]
    grid = tb.picture_grid(rows, stretch=False)
    from skimage.io import imsave

    imsave(out / "views.png", (grid.transpose(1, 2, 0) * 255).round().astype(np.uint8), check_contrast=False)
    recipe = as_yaml(recipe_list(cfg.views, d))
    (out / "recipe.yaml").write_text(recipe)
    (out / "engines.txt").write_text("\n".join(report) + "\n")
    writer = tb.open_writer(out / "tb")
    writer.add_image("views/preview", grid, 0, dataformats="CHW")
    tb.log_text(writer, "views/recipe", "```\n" + recipe + "```")
    tb.log_text(writer, "views/engines", "\n".join(f"- {ln}" for ln in report))
    writer.close()
    names = [scans.records[i].key for i in keep]
    log(f"views of {len(keep)} scans ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): each row is the "
        f"scan as cached ({'x'.join([str(size)] * d)}), then {n_pairs} view pairs"
        + (" (three orthogonal middle slices per cell)" if d == 3 else ""))
    log("engines:\n" + "\n".join(f"  {ln}" for ln in report))
    log(f"wrote {out / 'views.png'}, {out / 'recipe.yaml'}, TensorBoard events in {out / 'tb'}")
    return out
