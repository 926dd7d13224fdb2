"""What a person sees: event files read back, projector files consistent, a real TensorBoard server, collapse flagged."""
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medcl.config import MedclConfig, apply_overrides
from medcl.embed import embed
from medcl.train import pretrain

TINY = {"encoder": {"name": "resnet10", "widen_factor": 0.125}, "data": {"size": 24}}


def tb_tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, phantoms2d):
    root = tmp_path_factory.mktemp("tbrun")
    cfg = apply_overrides(MedclConfig(), {**TINY, "train": {"epochs": 2, "batch_size": 8, "monitor_every": 2,
                                                             "log_every": 1}})
    pretrain(phantoms2d, root / "pretrain", cfg, progress=False, log=lambda *a: None)
    embed(root / "pretrain", phantoms2d, root / "embed", labels=phantoms2d / "labels.csv", progress=False,
          log=lambda *a: None)
    return root


def test_pretrain_events_hold_monitors_and_views(small_run):
    ea = tb_tags(small_run / "pretrain" / "tb")
    scalars = set(ea.Tags()["scalars"])
    assert {"pretrain/loss", "pretrain/lr", "pretrain/images_per_s", "monitor/std", "monitor/std_ratio",
            "monitor/rankme", "monitor/alignment", "monitor/uniformity"} <= scalars
    img = ea.Images("views/pairs")[0]
    assert img.width > img.height / 8  # pairs side by side


def test_projector_files_are_consistent(small_run):
    tb = small_run / "embed" / "tb"
    cfg = next(tb.rglob("projector_config.pbtxt")).read_text()
    folder = next(tb.rglob("tensors.tsv")).parent
    tensors = (folder / "tensors.tsv").read_text().strip().splitlines()
    meta = (folder / "metadata.tsv").read_text().strip().splitlines()
    assert meta[0].split("\t") == ["path", "label", "patient", "split"]
    assert len(tensors) == len(meta) - 1 == 48
    from PIL import Image

    sprite = Image.open(folder / "sprite.png")
    side = int(np.ceil(np.sqrt(48)))
    assert sprite.size == (side * 24, side * 24)
    assert "single_image_dim: 24" in cfg and "sprite.png" in cfg and "metadata.tsv" in cfg


def test_projector_marks_the_classifiers_splits_and_training_scans(tmp_path, small_run, phantoms2d):
    from medcl.finetune import finetune

    ft = tmp_path / "ft"
    finetune(small_run / "pretrain", phantoms2d, phantoms2d / "labels.csv", ft, labels_per_class=4, seed=0,
             progress=False, log=lambda *a: None)
    embed(None, phantoms2d, tmp_path / "emb", labels=phantoms2d / "labels.csv", classifier=ft, progress=False,
          log=lambda *a: None)
    folder = next((tmp_path / "emb" / "tb").rglob("metadata.tsv")).parent
    rows = [ln.split("\t") for ln in (folder / "metadata.tsv").read_text().strip().splitlines()]
    head, rows = rows[0], rows[1:]
    assert head == ["path", "label", "patient", "split", "probability", "classifier_role"]
    import csv

    splits = {r["path"]: r for r in csv.DictReader(open(ft / "splits.csv"))}
    for path, _, _, split, prob, role in rows:
        assert split == splits[path]["split"] != "-"  # the classifier's own split, not '-'
        assert role == splits[path]["role"]
    roles = [r[5] for r in rows]
    assert roles.count("trained_on") == 8 and "test" in roles and "unlabeled" in roles  # 4 per class trained on
    z = np.load(tmp_path / "emb" / "embeddings.npz")
    assert list(z["roles"]) == roles


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_tensorboard_server_serves_the_run(small_run):
    exe = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    if not Path(exe).exists():
        pytest.skip("tensorboard executable not found")
    port = _free_port()
    proc = subprocess.Popen([exe, "--logdir", str(small_run), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def get(path):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            return json.loads(r.read())

    try:
        for _ in range(120):
            try:
                get("/data/runs")
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.skip("tensorboard could not start")
                time.sleep(0.5)
        else:
            pytest.skip("tensorboard did not answer within 60 s")
        scalars = get("/data/plugin/scalars/tags")
        run = next(r for r in scalars if r.endswith("pretrain/tb"))
        assert "pretrain/loss" in scalars[run] and "monitor/rankme" in scalars[run]
        series = get(f"/data/plugin/scalars/scalars?run={urllib.request.quote(run)}&tag=pretrain/loss")
        assert len(series) >= 2 and all(np.isfinite(v[2]) for v in series)
        images = get("/data/plugin/images/tags")
        assert any("views/pairs" in tags for tags in images.values())
        runs = get("/data/plugin/projector/runs")
        assert any(r.endswith("embed/tb") for r in runs)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("stop_gradient,flagged", [(False, True), (True, False)])
def test_collapsing_run_is_flagged(tmp_path, phantoms2d, stop_gradient, flagged):
    # BYOL without its stop-gradient collapses (SimSiam no longer does: its projector ends in BatchNorm, as in the paper)
    name = "byol" if not stop_gradient else "simclr"  # control: a contrastive run that cannot collapse this way
    cfg = apply_overrides(MedclConfig(), {**TINY, "method": {"name": name, "stop_gradient": stop_gradient},
                                          "train": {"epochs": 6, "batch_size": 16, "monitor_every": 1},
                                          "optim": {"lr": 0.01}})
    msgs = []
    pretrain(phantoms2d, tmp_path / "run", cfg, progress=False, log=msgs.append)
    warned = [m for m in msgs if "collapse" in m]
    assert bool(warned) == flagged, msgs
    ea = tb_tags(tmp_path / "run" / "tb")
    if flagged:
        assert "monitor/warning/text_summary" in ea.Tags()["tensors"]
        assert ea.Scalars("monitor/std_ratio")[-1].value < 0.1
