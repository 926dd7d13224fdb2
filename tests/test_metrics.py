"""Metric edge cases against scikit-learn: rare classes in the bootstrap, undefined rates, thresholds, JSON."""
import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from medcl.metrics import binary_metrics, bootstrap_ci, score, youden_threshold
from medcl.runs import write_json


def test_multiclass_bootstrap_ci_is_finite_with_a_rare_class():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(150, int), np.ones(145, int), np.full(5, 2)]  # a class of 5 among 300 test scans
    p = rng.dirichlet([1, 1, 1], 300)
    p[np.arange(300), y] += 0.5
    p /= p.sum(1, keepdims=True)
    lo, hi = bootstrap_ci(y, p, "auc", n=200, seed=1)
    auc = skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert np.isfinite(lo) and np.isfinite(hi) and lo <= auc <= hi


@pytest.mark.parametrize("cls", [0, 1])
def test_rates_on_a_single_class_test_set_are_undefined_like_sklearn(cls):
    y = np.full(12, cls)
    p = np.random.default_rng(2).random(12)
    m = binary_metrics(y, p, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn flags these as undefined (a warning), medcl as NaN -> null
        with pytest.raises(Exception):
            skm.recall_score(y, (p >= 0.5).astype(int), pos_label=1 - cls)
    undefined = "sensitivity" if cls == 0 else "specificity"
    defined = "specificity" if cls == 0 else "sensitivity"
    assert np.isnan(m[undefined]) and np.isnan(m["balanced_accuracy"])
    assert m[defined] == pytest.approx(skm.recall_score(y, (p >= 0.5).astype(int), pos_label=cls))


def test_youden_threshold_is_never_worse_than_chance():
    rng = np.random.default_rng(3)
    for _ in range(400):
        n = int(rng.integers(4, 40))
        y = rng.integers(0, 2, n)
        if len(np.unique(y)) < 2:
            continue
        p = rng.random(n) * (1 - 1.5 * y * rng.random())  # often anti-correlated: J < 0 at every score threshold
        t = youden_threshold(y, p)
        m = binary_metrics(y, p, t)
        fpr, tpr, _ = skm.roc_curve(y, p)
        assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(max(0.0, (tpr - fpr).max()))


def test_metrics_json_is_always_valid_json(tmp_path):
    m = score(np.ones(5, int), np.stack([np.zeros(5), np.ones(5)], 1))  # one class: AUC undefined
    write_json(tmp_path / "m.json", {"test": m, "ci": (float("nan"), np.float32(0.5)), "n": np.int64(3)})
    back = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert back["test"]["auc"] is None and back["ci"] == [None, 0.5] and back["n"] == 3
