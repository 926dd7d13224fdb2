"""Heads on frozen features, trained on a few labels: one scikit-learn-style class per head, registered by name.

Every head gets the labeled rows, the unlabeled pool (non-test scans outside the label budget) and nothing else:
test rows reach a head only through the `predict` function it returns. Its hyperparameter is chosen by out-of-fold
(OOF) AUC over the labeled rows, and the OOF predictions are what the decision threshold is picked from, so a 1%
budget does not rest on a handful of validation labels.

- supervised: `linear` (logistic regression), `knn`, `mlp`, `proto` (nearest class mean)
- semi-supervised, on the labeled and unlabeled scans: `spread` (label spreading on the kNN graph, scikit-learn
  LabelSpreading), `selftrain` (logistic regression re-fitted with its confident, class-balanced pseudo-labels)

A new head is one class here with `@register_head` (docs/contributing.md); every command and `--mode`/`--heads`
choice reads HEAD_TYPES. This module does not import torch (the CLI reads its names before torch loads).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

CV_FOLDS = 5  # feature heads (cheap); fine-tuning uses heads.FINETUNE_FOLDS
HEAD_TYPES: dict = {}  # name -> FeatureHead subclass, in the order registered
DEFAULT_HEADS = ("knn", "linear", "proto", "spread", "selftrain")  # medcl evaluate's, on both encoders


def register_head(cls):
    """Class decorator: make a FeatureHead subclass available under its `name` everywhere."""
    HEAD_TYPES[cls.name] = cls
    return cls


@dataclass
class HeadFit:
    oof: np.ndarray  # (n_labeled, n_classes) out-of-fold probabilities; NaN when too few labels to cross-validate
    predict: object  # rows or features -> probabilities
    info: dict = field(default_factory=dict)
    head: FeatureHead | None = None  # the fitted feature head (None for finetune)
    classifier: object = None  # an nn.Module, encoder + linear head, for classifier.pt (linear and finetune)


def cv_folds(y: np.ndarray, groups, seed: int, k: int = CV_FOLDS) -> list:
    """Stratified folds over the labeled rows, grouped by patient when patients repeat (no patient on both sides)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = np.bincount(y)
    k = int(min(k, counts[counts > 0].min()))
    if k < 2:
        return []
    dummy = np.zeros(len(y))
    if groups is not None and len(set(groups)) < len(groups):
        return [f for f in StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(dummy, y, groups)
                if len(f[1])]
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(dummy, y))


def auc_or_accuracy(y, proba) -> float:
    if not np.all(np.isfinite(proba)):  # a fitter that failed on a fold never wins the choice
        return -np.inf
    from .metrics import score

    m = score(y, proba)
    return m["auc"] if np.isfinite(m["auc"]) else m["accuracy"]


def _full_proba(clf, x, n_classes, classes=None):
    p = clf.predict_proba(x)
    classes = clf.classes_ if classes is None else classes
    if p.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return p
    out = np.zeros((len(x), n_classes))
    out[:, np.asarray(classes, dtype=int)] = p
    return out


def _unit(f):
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


# ---- the heads: each built with its hyperparameter (`param`, chosen from `grid` by OOF AUC) and fitted on labeled
# features; heads with `uses_pool` also get the unlabeled pool's features (at most `pool_cap`, a seeded sample)

class FeatureHead:
    name, param, grid, uses_pool, pool_cap = "", "", (None,), False, None

    def __init__(self, value, n_classes: int, seed: int = 0):
        self.value, self.n_classes, self.seed = value, n_classes, seed

    def fit(self, x, y, x_unlabeled=None):
        raise NotImplementedError

    def predict_proba(self, x) -> np.ndarray:
        raise NotImplementedError

    def info(self) -> dict:
        return {self.param: self.value}

    def to_module(self):
        """An nn.Linear over the features computing the same probabilities, where the head is one; else None."""
        return None


@register_head
class LinearHead(FeatureHead):
    """Logistic regression on standardised features, class-balanced."""
    name, param, grid = "linear", "C", (1e-3, 1e-2, 1e-1, 1.0)

    def fit(self, x, y, x_unlabeled=None):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        self.clf = LogisticRegression(C=self.value, class_weight="balanced", max_iter=2000,
                                      random_state=self.seed).fit(self.scaler.transform(x), y)
        return self

    def predict_proba(self, x):
        return _full_proba(self.clf, self.scaler.transform(x), self.n_classes)

    def to_module(self):
        """The same probe as one nn.Linear on raw features (the scaler folded in)."""
        import torch
        from torch import nn

        w = self.clf.coef_ / self.scaler.scale_
        b = self.clf.intercept_ - (self.clf.coef_ * self.scaler.mean_ / self.scaler.scale_).sum(1)
        if w.shape[0] == 1:  # binary: logits [0, w.x + b]
            w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
        layer = nn.Linear(w.shape[1], w.shape[0])
        layer.weight.data = torch.tensor(w, dtype=torch.float32)
        layer.bias.data = torch.tensor(b, dtype=torch.float32)
        return layer


@register_head
class KnnHead(FeatureHead):
    """Cosine kNN, neighbours weighted by distance."""
    name, param, grid = "knn", "k", (5, 10, 20)

    def fit(self, x, y, x_unlabeled=None):
        from sklearn.neighbors import KNeighborsClassifier

        self.clf = KNeighborsClassifier(n_neighbors=min(self.value, len(y)), weights="distance").fit(_unit(x), y)
        return self

    def predict_proba(self, x):
        return _full_proba(self.clf, _unit(x), self.n_classes)


@register_head
class MlpHead(FeatureHead):
    """One hidden layer on standardised features, classes balanced by resampling (MLPClassifier has no weights)."""
    name, param, grid = "mlp", "alpha", (1e-3, 1e-1, 1.0)

    def fit(self, x, y, x_unlabeled=None):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        rng = np.random.default_rng(self.seed)
        counts = np.bincount(y, minlength=self.n_classes)
        idx = np.concatenate([rng.choice(np.flatnonzero(y == c), counts.max(), replace=True)
                              for c in range(self.n_classes) if counts[c] > 0])
        with warnings.catch_warnings():  # 200 iterations is the budget on purpose: alpha is chosen by cross-validation,
            warnings.simplefilter("ignore", ConvergenceWarning)  # and a few labels are fitted long before it converges
            self.clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=self.value, max_iter=200,
                                     random_state=self.seed).fit(self.scaler.transform(x[idx]), y[idx])
        return self

    def predict_proba(self, x):
        return _full_proba(self.clf, self.scaler.transform(x), self.n_classes)


@register_head
class ProtoHead(FeatureHead):
    """Nearest class mean in cosine geometry, after centring on the mean of the labeled and unlabeled features
    (SimpleShot's CL2N). Nothing is fitted but the means, so nothing is chosen from a handful of labels."""
    name, param, grid, uses_pool = "proto", "temperature", (0.1,), True

    def fit(self, x, y, x_unlabeled=None):
        pool = x if x_unlabeled is None else np.vstack([x, x_unlabeled])
        self.mu = pool.mean(0)
        z = _unit(x - self.mu)
        self.present = np.bincount(y, minlength=self.n_classes) > 0
        self.protos = _unit(np.stack([z[y == c].mean(0) if self.present[c] else np.zeros(x.shape[1])
                                      for c in range(self.n_classes)]))
        return self

    def predict_proba(self, x):
        s = np.where(self.present, _unit(x - self.mu) @ self.protos.T / self.value, -np.inf)
        e = np.exp(s - s.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


@register_head
class SpreadHead(FeatureHead):
    """Labels spread over the kNN graph of labeled + unlabeled scans (cosine geometry: unit-normalised features)."""
    name, param, grid, uses_pool, pool_cap = "spread", "k", (10, 30), True, 5000

    def fit(self, x, y, x_unlabeled=None):
        from sklearn.semi_supervised import LabelSpreading

        fu = np.zeros((0, x.shape[1])) if x_unlabeled is None else x_unlabeled
        xs = _unit(np.vstack([x, fu]))
        self.clf = LabelSpreading(kernel="knn", n_neighbors=min(self.value, len(xs) - 1), alpha=0.2, max_iter=100)
        with np.errstate(divide="ignore", invalid="ignore"):  # a component without labels: its rows get the prior
            self.clf.fit(xs, np.concatenate([y, -np.ones(len(fu), dtype=int)]))
        self.prior, self.n_unlabeled = np.bincount(y, minlength=self.n_classes) / len(y), len(fu)
        return self

    def predict_proba(self, x):  # a scan whose neighbours carry no label mass (a component without labels): the prior
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.nan_to_num(_full_proba(self.clf, _unit(x), self.n_classes))
        p[p.sum(1) <= 0] = self.prior
        return p / p.sum(1, keepdims=True)

    def info(self):
        return {**super().info(), "n_unlabeled": self.n_unlabeled}


@register_head
class SelfTrainHead(FeatureHead):
    """Logistic regression, then `rounds` re-fits that add the most confident unlabeled scans with their predicted
    class, in proportion to the labeled class balance, until `share` of the pool carries a pseudo-label."""
    name, param, grid, uses_pool, pool_cap = "selftrain", "C", (1e-2, 1e-1), True, 2000
    rounds, share = 3, 0.5

    def fit(self, x, y, x_unlabeled=None):
        fu = np.zeros((0, x.shape[1])) if x_unlabeled is None else x_unlabeled
        self.linear = LinearHead(self.value, self.n_classes, self.seed).fit(x, y)
        prior = np.bincount(y, minlength=self.n_classes) / len(y)
        pseudo = np.full(len(fu), -1)  # a pseudo-label, once given, is kept
        for r in range(1, self.rounds + 1):
            if not len(fu):
                break
            p = self.linear.predict_proba(fu)
            guess = p.argmax(1)
            for cls in range(self.n_classes):
                want = int(round(self.share * len(fu) * prior[cls] * r / self.rounds)) - int((pseudo == cls).sum())
                cand = np.flatnonzero((pseudo < 0) & (guess == cls))
                pseudo[cand[np.argsort(-p[cand, cls])][:max(0, want)]] = cls
            taken = pseudo >= 0
            self.linear = LinearHead(self.value, self.n_classes, self.seed).fit(
                np.vstack([x, fu[taken]]), np.concatenate([y, pseudo[taken]]))
        self.n_pseudo, self.n_unlabeled = int((pseudo >= 0).sum()), len(fu)
        return self

    def predict_proba(self, x):
        return self.linear.predict_proba(x)

    def info(self):
        return {**super().info(), "n_pseudo": self.n_pseudo, "n_unlabeled": self.n_unlabeled}


class _Prior:
    """What a fold with one class can predict: its class shares."""

    def __init__(self, y, n_classes):
        self.p = np.bincount(y, minlength=n_classes) / len(y)

    def predict_proba(self, x):
        return np.tile(self.p, (len(x), 1))


def fit_feature_head(head: str, feats: np.ndarray, y: np.ndarray, labeled, unlabeled, groups, n_classes: int,
                     seed: int = 0) -> HeadFit:
    """A head on frozen features. Only rows `labeled` (with y) and `unlabeled` (features only) are read."""
    kind = HEAD_TYPES[head]
    labeled, unlabeled = np.asarray(labeled, dtype=int), np.asarray(unlabeled, dtype=int)
    fl, yl = feats[labeled], y[labeled]
    fu = feats[unlabeled] if kind.uses_pool else np.zeros((0, feats.shape[1]))
    if kind.pool_cap and len(fu) > kind.pool_cap:
        fu = fu[np.sort(np.random.default_rng([seed, 99]).choice(len(fu), kind.pool_cap, replace=False))]
    folds = cv_folds(yl, None if groups is None else np.asarray(groups)[labeled], seed)
    oof = np.full((len(yl), n_classes), np.nan)
    best = None
    grid = kind.grid if folds else kind.grid[len(kind.grid) // 2:len(kind.grid) // 2 + 1]
    for v in grid:
        cand = np.full((len(yl), n_classes), np.nan)
        for tr, ho in folds:
            one_class = len(np.unique(yl[tr])) < 2
            h = _Prior(yl[tr], n_classes) if one_class else kind(v, n_classes, seed).fit(fl[tr], yl[tr], fu)
            cand[ho] = h.predict_proba(fl[ho])
        s = auc_or_accuracy(yl, cand) if folds else 0.0
        if best is None or s > best[0]:
            best, oof = (s, v), cand
    fitted = kind(best[1], n_classes, seed).fit(fl, yl, fu)
    info = {**fitted.info(), "oof_score": float(best[0]) if folds else None, "folds": len(folds)}
    return HeadFit(oof, fitted.predict_proba, info, head=fitted)


def head_names() -> tuple:
    """Every head `evaluate --heads` accepts: the registered feature heads, then `finetune` (medcl.heads)."""
    return (*HEAD_TYPES, "finetune")
