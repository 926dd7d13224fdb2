"""Classification metrics (scikit-learn) and the validation-chosen decision threshold."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (Youden's J) on (validation) data.

    0.5 only when it cannot be chosen (one class). When no score threshold beats chance (J < 0 everywhere), the
    best is J = 0, "call nothing positive": a threshold just above every score, never an arbitrary 0.5 that may be
    worse than chance."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y, p)
    t = float(thr[np.argmax(tpr - fpr)])
    if not np.isfinite(t):  # roc_curve's first point (+inf: nothing positive) is the best
        return float(np.nextafter(np.max(p), np.inf))
    return max(t, 0.0)


def parse_operating_point(text: str | None) -> tuple:
    """'youden' | 'sensitivity=0.95' | 'specificity=0.9' -> (rule, target). Raises ValueError with what is allowed."""
    text = (text or "youden").strip().lower()
    if text == "youden":
        return "youden", None
    rule, _, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if rule not in ("sensitivity", "specificity") or not 0 < target <= 1:
        raise ValueError(f"--operating-point {text!r}: use youden, sensitivity=X or specificity=X with X in (0, 1], "
                         f"e.g. sensitivity=0.95")
    return rule, target


def operating_threshold(y: np.ndarray, p: np.ndarray, rule: str = "youden", target: float | None = None) -> float:
    """The decision threshold on scores `p` (out-of-fold predictions of the labeled scans) for an operating point:
    Youden's J, or the highest threshold whose sensitivity reaches `target` (the most specific such point), or the
    lowest threshold whose specificity reaches `target` (the most sensitive such point)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if len(np.unique(y)) < 2:
        return 0.5
    if rule == "youden":
        return youden_threshold(y, p)
    if rule == "sensitivity":  # call positive every score >= t: t = the score below which (1 - target) positives lie
        pos = np.sort(p[y == 1])
        k = int(np.floor((1 - target) * len(pos) + 1e-9))
        return float(pos[min(k, len(pos) - 1)])
    neg = np.sort(p[y == 0])  # specificity: at least `target` of negatives strictly below t
    k = int(np.ceil(target * len(neg) - 1e-9))
    return float(np.nextafter(neg[k - 1], np.inf)) if k >= 1 else float(neg[0])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    y = np.asarray(y).astype(int)
    pred = (np.asarray(p) >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    nan = float("nan")  # undefined (scikit-learn warns): sensitivity without positives, specificity without negatives
    out = {"n": int(len(y)), "accuracy": float((tp + tn) / max(1, len(y))),
           "sensitivity": float(tp / (tp + fn)) if tp + fn else nan,
           "specificity": float(tn / (tn + fp)) if tn + fp else nan,
           "f1": float(skm.f1_score(y, pred, zero_division=0))}
    out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2  # NaN if either is undefined
    out["auc"] = float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    out["confusion"] = [[tn, fp], [fn, tp]]
    return out


def multiclass_metrics(y: np.ndarray, proba: np.ndarray) -> dict:
    pred = proba.argmax(1)
    out = {"n": int(len(y)), "accuracy": float(skm.accuracy_score(y, pred)),
           "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
           "f1": float(skm.f1_score(y, pred, average="macro", zero_division=0))}
    # macro one-vs-rest AUC is undefined when a class is missing from y (a small test split, a bootstrap resample)
    out["auc"] = float("nan")
    if len(np.unique(y)) == proba.shape[1]:
        try:
            out["auc"] = float(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro",
                                                 labels=np.arange(proba.shape[1])))
        except ValueError:
            pass
    out["confusion"] = skm.confusion_matrix(y, pred, labels=np.arange(proba.shape[1])).tolist()
    return out


def score(y, proba: np.ndarray, threshold: float = 0.5) -> dict:
    """proba: (N, K) class probabilities. Binary tasks use column 1 and the threshold."""
    if proba.shape[1] == 2:
        return binary_metrics(y, proba[:, 1], threshold)
    return multiclass_metrics(y, proba)


def bootstrap_ci(y, proba, metric: str = "auc", n: int = 1000, seed: int = 0, threshold: float = 0.5, level=0.95):
    """Percentile bootstrap over test scans for a single run, stratified by class: each resample keeps every class
    at its test count, so a rare class (5 of 300) cannot drop out and leave the metric undefined."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    if len(by_class) < 2:
        return float("nan"), float("nan")
    vals = []
    for _ in range(n):
        i = np.concatenate([rng.choice(rows, len(rows), replace=True) for rows in by_class])
        v = score(y[i], proba[i], threshold)[metric]
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def paired_auc_gain_ci(y, p_a, p_b, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """(gain, lo, hi): AUC(p_a) - AUC(p_b) on the same test scans, with a percentile interval from a bootstrap that
    resamples scans (stratified by class) and scores both on the same resample: the pairing removes the spread both
    share (which scans happen to be hard), so the interval is the one a gain needs."""
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_auc_score

    y, p_a, p_b = np.asarray(y), np.asarray(p_a, dtype=float), np.asarray(p_b, dtype=float)
    classes = np.unique(y)
    if len(classes) != 2:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    neg, pos = (rng.choice(np.flatnonzero(y == c), (n, (y == c).sum()), replace=True) for c in classes)

    def aucs(p):  # AUC = Mann-Whitney U / (n_pos n_neg), ties counted half: every resample at once
        return mannwhitneyu(p[pos], p[neg], axis=1, method="asymptotic").statistic / (pos.shape[1] * neg.shape[1])

    diffs = aucs(p_a) - aucs(p_b)
    a = (1 - level) / 2
    gain = float(roc_auc_score(y, p_a) - roc_auc_score(y, p_b))
    return gain, float(np.quantile(diffs, a)), float(np.quantile(diffs, 1 - a))


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
