"""The speed switches of `train.*` (issue 6): what each resolves to on a device, and that the non-default settings
run. GPU-only effects (channels_last, cuDNN autotuning, fused AdamW on CUDA) are exercised by tests/test_gpu.py."""
import numpy as np
import pytest
import torch

from medcl.config import MedclConfig, apply_overrides
from medcl.train import pretrain, speed_settings

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def cfg_with(**train):
    return apply_overrides(MedclConfig(), {"train": train})


def test_defaults_resolve_per_device(monkeypatch):
    monkeypatch.setattr("medcl.train.optim.cpu_has_native_bf16", lambda: False)
    assert speed_settings(MedclConfig(), CPU) == dict(amp=False, channels_last=False, compile=False,
                                                      cudnn_benchmark=False, fused=False)
    assert speed_settings(MedclConfig(), GPU) == dict(amp=True, channels_last=True, compile=False,
                                                      cudnn_benchmark=True, fused=True)
    assert not speed_settings(apply_overrides(MedclConfig(), {"data": {"dims": 3}}), GPU)["channels_last"]
    assert not speed_settings(apply_overrides(MedclConfig(), {"optim": {"name": "lars"}}), GPU)["fused"]


def test_bf16_by_default_only_for_2d_on_a_cpu_that_has_it(monkeypatch):
    monkeypatch.setattr("medcl.train.optim.cpu_has_native_bf16", lambda: True)
    assert speed_settings(MedclConfig(), CPU)["amp"]
    assert not speed_settings(apply_overrides(MedclConfig(), {"data": {"dims": 3}}), CPU)["amp"]  # diverged in 3D
    assert not speed_settings(cfg_with(amp="off"), CPU)["amp"]


def test_where_bf16_is_the_default_a_bf16_convolution_agrees_with_float32():
    # the default rests on this CPU's bf16 kernels being right (a bf16 conv2d once summed wrongly: pytorch#163347)
    from medcl.train.optim import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16: train.amp=auto stays float32 here")
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(16, 32, 3, padding=1), torch.randn(8, 16, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x).float()
    assert torch.allclose(low, conv(x), atol=0.05, rtol=0.02)
    assert torch.conv2d(torch.ones(1, 1, 2, 2, dtype=torch.bfloat16), torch.ones(1, 1, 2, 2, dtype=torch.bfloat16)) == 4


def test_each_switch_turns_off_and_on():
    off = speed_settings(cfg_with(amp="off", channels_last=False, cudnn_benchmark=False, fused_optimizer="off"), GPU)
    assert not any(off.values())
    on = speed_settings(cfg_with(amp="bf16", fused_optimizer="on", compile=True), CPU)
    assert on["amp"] and on["fused"] and on["compile"]


def test_bf16_and_fused_adamw_train_on_cpu(tmp_path, phantoms2d):
    cfg = apply_overrides(cfg_with(amp="bf16", fused_optimizer="on", max_steps=3, batch_size=8),
                          {"encoder": {"name": "resnet10", "widen_factor": 0.125}, "data": {"size": 16}})
    pretrain(phantoms2d, tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    losses = [float(ln.split(",")[2]) for ln in (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and np.isfinite(losses).all()


def test_a_resumed_run_keeps_the_precision_it_started_in(tmp_path, phantoms2d, monkeypatch):
    cfg = apply_overrides(cfg_with(batch_size=8, epochs=1), {"encoder": {"name": "resnet10", "widen_factor": 0.125},
                                                             "data": {"size": 16}})
    monkeypatch.setattr("medcl.train.optim.cpu_has_native_bf16", lambda: False)
    pretrain(phantoms2d, tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["amp"] is False
    del ckpt["amp"]  # a checkpoint written before the precision was recorded: train.amp=auto meant float32 on a CPU
    torch.save(ckpt, last)
    monkeypatch.setattr("medcl.train.optim.cpu_has_native_bf16", lambda: True)  # auto now means bf16 here
    said = []
    cfg.train.epochs = 2
    pretrain(phantoms2d, tmp_path / "run", cfg, resume=True, progress=False, log=said.append)
    assert any("resuming in float32" in line for line in said)
    assert torch.load(last, weights_only=True)["amp"] is False


def test_compiled_encoder_exports_a_strict_loadable_encoder(tmp_path, phantoms2d):
    from medcl.encoders import load_encoder

    cfg = apply_overrides(cfg_with(compile=True, max_steps=2, batch_size=8),
                          {"encoder": {"name": "resnet10", "widen_factor": 0.125}, "data": {"size": 16}})
    pretrain(phantoms2d, tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    keys = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)["state_dict"].keys()
    assert keys and not any("_orig_mod" in k for k in keys)  # the plain module was exported, not the compiled wrapper
    enc, _ = load_encoder(tmp_path / "run" / "encoder.pt")  # strict: fails on any missing or unexpected key
    assert enc(torch.rand(2, 1, 16, 16)).shape[0] == 2


def test_stem_fits_the_input_size():
    from medcl.encoders import build_encoder

    def first_conv(size, stem="auto", dims=2):
        cfg = apply_overrides(MedclConfig(), {"data": {"size": size, "dims": dims},
                                              "encoder": {"name": "resnet10", "widen_factor": 0.125, "stem": stem}})
        enc = build_encoder(cfg)
        return enc.spec["stem"], enc.net.conv1.stride[0], enc.net.conv1.kernel_size[0]

    assert first_conv(28) == ("small", 1, 3)  # small inputs keep their detail: 3x3, stride 1, no max-pool
    assert first_conv(32, dims=3) == ("small", 1, 3)
    assert first_conv(64) == ("standard", 2, 7)  # larger ones are downsampled early: 7x7, stride 2
    assert first_conv(28, stem="standard") == ("standard", 2, 7)
    assert first_conv(128, stem="small") == ("small", 1, 3)
