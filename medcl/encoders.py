"""Encoders: a MONAI network from the registry (medcl.networks) as pooled features, and a strict export/load of its
weights."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError
from .networks import ENCODERS, encoder_names

ENCODER_FORMAT = "medcl-encoder-v1"
ENCODER_NAMES = encoder_names()


def resolve_stem(stem: str, size: int) -> str:
    return stem if stem != "auto" else ("small" if size <= 32 else "standard")


class Encoder(nn.Module):
    """A MONAI network without its classifier: (B, C, *S) -> (B, feat_dim) pooled features, built by name from the
    registry in medcl.networks (resnet10-50, densenet121, efficientnet-b0, vit, swin). `spatial_dims` makes any of
    them 2D or 3D. `spec` rebuilds it: Encoder(**spec). `cam_layer` names the layer Grad-CAM reads (None for
    transformers)."""

    def __init__(self, name: str = "resnet18", spatial_dims: int = 2, in_channels: int = 1, stem: str = "small",
                 widen_factor: float = 1.0, **options):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder '{name}' (choose from {', '.join(ENCODERS)})")
        common = dict(name=name, spatial_dims=spatial_dims, in_channels=in_channels, stem=stem,
                      widen_factor=widen_factor)
        built = ENCODERS[name](**common, **options)
        self.net, self.feat_dim, self.cam_layer, self._features = built.net, built.feat_dim, built.cam_layer, \
            built.features
        self.spec = {**common, **built.spec}

    # ViT pieces, used by forward and by MAE (which encodes only the visible tokens)
    def embed_tokens(self, x):
        """Patch tokens with positions: (B, C, *S) -> (B, N, width); crops of another size get interpolated
        positions."""
        pe = self.net.patch_embedding
        t = pe.patch_embeddings(x).flatten(2).transpose(1, 2)
        pos = pe.position_embeddings
        grid = [s // self.spec["patch_size"] for s in x.shape[2:]]
        if grid != [self.grid] * len(grid):
            d = len(grid)
            pos = pos.transpose(1, 2).reshape(1, -1, *[self.grid] * d)
            pos = F.interpolate(pos, size=grid, mode="bilinear" if d == 2 else "trilinear", align_corners=False)
            pos = pos.flatten(2).transpose(1, 2)
        return pe.dropout(t + pos)

    def encode_tokens(self, t):
        for blk in self.net.blocks:
            t = blk(t)
        return self.net.norm(t)

    @property
    def grid(self) -> int:
        """ViT: patches per side at the size it was built for."""
        return self.spec["img_size"] // self.spec["patch_size"]

    def forward(self, x):
        return self._features(self, x) if self._features is not None else self.net(x).flatten(1)


def encoder_spec(cfg, size: int | None = None) -> dict:
    """Encoder(**spec) arguments from a MedclConfig."""
    size = size or cfg.data.size
    e = cfg.encoder
    return dict(name=e.name, spatial_dims=cfg.data.dims, in_channels=cfg.data.channels,
                stem=resolve_stem(e.stem, size), widen_factor=e.widen_factor, img_size=size, patch_size=e.patch_size,
                depth=e.depth, width=e.width, swin_feature_size=e.swin_feature_size, shortcut=e.shortcut,
                bias_downsample=e.bias_downsample)


def build_encoder(cfg, size: int | None = None) -> Encoder:
    """From a MedclConfig."""
    return Encoder(**encoder_spec(cfg, size))


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
                                  f"(it may run code when unpickled). Only load files you trust with other tools. "
                                  f"({msg})") from None
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {msg}).") from None


def export_encoder(encoder: Encoder, path, extra: dict | None = None) -> None:
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    atomic_save({"format": ENCODER_FORMAT, "spec": dict(encoder.spec), "extra": extra or {}, "state_dict": state}, path)


def resolve_encoder_file(checkpoint) -> Path:
    p = Path(checkpoint)
    if p.is_dir():
        if (p / "encoder.pt").is_file():
            return p / "encoder.pt"
        raise CheckpointError(f"{p} has no encoder.pt: pass a pretrain run folder (medcl pretrain --out) or its "
                              f"encoder file.")
    return p


def load_encoder(checkpoint) -> tuple[Encoder, dict]:
    """Load an exported encoder strictly. Returns (encoder, extra) where extra holds the data settings it was
    trained with."""
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
