"""Training the network on a few labels (`finetune`), beside the heads on frozen features (medcl.feature_heads).

`finetune`: the network trained end to end (pretrained: the encoder at a tenth of the head's learning rate and the
head starting from a linear probe on the frozen features; from scratch: one rate and a random head), early-stopped on
each held-out fold of the labeled scans; the final model is trained on every label for the median best epoch count of
the folds.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from .config import ViewsConfig
from .feature_heads import HeadFit, LinearHead, auc_or_accuracy, cv_folds
from .progress import Progress
from .runtime import encode, seed_everything
from .views import BatchedViews

FINETUNE_FOLDS = 3
# LP-FT (Kumar et al. 2022): a pretrained encoder's head starts from a linear probe on its frozen features. From a
# random head the first steps' large gradients reach the encoder and distort the features the probe already finds.
PROBE_INIT = True
PROBE_C = 0.1  # the linear head's middle regularisation (feature_heads.LinearHead.grid)


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
                  pretrained=True, val_idx=None, patience=8, progress=False, head_start: nn.Linear | None = None):
    """Encoder + linear head trained end to end: strong augmentation, class-weighted loss, AdamW with a cosine
    schedule. A pretrained encoder learns at lr/10 (the head at lr), a scratch one at lr. The head starts from
    `head_start` (`probe_head`) when given, else at random. With `val_idx`, the best epoch on it is kept (early
    stopping); without, all `epochs` run. Returns (model, best epoch count)."""
    seed_everything(seed)
    model = Classifier(copy.deepcopy(encoder), n_classes).to(device)
    if head_start is not None:
        model.head.load_state_dict(head_start.state_dict())
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


def probe_head(feats: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0) -> nn.Linear | None:
    """A class-balanced logistic regression on frozen features, as the fine-tune head's start; None (a random head)
    when the rows lack a class."""
    if len(np.unique(labels)) < 2:
        return None
    layer = LinearHead(PROBE_C, n_classes, seed).fit(feats, labels).to_module()
    return layer if layer.out_features == n_classes else None


class _Rows:
    """The rows `idx` of a ScanSet, as `encode` reads them."""

    def __init__(self, scans, idx):
        self.scans, self.idx = scans, np.asarray(idx)

    def __len__(self):
        return len(self.idx)

    def batch(self, rows):
        return self.scans.batch(self.idx[np.asarray(rows)])


def fit_finetune(encoder, scans, y, labeled, groups, n_classes: int, device, seed=0, epochs=30, pretrained=True,
                 folds: int = FINETUNE_FOLDS, progress=False, features=None) -> HeadFit:
    """Fine-tune with cross-validation inside the labeled rows: each fold early-stops on its held-out part and gives
    its OOF predictions; the final model learns from every label for the median best epoch count. A pretrained
    encoder's head starts from a probe on its frozen features: `features` of every row when the caller has them,
    else the labeled rows are encoded here, once for every fold."""
    labeled = np.asarray(labeled, dtype=int)
    yl = y[labeled]
    probe = pretrained and PROBE_INIT
    if probe:
        fl = features[labeled] if features is not None else encode(encoder, _Rows(scans, labeled), device)

    def start(rows):
        return probe_head(fl[rows], yl[rows], n_classes, seed) if probe else None

    cv = cv_folds(yl, None if groups is None else np.asarray(groups)[labeled], seed, folds)
    oof = np.full((len(labeled), n_classes), np.nan)
    best_epochs = []
    for i, (tr, ho) in enumerate(cv):
        model, ep = train_network(encoder, scans, y, labeled[tr], device, n_classes, seed + 100 * (i + 1), epochs,
                                  pretrained=pretrained, val_idx=labeled[ho], progress=progress, head_start=start(tr))
        oof[ho] = predict_rows(model.to(device), scans, labeled[ho], device)
        best_epochs.append(ep)
    final_epochs = int(np.median(best_epochs)) if best_epochs else epochs
    model, _ = train_network(encoder, scans, y, labeled, device, n_classes, seed, final_epochs, pretrained=pretrained,
                             progress=progress, head_start=start(np.arange(len(labeled))))
    return HeadFit(oof, lambda rows: predict_rows(model.to(device), scans, np.asarray(rows, dtype=int), device),
                   {"fold_best_epochs": best_epochs, "epochs": final_epochs, "folds": len(cv),
                    "encoder_lr_ratio": 0.1 if pretrained else 1.0,
                    "head_init": "linear probe" if probe else "random"}, classifier=model)
