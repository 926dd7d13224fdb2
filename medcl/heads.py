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
FEATURE_HEADS = SUPERVISED + SEMI_SUPERVISED
USES_POOL = SEMI_SUPERVISED + ("proto",)  # heads that read the unlabeled pool's features (proto: only their mean)
HEADS = FEATURE_HEADS + ("finetune",)
CV_FOLDS = 5  # feature heads (cheap); fine-tuning uses FINETUNE_FOLDS
FINETUNE_FOLDS = 3
POOL_CAP = {"spread": 5000, "selftrain": 2000}  # unlabeled scans a semi-supervised head uses (a seeded sample)


@dataclass
class HeadFit:
    oof: np.ndarray  # (n_labeled, n_classes) out-of-fold probabilities; NaN when too few labels to cross-validate
    predict: object  # rows or features -> probabilities
    info: dict = field(default_factory=dict)
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


def _prior(y, n_classes):
    p = np.bincount(y, minlength=n_classes).astype(float)
    return lambda f: np.tile(p / p.sum(), (len(f), 1))


# ---- fitters: (labeled features, labels, unlabeled features, hyperparameter, classes, seed) -> (predict, info) -----

def _fit_linear(f, y, fu, c, n_classes, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed).fit(scaler.transform(f), y)
    w = clf.coef_ / scaler.scale_
    b = clf.intercept_ - (clf.coef_ * scaler.mean_ / scaler.scale_).sum(1)
    if w.shape[0] == 1:  # binary: logits [0, w.x + b]
        w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    return (lambda x: _full_proba(clf, scaler.transform(x), n_classes)), {"C": c, "weight": w, "bias": b}


def _fit_knn(f, y, fu, k, n_classes, seed):
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(y)), weights="distance").fit(_unit(f), y)
    return (lambda x: _full_proba(clf, _unit(x), n_classes)), {"k": k}


def _fit_mlp(f, y, fu, alpha, n_classes, seed):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f)
    rng = np.random.default_rng(seed)  # balance classes by resampling: MLPClassifier has no class weights
    counts = np.bincount(y, minlength=n_classes)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), counts.max(), replace=True)
                          for c in range(n_classes) if counts[c] > 0])
    with warnings.catch_warnings():  # 200 iterations is the budget on purpose: alpha is chosen by cross-validation,
        warnings.simplefilter("ignore", ConvergenceWarning)  # and a few labels are fitted long before it converges
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=alpha, max_iter=200, random_state=seed).fit(
            scaler.transform(f[idx]), y[idx])
    return (lambda x: _full_proba(clf, scaler.transform(x), n_classes)), {"alpha": alpha}


def _fit_proto(f, y, fu, t, n_classes, seed):
    """Nearest class mean in cosine geometry, after centring on the mean of the labeled and unlabeled features
    (SimpleShot's CL2N). Nothing is fitted but the means, so nothing is chosen from a handful of labels."""
    mu = np.vstack([f, fu]).mean(0)
    z = _unit(f - mu)
    present = np.bincount(y, minlength=n_classes) > 0
    protos = _unit(np.stack([z[y == c].mean(0) if present[c] else np.zeros(f.shape[1]) for c in range(n_classes)]))

    def predict(x):
        s = np.where(present, _unit(x - mu) @ protos.T / t, -np.inf)
        e = np.exp(s - s.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    return predict, {"temperature": t}


def _fit_spread(f, y, fu, k, n_classes, seed):
    """Labels spread over the kNN graph of labeled + unlabeled scans (cosine geometry: unit-normalised features)."""
    from sklearn.semi_supervised import LabelSpreading

    x = _unit(np.vstack([f, fu]))
    clf = LabelSpreading(kernel="knn", n_neighbors=min(k, len(x) - 1), alpha=0.2, max_iter=100)
    clf.fit(x, np.concatenate([y, -np.ones(len(fu), dtype=int)]))
    prior = np.bincount(y, minlength=n_classes) / len(y)

    def predict(q):  # a scan whose neighbours carry no label mass (a component without labels) gets the prior
        p = np.nan_to_num(_full_proba(clf, _unit(q), n_classes))
        empty = p.sum(1) <= 0
        p[empty] = prior
        return p / p.sum(1, keepdims=True)

    return predict, {"k": k, "n_unlabeled": len(fu)}


def _fit_selftrain(f, y, fu, c, n_classes, seed, rounds: int = 3, share: float = 0.5):
    """Logistic regression, then `rounds` re-fits that add the most confident unlabeled scans with their predicted
    class, in proportion to the labeled class balance, until `share` of the pool carries a pseudo-label."""
    predict, _ = _fit_linear(f, y, None, c, n_classes, seed)
    prior = np.bincount(y, minlength=n_classes) / len(y)
    pseudo = np.full(len(fu), -1)  # a pseudo-label, once given, is kept
    for r in range(1, rounds + 1):
        if not len(fu):
            break
        p = predict(fu)
        guess = p.argmax(1)
        for cls in range(n_classes):
            want = int(round(share * len(fu) * prior[cls] * r / rounds)) - int((pseudo == cls).sum())
            cand = np.flatnonzero((pseudo < 0) & (guess == cls))
            pseudo[cand[np.argsort(-p[cand, cls])][:max(0, want)]] = cls
        taken = pseudo >= 0
        predict, _ = _fit_linear(np.vstack([f, fu[taken]]), np.concatenate([y, pseudo[taken]]), None, c, n_classes,
                                 seed)
    return predict, {"C": c, "n_pseudo": int((pseudo >= 0).sum()), "n_unlabeled": len(fu)}


FITTERS = {"linear": (_fit_linear, (1e-3, 1e-2, 1e-1, 1.0)), "knn": (_fit_knn, (5, 10, 20)),
           "mlp": (_fit_mlp, (1e-3, 1e-1, 1.0)), "spread": (_fit_spread, (10, 30)),
           "selftrain": (_fit_selftrain, (1e-2, 1e-1)), "proto": (_fit_proto, (0.1,))}


def fit_feature_head(head: str, feats: np.ndarray, y: np.ndarray, labeled, unlabeled, groups, n_classes: int,
                     seed: int = 0) -> HeadFit:
    """A head on frozen features. Only rows `labeled` (with y) and `unlabeled` (features only) are read."""
    fit, grid = FITTERS[head]
    labeled, unlabeled = np.asarray(labeled, dtype=int), np.asarray(unlabeled, dtype=int)
    fl, yl = feats[labeled], y[labeled]
    fu = feats[unlabeled] if head in USES_POOL else np.zeros((0, feats.shape[1]))
    if head in POOL_CAP and len(fu) > POOL_CAP[head]:
        fu = fu[np.sort(np.random.default_rng([seed, 99]).choice(len(fu), POOL_CAP[head], replace=False))]
    folds = cv_folds(yl, None if groups is None else np.asarray(groups)[labeled], seed)
    oof = np.full((len(yl), n_classes), np.nan)
    best = None
    for v in grid if folds else grid[len(grid) // 2:len(grid) // 2 + 1]:
        cand = np.full((len(yl), n_classes), np.nan)
        for tr, ho in folds:
            pf = fit(fl[tr], yl[tr], fu, v, n_classes, seed)[0] if len(np.unique(yl[tr])) > 1 else _prior(yl[tr], n_classes)
            cand[ho] = pf(fl[ho])
        s = auc_or_accuracy(yl, cand) if folds else 0.0
        if best is None or s > best[0]:
            best, oof = (s, v), cand
    predict, info = fit(fl, yl, fu, best[1], n_classes, seed)
    info = {**info, "oof_score": float(best[0]) if folds else None, "folds": len(folds)}
    return HeadFit(oof, predict, info)


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
                    "encoder_lr_ratio": 0.1 if pretrained else 1.0}, model)
