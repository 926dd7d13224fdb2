"""The encoder registry: name -> a function that builds the MONAI network without its classifier.

A new encoder is one function here with `@register_encoder` (docs/contributing.md) plus its test: `medcl.Encoder`,
`encoder.name` in the config, `--set encoder.name=...`, checkpoints and every command then know it. Importing this
module does not import torch (the config validates names with it before torch loads); builders import MONAI inside.

A builder is called with the Encoder's arguments (name, spatial_dims, in_channels, stem, widen_factor and the
options img_size, patch_size, depth, width, swin_feature_size, shortcut, bias_downsample; it takes those it uses)
and returns a Built. `spec` lists the options it used: with the five arguments above, they must rebuild the network
exactly, because a checkpoint stores only them and the weights.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

ENCODERS: dict = {}
TRANSFORMERS: set = set()  # methods pick other settings for these (medcl.methods.TEMPERATURES)
# ResNet depths as MONAI builds them: (block, blocks per stage)
RESNET_DEPTHS = {"resnet10": ("basic", [1, 1, 1, 1]), "resnet18": ("basic", [2, 2, 2, 2]),
                 "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3])}
# EfficientNet-B0's stages (Tan & Le 2019, table 1), as MONAI's EfficientNetBN spells them. MONAI's EfficientNetBN fixes
# its "same" padding for 224 px; built through EfficientNet with the real image size, small scans work too.
_EFFICIENTNET_B0 = ["r1_k3_s11_e1_i32_o16_se0.25", "r2_k3_s22_e6_i16_o24_se0.25", "r2_k5_s22_e6_i24_o40_se0.25",
                    "r3_k3_s22_e6_i40_o80_se0.25", "r3_k5_s11_e6_i80_o112_se0.25", "r4_k5_s22_e6_i112_o192_se0.25",
                    "r1_k3_s11_e6_i192_o320_se0.25"]


@dataclass
class Built:
    net: object  # the nn.Module, stored as Encoder.net (checkpoint keys start with "net.")
    feat_dim: int
    cam_layer: str | None  # the layer Grad-CAM reads, under the Encoder (None: occlusion only)
    spec: dict = field(default_factory=dict)  # the options the builder used, beyond the five common arguments
    features: Callable | None = None  # (encoder, x) -> (B, feat_dim); None: net(x) flattened


def register_encoder(*names: str, transformer: bool = False):
    def add(builder):
        for name in names:
            ENCODERS[name] = builder
            if transformer:
                TRANSFORMERS.add(name)
        return builder
    return add


def encoder_names() -> tuple:
    return tuple(ENCODERS)


def _nets():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.networks import nets
    return nets


def _needs_size(name, img_size):
    if img_size <= 0:
        raise ValueError(f"encoder '{name}' needs img_size (the scans' side in pixels).")


@register_encoder(*RESNET_DEPTHS)
def resnet(name, spatial_dims, in_channels, stem, widen_factor, shortcut="B", bias_downsample=True, **_) -> Built:
    """MONAI's ResNet. Its default stem is 7x7 with stride 1: ~4x the cost of torchvision's stride 2 at 224 px.
    'small' (3x3, stride 1, no max-pool) keeps detail for 28-64 px inputs; 'standard' downsamples by 4 as torchvision
    does. shortcut/bias_downsample: other weights' layouts (medcl.weights); kept out of the spec when MONAI's."""
    block, layers = RESNET_DEPTHS[name]
    small = stem == "small"
    net = _nets().ResNet(block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=spatial_dims,
                         n_input_channels=in_channels, conv1_t_size=3 if small else 7, conv1_t_stride=1 if small else 2,
                         no_max_pool=small, widen_factor=widen_factor, shortcut_type=shortcut,
                         bias_downsample=bias_downsample, feed_forward=False)
    spec = dict(shortcut=shortcut, bias_downsample=bias_downsample) if (shortcut, bias_downsample) != ("B", True) \
        else {}
    return Built(net, int(512 * widen_factor) * (4 if block == "bottleneck" else 1), "net.layer4", spec)


@register_encoder("densenet121")
def densenet121(spatial_dims, in_channels, stem, **_) -> Built:
    from torch import nn

    nets = _nets()
    net = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    if stem == "small":  # the 7x7/2 stem and max-pool leave nothing of a 28 px scan after the three transitions
        conv = nets.densenet.Conv[nets.densenet.Conv.CONV, spatial_dims]
        net.features.conv0 = conv(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.features.pool0 = nn.Identity()
    net.class_layers.out = nn.Identity()
    return Built(net, 1024, "net.features")


@register_encoder("efficientnet-b0")
def efficientnet_b0(name, spatial_dims, in_channels, img_size=0, **_) -> Built:
    from torch import nn

    _needs_size(name, img_size)
    net = _nets().EfficientNet(_EFFICIENTNET_B0, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=1,
                               image_size=img_size)
    net._fc = nn.Identity()
    return Built(net, 1280, "net._conv_head", dict(img_size=img_size))


def _vit_features(encoder, x):
    return encoder.encode_tokens(encoder.embed_tokens(x)).mean(1)


@register_encoder("vit", transformer=True)
def vit(name, spatial_dims, in_channels, img_size=0, patch_size=4, depth=6, width=192, **_) -> Built:
    """MONAI's ViT, tokens mean-pooled; heads of 64 channels as in ViT-S/B; sin-cos positions, interpolated for crops
    of another size (Encoder.embed_tokens)."""
    _needs_size(name, img_size)
    if img_size % patch_size:
        raise ValueError(f"vit: data.size={img_size} is not a multiple of encoder.patch_size={patch_size}.")
    d = spatial_dims
    net = _nets().ViT(in_channels=in_channels, img_size=(img_size,) * d, patch_size=(patch_size,) * d,
                      hidden_size=width, mlp_dim=4 * width, num_layers=depth, num_heads=max(1, width // 64),
                      proj_type="conv", pos_embed_type="sincos", classification=False, spatial_dims=d)
    return Built(net, width, None, dict(img_size=img_size, patch_size=patch_size, depth=depth, width=width),
                 _vit_features)


def _swin_features(encoder, x):
    return encoder.net(x, normalize=True)[-1].flatten(2).mean(2)


@register_encoder("swin", transformer=True)
def swin(spatial_dims, in_channels, patch_size=4, swin_feature_size=24, **_) -> Built:
    """The Swin transformer inside MONAI's SwinUNETR: its last stage, mean-pooled."""
    d = spatial_dims
    net = _nets().swin_unetr.SwinTransformer(in_chans=in_channels, embed_dim=swin_feature_size, window_size=(7,) * d,
                                             patch_size=(patch_size,) * d, depths=(2, 2, 2, 2),
                                             num_heads=(3, 6, 12, 24), spatial_dims=d)
    return Built(net, 16 * swin_feature_size, None, dict(patch_size=patch_size, swin_feature_size=swin_feature_size),
                 _swin_features)
