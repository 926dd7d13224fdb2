"""Cheap health checks of a representation while it trains: collapse metrics and an online kNN probe."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_metrics(z1: torch.Tensor, z2: torch.Tensor | None = None) -> dict:
    """On L2-normalised embeddings:
    - std: mean per-dimension std; ~1/sqrt(d) when spread over the sphere, 0 when collapsed to a point.
    - std_ratio: std * sqrt(d) (~1 healthy, ~0 collapsed), comparable across embedding sizes.
    - rankme: effective rank exp(H(sigma / |sigma|_1)) (Garrido et al. 2023).
    - alignment: E||z1 - z2||^2 between views (lower is better); uniformity: log E exp(-2||zi - zj||^2) (Wang &
      Isola 2020).
    """
    z = F.normalize(z1.float(), dim=1)
    n, d = z.shape
    std = z.std(0).mean().item() if n > 1 else 0.0
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    out = {"std": std, "std_ratio": std * math.sqrt(d), "rankme": float(torch.exp(-(p * p.log()).sum()))}
    if n > 1:
        sq = torch.pdist(z).pow(2)
        out["uniformity"] = float(torch.log(torch.exp(-2 * sq).mean()))
    if z2 is not None:
        out["alignment"] = float((z - F.normalize(z2.float(), dim=1)).pow(2).sum(1).mean())
    return out


def is_collapsed(metrics: dict, dim: int) -> str | None:
    """A reason string when the metrics say the representation collapsed, else None."""
    if metrics.get("std_ratio", 1.0) < 0.1:
        return f"embedding std {metrics['std']:.4f} is far below the healthy ~1/sqrt(d)={1 / math.sqrt(dim):.4f}"
    if metrics.get("rankme", dim) < 1.5:
        return f"effective rank {metrics['rankme']:.2f}: all embeddings lie along one direction"
    return None


def knn_probe(features: np.ndarray, labels: np.ndarray, k: int = 10, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated kNN (cosine) on a labeled probe set: reports how separable the classes are.
    The encoder never trains on these labels; only this score reads them."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.metrics import accuracy_score, roc_auc_score

    classes, y = np.unique(labels, return_inverse=True)
    counts = np.bincount(y)
    if len(classes) < 2 or counts.min() < 2:
        return {}
    folds = int(min(folds, counts.min()))
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    knn = KNeighborsClassifier(n_neighbors=int(min(k, len(y) - len(y) // folds - 1)), metric="cosine")
    proba = cross_val_predict(knn, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              method="predict_proba")
    out = {"knn_accuracy": float(accuracy_score(y, proba.argmax(1)))}
    try:
        out["knn_auc"] = float(roc_auc_score(y, proba[:, 1]) if len(classes) == 2
                               else roc_auc_score(y, proba, multi_class="ovr"))
    except ValueError:
        pass
    return out
