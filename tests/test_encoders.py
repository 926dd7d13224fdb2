"""Every encoder trains a few SimCLR steps in 2D and 3D (called directly), exports, reloads strictly and gives
embeddings that have not collapsed on the phantoms; the new methods (DINO with multi-crop, MAE, MONAI's SSL recipe)
pretrain a few steps through `pretrain`."""
import numpy as np
import pytest
import torch

from medcl.config import MedclConfig, apply_overrides
from medcl.encoders import ENCODER_NAMES, Encoder, export_encoder, load_encoder
from medcl.errors import CheckpointError
from medcl.monitors import collapse_metrics, is_collapsed
from medcl.train import pretrain

# CPU-sized settings; every encoder keeps its architecture, only widths shrink where the config allows
SMALL = {"resnet10": {"widen_factor": 0.125}, "resnet18": {"widen_factor": 0.125}, "resnet34": {"widen_factor": 0.125},
         "resnet50": {"widen_factor": 0.0625}, "vit": {"width": 48, "depth": 2}, "swin": {"swin_feature_size": 12}}
HEAD = {"proj_hidden": 64, "proj_dim": 32, "pred_hidden": 64, "dino_out_dim": 256}


def phantom_batch(folder, dims, size, n=24):
    from medcl.data.cache import build_cache
    from medcl.data.discover import open_source

    scans = build_cache(open_source(folder, dims), dims, size, progress=False)
    return torch.as_tensor(scans.batch(np.arange(min(n, len(scans)))))


def run(tmp_path, data, name, dims, encoder, method="simclr", steps=3, size=16, **method_kw):
    cfg = apply_overrides(MedclConfig(), {"data": {"dims": dims, "size": size},
                                          "encoder": {"name": encoder, **SMALL.get(encoder, {})},
                                          "method": {**HEAD, "name": method, **method_kw},
                                          "train": {"epochs": 1, "batch_size": 8, "max_steps": steps}})
    out = pretrain(data, tmp_path / name, cfg, progress=False, log=lambda *a: None)
    return out, check_export(out, data, name, dims, encoder, size)


def train_directly(tmp_path, data, name, dims, encoder, steps=2, size=16):
    """`steps` SimCLR steps on the encoder (batch 8, the recipe's batched views), then its export: what `pretrain`
    adds around a step (run folder, cache, schedule) is tested by the runs below and in test_cli."""
    from medcl.encoders import build_encoder
    from medcl.methods import build_method
    from medcl.views import BatchedViews

    cfg = apply_overrides(MedclConfig(), {"data": {"dims": dims, "size": size},
                                          "encoder": {"name": encoder, **SMALL.get(encoder, {})},
                                          "method": {**HEAD, "name": "simclr"}})
    torch.manual_seed(0)
    method = build_method("simclr", build_encoder(cfg), cfg.method, image_size=size)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    views, x = BatchedViews(cfg.views, dims, size), phantom_batch(data, dims, size, n=8)
    for step in range(steps):
        v1, v2 = views(torch.cat([x, x]), torch.Generator().manual_seed(step)).chunk(2)
        loss = method(v1, v2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path / name
    out.mkdir()
    export_encoder(method.encoder, out / "encoder.pt", {"data": {"dims": dims, "size": size, "channels": 1}})
    return out, check_export(out, data, name, dims, encoder, size)


def check_export(out, data, name, dims, encoder, size):
    enc, extra = load_encoder(out)  # strict: every key must match the network built from the saved spec
    assert enc.spec["name"] == encoder and enc.spec["spatial_dims"] == dims
    x = phantom_batch(data, dims, size)
    with torch.no_grad():
        f = enc.eval()(x)
        assert f.shape == (len(x), enc.feat_dim) and torch.isfinite(f).all()
        # after 2-3 steps the BatchNorm running statistics (EfficientNet's move by 1% a step) are still near their
        # start, so the spread is judged on what training computed: batch statistics
        f = enc.train()(x)
    # standardised like the probe sees them: spread over many directions, not one point
    m = collapse_metrics((f - f.mean(0)) / (f.std(0) + 1e-6))
    assert is_collapsed(m, enc.feat_dim) is None and m["rankme"] > 3, f"{name}: {m}"
    return enc


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("encoder", [e for e in ENCODER_NAMES if e not in ("resnet18", "resnet34")])
def test_every_encoder_trains_exports_and_reloads(tmp_path, phantoms2d, phantoms3d, encoder, dims):
    data = phantoms2d if dims == 2 else phantoms3d
    # 3D DenseNet-121 is the one heavy network here (11 s a step on 2 cores): one step exercises the same path
    steps = 1 if (encoder, dims) == ("densenet121", 3) else 2
    out, enc = train_directly(tmp_path, data, f"{encoder}{dims}", dims, encoder, steps=steps)
    # a tampered file is refused with the keys named, never half-loaded
    obj = torch.load(out / "encoder.pt", weights_only=True)
    obj["state_dict"].pop(next(iter(obj["state_dict"])))
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_encoder(tmp_path / "bad.pt")


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method,encoder,kw", [
    ("dino", "resnet10", {"local_crops": 2}),
    ("dino", "vit", {"local_crops": 2}),
    ("mae", "vit", {}),
    ("monai_ssl", "resnet10", {}),
    ("simclr", "swin", {"local_crops": 2}),  # multi-crop for a contrastive method
])
def test_new_methods_pretrain_in_2d_and_3d(tmp_path, phantoms2d, phantoms3d, method, encoder, kw, dims):
    data = phantoms2d if dims == 2 else phantoms3d
    run(tmp_path, data, f"{method}{dims}", dims, encoder, method=method, steps=3, **kw)
    log = (tmp_path / f"{method}{dims}" / "loss.csv").read_text().splitlines()[1:]
    assert len(log) == 3 and all(np.isfinite(float(r.split(",")[2])) for r in log)


def test_vit_positions_follow_the_crop_size_and_swin_takes_any_size():
    vit = Encoder("vit", 2, 1, img_size=16, patch_size=4, width=48, depth=1)
    assert vit(torch.randn(2, 1, 16, 16)).shape == (2, 48)
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 48)  # a local crop: 4 tokens, interpolated positions
    swin = Encoder("swin", 3, 1, swin_feature_size=12)
    assert swin(torch.randn(1, 1, 12, 12, 12)).shape == (1, 192)


def test_encoder_config_errors_name_the_fix():
    from medcl.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of encoder.patch_size"):
        apply_overrides(MedclConfig(), {"data": {"size": 30}, "encoder": {"name": "vit"}})
    with pytest.raises(ConfigError, match="multiple of 6"):
        apply_overrides(MedclConfig(), {"data": {"dims": 3, "size": 16}, "encoder": {"name": "vit", "width": 64}})
    with pytest.raises(ConfigError, match="needs encoder.name=vit"):
        apply_overrides(MedclConfig(), {"method": {"name": "mae"}})
    with pytest.raises(ConfigError, match="not one of"):
        apply_overrides(MedclConfig(), {"encoder": {"name": "vgg16"}})


def test_old_resnet_encoder_files_still_load(tmp_path):
    """Files written before the new encoders (spec without the new keys) load as before."""
    enc = Encoder("resnet10", 2, 1, "small", 0.125)
    export_encoder(enc, tmp_path / "e.pt")
    obj = torch.load(tmp_path / "e.pt", weights_only=True)
    assert set(obj["spec"]) == {"name", "spatial_dims", "in_channels", "stem", "widen_factor"}
    back, _ = load_encoder(tmp_path / "e.pt")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(enc.eval()(x), back.eval()(x))


def test_gradcam_on_a_transformer_says_to_use_occlusion():
    from medcl.errors import MedclError
    from medcl.saliency import saliency_maps

    class Clf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder("vit", 2, 1, img_size=16, patch_size=4, width=48, depth=1)
            self.head = torch.nn.Linear(48, 2)

        def forward(self, x):
            return self.head(self.encoder(x))

    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(MedclError, match="occlusion"):
        saliency_maps(Clf(), x, "gradcam")
    maps = saliency_maps(Clf(), x, "occlusion")
    assert maps.shape == (1, 16, 16)
