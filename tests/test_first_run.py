"""First-run trust (issue 30): what a new user meets on their first folders, each a case that once broke the journey."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import medcl as run_medcl, shared

TINY = ["--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125", "--set", "data.size=16",
        "--batch-size", "4", "--epochs", "1"]


def medcl(*args, check=True, **kw):
    return run_medcl("--quiet", *args, check=check, **kw)


def binary_volumes(folder: Path, n: int = 16) -> Path:
    """A NIfTI folder in which every scan is a 0/255 shape volume (cubes and balls), as a 3D shape set would be."""
    import nibabel as nib

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    grid = np.mgrid[:16, :16, :16]
    rows = ["path,label"]
    for i in range(n):
        c, r = rng.uniform(6, 10, 3)[:, None, None, None], rng.uniform(3, 5)
        shape = np.abs(grid - c).max(0) < r if i % 2 else ((grid - c) ** 2).sum(0) < r * r
        nib.save(nib.Nifti1Image((shape * 255).astype(np.uint8), np.eye(4)), str(folder / f"s{i:02d}.nii.gz"))
        rows.append(f"s{i:02d}.nii.gz,{i % 2}")
    (folder.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_label_maps_beside_images_are_skipped_not_counted_as_bad(tmp_path):
    """BraTS: FLAIR, T1c, brain mask and tumour labels per patient; the 12 masks are listed, the 12 images used."""
    data = shared("brats2013_deepmedic_examples")
    run = tmp_path / "run"
    r = run_medcl("pretrain", data, "--dims", 3, "--out", run, *TINY)
    skipped = (run / "skipped.csv").read_text().splitlines()[1:]
    assert len(skipped) == 12 and all("label map or mask" in ln for ln in skipped)
    assert {Path(ln.split(",")[0]).name for ln in skipped} == {"brainmask.nii.gz", "OTMultiClass.nii.gz"}
    assert "12 of 24 files are label maps or masks" in r.stdout and "12 scans" in r.stdout


@pytest.mark.slow
def test_a_folder_of_binary_volumes_is_shape_data_in_every_command(tmp_path):
    data = binary_volumes(tmp_path / "shapes")
    run = tmp_path / "run"
    r = run_medcl("pretrain", data, "--dims", 3, "--out", run, *TINY)
    assert "all 16 readable scans are binary or label volumes: treating them as shape data" in r.stdout
    assert (run / "encoder.pt").is_file()
    r = medcl("evaluate", "--checkpoint", run, "--data", data, "--labels", data.parent / "labels.csv",
              "--out", tmp_path / "ev", "--fractions", "1.0", "--seeds", 1, "--heads", "knn", "--baseline", "none")
    assert (tmp_path / "ev" / "results.csv").is_file()
    medcl("embed", "--checkpoint", run, "--data", data, "--out", tmp_path / "emb")
    assert len(np.load(tmp_path / "emb" / "embeddings.npz")["features"]) == 16


def test_a_crop_only_view_list_gets_a_resize_to_the_model_size(tmp_path, phantoms2d):
    from medcl.config import MedclConfig, apply_overrides
    from medcl.views import BatchedViews, engine_report, monai_transform

    crop_only = [{"_target_": "RandScaleCrop", "roi_scale": 0.4, "random_size": True},
                 {"_target_": "RandBiasField", "prob": 0.3}]
    cfg = apply_overrides(MedclConfig(), {"views": {"transforms": crop_only}})
    import torch

    x = torch.rand(6, 1, 32, 32)
    assert BatchedViews(cfg.views, 2, 24, in_size=32)(x, torch.Generator().manual_seed(0)).shape == (6, 1, 24, 24)
    assert monai_transform(cfg.views, 2, 24)(x[0]).shape == (1, 24, 24)
    report = engine_report(cfg.views, 2, 24, "batched")
    assert any("Resize to data.size added after RandScaleCrop" in ln for ln in report)
    assert cfg.views.transforms == crop_only  # the user's list is not edited in place
    recipe = tmp_path / "crop.yaml"
    recipe.write_text("views:\n  transforms:\n    - {_target_: RandScaleCrop, roi_scale: 0.4, random_size: true}\n"
                      "    - {_target_: RandBiasField, prob: 0.3}\n")
    r = run_medcl("views", phantoms2d, "--out", tmp_path / "v", "--config", recipe)
    assert "Resize to data.size added" in r.stdout and (tmp_path / "v" / "views.png").is_file()


def test_a_failed_run_does_not_block_its_corrected_rerun(tmp_path, phantoms2d):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(6):
        (junk / f"s{i}.png").write_text("not an image")
    run = tmp_path / "run"
    r = medcl("pretrain", junk, "--out", run, check=False)
    assert r.returncode == 2
    (run / ".medcl").parent.mkdir(exist_ok=True)
    (run / ".medcl").write_text("medcl")  # what a failed start leaves (and config.yaml)
    (run / "config.yaml").write_text("data: {}\n")
    r = medcl("pretrain", phantoms2d, "--out", run, *TINY)  # the corrected command, without --overwrite
    assert r.returncode == 0 and (run / "encoder.pt").is_file()
    # --resume of a run that never trained says so and starts afresh, without "was trained on" other data
    never = tmp_path / "never"
    never.mkdir()
    (never / ".medcl").write_text("medcl")
    (never / "config.yaml").write_text("data: {}\n")
    r = run_medcl("pretrain", phantoms2d, "--out", never, "--resume", *TINY)
    assert "never trained" in r.stdout and "was trained on" not in r.stdout + r.stderr
    assert (never / "encoder.pt").is_file()


def test_a_folder_holding_a_finished_output_is_still_protected(tmp_path, phantoms2d):
    from medcl.errors import RunDirError
    from medcl.runs import check_out_dir, prepare_out_dir

    out = prepare_out_dir(tmp_path / "ev", phantoms2d, marker="results.csv")
    (out / "results.csv").write_text("budget\n")
    with pytest.raises(RunDirError, match="--overwrite"):
        check_out_dir(out, phantoms2d, marker="results.csv")
    assert check_out_dir(tmp_path / "new", phantoms2d) == "new"


CHEAP = "import sys; from medcl.cli import main; rc = main(sys.argv[1:]); " \
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(rc)"


def _cheap(*args):
    r = subprocess.run([sys.executable, "-c", CHEAP, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 2 and "torch not imported" in r.stdout, (args, r.stdout, r.stderr)
    return r.stderr


def test_path_mistakes_fail_before_torch_is_imported(tmp_path, phantoms2d):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "already exists and is not empty" in _cheap("pretrain", phantoms2d, "--out", busy)
    assert "inside the data folder" in _cheap("pretrain", phantoms2d, "--out", phantoms2d / "run")
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "classifier.pt").write_bytes(b"x")
    (ft / "metrics.json").write_text("{}")
    err = _cheap("embed", "--checkpoint", ft, "--data", phantoms2d, "--out", tmp_path / "e")
    assert "is a finetune output folder" in err and f"--classifier {ft}" in err
    assert "is a finetune output folder" in _cheap("evaluate", "--checkpoint", ft, "--data", phantoms2d,
                                                   "--out", tmp_path / "e")
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "encoder.pt").write_bytes(b"x")
    (pre / "config.yaml").write_text("data: {}\n")
    err = _cheap("predict", "--classifier", pre, "--data", phantoms2d, "--out", tmp_path / "p")
    assert "is a pretrain run folder, not a classifier: pass its finetune folder" in err


@pytest.mark.slow
def test_a_2d_encoder_on_volumes_names_the_encoder_from_the_first_scan(tmp_path, phantoms2d, phantoms3d):
    run = tmp_path / "run2d"
    medcl("pretrain", phantoms2d, "--out", run, *TINY)
    for extra in ([], ["--dims", "3"]):  # --dims does not change what the checkpoint is
        r = medcl("finetune", "--checkpoint", run, "--data", phantoms3d, "--labels", phantoms3d / "labels.csv",
                  "--out", tmp_path / f"ft{len(extra)}", *extra, check=False)
        assert r.returncode == 2 and "holds 3D volumes" in r.stderr and "pretrained on 2D scans" in r.stderr
        assert r.stderr.count("3D volume") == 1  # one reason, said once
    from medcl.data.cache import build_cache
    from medcl.data.discover import open_source

    src = open_source(phantoms3d, 2)
    reads = []
    read = src.read
    src.read = lambda rec: reads.append(rec) or read(rec)
    with pytest.raises(Exception, match="holds 3D volumes"):
        build_cache(src, 2, 16, store=None, progress=False)
    assert len(reads) <= 3  # decided from the first scans, not after decoding the folder


def test_a_folder_of_non_images_fails_in_one_line_before_a_plan(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(20):
        (junk / f"s{i}.png").write_text("not an image")
    r = medcl("pretrain", junk, "--out", tmp_path / "run", check=False)
    assert r.returncode == 2 and "native ~0 px" not in r.stdout and "defaults for this folder" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be read as image" in lines[0] and "LoadImage" not in lines[0]


def test_progress_lines_come_when_a_multiple_is_crossed_and_phases_are_timed(capsys):
    from medcl.progress import Phases, Progress

    bar = Progress(1000, "encode scans", "lines", line_every=250)
    for _ in range(4):
        bar.update(256)  # batches never land on a multiple of 250
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["encode scans: 256/1000", "encode scans: 512/1000",
                                                  "encode scans: 768/1000", "encode scans: 1024/1000"]
    phases = Phases()
    phases.done("read scans")
    phases.done("encode")
    assert str(phases).startswith("read scans ") and ", encode " in str(phases)


@pytest.mark.slow
def test_silent_phases_speak(tmp_path, phantoms2d):
    """The pretraining estimate within the first ~10% of the steps; embed's per-phase times at its end."""
    run = tmp_path / "run"
    r = run_medcl("pretrain", phantoms2d, "--out", run, *TINY[:-2], "--epochs", 3, "--batch-size", 8,
                  env={"MEDCL_PROGRESS": "lines"})
    est = next(ln for ln in r.stdout.splitlines() if ln.startswith("estimated time"))
    assert "timed over steps 2-3)" in est  # 18 steps: the estimate after step 3, not step 10 (in epoch 2)
    assert r.stdout.index("estimated time") < r.stdout.index("epoch 1/3")
    r = run_medcl("embed", "--checkpoint", run, "--data", phantoms2d, "--out", tmp_path / "emb")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("embedded"))
    assert "read scans" in line and "encode" in line and "projector" in line and "2D map" in line


@pytest.mark.slow
def test_a_degenerate_threshold_is_warned_about(tmp_path, phantoms2d):
    """The README's own example on a small folder: 4 labels and sensitivity=0.95 called every scan diseased."""
    r = medcl("finetune", "--checkpoint", "none", "--data", phantoms2d, "--labels", phantoms2d / "labels.csv",
              "--out", tmp_path / "ft", "--label-fraction", "0.05", "--operating-point", "sensitivity=0.95",
              *TINY[:6])
    import json

    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    expected = metrics["expected_at_threshold"]
    assert metrics["n_labeled"] <= 4
    if expected:
        degenerate = {expected["sensitivity"], expected["specificity"]} == {0.0, 1.0}
        assert ("calls every one of the" in r.stdout) == degenerate
    assert metrics["warning"] and metrics["warning"] in r.stdout  # 2 labels per class: too few either way
    assert "Label more scans" in metrics["warning"] or "expect it to move" in metrics["warning"]


def test_threshold_warning_names_the_degenerate_case():
    from types import SimpleNamespace

    from medcl.finetune import threshold_warning

    table = SimpleNamespace(class_names=lambda: ["healthy", "diseased"])
    ld = SimpleNamespace(n_classes=2, table=table, y=np.array([0, 0, 1, 1, 0, 1, 0, 1]))
    fit = SimpleNamespace(info={"folds": 4})
    lab = np.arange(8)
    w = threshold_warning(ld, lab, fit, {"sensitivity": 1.0, "specificity": 0.0}, "sensitivity=0.95")
    assert "calls every one of the 8 labeled scans 'diseased'" in w and "--operating-point youden" in w
    assert threshold_warning(ld, lab, fit, {"sensitivity": 0.9, "specificity": 0.7}, "youden") is None
    assert "too few for the cross-validation" in threshold_warning(ld, lab, fit, {}, "youden")
    assert "2-fold" in threshold_warning(ld, lab, SimpleNamespace(info={"folds": 2}),
                                         {"sensitivity": 0.9, "specificity": 0.7}, "youden")


@pytest.mark.slow
def test_select_without_labels_keeps_the_layouts_test_folder_out(tmp_path, phantoms2d):
    import shutil

    data = tmp_path / "layout"
    scans = sorted((phantoms2d / "scans").glob("*.png"))
    for i, p in enumerate(scans):
        dest = data / ("test" if i % 4 == 0 else "train") / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    run = tmp_path / "run"
    medcl("pretrain", phantoms2d, "--out", run, *TINY)
    r = run_medcl("select", "--checkpoint", run, "--data", data, "--budget", 20, "--out", tmp_path / "sel")
    assert "holding out the 12 scans under a test/ folder" in r.stdout
    chosen = [ln.split(",")[0] for ln in (tmp_path / "sel" / "to_label.csv").read_text().splitlines()[1:]]
    assert len(chosen) == 20 and not any(c.startswith("test/") for c in chosen)
    r = run_medcl("select", "--checkpoint", run, "--data", data / "train", "--budget", 5, "--out", tmp_path / "s2")
    assert "without --labels no scan is held out" in r.stdout
