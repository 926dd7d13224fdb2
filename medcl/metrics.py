"""Classification metrics (scikit-learn) and the validation-chosen decision threshold."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 on (validation) data; 0.5 when it cannot be chosen."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y, p)
    j = np.argmax(tpr - fpr)
    t = float(thr[j])
    return 0.5 if not np.isfinite(t) else min(max(t, 0.0), 1.0)


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    y = np.asarray(y).astype(int)
    pred = (np.asarray(p) >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    out = {"n": int(len(y)), "accuracy": float((tp + tn) / max(1, len(y))),
           "sensitivity": float(tp / max(1, tp + fn)), "specificity": float(tn / max(1, tn + fp)),
           "f1": float(skm.f1_score(y, pred, zero_division=0))}
    out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
    out["auc"] = float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    out["confusion"] = [[tn, fp], [fn, tp]]
    return out


def multiclass_metrics(y: np.ndarray, proba: np.ndarray) -> dict:
    pred = proba.argmax(1)
    out = {"n": int(len(y)), "accuracy": float(skm.accuracy_score(y, pred)),
           "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
           "f1": float(skm.f1_score(y, pred, average="macro", zero_division=0))}
    try:
        out["auc"] = float(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=np.arange(proba.shape[1])))
    except ValueError:
        out["auc"] = float("nan")
    out["confusion"] = skm.confusion_matrix(y, pred, labels=np.arange(proba.shape[1])).tolist()
    return out


def score(y, proba: np.ndarray, threshold: float = 0.5) -> dict:
    """proba: (N, K) class probabilities. Binary tasks use column 1 and the threshold."""
    if proba.shape[1] == 2:
        return binary_metrics(y, proba[:, 1], threshold)
    return multiclass_metrics(y, proba)


def bootstrap_ci(y, proba, metric: str = "auc", n: int = 1000, seed: int = 0, threshold: float = 0.5, level=0.95):
    """Percentile bootstrap over test scans for a single run."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        vals.append(score(y[i], proba[i], threshold)[metric])
    if not vals:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def mean_ci(values, level: float = 0.95):
    """Mean and t-interval half-width over seeds."""
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), 0.0, float("nan")
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * sd / np.sqrt(len(v)))
    return float(v.mean()), sd, half
