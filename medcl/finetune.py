"""Few-label fine-tuning: labeled data and splits, heads (linear probe, kNN, MLP, full fine-tune), one run's outputs."""
from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import tensorboard as tb
from .config import MedclConfig, ViewsConfig
from .data.cache import ScanSet, build_cache, write_skipped
from .data.discover import open_source
from .data.labels import LabelsTable, labels_from_records, make_splits, read_labels_csv, select_budget
from .encoders import Encoder, atomic_save, build_encoder, load_encoder
from .errors import LabelsError, MedclError
from .metrics import bootstrap_ci, score, youden_threshold
from .progress import Progress
from .runs import prepare_out_dir, write_json
from .train import encode, pick_device, seed_everything
from .views import BatchedViews

CLASSIFIER_FORMAT = "medcl-classifier-v1"


@dataclass
class LabeledData:
    scans: ScanSet
    table: LabelsTable  # aligned with scans.records
    y: np.ndarray
    split: np.ndarray  # 'train' | 'val' | 'test' per scan
    groups: np.ndarray
    split_source: str  # 'csv' | 'npz' | 'made (seed S)'

    @property
    def n_classes(self) -> int:
        return 2 if self.table.binary else len(self.table.classes)


def load_encoder_or_scratch(checkpoint, cfg: MedclConfig):
    """(encoder, data settings). checkpoint 'none' builds the same kind of network with random weights."""
    if checkpoint is None or str(checkpoint).lower() == "none":
        seed_everything(cfg.train.seed)
        enc = build_encoder(cfg)
        return enc, {"dims": cfg.data.dims, "size": cfg.data.size, "channels": cfg.data.channels,
                     "intensity": cfg.data.intensity}, "none"
    enc, extra = load_encoder(checkpoint)
    return enc, extra.get("data", {}), str(checkpoint)


def load_labeled(data, labels_csv, data_settings: dict, positive=None, split_seed: int = 0, out: Path | None = None,
                 allow_outside: bool = False, strict: bool = False, max_bad_fraction: float = 0.2,
                 progress: bool = True, log=print, negative=None, multiclass: bool = False,
                 select=None) -> LabeledData:
    dims, size = int(data_settings.get("dims", 2)), int(data_settings.get("size", 64))
    source = open_source(data, dims, "all", select)
    if labels_csv:
        table = read_labels_csv(labels_csv, source.root if not source.arrays else None, positive, allow_outside,
                                negative, multiclass)
    else:
        table = labels_from_records(source.records, positive, negative, multiclass)
    by_key = {r.key: r for r in source.records}
    if source.left_out:  # labeled scans that --include/--exclude/--files leave out are not part of this task
        table = table.subset([i for i, k in enumerate(table.keys) if k not in source.left_out])
    missing = [k for k in table.keys if k not in by_key]
    if missing:
        if len(missing) == len(table.keys):
            raise LabelsError(f"none of the {len(missing)} paths in the labels file were found under {data} "
                              f"(first: '{missing[0]}'; paths must be relative to DATA).")
        raise LabelsError(f"{len(missing)} labeled paths were not found under {data}: {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}. Fix the CSV or the folder.")
    source.records = [by_key[k] for k in table.keys]
    scans = build_cache(source, dims, size, int(data_settings.get("channels", 1)),
                        data_settings.get("intensity", "percentile"), strict, max_bad_fraction,
                        (out / "cache") if out else None, num_workers=2, progress=progress)
    if out is not None:
        write_skipped(scans.skipped, out / "skipped.csv")
    if scans.skipped:
        log(f"skipped {len(scans.skipped)} unusable labeled scans" + (f" (see {out / 'skipped.csv'})" if out else ""))
    table = table.subset([table.row_of(r.key) for r in scans.records])
    y = table.y()
    groups = np.array(table.patients, dtype=object)
    if all(s is not None for s in table.splits):
        split = np.array(table.splits, dtype=object)
        how = "npz" if source.arrays else "csv"
        if not (split == "val").any():  # carve a validation split out of train, grouped by patient
            tr = np.flatnonzero(split == "train")
            sub = make_splits(y[tr], groups[tr], test_fraction=0.15, val_fraction=1e-9, seed=split_seed)
            split[tr[sub == "test"]] = "val"
    elif any(s is not None for s in table.splits):
        raise LabelsError("the labels' split column is filled for some rows only; fill it for every row or drop it.")
    else:
        split = make_splits(y, groups, seed=split_seed)
        how = f"made (patient-grouped, stratified, seed {split_seed})"
    for name in ("train", "test"):
        if len(np.unique(y[split == name])) < 2:
            raise LabelsError(f"the {name} split holds a single class: need both healthy and diseased scans there.")
    return LabeledData(scans, table, y, split, groups, how)


def write_splits(ld: LabeledData, path: Path, train_idx=None, val_idx=None) -> None:
    """splits.csv: every labeled scan's split and, for one classifier, its role: trained_on (its labels were used),
    validated_on (chose the model and threshold), test, or unlabeled (a train/val scan outside the label budget)."""
    role = np.where(ld.split == "test", "test", "unlabeled").astype(object)
    if train_idx is not None:
        role[np.asarray(train_idx, dtype=int)] = "trained_on"
    if val_idx is not None:
        role[np.asarray(val_idx, dtype=int)] = "validated_on"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient", "split"] + (["role"] if train_idx is not None else []))
        for i, (r, lab, p, s) in enumerate(zip(ld.scans.records, ld.table.labels, ld.groups, ld.split)):
            w.writerow([r.key, lab, p, s] + ([role[i]] if train_idx is not None else []))


def read_splits(path: Path) -> dict:
    """{scan key: (split, role)} from a finetune folder's splits.csv ('' where a column is absent)."""
    with open(path, newline="") as f:
        return {r["path"]: (r.get("split") or "", r.get("role") or "") for r in csv.DictReader(f)}


# ---- heads on frozen features ------------------------------------------------------------------------------------

def _auc_or_acc(y, proba):
    m = score(y, proba)
    return m["auc"] if np.isfinite(m["auc"]) else m["accuracy"]


def fit_linear_probe(ftr, ytr, fva, yva, n_classes: int, seed: int = 0):
    """Logistic regression on standardised frozen features, class-balanced; C chosen on validation AUC.
    Returns (predict_proba, info) where info holds the equivalent linear layer on raw features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(ftr)
    xtr, xva = scaler.transform(ftr), scaler.transform(fva)
    best = None
    for c in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed).fit(xtr, ytr)
        s = _auc_or_acc(yva, _full_proba(clf, xva, n_classes)) if len(np.unique(yva)) > 1 else -abs(np.log10(c))
        if best is None or s > best[0]:
            best = (s, c, clf)
    _, c, clf = best
    w = clf.coef_ / scaler.scale_
    b = clf.intercept_ - (clf.coef_ * scaler.mean_ / scaler.scale_).sum(1)
    if w.shape[0] == 1:  # binary: logits [0, w.x + b]
        w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    return (lambda f: _full_proba(clf, scaler.transform(f), n_classes)), {"C": c, "weight": w, "bias": b}


def _full_proba(clf, x, n_classes):
    p = clf.predict_proba(x)
    if p.shape[1] == n_classes:
        return p
    out = np.zeros((len(x), n_classes))
    out[:, clf.classes_] = p
    return out


def fit_knn(ftr, ytr, fva, yva, n_classes: int, seed: int = 0):
    from sklearn.neighbors import KNeighborsClassifier

    def norm(f):
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    best = None
    for k in (1, 5, 10, 20):
        if k > len(ytr):
            continue
        clf = KNeighborsClassifier(n_neighbors=k, weights="distance", metric="cosine").fit(norm(ftr), ytr)
        s = _auc_or_acc(yva, _full_proba(clf, norm(fva), n_classes)) if len(np.unique(yva)) > 1 else -k
        if best is None or s > best[0]:
            best = (s, k, clf)
    _, k, clf = best
    return (lambda f: _full_proba(clf, norm(f), n_classes)), {"k": k}


def fit_mlp(ftr, ytr, fva, yva, n_classes: int, seed: int = 0):
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(ftr)
    # balance classes by resampling the (small) labeled set: MLPClassifier has no class weights
    rng = np.random.default_rng(seed)
    counts = np.bincount(ytr, minlength=n_classes)
    idx = np.concatenate([rng.choice(np.flatnonzero(ytr == c), counts.max(), replace=True)
                          for c in range(n_classes) if counts[c] > 0])
    best = None
    for alpha in (1e-3, 1e-1, 1.0):
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=alpha, max_iter=200, early_stopping=False,
                            random_state=seed).fit(scaler.transform(ftr[idx]), ytr[idx])
        s = _auc_or_acc(yva, _full_proba(clf, scaler.transform(fva), n_classes)) if len(np.unique(yva)) > 1 else -alpha
        if best is None or s > best[0]:
            best = (s, alpha, clf)
    _, alpha, clf = best
    return (lambda f: _full_proba(clf, scaler.transform(f), n_classes)), {"alpha": alpha}


FEATURE_HEADS = {"linear": fit_linear_probe, "knn": fit_knn, "mlp": fit_mlp}


# ---- full fine-tuning ------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    def __init__(self, encoder: Encoder, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feat_dim, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


@torch.no_grad()
def predict(model: nn.Module, scans, idx, device, batch_size=256) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(idx), batch_size):
        x = torch.as_tensor(scans.batch(idx[s:s + batch_size])).to(device)
        out.append(torch.softmax(model(x).float(), 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2))


def train_finetune(encoder, ld: LabeledData, train_idx, val_idx, device, seed=0, epochs=30, batch_size=32,
                   lr=1e-4, patience=8, progress=True, log=print):
    """End-to-end training of encoder + linear head with light augmentation, class-weighted loss, and early
    stopping on validation AUC (the best epoch's weights are kept)."""
    seed_everything(seed)
    n_classes = ld.n_classes
    model = Classifier(copy.deepcopy(encoder), n_classes).to(device)
    dims = ld.scans.images.ndim - 2
    size = ld.scans.images.shape[-1]
    aug = BatchedViews(ViewsConfig(crop_scale=(0.7, 1.0), rotate_deg=10, noise_std=0.02, blur_prob=0.0,
                                   gamma=(0.8, 1.25)), dims, size)
    ytr = ld.y[train_idx]
    counts = np.bincount(ytr, minlength=n_classes).astype(float)
    weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / n_classes, dtype=torch.float32, device=device)
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                             {"params": model.head.parameters(), "lr": lr * 10}], weight_decay=1e-4)
    g = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    best = (-np.inf, None, 0)
    bs = min(batch_size, len(train_idx))
    steps = max(1, math.ceil(len(train_idx) / bs))
    bar = Progress(epochs, "fine-tune epoch", progress)
    for ep in range(epochs):
        model.train()
        order = rng.permutation(train_idx)
        for s in range(steps):
            b = order[s * bs:(s + 1) * bs]
            if len(b) < 2:
                continue
            x = aug(torch.as_tensor(ld.scans.batch(b)).to(device), g)
            loss = nn.functional.cross_entropy(model(x), torch.as_tensor(ld.y[b], device=device), weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        pv = predict(model, ld.scans, val_idx, device)
        s = _auc_or_acc(ld.y[val_idx], pv) if len(np.unique(ld.y[val_idx])) > 1 else -loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{s:.3f}")
        bar.update()
        if s > best[0]:
            best = (s, copy.deepcopy(model.state_dict()), ep)
        elif ep - best[2] >= patience:
            break
    bar.close()
    model.load_state_dict(best[1])
    return model, {"best_epoch": best[2] + 1, "val_score": float(best[0])}


# ---- one run ---------------------------------------------------------------------------------------------------

def run_head(head: str, encoder, ld: LabeledData, train_idx, val_idx, test_idx, device, seed: int,
             features=None, epochs=30, progress=True, log=print):
    """Train one head on the labeled rows; return (val_proba, test_proba, info, classifier module or None)."""
    if head in FEATURE_HEADS:
        f = features if features is not None else encode(encoder, ld.scans, device)
        fit = FEATURE_HEADS[head]
        proba_fn, info = fit(f[train_idx], ld.y[train_idx], f[val_idx], ld.y[val_idx], ld.n_classes, seed)
        clf = None
        if head == "linear":
            clf = Classifier(encoder, ld.n_classes)
            clf.head.weight.data = torch.tensor(info.pop("weight"), dtype=torch.float32)
            clf.head.bias.data = torch.tensor(info.pop("bias"), dtype=torch.float32)
        return proba_fn(f[val_idx]), proba_fn(f[test_idx]), info, clf
    if head == "finetune":
        model, info = train_finetune(encoder, ld, train_idx, val_idx, device, seed=seed, epochs=epochs,
                                     progress=progress, log=log)
        return predict(model, ld.scans, val_idx, device), predict(model, ld.scans, test_idx, device), info, model.cpu()
    raise MedclError(f"unknown head '{head}' (choose linear, knn, mlp or finetune)")


def budget_rows(ld: LabeledData, label_fraction=None, labels_per_class=None, seed=0, val_labels="budget"):
    tr_all = np.flatnonzero(ld.split == "train")
    va_all = np.flatnonzero(ld.split == "val")
    if label_fraction is None and labels_per_class is None:
        label_fraction = 1.0
    if label_fraction is not None and not (0 < label_fraction <= 1):
        raise LabelsError(f"--label-fraction {label_fraction}: must be in (0, 1].")
    tr = select_budget(ld.y, tr_all, label_fraction, labels_per_class, seed)
    if val_labels == "all" or len(va_all) == 0:
        va = va_all
    else:  # validation labels cost labels too: the same budget, with at least 2 per class to choose anything
        va = select_budget(ld.y, va_all, label_fraction, max(2, labels_per_class) if labels_per_class else None,
                           seed + 7, min_per_class=2, cap=True)
    te = np.flatnonzero(ld.split == "test")
    assert not (set(tr) | set(va)) & set(te), "test rows leaked into training/selection"
    return tr, va, te


def save_classifier(model: Classifier, spec: dict, extra: dict, class_names, threshold, path: Path) -> None:
    atomic_save({"format": CLASSIFIER_FORMAT, "spec": dict(spec), "extra": extra,
                 "encoder": {k: v.detach().cpu() for k, v in model.encoder.state_dict().items()},
                 "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
                 "classes": list(class_names), "threshold": float(threshold)}, path)


def load_classifier(path) -> tuple[Classifier, dict]:
    from .encoders import safe_load
    from .errors import CheckpointError

    obj = safe_load(path, "classifier")
    if not isinstance(obj, dict) or obj.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not a medcl classifier (written by medcl finetune as classifier.pt).")
    enc = Encoder(**obj["spec"])
    enc.load_state_dict(obj["encoder"], strict=True)
    model = Classifier(enc, len(obj["classes"]))
    model.head.load_state_dict(obj["head"], strict=True)
    return model, obj


def finetune(checkpoint, data, labels, out, label_fraction=None, labels_per_class=None, mode="probe", seed=0,
             positive=None, cfg: MedclConfig | None = None, overwrite=False, epochs=30, val_labels="budget",
             allow_outside=False, progress=True, log=print, negative=None, multiclass=False, select=None) -> dict:
    """Train a classifier on a few labels and evaluate it on the held-out test split. Returns metrics.json's dict."""
    cfg = cfg or MedclConfig()
    if mode not in ("probe", "finetune"):
        raise MedclError(f"--mode {mode}: choose probe or finetune")
    if label_fraction is not None and labels_per_class is not None:
        raise MedclError("give either --label-fraction or --labels-per-class, not both.")
    out = prepare_out_dir(out, data, overwrite=overwrite, marker="metrics.json")
    t0 = time.perf_counter()
    device = pick_device(cfg.train.device)
    encoder, settings, ck = load_encoder_or_scratch(checkpoint, cfg)
    if ck == "none" and mode == "probe":
        log("note: --checkpoint none --mode probe is the random-init control (random features, the same probe): "
            "what a pretrained probe must beat; --mode finetune trains the network from scratch instead")
    ld = load_labeled(data, labels, settings, positive, split_seed=0, out=out, allow_outside=allow_outside,
                      progress=progress, log=log, negative=negative, multiclass=multiclass, select=select)
    tr, va, te = budget_rows(ld, label_fraction, labels_per_class, seed, val_labels)
    write_splits(ld, out / "splits.csv", tr, va)
    log(f"{len(ld.scans)} labeled scans (splits {ld.split_source}): train {len(tr)} of {(ld.split == 'train').sum()} "
        f"labeled, val {len(va)}, test {len(te)}; positive class: {ld.table.class_names()[-1] if ld.table.binary else 'multi-class'}")
    encoder = encoder.to(device)
    head = "linear" if mode == "probe" else "finetune"
    pva, pte, info, clf = run_head(head, encoder, ld, tr, va, te, device, seed, epochs=epochs, progress=progress, log=log)
    binary = pte.shape[1] == 2
    thr = youden_threshold(ld.y[va], pva[:, 1]) if binary else 0.5
    test = score(ld.y[te], pte, thr)
    val = score(ld.y[va], pva, thr) if len(np.unique(ld.y[va])) > 1 else {}
    lo, hi = bootstrap_ci(ld.y[te], pte, "auc", n=500, seed=seed, threshold=thr)
    test["auc_ci95"] = [lo, hi]
    metrics = {"test": test, "val": val, "n_labeled_train": int(len(tr)), "n_labeled_val": int(len(va)),
               "label_fraction": label_fraction if label_fraction is not None else (None if labels_per_class else 1.0),
               "labels_per_class": labels_per_class, "seed": seed,
               "positive_class": "/".join(ld.table.positive) if binary else None,
               "classes": ld.table.class_names(), "mode": mode, "head": head, "head_info": info,
               "threshold": thr, "threshold_rule": ("argmax" if not binary else "Youden J on validation"
                                                     if len(np.unique(ld.y[va])) > 1 else
                                                     "0.5: the validation labels hold one class"),
               "checkpoint": ck, "splits": ld.split_source, "n_skipped": len(ld.scans.skipped),
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "metrics.json", metrics)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        names = ld.table.class_names()
        w.writerow(["path", "label", "target"] + [f"prob_{n}" for n in names] + ["predicted"])
        for i, p in zip(te, pte):
            pred = int(p[1] >= thr) if binary else int(p.argmax())
            w.writerow([ld.scans.records[i].key, ld.table.labels[i], int(ld.y[i])] + [f"{v:.6f}" for v in p] + [names[pred]])
    if clf is not None:
        save_classifier(clf, encoder.spec, {"data": settings}, ld.table.class_names(), thr, out / "classifier.pt")
    writer = tb.open_writer(out / "tb")
    try:
        from .report import log_evaluation

        log_evaluation(writer, ld, te, pte, thr, metrics)
    finally:
        writer.close()
    log(f"test ({len(te)} scans): AUC {test['auc']:.3f} [95% CI {lo:.3f}-{hi:.3f}], accuracy {test['accuracy']:.3f}, "
        f"balanced accuracy {test['balanced_accuracy']:.3f}" +
        (f", sensitivity {test['sensitivity']:.3f}, specificity {test['specificity']:.3f}" if binary else ""))
    log(f"wrote {out / 'metrics.json'}, {out / 'predictions.csv'}, {out / 'splits.csv'}"
        f"{', ' + str(out / 'classifier.pt') if clf is not None else ''}, TensorBoard events in {out / 'tb'}")
    return metrics
