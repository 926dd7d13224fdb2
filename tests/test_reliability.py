"""Runs that survive, data that is never touched, files that are never trusted."""
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from medcl.data.labels import Task
from medcl.encoders import atomic_save, load_encoder, safe_load
from medcl.errors import CheckpointError, MedclError, TrainingDiverged

from conftest import medcl as run_medcl

TINY = ["--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125", "--set", "data.size=24",
        "--batch-size", "8"]


def medcl(*args, check=True, **kw):
    return run_medcl("--quiet", *args, check=check, **kw)


def losses(run):
    lines = (run / "loss.csv").read_text().splitlines()[1:]
    return [(int(a), float(c)) for a, b, c in (ln.split(",") for ln in lines)]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, phantoms2d):
    args = ["pretrain", phantoms2d, "--epochs", 2, "--set", "train.checkpoint_every=1", *TINY]
    medcl(*args, "--out", tmp_path / "full", in_process=False)  # every run of the comparison: its own process
    full = losses(tmp_path / "full")
    assert len(full) == 12  # 48 scans / batch 8 = 6 steps x 2 epochs
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "medcl", "--quiet", *map(str, args), "--out", tmp_path / "cut"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "cut" / "loss.csv"
    t0 = time.time()
    while time.time() - t0 < 300:  # kill mid-epoch 2... or wherever step 8 lands
        if log.is_file() and len(log.read_text().splitlines()) >= 9:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ck = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < ck["global_step"] < 12
    medcl("pretrain", phantoms2d, "--out", tmp_path / "cut", "--resume", in_process=False)  # the saved config rules
    resumed = losses(tmp_path / "cut")
    assert [s for s, _ in resumed] == list(range(1, 13))
    np.testing.assert_allclose([l for _, l in resumed], [l for _, l in full], rtol=1e-6)


def test_existing_run_is_not_overwritten(tmp_path, phantoms2d):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("x")
    (out / "encoder.pt").write_text("x")  # a run that trained (one that never did is reused: test_first_run.py)
    r = medcl("pretrain", phantoms2d, "--out", out, check=False)
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert (out / "config.yaml").read_text() == "x"
    other = tmp_path / "notmine"
    other.mkdir()
    (other / "thesis.docx").write_text("precious")
    r = medcl("pretrain", phantoms2d, "--out", other, "--overwrite", check=False)
    assert r.returncode == 2 and (other / "thesis.docx").read_text() == "precious"


def test_a_run_stopped_before_its_first_output_can_be_overwritten(tmp_path, phantoms2d):
    """A Ctrl-C while the cache builds leaves only cache files: the folder is known as medcl's (its marker) and holds
    no output, so the next command reuses it (with or without --overwrite), while a folder medcl did not create stays
    refused."""
    from medcl.errors import RunDirError
    from medcl.runs import prepare_out_dir

    out = prepare_out_dir(tmp_path / "ev", phantoms2d, marker="results.csv")
    (out / "cache").mkdir()
    (out / "cache" / "scans.npy").write_bytes(b"partial")
    assert prepare_out_dir(out, phantoms2d, marker="results.csv", log=lambda *a: None) == out
    assert not (out / "cache").exists() and (out / ".medcl").is_file()
    (out / "cache").mkdir()
    assert prepare_out_dir(out, phantoms2d, overwrite=True, marker="results.csv") == out
    assert not (out / "cache").exists() and (out / ".medcl").is_file()
    (out / "results.csv").write_text("budget\n")  # a finished output is never replaced unasked
    with pytest.raises(RunDirError, match="--overwrite"):
        prepare_out_dir(out, phantoms2d, marker="results.csv")
    mine = tmp_path / "mine"
    (mine / "cache").mkdir(parents=True)
    with pytest.raises(RunDirError, match="does not look like a medcl output"):
        prepare_out_dir(mine, phantoms2d, overwrite=True)
    assert (mine / "cache").is_dir()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_read_only_data_folder_is_never_written(tmp_path, phantoms2d):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantoms2d, data)
    for p in [data, *data.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    before = _snapshot(data)
    try:
        medcl("pretrain", data, "--out", tmp_path / "run", "--epochs", 1, *TINY)
        medcl("finetune", "--checkpoint", tmp_path / "run", "--data", data, "--labels", data / "labels.csv",
              "--out", tmp_path / "ft", "--label-fraction", 0.5)
        medcl("embed", "--checkpoint", tmp_path / "run", "--data", data, "--out", tmp_path / "emb")
        assert _snapshot(data) == before
    finally:
        for p in [data, *data.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile file is written with protocol 4
def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "encoder.pt"
    torch.save({"format": "medcl-encoder-v1", "state_dict": _Payload(str(marker))}, bad)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_encoder(bad)
    with pytest.raises(CheckpointError):
        safe_load(bad)
    assert not marker.exists(), "the payload ran"
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        safe_load(plain)
    assert not marker.exists()


def test_encoder_load_is_strict(tmp_path):
    from medcl.encoders import Encoder, export_encoder

    enc = Encoder("resnet10", 2, 1, "small", 0.125)
    export_encoder(enc, tmp_path / "e.pt")
    obj = torch.load(tmp_path / "e.pt", weights_only=True)
    obj["state_dict"].pop(next(iter(obj["state_dict"])))
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_encoder(tmp_path / "broken.pt")
    loaded, _ = load_encoder(tmp_path / "e.pt")
    for a, b in zip(enc.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": torch.tensor(1)}, path)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        atomic_save({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.parametrize("checkpoint_every", [0, 3])  # 3: a mid-epoch checkpoint falls due at the NaN step itself
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, phantoms2d, monkeypatch, checkpoint_every):
    from medcl import methods
    from medcl.config import MedclConfig, apply_overrides
    from medcl.train import pretrain

    real = methods.SimCLR.loss_fn
    calls = {"n": 0}

    def flaky(self, z1, z2, labels):
        calls["n"] += 1
        loss = real(self, z1, z2, labels)
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(methods.SimCLR, "loss_fn", flaky)
    cfg = apply_overrides(MedclConfig(), {"encoder": {"name": "resnet10", "widen_factor": 0.125},
                                          "data": {"size": 16},
                                          "train": {"epochs": 3, "batch_size": 8, "checkpoint_every": checkpoint_every}})
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        pretrain(phantoms2d, tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["global_step"] == 6  # end of epoch 1; the NaN came at step 9
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    steps = [int(ln.split(",")[0]) for ln in (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 9))  # every finite step logged, the NaN one not


def test_symlink_loop_does_not_hang(tmp_path, phantoms2d):
    import shutil

    from medcl.data import discover

    data = tmp_path / "d"
    shutil.copytree(phantoms2d / "scans", data / "scans")
    (data / "scans" / "loop").symlink_to(data, target_is_directory=True)
    assert len(discover(data).records) == 48


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=600), ext=st.sampled_from([".png", ".jpg", ".nii", ".nii.gz", ".dcm", ".npy", ".tif"]))
def test_fuzz_random_bytes_give_an_array_or_a_medcl_error(tmp_path, data, ext):
    from medcl.data.cache import to_model_array
    from medcl.data.readers import read_scan

    p = tmp_path / f"fuzz{ext}"
    p.write_bytes(data)
    try:
        arr, spacing = read_scan(p)
        out = to_model_array(arr, spacing, p, 2, 16, 1, "percentile")
        assert out.shape == (1, 16, 16) and np.isfinite(out).all()
    except MedclError:
        pass


@settings(max_examples=60, deadline=5000)
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       fill=st.sampled_from(["rand", "nan", "inf", "const", "huge"]))
def test_fuzz_random_arrays_through_reader_and_views(shape, fill):
    import tempfile

    from medcl.config import ViewsConfig
    from medcl.data.cache import to_model_array
    from medcl.data.readers import read_scan
    from medcl.views import BatchedViews

    arr = {"rand": np.random.rand(*shape), "nan": np.full(shape, np.nan), "inf": np.full(shape, np.inf),
           "const": np.ones(shape), "huge": np.random.rand(*shape) * 1e30}[fill].astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "a.npy"
        np.save(p, arr)
        try:
            a, sp = read_scan(p)
            out = to_model_array(a, sp, p, 2, 16, 1, "percentile")
        except MedclError:
            return
    v = BatchedViews(ViewsConfig(), 2, 16)(torch.as_tensor(out)[None])
    assert v.shape == (1, 1, 16, 16) and torch.isfinite(v).all()


def test_dicom_without_pixel_data(tmp_path):
    import pydicom

    from conftest import shared
    from medcl.data.readers import read_scan
    from medcl.errors import ScanReadError

    ds = pydicom.dcmread(str(shared("pypi_bundled", "dicom", "CT_small.dcm")))
    del ds.PixelData
    p = tmp_path / "nopixels.dcm"
    ds.save_as(str(p))
    with pytest.raises(ScanReadError, match="no pixel data"):
        read_scan(p)


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    from medcl.data import readers
    from medcl.errors import ScanReadError

    p = tmp_path / "locked.png"
    p.write_bytes(b"\x89PNG....")
    monkeypatch.setattr(readers.os, "access", lambda path, mode: False)  # root ignores chmod; simulate it
    with pytest.raises(ScanReadError, match="permission denied"):
        readers.read_scan(p)


def test_rgb_tiny_and_mixed_dims(tmp_path):
    import nibabel as nib
    from PIL import Image

    from medcl.data import discover
    from medcl.data.cache import build_cache, to_model_array
    from medcl.errors import ScanReadError

    rgb = np.random.rand(3, 20, 20).astype(np.float32)
    assert to_model_array(rgb, None, "rgb", 2, 16, 1, "percentile").shape == (1, 16, 16)  # averaged to gray
    assert to_model_array(rgb[:1], None, "g", 2, 16, 3, "percentile").shape == (3, 16, 16)
    assert to_model_array(np.random.rand(1, 6, 6).astype(np.float32), None, "small", 2, 16, 1, "percentile").shape == (1, 16, 16)
    with pytest.raises(ScanReadError, match="too small"):
        to_model_array(np.random.rand(1, 2, 2).astype(np.float32), None, "tiny", 2, 16, 1, "percentile")
    for i in range(4):
        Image.fromarray((np.random.rand(12, 12) * 255).astype(np.uint8)).save(tmp_path / f"img{i}.png")
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), str(tmp_path / "vol.nii.gz"))
    scans = build_cache(discover(tmp_path), 2, 16, progress=False)
    assert len(scans) == 4 and "vol.nii.gz" in scans.skipped[0][0] and "--dims 3" in scans.skipped[0][1]


def test_labels_paths_not_found(tmp_path, phantoms2d):
    from medcl.errors import LabelsError
    from medcl.finetune import load_labeled

    csv_ = tmp_path / "labels.csv"
    csv_.write_text("path,label\nscans/p0000_0.png,healthy\nscans/nothere.png,diseased\n")
    with pytest.raises(LabelsError, match="nothere.png"):
        load_labeled(phantoms2d, csv_, {"dims": 2, "size": 16}, task=Task("diseased"), progress=False)
