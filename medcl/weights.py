"""Existing weights: a start for pretraining (`pretrain --init`), a control (`evaluate --compare`), a --checkpoint.

WEIGHTS is a file, a medcl run folder, or a name resolved from the standard local caches (never downloaded):
- a medcl `encoder.pt` or the run folder holding it (any medcl encoder);
- a ResNet state dict in torchvision/timm names (`conv1.weight`, `layer1.0.conv1.weight`, `fc.*`), 2D or 3D;
- a MONAI MedicalNet `.pth` (`{"state_dict": {"module.conv1.weight": ...}}`, shortcut A or B);
- a Lightning checkpoint of lightly or solo-learn (`state_dict` with the ResNet under `backbone.`, by name or as
  lightly's `nn.Sequential(*children)` indices), whatever else the file holds.
The file decides the architecture (depth, width, stem, shortcut); only its input channels adapt to the scans.

Nothing here imports torch at module level: a name that is not in the cache fails in a second, before torch loads.
"""
from __future__ import annotations

import hashlib
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ConfigError

# name -> (cache, repository in that cache, file names it may have there, where to get it)
NAMED = {
    "torchvision:resnet18": ("torch", "", ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
                             "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    "torchvision:resnet50": ("torch", "", ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", "resnet50-19c8e357.pth"),
                             "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    **{f"medicalnet:resnet{d}": ("hf", f"TencentMedicalNet/MedicalNet-Resnet{d}",
                                 (f"resnet_{d}_23dataset.pth", f"resnet_{d}.pth"),
                                 f"https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{d}")
       for d in (10, 18, 34, 50)},
}
# the Encoder arguments a weights file decides (config key: encoder.<key>)
ARCHITECTURE = ("name", "stem", "widen_factor", "shortcut", "bias_downsample", "patch_size", "depth", "width",
                "swin_feature_size")
# lightly's backbone: nn.Sequential(*list(resnet.children())[:-1]) numbers the children
_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_TRUNK = re.compile(r"(conv1|bn1|layer[1-4])\.")


def is_name(source) -> bool:
    return str(source).split(":")[0] in ("torchvision", "medicalnet") and ":" in str(source)


def torch_cache() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _cached(name: str) -> tuple[Path | None, str]:
    """(the cached file or None, where it belongs)."""
    cache, repo, files, _ = NAMED[name]
    if cache == "torch":
        hits = [torch_cache() / f for f in files]
        where = f"{torch_cache()}/{files[0]}"
    else:
        snaps = hf_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
        hits = [p for f in files for p in sorted(snaps.glob(f"*/{f}"))]
        where = f"{snaps}/<revision>/{files[0]} (the Hugging Face cache layout)"
    return next((p for p in hits if p.is_file()), None), where


def resolve(source, flag: str = "weights") -> Path:
    """The file (or run folder) WEIGHTS names; torch-free, so a missing one fails before torch loads."""
    s = str(source)
    if is_name(s):
        if s not in NAMED:
            raise CheckpointError(f"{flag} {s}: unknown name; medcl knows {', '.join(NAMED)} (or pass a file)")
        path, where = _cached(s)
        if path is None:
            raise CheckpointError(f"{flag} {s}: not in the local cache and medcl never downloads weights: put the "
                                  f"file from {NAMED[s][3]} at {where}, or pass its path")
        return path
    p = Path(s)
    if p.is_dir():
        if (p / "encoder.pt").is_file():
            return p / "encoder.pt"
        raise CheckpointError(f"{flag} {p}: a folder without encoder.pt; pass a medcl pretrain run, a weights file "
                              f"or one of {', '.join(NAMED)}")
    if not p.is_file():
        raise CheckpointError(f"{flag} not found: {p} (a weights file, a medcl pretrain run, or one of "
                              f"{', '.join(NAMED)})")
    return p


def label(source) -> str:
    """How results name an external encoder: `external:<name or file stem>`."""
    s = str(source).rstrip("/")
    if is_name(s):
        return f"external:{s.split(':', 1)[1]}"
    p = Path(s)
    return f"external:{p.parent.name if p.name == 'encoder.pt' else p.stem if p.is_file() else p.name}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Weights:
    """A weights file read into medcl's Encoder names: `state` fits Encoder(**spec) up to the input channels."""
    source: str
    path: Path
    layout: str
    spec: dict
    state: dict
    ignored: list = field(default_factory=list)  # the file's tensors outside the encoder (its head, a momentum copy)
    extra: dict = field(default_factory=dict)  # a medcl encoder's `extra` (its preprocessing under `data`)
    sha256: str = ""

    @property
    def dims(self) -> int:
        return int(self.spec["spatial_dims"])

    def record(self) -> dict:
        """What a run or an evaluation says it started from / compared against."""
        return {"weights": self.source, "path": str(self.path.resolve()), "sha256": self.sha256, "layout": self.layout,
                "ignored": len(self.ignored)}


def _inert_class(full_name: str):
    """A stand-in for a class or function the file names: it holds the state it is given and runs nothing."""

    class Inert(dict):
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.args = args

        def __setstate__(self, state):
            self.state = state

        def append(self, item):
            self.setdefault("items", []).append(item)

        def extend(self, items):
            self.setdefault("items", []).extend(items)

    Inert.__qualname__ = Inert.__name__ = f"Inert[{full_name}]"
    return Inert


def _inert_pickle_module():
    """A pickle module whose unpickler resolves only what torch's weights_only loader allows; every other global (a
    Lightning AttributeDict, an OmegaConf config, argparse.Namespace, ...) becomes an inert stand-in, never imported."""
    import pickle

    from torch._weights_only_unpickler import _get_allowed_globals

    allowed, made = _get_allowed_globals(), {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            return made.setdefault(full, _inert_class(full))

    return types.SimpleNamespace(Unpickler=Unpickler, load=lambda f, **kw: Unpickler(f, **kw).load(),
                                 __name__="medcl_inert_pickle")


def load_file(path: Path):
    """torch.load with weights_only=True; a file that also holds other Python objects (a Lightning checkpoint's
    hyperparameters) is read with those objects as inert stand-ins, so nothing in it runs."""
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_inert_pickle_module())
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e)[:200]})") from None


def _state_of(obj) -> tuple[dict, str]:
    """The tensors of a file, unwrapped from a checkpoint's `state_dict` (Lightning, MedicalNet) or `model`."""
    import torch

    layout = "state dict"
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                layout = "Lightning checkpoint" if "pytorch-lightning_version" in obj or "epoch" in obj else key
                obj = obj[key]
                break
    state = {str(k): v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, dict) else {}
    return state, layout


def _trunk_prefix(state: dict, path: Path) -> tuple[str, bool]:
    """(prefix, numbered) of the ResNet in a state dict: '' (torchvision/timm), 'module.' (MedicalNet), 'backbone.'
    (solo-learn, lightly), 'net.' (medcl); numbered for lightly's nn.Sequential. The most tensors win, then the
    shortest prefix, so `backbone.` is chosen over `momentum_backbone.`."""
    found = {}
    for k, v in state.items():
        if v.ndim not in (4, 5):
            continue
        if k.endswith("conv1.weight") and f"{k[:-len('conv1.weight')]}layer1.0.conv1.weight" in state:
            found[k[:-len("conv1.weight")]] = False
        elif k.endswith("0.weight") and f"{k[:-len('0.weight')]}4.0.conv1.weight" in state:
            found[k[:-len("0.weight")]] = True
    if not found:
        first = ", ".join(list(state)[:3])
        raise CheckpointError(f"{path}: no ResNet found (no conv1 + layer1 tensors; first keys: {first}); medcl reads "
                              f"ResNet weights from other tools and any encoder from medcl runs")
    prefix = min(found, key=lambda p: (-sum(k.startswith(p) for k in state), len(p)))
    return prefix, found[prefix]


def _rename(rest: str, numbered: bool) -> str:
    if numbered:
        head, _, tail = rest.partition(".")
        return f"{_SEQUENTIAL[head]}.{tail}" if head in _SEQUENTIAL else rest
    return rest


def _resnet_spec(c: dict, path: Path) -> dict:
    """Encoder arguments from ResNet tensors in torchvision names."""
    from .networks import RESNET_DEPTHS

    conv1 = c["conv1.weight"]
    bottleneck = "layer1.0.conv3.weight" in c
    layers = [len({k.split(".")[1] for k in c if k.startswith(f"layer{n}.")}) for n in (1, 2, 3, 4)]
    name = next((n for n, (b, ls) in RESNET_DEPTHS.items() if ls == layers and (b == "bottleneck") == bottleneck), None)
    if name is None:
        raise CheckpointError(f"{path}: a ResNet with {layers} {'bottleneck' if bottleneck else 'basic'} blocks is not "
                              f"one medcl builds ({', '.join(RESNET_DEPTHS)})")
    stems = {7: "standard", 3: "small"}
    if conv1.shape[2] not in stems:
        raise CheckpointError(f"{path}: a first convolution of {conv1.shape[2]} pixels; medcl's ResNet stems are 7 "
                              f"(standard) and 3 (small)")
    return dict(name=name, spatial_dims=conv1.ndim - 2, in_channels=int(conv1.shape[1]), stem=stems[conv1.shape[2]],
                widen_factor=conv1.shape[0] / 64, shortcut="B" if "layer2.0.downsample.0.weight" in c else "A",
                bias_downsample="layer2.0.downsample.0.bias" in c)


def read_weights(source, flag: str = "weights") -> Weights:
    """Read WEIGHTS (see the module docstring) into Encoder names and arguments."""
    from .encoders import ENCODER_FORMAT

    path = resolve(source, flag)
    obj = load_file(path)
    digest = sha256(path)
    if isinstance(obj, dict) and obj.get("format") == ENCODER_FORMAT:
        return Weights(str(source), path, "medcl encoder", dict(obj["spec"]), dict(obj["state_dict"]),
                       extra=dict(obj.get("extra", {})), sha256=digest)
    state, layout = _state_of(obj)
    if not state:
        raise CheckpointError(f"{path}: holds no tensors; pass a weights file (a state dict or a checkpoint)")
    prefix, numbered = _trunk_prefix(state, path)
    trunk, ignored = {}, []
    for k, v in state.items():
        rest = _rename(k[len(prefix):], numbered) if k.startswith(prefix) else None
        if rest is not None and _TRUNK.match(rest):
            trunk[rest] = v
        else:
            ignored.append(k)
    if prefix == "module." and trunk["conv1.weight"].ndim == 5:
        layout = "MedicalNet"
    elif not prefix and layout == "state dict":
        layout = "torchvision/timm state dict"
    where = f" under '{prefix}'" if prefix else ""
    return Weights(str(source), path, f"{layout}, ResNet{where}", _resnet_spec(trunk, path),
                   {f"net.{k}": v for k, v in trunk.items()}, ignored=ignored, sha256=digest)


def _adapt(t, shape):
    """A first convolution between RGB and grayscale (summed over colour; repeated over RGB / 3), or None."""
    if t.ndim < 4 or t.shape[:1] + t.shape[2:] != shape[:1] + shape[2:]:
        return None, ""
    if (t.shape[1], shape[1]) == (3, 1):
        return t.sum(1, keepdim=True), "RGB first convolution summed over colour for grayscale scans"
    if (t.shape[1], shape[1]) == (1, 3):
        return t.repeat(1, 3, *[1] * (t.ndim - 2)) / 3, "grayscale first convolution repeated over RGB / 3"
    return None, ""


def load_into(encoder, w: Weights) -> dict:
    """Every tensor of the encoder from `w`, strictly: refused (one line, the first mismatches) when a shape differs
    beyond the input channels, or when any encoder tensor is missing. Returns the counts a run records."""
    target = encoder.state_dict()
    need = [k for k in target if not k.endswith("num_batches_tracked")]  # older files lack BatchNorm's counter
    loaded, adapted, wrong = {}, [], []
    for k, v in target.items():
        if k not in w.state:
            continue
        t = w.state[k]
        if t.shape != v.shape:
            t, note = _adapt(t, v.shape)
            if t is None:
                wrong.append(f"{k} {tuple(w.state[k].shape)} vs {tuple(v.shape)}")
                continue
            adapted.append(note)
        loaded[k] = t.to(v.dtype)
    missing = [k for k in need if k not in loaded and k not in {m.split(" ")[0] for m in wrong}]
    extra = [k for k in w.state if k not in target]
    if wrong or missing or extra:
        what = "; ".join(filter(None, [f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
                                       f"missing: {', '.join(missing[:3])}" if missing else "",
                                       f"not in the encoder: {', '.join(extra[:3])}" if extra else ""]))
        raise CheckpointError(f"{w.path}: {len(need) - len(missing) - len(wrong)} of the encoder's {len(need)} "
                              f"tensors match ({what})")
    encoder.load_state_dict({**target, **loaded}, strict=True)
    return {"loaded": sum(not k.endswith("num_batches_tracked") for k in loaded), "of": len(need),
            "adapted": sorted(set(adapted))}


def build_encoder_from(w: Weights, in_channels: int | None = None):
    """The encoder the weights describe, loaded; its input channels adapted to `in_channels`. Returns (encoder,
    load report)."""
    from .encoders import Encoder

    enc = Encoder(**{**w.spec, "in_channels": int(in_channels or w.spec["in_channels"])})
    return enc, load_into(enc, w)


def apply_architecture(cfg, w: Weights, typed: dict | None = None, log=print) -> None:
    """`--init`: the weights decide the encoder (folder defaults and recipes give way, and the run says so); a value
    the user typed with --set that contradicts the file is an error; 2D weights into a 3D run (or back) too."""
    from .encoders import resolve_stem

    if w.dims != cfg.data.dims:
        raise ConfigError(f"--init {w.source}: {w.dims}D weights, but this run is {cfg.data.dims}D (data.dims); "
                          f"start a {w.dims}D run (--dims {w.dims}) or choose {cfg.data.dims}D weights")
    typed = (typed or {}).get("encoder", {})
    e, changed = cfg.encoder, []
    for key in ARCHITECTURE:
        if key not in w.spec and key not in ("shortcut", "bias_downsample"):
            continue
        want = w.spec.get(key, {"shortcut": "B", "bias_downsample": True}.get(key))
        have = resolve_stem(e.stem, cfg.data.size) if key == "stem" else getattr(e, key)
        if have == want:
            continue
        if key in typed:
            raise ConfigError(f"--set encoder.{key}={typed[key]!r} contradicts --init {w.source}, which holds "
                              f"{key} {want!r}; drop the --set (the weights decide the architecture)")
        changed.append(f"{key} {want!r} (was {have!r})")
        setattr(e, key, want)
    if changed:
        log(f"--init {w.source} decides the encoder: {', '.join(changed)}")


def open_checkpoint(checkpoint, data, select=None, log=print) -> tuple:
    """(encoder, extra) for a command's --checkpoint: a medcl run as always, or WEIGHTS from another tool, which
    read the scans with the folder's default preprocessing (medcl.auto) and adapt their input channels to them."""
    from .auto import auto_settings, folder_profile
    from .data.preprocessing import Preprocessing

    w = read_weights(checkpoint, "--checkpoint")
    if w.layout == "medcl encoder":
        return build_encoder_from(w)[0], w.extra
    settings = Preprocessing.of(auto_settings(folder_profile(data, select, w.dims))["data"])
    encoder, report = build_encoder_from(w, settings.channels)
    log(f"--checkpoint {checkpoint}: {w.layout}; {report['loaded']} of {report['of']} encoder tensors loaded"
        + "".join(f"; {a}" for a in report["adapted"]) + f"; scans read at {settings.size} px, {settings.channels} "
        f"channel(s), as the folder defaults would")
    return encoder, {"data": settings.to_dict(), "external": {**w.record(), **report}}
