"""Encoders: MONAI networks by name and spatial_dims, and a strict export/load of the encoder weights."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

ENCODER_FORMAT = "medcl-encoder-v1"
_DEPTHS = {"resnet10": ("basic", [1, 1, 1, 1]), "resnet18": ("basic", [2, 2, 2, 2]),
           "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3])}
ENCODER_NAMES = tuple(_DEPTHS) + ("densenet121", "efficientnet-b0", "vit", "swin")
TRANSFORMERS = ("vit", "swin")
# EfficientNet-B0's stages (Tan & Le 2019, table 1), as MONAI's EfficientNetBN spells them. MONAI's EfficientNetBN fixes
# its "same" padding for 224 px; built through EfficientNet with the real image size, small scans work too.
_EFFICIENTNET_B0 = ["r1_k3_s11_e1_i32_o16_se0.25", "r2_k3_s22_e6_i16_o24_se0.25", "r2_k5_s22_e6_i24_o40_se0.25",
                    "r3_k3_s22_e6_i40_o80_se0.25", "r3_k5_s11_e6_i80_o112_se0.25", "r4_k5_s22_e6_i112_o192_se0.25",
                    "r1_k3_s11_e6_i192_o320_se0.25"]


def resolve_stem(stem: str, size: int) -> str:
    return stem if stem != "auto" else ("small" if size <= 32 else "standard")


class Encoder(nn.Module):
    """A MONAI network without its classifier: (B, C, *S) -> (B, feat_dim) pooled features.

    resnet10-50, densenet121 and efficientnet-b0 are CNNs; `vit` is MONAI's ViT (tokens mean-pooled) and `swin` the
    Swin transformer inside MONAI's SwinUNETR (its last stage, mean-pooled). `spatial_dims` makes any of them 2D or 3D.
    `cam_layer` names the layer Grad-CAM reads (None for transformers)."""

    def __init__(self, name: str = "resnet18", spatial_dims: int = 2, in_channels: int = 1, stem: str = "small",
                 widen_factor: float = 1.0, img_size: int = 0, patch_size: int = 4, depth: int = 6, width: int = 192,
                 swin_feature_size: int = 24):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from monai.networks import nets
        if name not in ENCODER_NAMES:
            raise ValueError(f"unknown encoder '{name}' (choose from {', '.join(ENCODER_NAMES)})")
        self.spec = dict(name=name, spatial_dims=spatial_dims, in_channels=in_channels, stem=stem,
                         widen_factor=widen_factor)
        d = spatial_dims
        small = stem == "small"
        self.cam_layer = "net.layer4"
        if name in _DEPTHS:
            block, layers = _DEPTHS[name]
            # MONAI's default stem is 7x7 with stride 1: ~4x the cost of torchvision's stride 2 at 224 px.
            # 'small' (3x3, stride 1, no max-pool) keeps detail for 28-64 px inputs; 'standard' downsamples by 4.
            self.net = nets.ResNet(block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=d,
                                   n_input_channels=in_channels, conv1_t_size=3 if small else 7,
                                   conv1_t_stride=1 if small else 2, no_max_pool=small, widen_factor=widen_factor,
                                   feed_forward=False)
            self.feat_dim = int(512 * widen_factor) * (4 if block == "bottleneck" else 1)
        elif name == "densenet121":
            self.net = nets.DenseNet121(spatial_dims=d, in_channels=in_channels, out_channels=1)
            if small:  # the 7x7/2 stem and max-pool leave nothing of a 28 px scan after the three transitions
                conv = nets.densenet.Conv[nets.densenet.Conv.CONV, d]
                self.net.features.conv0 = conv(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
                self.net.features.pool0 = nn.Identity()
            self.net.class_layers.out = nn.Identity()
            self.feat_dim, self.cam_layer = 1024, "net.features"
        elif name == "efficientnet-b0":
            self._needs_size(name, img_size)
            self.spec["img_size"] = img_size
            self.net = nets.EfficientNet(_EFFICIENTNET_B0, spatial_dims=d, in_channels=in_channels, num_classes=1,
                                         image_size=img_size)
            self.net._fc = nn.Identity()
            self.feat_dim, self.cam_layer = 1280, "net._conv_head"
        elif name == "vit":
            self._needs_size(name, img_size)
            if img_size % patch_size:
                raise ValueError(f"vit: data.size={img_size} is not a multiple of encoder.patch_size={patch_size}.")
            self.spec.update(img_size=img_size, patch_size=patch_size, depth=depth, width=width)
            # heads of 64 channels as in ViT-S/B; sin-cos positions, interpolated for crops of another size
            self.net = nets.ViT(in_channels=in_channels, img_size=(img_size,) * d, patch_size=(patch_size,) * d,
                                hidden_size=width, mlp_dim=4 * width, num_layers=depth, num_heads=max(1, width // 64),
                                proj_type="conv", pos_embed_type="sincos", classification=False, spatial_dims=d)
            self.grid = img_size // patch_size
            self.feat_dim, self.cam_layer = width, None
        else:  # swin
            self.spec.update(patch_size=patch_size, swin_feature_size=swin_feature_size)
            self.net = nets.swin_unetr.SwinTransformer(
                in_chans=in_channels, embed_dim=swin_feature_size, window_size=(7,) * d, patch_size=(patch_size,) * d,
                depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), spatial_dims=d)
            self.feat_dim, self.cam_layer = 16 * swin_feature_size, None

    @staticmethod
    def _needs_size(name, img_size):
        if img_size <= 0:
            raise ValueError(f"encoder '{name}' needs img_size (the scans' side in pixels).")

    # ViT pieces, used by forward and by MAE (which encodes only the visible tokens)
    def embed_tokens(self, x):
        """Patch tokens with positions: (B, C, *S) -> (B, N, width). Crops of another size get interpolated positions."""
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

    def forward(self, x):
        name = self.spec["name"]
        if name == "vit":
            return self.encode_tokens(self.embed_tokens(x)).mean(1)
        if name == "swin":
            return self.net(x, normalize=True)[-1].flatten(2).mean(2)
        return self.net(x).flatten(1)


def encoder_spec(cfg, size: int | None = None) -> dict:
    """Encoder(**spec) arguments from a MedclConfig."""
    size = size or cfg.data.size
    e = cfg.encoder
    return dict(name=e.name, spatial_dims=cfg.data.dims, in_channels=cfg.data.channels,
                stem=resolve_stem(e.stem, size), widen_factor=e.widen_factor, img_size=size, patch_size=e.patch_size,
                depth=e.depth, width=e.width, swin_feature_size=e.swin_feature_size)


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
