"""The few-label protocol: no leakage, grouping, tiny-budget stratification, reproducibility, CIs, outputs."""
import csv
import json

import numpy as np
import pytest
from scipy import stats

from medcl.encoders import Encoder, export_encoder
from medcl.evaluate import evaluate
from medcl.finetune import budget_rows, load_labeled
from medcl.metrics import bootstrap_ci, mean_ci, score
from conftest import shared


def test_mean_ci_matches_direct_t_interval():
    v = [0.91, 0.93, 0.90, 0.95, 0.92]
    m, sd, half = mean_ci(v)
    direct = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert m == pytest.approx(np.mean(v)) and sd == pytest.approx(np.std(v, ddof=1))
    assert (m - half, m + half) == pytest.approx(direct)


def test_bootstrap_ci_matches_direct_loop():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(y * 0.4 + rng.random(80) * 0.6, 0, 1)
    proba = np.stack([1 - p, p], 1)
    lo, hi = bootstrap_ci(y, proba, "auc", n=200, seed=3)
    r = np.random.default_rng(3)  # stratified: each class resampled within itself, at its own count
    neg, pos = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    vals = []
    for _ in range(200):
        i = np.concatenate([r.choice(neg, len(neg)), r.choice(pos, len(pos))])
        vals.append(score(y[i], proba[i])["auc"])
    assert (lo, hi) == pytest.approx((np.quantile(vals, 0.025), np.quantile(vals, 0.975)))


def test_budget_rows_never_touch_test_and_keep_patients_and_classes(phantoms2d):
    ld = load_labeled(phantoms2d, phantoms2d / "labels.csv", {"dims": 2, "size": 16}, positive="diseased",
                      progress=False)
    for p in set(ld.groups):  # patient grouping of the made splits
        assert len(set(ld.split[ld.groups == p])) == 1
    test = set(np.flatnonzero(ld.split == "test"))
    for seed in range(10):
        tr, va, te = budget_rows(ld, 0.01, None, seed)
        assert not (set(tr) | set(va)) & test and set(te) == test
        assert set(ld.y[tr]) == {0, 1}  # 1% of a tiny train split still has both classes
    a = budget_rows(ld, 0.3, None, 5)
    b = budget_rows(ld, 0.3, None, 5)
    assert all((x == y).all() for x, y in zip(a, b))


def _tiny_encoder(tmp_path, dims, size):
    enc = Encoder("resnet10", dims, 1, "small", 0.125)
    export_encoder(enc, tmp_path / "encoder.pt", {"data": {"dims": dims, "size": size, "channels": 1}})
    return tmp_path / "encoder.pt"


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_outputs_on_folders(tmp_path, phantoms2d, phantoms3d, dims):
    data = phantoms2d if dims == 2 else phantoms3d
    enc = _tiny_encoder(tmp_path, dims, 16)
    rows = evaluate(enc, data, data / "labels.csv", tmp_path / "ev", fractions=[0.5], per_class=[2], seeds=2,
                    heads=("knn", "linear"), baseline="finetune", epochs=1, positive="diseased", progress=False,
                    log=lambda *a: None)
    assert len(rows) == 2 * 2 * 5  # budgets x seeds x (2 heads + the same 2 heads at random init + scratch)
    out = tmp_path / "ev"
    for f in ("results.csv", "summary.md", "learning_curve.png", "splits.csv"):
        assert (out / f).is_file()
    got = list(csv.DictReader(open(out / "results.csv")))
    assert {r["encoder"] for r in got} == {"pretrained", "random-init", "scratch"}
    # the controls use exactly the labeled subsets the pretrained heads use
    for key in {(r["budget_kind"], r["budget"], r["seed"]) for r in got}:
        same = [r for r in got if (r["budget_kind"], r["budget"], r["seed"]) == key]
        assert len({r["subset"] for r in same}) == 1 and len({r["n_labeled_train"] for r in same}) == 1
    text = (out / "summary.md").read_text()
    assert "| budget |" in text and "## Gain over the best control" in text


@pytest.mark.slow
def test_evaluate_on_medmnist_npz(tmp_path):
    npz = shared("pneumoniamnist", "pneumoniamnist_reconstructed.npz")
    enc = _tiny_encoder(tmp_path, 2, 28)
    rows = evaluate(enc, npz, None, tmp_path / "ev", per_class=[5], seeds=1, heads=("knn", "linear"),
                    baseline="none", progress=False, log=lambda *a: None)
    assert {r["n_test"] for r in rows} == {624} and {r["n_labeled_train"] for r in rows} == {10}
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)


def test_summary_intervals_stay_in_range_and_flag_few_seeds():
    from medcl.evaluate import summarize, summary_markdown

    rows = [{"budget_kind": "fraction", "budget": 0.1, "encoder": "pretrained", "head": "linear", "n_labeled_train": 9,
             "auc": a, "accuracy": 0.5, "balanced_accuracy": 0.5, "sensitivity": float("nan"), "specificity": 0.5,
             "f1": 0.5} for a in (0.925, 0.769)]  # two seeds: mean 0.847, t-interval ±0.99, past 1 unclipped
    text = summary_markdown(summarize(rows), None, "x", 2, "budget", short=True)
    cell = text.strip().splitlines()[-1].split("|")[5]
    assert "[0.000-1.000] †" in cell and "undefined" in text


@pytest.mark.slow
def test_a_collapsed_encoder_shows_no_gain_over_the_control(tmp_path, phantoms2d):
    import torch

    enc = Encoder("resnet10", 2, 1, "small", 0.125)
    with torch.no_grad():
        for p in enc.parameters():
            p.zero_()  # every scan maps to the same features: a collapsed encoder
    export_encoder(enc, tmp_path / "collapsed.pt", {"data": {"dims": 2, "size": 16, "channels": 1}})
    evaluate(tmp_path / "collapsed.pt", phantoms2d, phantoms2d / "labels.csv", tmp_path / "ev", per_class=[8],
             seeds=3, heads=("linear",), baseline="none", positive="diseased", progress=False, log=lambda *a: None)
    gain = json.loads((tmp_path / "ev" / "protocol.json").read_text())["gain_over_best_control"]
    assert len(gain) == 1 and gain[0]["control"] == "random-init/linear" and gain[0]["gain_mean"] <= 0
