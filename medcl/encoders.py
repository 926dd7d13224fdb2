"""Encoders: MONAI networks by name and spatial_dims, and a strict export/load of the encoder weights."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

ENCODER_FORMAT = "medcl-encoder-v1"
_DEPTHS = {"resnet10": ("basic", [1, 1, 1, 1]), "resnet18": ("basic", [2, 2, 2, 2]),
           "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3])}


def resolve_stem(stem: str, size: int) -> str:
    return stem if stem != "auto" else ("small" if size <= 32 else "standard")


class Encoder(nn.Module):
    """A MONAI ResNet without its classifier: (B, C, *S) -> (B, feat_dim) pooled features."""

    def __init__(self, name: str = "resnet18", spatial_dims: int = 2, in_channels: int = 1, stem: str = "small",
                 widen_factor: float = 1.0):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from monai.networks.nets import ResNet
        if name not in _DEPTHS:
            raise ValueError(f"unknown encoder '{name}' (choose from {', '.join(_DEPTHS)})")
        block, layers = _DEPTHS[name]
        # MONAI's default stem is 7x7 with stride 1: ~4x the cost of torchvision's stride 2 at 224 px.
        # 'small' (3x3, stride 1, no max-pool) keeps detail for 28-64 px inputs; 'standard' downsamples by 4.
        small = stem == "small"
        self.net = ResNet(block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=spatial_dims,
                          n_input_channels=in_channels, conv1_t_size=3 if small else 7,
                          conv1_t_stride=1 if small else 2, no_max_pool=small, widen_factor=widen_factor,
                          feed_forward=False)
        self.spec = dict(name=name, spatial_dims=spatial_dims, in_channels=in_channels, stem=stem,
                         widen_factor=widen_factor)
        self.feat_dim = int(512 * widen_factor) * (4 if block == "bottleneck" else 1)

    def forward(self, x):
        return self.net(x).flatten(1)


def build_encoder(cfg, size: int | None = None) -> Encoder:
    """From a MedclConfig."""
    size = size or cfg.data.size
    return Encoder(cfg.encoder.name, cfg.data.dims, cfg.data.channels, resolve_stem(cfg.encoder.stem, size),
                   cfg.encoder.widen_factor)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves a half file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def safe_load(path: str | os.PathLike, what: str = "checkpoint"):
    """torch.load with weights_only=True; a file with code in it is refused, not run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).split("\n")[0][:300]
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError(f"{path}: refused to load: the file contains Python objects beyond tensors "
                                  f"(it may run code when unpickled). Only load files you trust with other tools. ({msg})") from None
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {msg}).") from None


def export_encoder(encoder: Encoder, path, extra: dict | None = None) -> None:
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    atomic_save({"format": ENCODER_FORMAT, "spec": dict(encoder.spec), "extra": extra or {}, "state_dict": state}, path)


def resolve_encoder_file(checkpoint) -> Path:
    p = Path(checkpoint)
    if p.is_dir():
        if (p / "encoder.pt").is_file():
            return p / "encoder.pt"
        raise CheckpointError(f"{p} has no encoder.pt: pass a pretrain run folder (medcl pretrain --out) or its encoder file.")
    return p


def load_encoder(checkpoint) -> tuple[Encoder, dict]:
    """Load an exported encoder strictly. Returns (encoder, extra) where extra holds the data settings it was trained with."""
    path = resolve_encoder_file(checkpoint)
    obj = safe_load(path, "encoder file")
    if not isinstance(obj, dict) or obj.get("format") != ENCODER_FORMAT:
        raise CheckpointError(f"{path} is not a medcl encoder file (expected format {ENCODER_FORMAT}); "
                              "export one with medcl pretrain, or pass the run folder.")
    enc = Encoder(**obj["spec"])
    missing, unexpected = enc.load_state_dict(obj["state_dict"], strict=False)
    if missing or unexpected:  # strict, with a message that names the keys
        raise CheckpointError(f"{path}: encoder weights do not match the network "
                              f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}).")
    return enc, obj.get("extra", {})


def open_encoder(checkpoint) -> Encoder:
    """`medcl.load_encoder`: the encoder of a pretrain run folder (or encoder.pt), loaded strictly with
    weights_only=True, in eval mode: `enc(tensor) -> features`. `enc.data_settings` is the preprocessing it was
    trained with (dims, size, channels, intensity)."""
    enc, extra = load_encoder(checkpoint)
    enc.data_settings = dict(extra.get("data", {}))
    return enc.eval()
