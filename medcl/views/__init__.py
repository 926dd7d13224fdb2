"""Augmented views: one recipe, two engines.

The recipe is a list of MONAI transforms (`views.transforms`, bundle syntax; empty: the knob recipe written out as
its equivalent list, see `recipe.knob_transforms`).

- `monai_transform`: the list as a MONAI `Compose`, per sample on CPU (the reference; runs in DataLoader workers).
- `BatchedViews`: the same list for a whole batch on the training device (`batched.Plan`): the transforms it
  implements run as batched tensor ops with MONAI's parameter meanings, the rest through MONAI per sample. On a GPU
  this keeps augmentation off the critical path (CPU workers cannot feed a modern GPU).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ViewsConfig
from .batched import Plan, check_output, gaussian_blur
from .recipe import as_yaml, knob_transforms, parse, recipe_list, recipe_note

__all__ = ["BatchedViews", "TwoViewDataset", "monai_transform", "resolve_backend", "gaussian_blur", "knob_transforms",
           "recipe_list", "as_yaml", "engine_report"]


def specs_for(cfg: ViewsConfig, dims: int, size: int, crop_scale: tuple | None = None) -> list:
    return parse(recipe_list(cfg, dims), dims, size, crop_scale)


def monai_transform(cfg: ViewsConfig, dims: int, size: int, crop_scale: tuple | None = None):
    """Per-sample MONAI pipeline: channel-first array/tensor -> augmented tensor of shape (C, *[size]*dims)."""
    from monai.transforms import Compose

    return Compose([s.transform for s in specs_for(cfg, dims, size, crop_scale)])


class BatchedViews:
    """The view recipe applied to a whole batch on its own device. Call with a (B, C, *[in_size]*dims) tensor in
    [0, 1]; views come out at `size` (in_size defaults to size). `crop_scale` (an area share) replaces the recipe's
    crop scale: multi-crop's small local views (size: the local size, in_size: data.size)."""

    def __init__(self, cfg: ViewsConfig, dims: int, size: int, crop_scale: tuple | None = None,
                 in_size: int | None = None):
        self.cfg, self.dims, self.size = cfg, dims, size
        self.plan = Plan(specs_for(cfg, dims, size, crop_scale), dims, size, in_size)
        note = recipe_note(cfg, dims)
        self.report = self.plan.report + ([f"note: {note}"] if note else [])
        check_output(self.plan, dims, size, in_size)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.plan(x, generator)


def engine_report(cfg: ViewsConfig, dims: int, size: int, backend: str) -> list:
    """A line per transform: which engine runs it."""
    if backend == "monai":
        note = recipe_note(cfg, dims)
        return [f"{s.name}: MONAI, per sample in the DataLoader workers" for s in specs_for(cfg, dims, size)] + \
            ([f"note: {note}"] if note else [])
    return BatchedViews(cfg, dims, size).report


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) % (2**32) for p in parts]).generate_state(1)[0])


class TwoViewDataset(torch.utils.data.Dataset):
    """Two MONAI-augmented views per item. Randomness is a function of (seed, epoch, index), so results do not
    depend on the number of workers and a resumed run sees the same views."""

    def __init__(self, scans, transform, seed: int = 0, partner=None):
        self.scans, self.transform, self.seed = scans, transform, seed
        self.epoch = 0
        self.partner = partner  # optional: index -> index of the positive partner (patient/neighbour positives)

    def __len__(self):
        return len(self.scans)

    def __getitem__(self, i):
        j = self.partner(i, self.epoch) if self.partner else i
        views = []
        for k, src in enumerate((i, j)):
            self.transform.set_random_state(seed=_seed(self.seed, self.epoch, i, k))
            x = torch.as_tensor(self.scans.batch([src])[0])
            views.append(torch.as_tensor(self.transform(x)).float().contiguous())
        return views[0], views[1], i


def resolve_backend(cfg: ViewsConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "batched"
