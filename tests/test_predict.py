"""`medcl predict` and the Python API: the classifier on new scans, with its own preprocessing and threshold."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

import medcl
from medcl.cli import main
from medcl.encoders import Encoder, export_encoder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantoms2d):
    """A linear probe on a tiny encoder, fine-tuned on the session phantoms; fresh phantoms to predict."""
    from medcl.data.synthetic import make_phantoms

    tmp = tmp_path_factory.mktemp("pred")
    enc = Encoder("resnet10", 2, 1, "small", 0.125)
    export_encoder(enc, tmp / "encoder.pt", {"data": {"dims": 2, "size": 16, "channels": 1}})
    assert main(["--quiet", "finetune", "--checkpoint", str(tmp / "encoder.pt"), "--data", str(phantoms2d),
                 "--labels", str(phantoms2d / "labels.csv"), "--positive", "diseased", "--out", str(tmp / "ft")]) == 0
    new = make_phantoms(tmp / "new", n=16, dims=2, size=32, seed=7)
    return tmp, new


def _read(path):
    return list(csv.DictReader(open(path)))


def test_the_api_names_stay_functions_after_their_modules_load():
    from medcl.evaluate import evaluate  # noqa: F401  (loads medcl.finetune and medcl.select as modules)

    for name in ("pretrain", "finetune", "embed", "evaluate", "select", "predict", "export", "demo",
                 "load_classifier", "load_encoder"):
        assert callable(getattr(medcl, name)) and callable(getattr(medcl, name)), name


def test_predict_matches_embed_and_the_python_api(trained, capsys):
    tmp, new = trained
    assert main(["--quiet", "predict", "--classifier", str(tmp / "ft"), "--data", str(new), "--out",
                 str(tmp / "p")]) == 0
    rows = _read(tmp / "p" / "predictions.csv")
    assert list(rows[0]) == ["path", "probability", "prediction", "threshold", "operating_point"] and len(rows) == 16
    thr = json.loads((tmp / "ft" / "metrics.json").read_text())["threshold"]
    for r in rows:  # the threshold it was fine-tuned with, applied as stated
        assert float(r["threshold"]) == pytest.approx(thr, abs=1e-6)
        assert r["prediction"] == ("diseased" if float(r["probability"]) >= thr else "healthy")
    assert "predicted 16 scans" in capsys.readouterr().out
    prob = {r["path"]: float(r["probability"]) for r in rows}
    # the same probabilities from embed --classifier and from the Python API
    assert main(["--quiet", "embed", "--classifier", str(tmp / "ft"), "--data", str(new), "--out",
                 str(tmp / "e")]) == 0
    z = np.load(tmp / "e" / "embeddings.npz")
    for k, p in zip(z["paths"], z["probability"]):
        assert prob[str(k)] == pytest.approx(float(p), abs=1e-5)
    clf = medcl.load_classifier(tmp / "ft")
    paths = [str(new / k) for k in prob]
    api = clf.predict(paths)
    assert api.shape == (16, 2) and np.allclose(api[:, 1], list(prob.values()), atol=1e-5)
    from PIL import Image

    arrays = [np.asarray(Image.open(p), dtype=np.float32) for p in paths[:3]]  # arrays, not paths: the same
    assert np.allclose(clf.predict(arrays)[:, 1], api[:3, 1], atol=1e-5)
    enc = medcl.load_encoder(tmp / "encoder.pt")
    assert enc(torch.zeros(2, 1, 16, 16)).shape == (2, enc.feat_dim) and enc.data_settings["size"] == 16


def test_labels_score_and_another_operating_point(trained):
    tmp, new = trained
    assert main(["--quiet", "predict", "--classifier", str(tmp / "ft"), "--data", str(new), "--labels",
                 str(new / "labels.csv"), "--operating-point", "sensitivity=0.95", "--out", str(tmp / "s")]) == 0
    m = json.loads((tmp / "s" / "metrics.json").read_text())
    assert m["n_scored"] == 16 and 0 <= m["test"]["auc"] <= 1 and "sensitivity=0.95" in m["threshold_rule"]
    clf = medcl.load_classifier(tmp / "ft")
    y, p = np.array(clf.oof["y"]), np.array(clf.oof["p"])
    assert (p[y == 1] >= m["threshold"]).mean() >= 0.95  # the operating point holds on the out-of-fold predictions
    assert {r["operating_point"] for r in _read(tmp / "s" / "predictions.csv")} == {"sensitivity=0.95"}


def test_bad_input_is_one_line_and_nothing_is_lost(trained, phantoms3d, tmp_path, capsys):
    tmp, new = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    for data, words in ((phantoms3d, "3D volume"), (empty, "no scans found")):
        out = tmp_path / f"out_{data.name}"  # not the data folder itself (refused before anything else)
        assert main(["predict", "--classifier", str(tmp / "ft"), "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    newer = tmp_path / "newer"  # a classifier folder from a newer medcl
    newer.mkdir()
    obj = torch.load(tmp / "ft" / "classifier.pt", weights_only=True)
    torch.save({**obj, "format": "medcl-classifier-v9"}, newer / "classifier.pt")
    assert main(["predict", "--classifier", str(newer), "--data", str(new), "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "medcl-classifier-v9" in err and not (tmp_path / "n").exists()
    mixed = tmp_path / "mixed"  # a corrupt file among good scans: listed in skipped.csv, the rest predicted
    shutil.copytree(new / "scans", mixed)
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["--quiet", "predict", "--classifier", str(tmp / "ft"), "--data", str(mixed), "--out",
                 str(tmp_path / "m")]) == 0
    assert len(_read(tmp_path / "m" / "predictions.csv")) == 16
    assert "broken.png" in (tmp_path / "m" / "skipped.csv").read_text()
    out = tmp_path / "kept"
    assert main(["--quiet", "predict", "--classifier", str(tmp / "ft"), "--data", str(new), "--out", str(out)]) == 0
    before = (out / "predictions.csv").read_bytes()
    assert main(["predict", "--classifier", str(tmp / "ft"), "--data", str(new), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "predictions.csv").read_bytes() == before
    assert main(["predict", "--classifier", str(tmp / "ft"), "--data", str(new), "--out", str(new / "p")]) == 2
    assert not (new / "p").exists()  # never into the data folder


def test_the_api_example_in_the_docs_runs(tmp_path, monkeypatch):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/api.md", "exec"), {"__name__": "api_example"})
    assert (tmp_path / "api_example" / "ft" / "classifier.pt").is_file()


def test_the_exported_classifier_runs_with_plain_torch_and_gives_the_same_probabilities(trained, tmp_path):
    import subprocess
    import sys

    tmp, new = trained
    assert main(["--quiet", "export", "--classifier", str(tmp / "ft"), "--out", str(tmp_path / "m.pt2")]) == 0
    assert main(["--quiet", "export", "--classifier", str(tmp / "ft"), "--out", str(tmp_path / "m.pt2")]) == 2
    clf = medcl.load_classifier(tmp / "ft")
    paths = sorted((new / "scans").glob("*.png"))
    np.save(tmp_path / "x.npy", np.stack([clf.preprocess(p) for p in paths]))
    code = ("import json, sys, numpy as np, torch\n"
            "extra = {'medcl.json': ''}\n"
            "m = torch.export.load(sys.argv[1], extra_files=extra).module()\n"
            "np.save(sys.argv[3], m(torch.as_tensor(np.load(sys.argv[2]))).detach().numpy())\n"
            "assert 'medcl' not in sys.modules\n"
            "print(json.loads(extra['medcl.json'])['classes'])\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt2"), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "diseased" in r.stdout
    assert np.allclose(np.load(tmp_path / "y.npy"), clf.predict(paths), atol=1e-5)


def test_saliency_maps_2d_and_3d_with_the_scan_affine(trained, phantoms3d, tmp_path):
    import nibabel as nib

    tmp, new = trained
    assert main(["--quiet", "predict", "--classifier", str(tmp / "ft"), "--data", str(new), "--saliency", "2",
                 "--out", str(tmp_path / "s2")]) == 0
    got = _read(tmp_path / "s2" / "saliency.csv")
    probs = sorted((float(r["probability"]) for r in _read(tmp_path / "s2" / "predictions.csv")), reverse=True)
    assert [float(r["probability"]) for r in got] == pytest.approx(probs[:2], abs=1e-6)  # the most probable first
    assert all((tmp_path / "s2" / "saliency" / r["overlay_png"]).stat().st_size > 500 for r in got)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "s2" / "tb").iterdir())
    # 3D: a tiny 3D classifier; the heat map lies on the scan's own voxel grid, with its affine
    enc = Encoder("resnet10", 3, 1, "small", 0.125)
    export_encoder(enc, tmp_path / "enc3.pt", {"data": {"dims": 3, "size": 16, "channels": 1}})
    assert main(["--quiet", "finetune", "--checkpoint", str(tmp_path / "enc3.pt"), "--data", str(phantoms3d),
                 "--labels", str(phantoms3d / "labels.csv"), "--positive", "diseased", "--out",
                 str(tmp_path / "ft3")]) == 0
    for method in ("occlusion", "gradcam"):
        out = tmp_path / f"s3{method}"
        assert main(["--quiet", "predict", "--classifier", str(tmp_path / "ft3"), "--data", str(phantoms3d),
                     "--saliency", "1", "--saliency-method", method, "--out", str(out)]) == 0
        row = _read(out / "saliency.csv")[0]
        scan, heat = nib.load(str(phantoms3d / row["path"])), nib.load(str(out / "saliency" / row["nifti"]))
        assert heat.shape == scan.shape and np.allclose(heat.affine, scan.affine)
        assert np.isfinite(heat.get_fdata()).all() and (out / "saliency" / row["overlay_png"]).is_file()
