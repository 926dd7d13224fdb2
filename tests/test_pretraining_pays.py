"""Issue 31: the demo's gain interval is paired by scan; the learning curve leads with best pretrained vs best control."""
import csv
import json

import numpy as np
import pytest
import yaml


def _write_predictions(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "target", "prob_healthy", "prob_diseased", "predicted"])
        for key, y, p in rows:
            w.writerow([key, "diseased" if y else "healthy", y, f"{1 - p:.6f}", f"{p:.6f}", "x"])


def test_the_demo_gain_interval_is_paired_by_scan(tmp_path):
    from medcl.demo import paired_gain
    from medcl.metrics import bootstrap_ci, paired_auc_gain_ci

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    hard = rng.normal(0, 1, 120)  # what makes a scan hard is shared by both encoders
    p_b = 1 / (1 + np.exp(-(1.0 * (y - 0.5) + hard)))
    p_a = 1 / (1 + np.exp(-(1.6 * (y - 0.5) + hard)))
    gain, lo, hi = paired_auc_gain_ci(y, p_a, p_b, n=1000)
    a_lo, a_hi = bootstrap_ci(y, np.c_[1 - p_a, p_a], n=1000)
    b_lo, b_hi = bootstrap_ci(y, np.c_[1 - p_b, p_b], n=1000)
    assert lo < gain < hi and lo > 0  # the pairing sees a gain the two separate intervals overlap on
    assert hi - lo < (a_hi - a_lo) and a_lo < b_hi
    assert paired_auc_gain_ci(y, p_a, p_a, n=200)[1:] == (0.0, 0.0)
    # demo.paired_gain pairs by path, whatever the row order of the two predictions.csv files
    keys = [f"scans/s{i:03d}.png" for i in range(120)]
    _write_predictions(tmp_path / "a.csv", list(zip(keys, y, p_a)))
    order = rng.permutation(120)
    _write_predictions(tmp_path / "b.csv", [(keys[i], y[i], p_b[i]) for i in order])
    assert paired_gain(tmp_path / "a.csv", tmp_path / "b.csv") == paired_auc_gain_ci(y, p_a, p_b)


@pytest.mark.slow
def test_the_demo_measures_the_gain_over_the_stronger_control(tmp_path, capsys):
    from medcl.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "48", "--epochs", "1", "--label-fraction", "0.3", "--quiet",
                 "--set", "train.batch_size=16"]) == 0
    d = json.loads((out / "demo.json").read_text())
    assert d["dims"] == 3  # the default demo is the one where pretraining beat both controls on every seed
    assert d["settings_changed"] == {"train": {"batch_size": 16}}  # another design, and the record says which
    assert yaml.safe_load((out / "pretrain" / "config.yaml").read_text())["train"]["batch_size"] == 16
    control = {"random-init": d["control_test_auc"], "scratch": d["scratch_test_auc"]}
    assert d["best_control"] == max(control, key=control.get)
    lo, hi = d["gain_ci95"]
    assert lo <= d["gain_over_control"] <= hi
    assert abs(d["gain_over_control"] - (d["test_auc"] - control[d["best_control"]])) < 1e-9
    scored = [sorted(r["path"] for r in csv.DictReader(open(out / f / "predictions.csv")))
              for f in ("finetune", "control", "scratch")]
    assert scored[0] and scored[0] == scored[1] == scored[2]  # the three classifiers scored the same test scans
    text = capsys.readouterr().out
    assert "trained from scratch" in text and f"stronger control ({d['best_control']})" in text
    assert main(["demo", "--out", str(out), "--n", "48", "--epochs", "1", "--quiet"]) == 2  # not overwritten unasked


def test_the_learning_curve_leads_with_the_best_rows(tmp_path):
    from medcl.evaluate import _best_per_budget, learning_curve

    summary = []
    for enc, head, aucs in (("pretrained", "knn", (0.7, 0.8)), ("pretrained", "linear", (0.75, 0.78)),
                            ("random-init", "linear", (0.6, 0.85)), ("scratch", "finetune", (0.65, 0.7))):
        for (b, n), auc in zip(((0.01, 12), (0.1, 120)), aucs):
            summary.append(dict(budget_kind="fraction", budget=b, selection="stratified", encoder=enc, head=head,
                                n_labeled=n, auc_mean=auc, auc_ci95=0.02, n_seeds=3))
    best = _best_per_budget(summary, ("pretrained",))
    control = _best_per_budget(summary, ("random-init", "scratch"))
    assert [(s["head"], s["auc_mean"]) for s in best] == [("linear", 0.75), ("knn", 0.8)]
    assert [(s["encoder"], s["auc_mean"]) for s in control] == [("scratch", 0.65), ("random-init", 0.85)]
    learning_curve(summary, tmp_path / "lc.png")
    from PIL import Image

    w, h = Image.open(tmp_path / "lc.png").size
    assert w > 1.8 * h  # two panels side by side


@pytest.mark.slow
def test_choosing_the_recipe_reads_no_test_split(tmp_path, phantoms2d, monkeypatch):
    """benchmarks/recipe.py scores a recipe on validation splits: no test scan is ever read, .npz or folder."""
    import importlib.util
    from pathlib import Path

    from conftest import medcl
    from medcl.data.discover import Source

    spec = importlib.util.spec_from_file_location("recipe", Path(__file__).resolve().parents[1] / "benchmarks" /
                                                  "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    run = tmp_path / "run"
    medcl("--quiet", "pretrain", phantoms2d, "--out", run, "--epochs", 1, "--set", "encoder.name=resnet10",
          "--set", "encoder.widen_factor=0.125", "--set", "data.size=16", "--batch-size", 8)
    rng = np.random.default_rng(0)
    npz = tmp_path / "set.npz"
    np.savez(npz, **{f"{s}_images": rng.integers(0, 255, (24, 16, 16)).astype(np.uint8) for s in ("train", "val")},
             test_images=np.full((24, 16, 16), 7, np.uint8), **{f"{s}_labels": np.arange(24)[:, None] % 2
                                                                  for s in ("train", "val", "test")})
    read = Source.read

    def guarded(self, rec):
        assert rec.split != "test", f"a test scan was read: {rec.key}"
        return read(self, rec)

    monkeypatch.setattr(Source, "read", guarded)
    assert 0 <= recipe.validation_score(run, npz, None, []) <= 1
    # a folder: the test rows of the split medcl evaluate makes are never decoded
    from medcl.data.labels import make_splits, read_labels_csv

    table = read_labels_csv(phantoms2d / "labels.csv", phantoms2d, "diseased")
    split = make_splits(table.y(), np.array(table.patients, dtype=object), seed=0)
    test = {k for k, s in zip(table.keys, split) if s == "test"}
    monkeypatch.setattr(Source, "read", lambda self, rec: (
        pytest.fail(f"test scan {rec.key} read") if rec.key in test else read(self, rec)))
    from medcl.data import store

    monkeypatch.setenv(store.ENV, "off")  # decode now, so that every read goes through the guard
    assert 0 <= recipe.validation_score(run, phantoms2d, phantoms2d / "labels.csv", ["--positive", "diseased"]) <= 1


def test_the_compute_curve_table_reads_back_as_printed():
    """benchmarks/budget.py --table: the figure is redrawn from docs/results.md's rows, which must read back exactly;
    a finished run replaces the table's row at its point and is restated against the table's 1x."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("budget", root / "benchmarks" / "budget.py")
    budget = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(budget)
    printed = [line for line in (root / "docs" / "results.md").read_text().split("## The compute curve")[1]
               .split("![compute curve]")[0].splitlines() if line.startswith("| ") and not line.startswith("| dataset")]
    rows = budget.rows_from_table("\n".join(printed))
    assert len(rows) == len(printed) >= 30
    assert budget.table(rows).splitlines()[2:] == printed
    run = dict(rows[0], views=4 * 4 * rows[0]["views"], multiple=4, gain_mean=0.5, interval=None)  # 4x a 4x default
    merged = budget.merge(rows, [run])
    assert len(merged) == len(rows) + 1 and dict(run, multiple=16) in merged
    same_point = dict(rows[0], multiple=1, best_auc=0.999, interval=None)
    replaced = budget.merge(rows, [same_point])
    assert len(replaced) == len(rows) and same_point in replaced and rows[0] not in replaced
