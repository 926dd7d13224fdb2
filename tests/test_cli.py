"""End-to-end: the real `medcl` command line (its `main()`, in this process unless a test needs its own), 2D and 3D,
on tiny synthetic data."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import medcl as run_medcl

TINY = ["--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125", "--set", "train.log_every=1",
        "--set", "train.monitor_every=1"]


def medcl(*args, check=True, **kw):
    return run_medcl("--quiet", *args, check=check, **kw)


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
    for k in ("n_labeled", "n_unlabeled", "label_fraction", "seed", "positive_class", "mode", "threshold_rule",
              "expected_at_threshold", "operating_point"):
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
    assert m["checkpoint"] == "none" and m["mode"] == "finetune" and m["n_labeled"] == 8
    assert m["head_info"]["encoder_lr_ratio"] == 1.0 and m["head_info"]["folds"] == 3
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


# ---- trust: tasks never change silently, progress off a terminal, cheap mistakes fail fast ---------------------

def _with_typo(tmp_path, phantoms2d):
    """labels.csv with CSV line 6 labelled 'maybe??' among diseased/healthy."""
    rows = (phantoms2d / "labels.csv").read_text().splitlines()
    header = rows[0].split(",")
    cells = rows[5].split(",")
    cells[header.index("label")] = "maybe??"
    rows[5] = ",".join(cells)
    p = tmp_path / "labels_typo.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


def test_a_mistyped_label_is_an_error_naming_its_row(tmp_path, phantoms2d):
    typo = _with_typo(tmp_path, phantoms2d)
    r = medcl("finetune", "--checkpoint", "none", "--data", phantoms2d, "--labels", typo, "--out", tmp_path / "ft",
              check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "'maybe??' (1 row: 6)" in r.stderr and "--multiclass" in r.stderr and "--positive" in r.stderr
    assert not (tmp_path / "ft" / "metrics.json").exists()


@pytest.mark.slow
def test_an_explicit_multiclass_task_writes_valid_json(tmp_path, phantoms2d):
    typo = _with_typo(tmp_path, phantoms2d)
    medcl("finetune", "--checkpoint", "none", "--data", phantoms2d, "--labels", typo, "--out", tmp_path / "ft",
          "--multiclass", *TINY, "--set", "data.size=16")
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert m["positive_class"] is None and len(m["classes"]) == 3


@pytest.mark.slow
def test_progress_lines_with_eta_when_not_on_a_terminal(tmp_path, phantoms2d):
    base = ["finetune", "--checkpoint", "none", "--mode", "finetune", "--data", phantoms2d, "--labels",
            phantoms2d / "labels.csv", "--labels-per-class", 4, "--epochs", 2, "--set", "data.size=16", *TINY]
    # captured stderr is not a terminal, as in a log file
    r = run_medcl(*base, "--out", tmp_path / "a", env={"MEDCL_PROGRESS": None})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fine-tune epoch")]
    assert lines[0].startswith("fine-tune epoch: 1/2") and "elapsed" in lines[0] and "ETA" in lines[0]
    assert "\r" not in r.stderr  # no bar redraws in a log file
    r = run_medcl(*base, "--out", tmp_path / "b", env={"MEDCL_PROGRESS": "off"})
    assert "fine-tune epoch" not in r.stderr
    r = run_medcl("pretrain", phantoms2d, "--out", tmp_path / "p", "--epochs", 2, "--batch-size", 8,
                  "--set", "data.size=16", *TINY, env={"MEDCL_PROGRESS": None})
    assert "estimated time: about" in r.stdout
    assert "views, and the engine each transform runs in:" in r.stdout and "RandGaussianSmooth: batched" in r.stdout
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("epoch 1/2: loss") and "ETA" in ln]


def test_cheap_mistakes_fail_before_torch_is_imported(tmp_path, phantoms2d):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,0\n")
    code = ("import sys; from medcl.cli import main; rc = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(rc)")
    for args in (["finetune", "--checkpoint", "none", "--data", phantoms2d, "--labels", bad, "--out", tmp_path / "o"],
                 ["finetune", "--checkpoint", tmp_path / "nope", "--data", phantoms2d, "--out", tmp_path / "o"],
                 ["pretrain", phantoms2d, "--out", tmp_path / "o", "--set", "method.name=simclrr"],
                 ["demo", "--out", tmp_path / "o", "--set", "train.batchsize=24"],
                 ["demo", "--out", tmp_path / "o", "--set", "data.dims=2"]):
        r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 2 and "torch not imported" in r.stdout, (args, r.stdout, r.stderr)
    assert not (tmp_path / "o").exists()


def test_cli_usability(tmp_path, phantoms2d):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "x").write_text("x")
    r = medcl("finetune", "--checkpoint", "none", "--data", phantoms2d, "--out", out, "--labels",
              phantoms2d / "labels.csv", check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "--resume" not in r.stderr  # finetune cannot resume
    r = subprocess.run([sys.executable, "-m", "medcl", "embed", "--help", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0  # --quiet after the command
    r = medcl("evaluate", "--help")
    assert "(default: 5)" in r.stdout and "(default: knn linear proto spread selftrain)" in r.stdout and "(default: 30)" in r.stdout
    for opt in ("--data", "--labels", "--out"):
        line = r.stdout.split(f"  {opt} ")[1].splitlines()[0].strip()
        assert line, f"{opt} has no help"
    r = medcl("config", "show", "--config", "simclr_3d", "--set", "train.epochs=7")
    assert "dims: 3" in r.stdout and "epochs: 7" in r.stdout and "# passes over the scans" in r.stdout
    assert "simclr_2d" in medcl("config", "list").stdout
