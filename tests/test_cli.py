"""End-to-end: the real `medcl` command in a subprocess, 2D and 3D, on tiny synthetic data."""
import json
import os
import subprocess
import sys

import pytest
import torch

TINY = ["--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125", "--set", "train.log_every=1",
        "--set", "train.monitor_every=1"]


def medcl(*args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "medcl", "--quiet", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"medcl {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea.Tags()


@pytest.mark.slow
@pytest.mark.parametrize("dims,size", [(2, 24), (3, 16)])
def test_pretrain_finetune_embed(tmp_path, phantoms2d, phantoms3d, dims, size):
    data = phantoms2d if dims == 2 else phantoms3d
    run, ft, emb = tmp_path / "run", tmp_path / "ft", tmp_path / "emb"
    r = medcl("pretrain", data, "--out", run, "--dims", dims, "--epochs", 1, "--batch-size", 8,
              "--set", f"data.size={size}", "--probe-labels", data / "labels.csv", *TINY)
    assert "wrote" in r.stdout
    for f in ("config.yaml", "checkpoints/last.pt", "encoder.pt", "skipped.csv"):
        assert (run / f).is_file(), f
    enc = torch.load(run / "encoder.pt", weights_only=True)
    assert enc["format"] == "medcl-encoder-v1" and enc["spec"]["spatial_dims"] == dims
    t = tags(run / "tb")
    assert {"pretrain/loss", "pretrain/lr", "pretrain/images_per_s", "monitor/std", "monitor/rankme",
            "monitor/knn_auc"} <= set(t["scalars"])
    assert "views/pairs" in t["images"]

    medcl("finetune", "--checkpoint", run, "--data", data, "--labels", data / "labels.csv", "--out", ft,
          "--label-fraction", 0.5)
    m = json.loads((ft / "metrics.json").read_text())
    for k in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "n"):
        assert k in m["test"]
    for k in ("n_labeled_train", "label_fraction", "seed", "positive_class", "mode"):
        assert k in m
    assert m["positive_class"] == "diseased" and m["mode"] == "probe"
    assert (ft / "predictions.csv").read_text().count("\n") == m["test"]["n"] + 1
    t = tags(ft / "tb")
    assert "test/auc" in t["scalars"] and "test/roc" in t["images"] and "test/confusion_matrix" in t["images"]

    medcl("embed", "--checkpoint", run, "--data", data, "--labels", data / "labels.csv", "--out", emb)
    z = __import__("numpy").load(emb / "embeddings.npz")
    assert len(z["features"]) == 48 if dims == 2 else 24
    proj = list((emb / "tb").rglob("projector_config.pbtxt"))
    assert proj and list((emb / "tb").rglob("sprite.png")) and list((emb / "tb").rglob("metadata.tsv"))
    assert (emb / "map.png").is_file()


@pytest.mark.slow
def test_finetune_from_scratch_baseline_and_full_mode(tmp_path, phantoms2d):
    ft = tmp_path / "scratch"
    medcl("finetune", "--checkpoint", "none", "--data", phantoms2d, "--labels", phantoms2d / "labels.csv", "--out", ft,
          "--mode", "finetune", "--labels-per-class", 4, "--epochs", 2, "--set", "data.size=24", *TINY)
    m = json.loads((ft / "metrics.json").read_text())
    assert m["checkpoint"] == "none" and m["mode"] == "finetune" and m["n_labeled_train"] == 8
    assert torch.load(ft / "classifier.pt", weights_only=True)["format"] == "medcl-classifier-v1"


def test_help_has_examples():
    for cmd in ("pretrain", "finetune", "embed", "demo", "evaluate"):
        r = medcl(cmd, "--help")
        assert "example" in r.stdout


def test_clear_errors_without_traceback(tmp_path, phantoms2d):
    r = medcl("pretrain", tmp_path / "missing", "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "data not found" in r.stderr and "Traceback" not in r.stderr
    r = medcl("pretrain", phantoms2d, "--out", tmp_path / "o", "--set", "method.nme=x", check=False)
    assert r.returncode == 2 and "Did you mean 'name'" in r.stderr
    r = medcl("pretrain", phantoms2d, "--out", phantoms2d / "run", check=False)
    assert r.returncode == 2 and "inside the data folder" in r.stderr
