"""Heads trained on a few labels, each chosen and thresholded by cross-validation inside the labeled scans.

Every head gets the labeled rows, the unlabeled pool (non-test scans outside the label budget) and nothing else:
test rows reach a head only through the `predict` function it returns. Hyperparameters are chosen by out-of-fold
(OOF) AUC over the labeled rows, and the OOF predictions are what the decision threshold is picked from, so a 1%
budget no longer rests on a handful of validation labels.

- supervised, on frozen features: `linear` (logistic regression), `knn`, `mlp`
- semi-supervised, on frozen features of the labeled and unlabeled scans: `spread` (label spreading on the kNN
  graph, scikit-learn LabelSpreading), `selftrain` (logistic regression re-fitted with its confident, class-balanced
  pseudo-labels on the unlabeled pool)
- `finetune`: the network trained end to end (pretrained: the encoder at a tenth of the head's learning rate; from
  scratch: one rate), early-stopped on each held-out fold; the final model is trained on every label for the median
  best epoch count of the folds
"""
from __future__ import annotations

import warnings

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import ViewsConfig
from .metrics import score
from .progress import Progress
from .runtime import seed_everything
from .views import BatchedViews

SUPERVISED = ("linear", "knn", "mlp", "proto")
SEMI_SUPERVISED = ("spread", "selftrain")
FEATURE_HEADS = SUPERVISED + SEMI_SUPERVISED  # each a class in HEAD_TYPES below
HEADS = FEATURE_HEADS + ("finetune",)
CV_FOLDS = 5  # feature heads (cheap); fine-tuning uses FINETUNE_FOLDS
FINETUNE_FOLDS = 3


@dataclass
class HeadFit:
    oof: np.ndarray  # (n_labeled, n_classes) out-of-fold probabilities; NaN when too few labels to cross-validate
    predict: object  # rows or features -> probabilities
    info: dict = field(default_factory=dict)
    head: FeatureHead | None = None  # the fitted feature head (None for finetune)
    classifier: nn.Module | None = None  # encoder + linear head, for classifier.pt (linear and finetune)


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


# ---- heads on frozen features: scikit-learn-style objects, one class each, in HEAD_TYPES ---------------------------
# A head is built with its hyperparameter (`param`, chosen from `grid` by OOF AUC) and fitted on labeled features;
# heads with `uses_pool` also get the unlabeled pool's features. `to_module` gives an nn.Linear over the features
# where the head is one (so it can become classifier.pt), else None.

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

    def to_module(self) -> nn.Linear | None:
        return None


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

    def to_module(self) -> nn.Linear:
        """The same probe as one linear layer on raw features (the scaler folded in)."""
        w = self.clf.coef_ / self.scaler.scale_
        b = self.clf.intercept_ - (self.clf.coef_ * self.scaler.mean_ / self.scaler.scale_).sum(1)
        if w.shape[0] == 1:  # binary: logits [0, w.x + b]
            w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
        layer = nn.Linear(w.shape[1], w.shape[0])
        layer.weight.data = torch.tensor(w, dtype=torch.float32)
        layer.bias.data = torch.tensor(b, dtype=torch.float32)
        return layer


class KnnHead(FeatureHead):
    """Cosine kNN, neighbours weighted by distance."""
    name, param, grid = "knn", "k", (5, 10, 20)

    def fit(self, x, y, x_unlabeled=None):
        from sklearn.neighbors import KNeighborsClassifier

        self.clf = KNeighborsClassifier(n_neighbors=min(self.value, len(y)), weights="distance").fit(_unit(x), y)
        return self

    def predict_proba(self, x):
        return _full_proba(self.clf, _unit(x), self.n_classes)


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


HEAD_TYPES = {h.name: h for h in (LinearHead, KnnHead, MlpHead, ProtoHead, SpreadHead, SelfTrainHead)}


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


# ---- fine-tuning the network ------------------------------------------------------------------------------------

class Classifier(nn.Module):
    def __init__(self, encoder, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feat_dim, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


@torch.no_grad()
def predict_rows(model: nn.Module, scans, idx, device, batch_size=256) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(idx), batch_size):
        x = torch.as_tensor(scans.batch(idx[s:s + batch_size])).to(device)
        out.append(torch.softmax(model(x).float(), 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2))


def train_network(encoder, scans, y, train_idx, device, n_classes, seed=0, epochs=30, batch_size=32, lr=1e-3,
                  pretrained=True, val_idx=None, patience=8, progress=False):
    """Encoder + linear head trained end to end: strong augmentation, class-weighted loss, AdamW with a cosine
    schedule. A pretrained encoder learns at lr/10 (the head at lr), a scratch one at lr. With `val_idx`, the best
    epoch on it is kept (early stopping); without, all `epochs` run. Returns (model, best epoch count)."""
    seed_everything(seed)
    model = Classifier(copy.deepcopy(encoder), n_classes).to(device)
    dims = len(scans.shape) - 2
    aug = BatchedViews(ViewsConfig(crop_scale=(0.6, 1.0), rotate_deg=15, noise_std=0.03, blur_prob=0.1,
                                   gamma=(0.75, 1.35)), dims, scans.shape[-1])
    counts = np.bincount(y[train_idx], minlength=n_classes).astype(float)
    weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / n_classes, dtype=torch.float32, device=device)
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr / 10 if pretrained else lr},
                             {"params": model.head.parameters(), "lr": lr}], weight_decay=1e-4)
    bs = min(batch_size, len(train_idx))
    steps = max(1, math.ceil(len(train_idx) / bs))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    g = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    best = (-np.inf, None, epochs)
    bar = Progress(epochs, "fine-tune epoch", progress)
    for ep in range(epochs):
        model.train()
        order = rng.permutation(train_idx)
        for s in range(steps):
            b = order[s * bs:(s + 1) * bs]
            if len(b) < 2:
                continue
            x = aug(torch.as_tensor(scans.batch(b)).to(device), g)
            loss = nn.functional.cross_entropy(model(x), torch.as_tensor(y[b], device=device), weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.update()
        if val_idx is not None and len(np.unique(y[val_idx])) > 1:
            s = auc_or_accuracy(y[val_idx], predict_rows(model, scans, val_idx, device))
            if s > best[0]:
                best = (s, copy.deepcopy(model.state_dict()), ep + 1)
            elif ep + 1 - best[2] >= patience:
                break
    bar.close()
    if best[1] is not None:
        model.load_state_dict(best[1])
    return model.cpu(), best[2]


def fit_finetune(encoder, scans, y, labeled, groups, n_classes: int, device, seed=0, epochs=30, pretrained=True,
                 folds: int = FINETUNE_FOLDS, progress=False) -> HeadFit:
    """Fine-tune with cross-validation inside the labeled rows: each fold early-stops on its held-out part and gives
    its OOF predictions; the final model learns from every label for the median best epoch count."""
    labeled = np.asarray(labeled, dtype=int)
    yl = y[labeled]
    cv = cv_folds(yl, None if groups is None else np.asarray(groups)[labeled], seed, folds)
    oof = np.full((len(labeled), n_classes), np.nan)
    best_epochs = []
    for i, (tr, ho) in enumerate(cv):
        model, ep = train_network(encoder, scans, y, labeled[tr], device, n_classes, seed + 100 * (i + 1), epochs,
                                  pretrained=pretrained, val_idx=labeled[ho], progress=progress)
        oof[ho] = predict_rows(model.to(device), scans, labeled[ho], device)
        best_epochs.append(ep)
    final_epochs = int(np.median(best_epochs)) if best_epochs else epochs
    model, _ = train_network(encoder, scans, y, labeled, device, n_classes, seed, final_epochs, pretrained=pretrained,
                             progress=progress)
    return HeadFit(oof, lambda rows: predict_rows(model.to(device), scans, np.asarray(rows, dtype=int), device),
                   {"fold_best_epochs": best_epochs, "epochs": final_epochs, "folds": len(cv),
                    "encoder_lr_ratio": 0.1 if pretrained else 1.0}, classifier=model)
