"""The view recipe as a list of MONAI transforms, in MONAI bundle syntax.

`views.transforms` is a list of `{_target_: Name, arg: value, ...}` items resolved by `monai.bundle.ConfigParser`
(so `@size`, `@dims`, `@spatial_size` (the view shape, [size] * dims), `@interp` (bilinear in 2D, trilinear
in 3D) and `$` expressions work as in a bundle). An empty list means the knob recipe (`crop_scale`,
`gamma`, ...), which `knob_transforms` writes out as the equivalent list. Each item becomes a `Spec`: the MONAI
transform object (the reference, and the fallback engine) plus its arguments with MONAI's own defaults filled in,
which the batched engine reads when it implements that transform.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import re
import warnings
from dataclasses import dataclass

from ..config import ViewsConfig, check_transform_items
from ..errors import ConfigError


@dataclass
class Spec:
    name: str  # the `_target_` as written
    args: dict  # resolved arguments, MONAI's defaults filled in
    transform: object  # the instantiated MONAI transform
    index: int  # position in the list (for messages)


def _interp(dims: int) -> str:
    return "bilinear" if dims == 2 else "trilinear"


def knob_transforms(cfg: ViewsConfig, dims: int) -> list:
    """The knob recipe as the equivalent MONAI list. The rotation comes first (about the scan's centre, zero
    padding), then flips, then the random resized crop: the batched engine fuses the three into one resampling."""
    lo, hi = cfg.crop_scale
    rad = math.radians(cfg.rotate_deg)
    out = []
    if rad > 0:
        out.append({"_target_": "RandAffine", "prob": 1.0, "rotate_range": [round(rad, 6)] * (1 if dims == 2 else 3),
                    "padding_mode": "zeros", "mode": "bilinear"})
    out += [{"_target_": "RandFlip", "prob": cfg.flip_prob, "spatial_axis": a} for a in range(dims)]
    out += [{"_target_": "RandScaleCrop", "roi_scale": round(lo ** (1 / dims), 6),
             "max_roi_scale": round(hi ** (1 / dims), 6), "random_size": True},
            {"_target_": "Resize", "spatial_size": "@spatial_size", "mode": _interp(dims)},
            {"_target_": "RandAdjustContrast", "prob": cfg.gamma_prob, "gamma": list(cfg.gamma)},
            {"_target_": "RandScaleIntensity", "prob": cfg.intensity_prob, "factors": cfg.intensity_scale},
            {"_target_": "RandShiftIntensity", "prob": cfg.intensity_prob, "offsets": cfg.intensity_shift},
            {"_target_": "RandGaussianNoise", "prob": cfg.noise_prob, "mean": 0.0, "std": cfg.noise_std},
            {"_target_": "RandGaussianSmooth", "prob": cfg.blur_prob, "sigma_x": list(cfg.blur_sigma),
             "sigma_y": list(cfg.blur_sigma), "sigma_z": list(cfg.blur_sigma)}]
    return out


SIZE_CLOSERS = ("Resize", "ResizeWithPadOrCrop")  # transforms that give every view one size


def _opens_size(name: str) -> bool:
    """A crop (RandScaleCrop, RandSpatialCrop, CenterSpatialCrop, CropForeground ...) leaves the view size open."""
    name = name.split(".")[-1]
    return "Crop" in name and name not in SIZE_CLOSERS


def closing_resize(items: list, dims: int) -> tuple[list, str | None]:
    """medcl owns the model's input size (data.size): a list whose last crop no resize follows gets a Resize to
    @spatial_size right after that crop (where the batched engine fuses the two). Returns (items, note or None)."""
    names = [str(it.get("_target_", "")).split(".")[-1] for it in items]
    last_open = max((i for i, n in enumerate(names) if _opens_size(n)), default=None)
    if last_open is None or any(n in SIZE_CLOSERS for n in names[last_open + 1:]):
        return items, None
    items = list(items)
    items.insert(last_open + 1, {"_target_": "Resize", "spatial_size": "@spatial_size", "mode": _interp(dims)})
    return items, (f"Resize to data.size added after {names[last_open]} (views.transforms[{last_open}]): the list "
                   f"left the view size open")


def recipe_list(cfg: ViewsConfig, dims: int) -> list:
    if not cfg.transforms:
        return knob_transforms(cfg, dims)
    return closing_resize(copy.deepcopy(list(cfg.transforms)), dims)[0]


def recipe_note(cfg: ViewsConfig, dims: int) -> str | None:
    """What medcl added to the user's list, for the engine report (None: the list runs as written)."""
    return closing_resize(list(cfg.transforms), dims)[1] if cfg.transforms else None


def _monai_names() -> list:
    import monai.transforms as T

    return [n for n in dir(T) if n[:1].isupper()]


def _quiet_monai():
    warnings.simplefilter("ignore")
    import monai.transforms  # noqa: F401
    from monai.data import set_track_meta

    set_track_meta(False)  # metadata tracking costs ~3x in 2D and views do not need it


def parse(items: list, dims: int, size: int, crop_scale: tuple | None = None) -> list:
    """Resolve a bundle-style list into Specs with MONAI's ConfigParser. `crop_scale` (an area share) replaces the
    first RandScaleCrop's scales: multi-crop's local views reuse the recipe with smaller crops."""
    from monai.bundle import ConfigParser

    check_transform_items(items)
    items = copy.deepcopy(list(items))
    if crop_scale is not None:
        crop = next((it for it in items if it["_target_"].split(".")[-1] == "RandScaleCrop"), None)
        if crop is None:
            raise ConfigError("multi-crop (method.local_crops) makes its small views by changing the recipe's "
                              "RandScaleCrop; add one to views.transforms, or set method.local_crops=0.")
        crop.update(roi_scale=crop_scale[0] ** (1 / dims), max_roi_scale=crop_scale[1] ** (1 / dims), random_size=True)
    with warnings.catch_warnings():
        _quiet_monai()
        parser = ConfigParser({"size": size, "dims": dims, "spatial_size": [size] * dims, "interp": _interp(dims),
                               "transforms": items})
        specs = []
        for i, it in enumerate(items):
            name = it["_target_"]
            where = f"views.transforms[{i}] ({name})"
            try:
                item = parser.get_parsed_content(f"transforms#{i}", instantiate=False)
                args = {k: v for k, v in item.get_config().items() if not k.startswith("_")}
                obj = item.instantiate()
            except ModuleNotFoundError:
                close = difflib.get_close_matches(name.split(".")[-1], _monai_names(), n=1, cutoff=0.4)
                hint = f" Did you mean '{close[0]}'?" if close else " See monai.transforms for the names."
                raise ConfigError(f"{where}: no MONAI transform is called '{name}'.{hint}") from None
            except Exception as e:  # MONAI's own argument checks: keep the innermost message, say which item
                raise ConfigError(f"{where}: {_reason(e, name)}") from None
            if not callable(obj):
                raise ConfigError(f"{where}: '{name}' is not a transform (not callable).")
            defaults = {}
            try:
                for p in inspect.signature(type(obj)).parameters.values():
                    if p.default is not inspect.Parameter.empty:
                        defaults[p.name] = p.default
            except (TypeError, ValueError):
                pass
            specs.append(Spec(name.split(".")[-1], {**defaults, **args}, obj, i))
    return specs


def _reason(e: Exception, name: str) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    bad = re.search(r"unexpected keyword argument '(\w+)'", msg)
    if bad:
        import monai.transforms as T

        params = list(inspect.signature(getattr(T, name.split(".")[-1], None) or (lambda: None)).parameters)
        close = difflib.get_close_matches(bad.group(1), params, n=1, cutoff=0.5)
        msg = f"{name} has no argument '{bad.group(1)}'." + (f" Did you mean '{close[0]}'?" if close else
                                                              f" Its arguments: {', '.join(params)}.")
    return msg


def as_yaml(items: list) -> str:
    """`views: {transforms: [...]}` with one transform per line, ready to paste into a recipe."""
    import yaml

    lines = ["views:", "  transforms:"]
    for it in items:
        lines.append("  - " + yaml.safe_dump(it, sort_keys=False, default_flow_style=True, width=10_000).strip())
    return "\n".join(lines) + "\n"
