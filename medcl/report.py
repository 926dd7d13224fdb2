"""Evaluation figures (matplotlib) sent to TensorBoard through medcl.tensorboard: ROC, PR, confusion matrix,
reliability diagram, the most confidently wrong test scans, and hparams."""
from __future__ import annotations

import numpy as np

from . import tensorboard as tb


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(y, p, title="ROC (test)"):
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def pr_figure(y, p):
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    prec, rec, _ = precision_recall_curve(y, p)
    ax.plot(rec, prec, label=f"AP {average_precision_score(y, p):.3f}")
    ax.axhline(np.mean(y), color="k", ls="--", lw=0.8, label="prevalence")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def confusion_figure(cm, names, title):
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def calibration_figure(y, p, bins=10):
    plt = _plt()
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    conf = [p[which == b].mean() if (which == b).any() else np.nan for b in range(bins)]
    freq = [y[which == b].mean() if (which == b).any() else np.nan for b in range(bins)]
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(conf, freq, "o-")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability (test)")
    fig.tight_layout()
    return fig


def wrong_gallery(scans, idx, y, p, names, threshold=0.5, k=8):
    """The k test scans the classifier was most confidently wrong about (at the chosen threshold)."""
    plt = _plt()
    pred = (p >= threshold).astype(int)
    conf = np.where(pred == 1, p, 1 - p)
    wrong = np.flatnonzero(pred != y)
    if len(wrong) == 0:
        return None
    wrong = wrong[np.argsort(-conf[wrong])][:k]
    fig, axes = plt.subplots(1, len(wrong), figsize=(2 * len(wrong), 2.4), dpi=100, squeeze=False)
    for ax, w in zip(axes[0], wrong):
        img = tb.thumbnail(scans.batch([idx[w]])[0])
        ax.imshow(np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img[0], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"true {names[y[w]]}\np={p[w]:.2f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def log_evaluation(writer, ld, test_idx, proba, threshold, metrics) -> None:
    test = metrics["test"]
    scalars = {k: v for k, v in test.items() if isinstance(v, float)}
    tb.log_scalars(writer, scalars, 0, "test/")
    names = ld.table.class_names()
    y = ld.y[test_idx]
    tb.log_figure(writer, "test/confusion_matrix", confusion_figure(test["confusion"], names,
                                                                    f"Confusion (threshold {threshold:.2f})"))
    if proba.shape[1] == 2 and len(np.unique(y)) == 2:
        p = proba[:, 1]
        tb.log_figure(writer, "test/roc", roc_figure(y, p))
        tb.log_figure(writer, "test/pr", pr_figure(y, p))
        tb.log_figure(writer, "test/calibration", calibration_figure(y, p))
        fig = wrong_gallery(ld.scans, test_idx, y, p, names, threshold)
        if fig is not None:
            tb.log_figure(writer, "test/most_confident_errors", fig)
    from sklearn.metrics import classification_report

    rep = classification_report(y, proba.argmax(1) if proba.shape[1] > 2 else (proba[:, 1] >= threshold).astype(int),
                                labels=list(range(len(names))), target_names=names, zero_division=0)
    tb.log_text(writer, "test/per_class", "```\n" + rep + "\n```")
    hp = {"mode": metrics["mode"], "seed": metrics["seed"], "n_labeled": metrics["n_labeled"],
          "label_fraction": metrics["label_fraction"] if metrics["label_fraction"] is not None else -1,
          "labels_per_class": metrics["labels_per_class"] or -1, "checkpoint": metrics["checkpoint"]}
    tb.log_hparams(writer, hp, {k: test[k] for k in ("auc", "accuracy", "balanced_accuracy") if k in test})
