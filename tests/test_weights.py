"""Bring your own weights (issue 33): every layout's tensors land where they should, mistakes are one line, external
encoders are controls on the same subsets, and a bundle runs without medcl."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import medcl
from medcl import weights as W
from medcl.data.labels import Task
from medcl.encoders import Encoder, export_encoder
from medcl.errors import CheckpointError

SEQ = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def _random_resnet(name="resnet18", dims=2, channels=3, stem="standard", widen=0.25, **kw) -> Encoder:
    torch.manual_seed(0)
    enc = Encoder(name, dims, channels, stem, widen, **kw)
    with torch.no_grad():
        for k, t in enc.state_dict().items():
            if t.is_floating_point():  # every tensor distinct, so a misplaced one shows; variances stay positive
                t.copy_(torch.rand_like(t) + 0.5 if k.endswith("running_var") else torch.randn_like(t) * 0.1)
    return enc


def _plain(enc) -> dict:
    """torchvision/timm names: medcl's `net.` dropped."""
    return {k[4:]: v.clone() for k, v in enc.state_dict().items()}


def _torchvision_file(path, enc):
    sd = _plain(enc)
    sd.update({"fc.weight": torch.randn(1000, enc.feat_dim), "fc.bias": torch.randn(1000)})
    torch.save(sd, path)
    return path


def _loads_every_tensor(w, source: Encoder, channels):
    enc, report = W.build_encoder_from(w, channels)
    assert report["loaded"] == report["of"] == sum(not k.endswith("num_batches_tracked") for k in enc.state_dict())
    for k, v in source.state_dict().items():
        got = enc.state_dict()[k]
        if k == "net.conv1.weight" and v.shape[1] != channels:
            want = v.sum(1, keepdim=True) if channels == 1 else v.repeat(1, 3, *[1] * (v.ndim - 2)) / 3
            assert torch.allclose(got, want)
        elif not k.endswith("num_batches_tracked") or k in w.state:
            assert torch.equal(got, v), k
    return enc, report


def test_torchvision_layout_at_3_channels_lands_and_adapts_to_grayscale(tmp_path):
    src = _random_resnet("resnet18", bias_downsample=False)
    w = W.read_weights(_torchvision_file(tmp_path / "resnet18.pth", src))
    assert w.spec == {"name": "resnet18", "spatial_dims": 2, "in_channels": 3, "stem": "standard",
                      "widen_factor": 0.25, "shortcut": "B", "bias_downsample": False}
    assert sorted(w.ignored) == ["fc.bias", "fc.weight"]
    _, report = _loads_every_tensor(w, src, 1)
    assert report["adapted"] == ["RGB first convolution summed over colour for grayscale scans"]
    enc, _ = _loads_every_tensor(w, src, 3)  # at 3 channels the features are the source's, to the bit
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(enc.eval()(x), src.eval()(x))


def test_grayscale_weights_repeat_over_rgb(tmp_path):
    src = _random_resnet("resnet10", channels=1, stem="small")
    w = W.read_weights(_torchvision_file(tmp_path / "gray.pth", src))
    _loads_every_tensor(w, src, 3)


@pytest.mark.parametrize("depth,shortcut,bias", [(18, "A", False), (10, "B", False)])
def test_medicalnet_wrapped_prefixed_3d_keys(tmp_path, depth, shortcut, bias):
    src = _random_resnet(f"resnet{depth}", dims=3, channels=1, shortcut=shortcut, bias_downsample=bias)
    path = tmp_path / f"resnet_{depth}_23dataset.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _plain(src).items()}}, path)
    w = W.read_weights(path)
    assert w.layout.startswith("MedicalNet") and w.dims == 3
    assert (w.spec["shortcut"], w.spec["bias_downsample"]) == (shortcut, bias)
    _loads_every_tensor(w, src, 1)


class _RunsCode:
    """An object whose unpickling would delete a file: a checkpoint must never run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.remove, (self.path,)


@pytest.mark.parametrize("numbered", [True, False])
def test_lightning_checkpoints_of_lightly_and_solo_learn(tmp_path, numbered):
    """lightly: backbone = nn.Sequential(*resnet.children()) (numbered); solo-learn: backbone.conv1 ... (named); both
    keep a momentum copy and a projector beside it, and hyperparameters as Python objects."""
    src = _random_resnet("resnet18", bias_downsample=False)
    state = {}
    for k, v in _plain(src).items():
        head, _, tail = k.partition(".")
        key = f"{SEQ[head]}.{tail}" if numbered else k
        state[f"backbone.{key}"] = v
        state[f"momentum_backbone.{key}"] = torch.zeros_like(v)
    state["projector.0.weight"] = torch.randn(8, src.feat_dim)
    canary = tmp_path / "canary"
    canary.write_text("still here")
    import argparse

    torch.save({"epoch": 9, "global_step": 90, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "hyper_parameters": {"cfg": argparse.Namespace(lr=0.1), "trap": _RunsCode(str(canary))}},
               tmp_path / "last.ckpt")
    w = W.read_weights(tmp_path / "last.ckpt")
    assert canary.is_file()  # the file's objects were read as inert stand-ins, never run
    assert "under 'backbone.'" in w.layout and w.layout.startswith("Lightning")
    assert len(w.ignored) == len(src.state_dict()) + 1  # the momentum copy and the projector
    _loads_every_tensor(w, src, 3)


def test_medcl_run_and_encoder_file(tmp_path):
    src = Encoder("resnet10", 2, 1, "small", 0.125)
    (tmp_path / "run").mkdir()
    export_encoder(src, tmp_path / "run" / "encoder.pt", {"data": {"dims": 2, "size": 16, "channels": 1}})
    for source in (tmp_path / "run", tmp_path / "run" / "encoder.pt"):
        w = W.read_weights(source)
        assert w.layout == "medcl encoder" and w.extra["data"]["size"] == 16
        _loads_every_tensor(w, src, 1)
    assert W.label(tmp_path / "run") == W.label(tmp_path / "run" / "encoder.pt") == "external:run"


def test_a_wrong_architecture_is_refused_naming_the_first_mismatches(tmp_path):
    src = _random_resnet("resnet18", bias_downsample=False)
    sd = _plain(src)
    sd["layer1.0.conv1.weight"] = torch.randn(5, 16, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"shapes differ: net.layer1.0.conv1.weight \(5, 16, 3, 3\)"):
        W.build_encoder_from(W.read_weights(tmp_path / "bad.pth"))
    torch.save({"weight": torch.randn(3, 3)}, tmp_path / "notresnet.pth")
    with pytest.raises(CheckpointError, match="no ResNet found"):
        W.read_weights(tmp_path / "notresnet.pth")
    enc = Encoder("resnet18", 2, 1, "small", 0.25)  # the file's shortcut conv has no bias; this encoder's has one
    with pytest.raises(CheckpointError, match="missing: net.layer2.0.downsample.0.bias"):
        W.load_into(enc, W.read_weights(_torchvision_file(tmp_path / "tv.pth", src)))


def _tiny_folder(tmp_path, n=24, size=32):
    import numpy as np
    from PIL import Image

    d = tmp_path / "scans"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((size, size)) * 255).astype("uint8")).save(d / f"s{i:02d}.png")
    return d


@pytest.mark.slow
def test_pretrain_init_records_its_start_and_the_weights_decide_the_architecture(tmp_path):
    data = _tiny_folder(tmp_path)
    src = _random_resnet("resnet10", bias_downsample=False)
    path = _torchvision_file(tmp_path / "r10.pth", src)
    r = medcl("pretrain", data, "--out", tmp_path / "run", "--init", path, "--epochs", "1", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert ("decides the encoder: name 'resnet10' (was 'resnet18'), stem 'standard' (was 'small'), widen_factor 0.25 "
            "(was 0.5), bias_downsample False (was True)") in r.stdout
    assert "60 of 60 encoder tensors loaded; RGB first convolution summed over colour" in r.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["encoder"]["init"] == str(path) and saved["encoder"]["bias_downsample"] is False
    init = saved["trained_on"]["init"]
    assert init["sha256"] == W.sha256(path) and (init["loaded"], init["of"], init["ignored"]) == (60, 60, 2)
    # the pretrained encoder loads as any medcl run, with the architecture of the file
    w = W.read_weights(tmp_path / "run")
    assert w.spec["stem"] == "standard" and w.spec["bias_downsample"] is False and w.spec["in_channels"] == 1
    # a medcl run as the start of another
    r = medcl("pretrain", data, "--out", tmp_path / "run2", "--init", tmp_path / "run", "--epochs", "1",
              "--batch-size", "8")
    assert r.returncode == 0 and "medcl encoder; 60 of 60 encoder tensors loaded" in r.stdout


@pytest.mark.slow
def test_init_mistakes_are_one_line_exit_2(tmp_path):
    data = _tiny_folder(tmp_path, n=8)
    path = _torchvision_file(tmp_path / "r10.pth", _random_resnet("resnet10", bias_downsample=False))
    r = medcl("pretrain", data, "--out", tmp_path / "a", "--init", path, "--set", "encoder.widen_factor=0.5",
              check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--set encoder.widen_factor=0.5 contradicts --init" in r.stderr
    r = medcl("pretrain", data, "--out", tmp_path / "b", "--init", path, "--dims", "3", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "2D weights, but this run is 3D" in r.stderr


def test_an_absent_named_weight_offline_is_exit_2_naming_the_path_before_torch(tmp_path):
    code = ("import sys; from medcl.cli import main; rc = main(['pretrain', sys.argv[1], '--out', sys.argv[2], "
            "'--init', 'torchvision:resnet18']); print('torch' in sys.modules); sys.exit(rc)")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "th"), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and r.stdout.strip() == "False"
    assert f"{tmp_path / 'th'}/hub/checkpoints/resnet18-f37072fd.pth" in r.stderr
    assert "never downloads" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # placed there, the name resolves to it
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"x")
    os.environ["TORCH_HOME"], before = str(tmp_path / "th"), os.environ.get("TORCH_HOME")
    try:
        assert W.resolve("torchvision:resnet18") == tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    finally:
        os.environ.pop("TORCH_HOME") if before is None else os.environ.update(TORCH_HOME=before)
    snap = tmp_path / "hf" / "models--TencentMedicalNet--MedicalNet-Resnet10" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "resnet_10.pth").write_bytes(b"x")
    os.environ["HF_HUB_CACHE"] = str(tmp_path / "hf")
    try:
        assert W.resolve("medicalnet:resnet10") == snap / "resnet_10.pth"
    finally:
        del os.environ["HF_HUB_CACHE"]


@pytest.mark.slow
def test_compare_rows_use_exactly_the_pretrained_rows_subsets(tmp_path, phantoms2d):
    from medcl.evaluate import evaluate

    enc = Encoder("resnet10", 2, 1, "small", 0.125)
    export_encoder(enc, tmp_path / "encoder.pt", {"data": {"dims": 2, "size": 16, "channels": 1}})
    other = _torchvision_file(tmp_path / "tv18.pth", _random_resnet("resnet18", bias_downsample=False))
    evaluate(tmp_path / "encoder.pt", phantoms2d, phantoms2d / "labels.csv", tmp_path / "ev", fractions=[0.5],
             per_class=[2], seeds=2, heads=("knn", "linear"), baseline="none", task=Task("diseased"), progress=False,
             log=lambda *a: None, compare=[other])
    rows = list(csv.DictReader(open(tmp_path / "ev" / "results.csv")))
    assert {r["encoder"] for r in rows} == {"pretrained", "random-init", "external:tv18"}
    for key in {(r["budget_kind"], r["budget"], r["seed"]) for r in rows}:
        same = [r for r in rows if (r["budget_kind"], r["budget"], r["seed"]) == key]
        assert len(same) == 6 and len({r["subset"] for r in same}) == 1
    assert "external:tv18" in (tmp_path / "ev" / "summary.md").read_text()
    settings = json.loads((tmp_path / "ev" / "settings.json").read_text())
    assert settings["compare"] == [["external:tv18", W.sha256(other)[:16]]]


@pytest.mark.slow
def test_embed_takes_weights_as_its_checkpoint(tmp_path, phantoms2d):
    other = _torchvision_file(tmp_path / "tv18.pth", _random_resnet("resnet18", bias_downsample=False))
    r = medcl("embed", "--checkpoint", other, "--data", phantoms2d, "--out", tmp_path / "emb")
    assert r.returncode == 0, r.stderr
    assert "torchvision/timm state dict, ResNet; 100 of 100 encoder tensors loaded" in r.stdout
    import numpy as np

    assert np.load(tmp_path / "emb" / "embeddings.npz")["features"].shape[1] == 128


_WITHOUT_MEDCL = """
import sys, torch
from monai.bundle import ConfigParser
bundle, x, want = sys.argv[1:]
p = ConfigParser()
p.read_config(f"{bundle}/configs/inference.json")
net = p.get_parsed_content("network_def")
net.load_state_dict(torch.load(f"{bundle}/models/model.pt", weights_only=True))
net.eval()
with torch.no_grad():
    got = net(torch.load(x))
    if p.get("postprocessing") is not None:
        got = torch.softmax(got, 1)
diff = float((got - torch.load(want)).abs().max())
p.get_parsed_content("preprocessing")
assert not any(m.startswith("medcl") for m in sys.modules), "medcl was imported"
print(diff)
"""


@pytest.mark.parametrize("dims,stem,shortcut", [(2, "small", "B"), (3, "standard", "A")])
def test_the_bundle_gives_the_same_features_without_medcl(tmp_path, dims, stem, shortcut):
    from medcl.bundle import export_bundle

    enc = _random_resnet("resnet10", dims=dims, channels=1, stem=stem, widen=0.125, shortcut=shortcut).eval()
    (tmp_path / "run").mkdir()
    export_encoder(enc, tmp_path / "run" / "encoder.pt", {"data": {"dims": dims, "size": 16, "channels": 1}})
    export_bundle(tmp_path / "bundle", checkpoint=tmp_path / "run", log=lambda *a: None)
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16] * dims
    x = torch.rand((3, 1) + (16,) * dims)
    with torch.no_grad():
        torch.save(x, tmp_path / "x.pt")
        torch.save(enc(x), tmp_path / "want.pt")
    r = subprocess.run([sys.executable, "-c", _WITHOUT_MEDCL, str(tmp_path / "bundle"), str(tmp_path / "x.pt"),
                        str(tmp_path / "want.pt")], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5


def test_a_classifier_bundle_gives_its_probabilities_without_medcl(tmp_path):
    from medcl.bundle import export_bundle
    from medcl.finetune import save_classifier
    from medcl.heads import Classifier

    enc = _random_resnet("resnet10", channels=1, stem="small", widen=0.125)
    model = Classifier(enc, 2).eval()
    (tmp_path / "ft").mkdir()
    save_classifier(model, enc.spec, {"data": {"dims": 2, "size": 16, "channels": 1}}, ["healthy", "diseased"], 0.5,
                    tmp_path / "ft" / "classifier.pt")
    r = medcl("export", "--classifier", tmp_path / "ft", "--bundle", tmp_path / "bundle")
    assert r.returncode == 0, r.stderr
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.save(x, tmp_path / "x.pt")
        torch.save(torch.softmax(model(x), 1), tmp_path / "want.pt")
    r = subprocess.run([sys.executable, "-c", _WITHOUT_MEDCL, str(tmp_path / "bundle"), str(tmp_path / "x.pt"),
                        str(tmp_path / "want.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5
    r = medcl("export", "--classifier", tmp_path / "ft", "--bundle", tmp_path / "bundle", check=False)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = medcl("export", "--checkpoint", tmp_path / "ft", "--out", tmp_path / "x.pt2", check=False)
    assert r.returncode == 2 and "add --bundle DIR" in r.stderr
    assert export_bundle  # the library call is what the CLI runs


def test_the_bundle_preprocessing_reads_a_scan_as_medcl_does(tmp_path):
    """A non-square PNG through the bundle's MONAI transforms equals medcl's own reading (rows first, intensity
    percentiles, longest side to the size, zero padding)."""
    import numpy as np
    from monai.bundle import ConfigParser
    from PIL import Image

    from medcl.bundle import _preprocessing
    from medcl.data.cache import to_model_array
    from medcl.data.preprocessing import Preprocessing
    from medcl.data.readers import read_scan

    import monai

    for shape, track_meta in [((40, 60), True), ((64, 48), False)]:  # medcl's views turn MONAI's metadata off
        Image.fromarray((np.random.default_rng(0).random(shape) * 255).astype(np.uint8)).save(tmp_path / "a.png")
        prep = Preprocessing(dims=2, size=32, channels=1)
        p = ConfigParser({"imports": ["$import torch"], "pre": {"_target_": "Compose",
                                                                "transforms": _preprocessing(prep)}})
        before = monai.data.get_track_meta()
        monai.data.set_track_meta(track_meta)
        try:
            got = np.asarray(p.get_parsed_content("pre")({"image": str(tmp_path / "a.png")})["image"])
        finally:
            monai.data.set_track_meta(before)
        arr, spacing = read_scan(tmp_path / "a.png")
        want = to_model_array(arr, spacing, tmp_path / "a.png", 2, 32, 1, "percentile")
        assert got.shape == want.shape == (1, 32, 32) and np.abs(got - want).max() < 1e-5
