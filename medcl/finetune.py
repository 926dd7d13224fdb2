"""Few-label fine-tuning: labeled data and splits, one `medcl finetune` run and its outputs (heads: heads.py)."""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import feature_heads, heads
from . import tensorboard as tb
from .config import MedclConfig
from .data.cache import ScanSet, build_for_encoder, write_skipped
from .data.discover import open_source
from .data.labels import LabelsTable, Task, make_splits, select_budget
from .data.preprocessing import Preprocessing
from .encoders import Encoder, atomic_save, build_encoder
from .errors import LabelsError, MedclError
from .heads import Classifier
from .metrics import bootstrap_ci, operating_threshold, parse_operating_point, score
from .runs import prepare_out_dir, write_json
from .runtime import encode, pick_device, seed_everything
from .weights import open_checkpoint

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


def load_encoder_or_scratch(checkpoint, cfg: MedclConfig, data=None, select=None, log=print):
    """(encoder, data settings). checkpoint 'none' builds the same kind of network with random weights; WEIGHTS from
    another tool read the scans with the folder's default preprocessing (medcl.weights.open_checkpoint)."""
    if checkpoint is None or str(checkpoint).lower() == "none":
        seed_everything(cfg.train.seed)
        enc = build_encoder(cfg)
        return enc, Preprocessing.of(cfg.data).to_dict(), "none"
    enc, extra = open_checkpoint(checkpoint, data, select, log)
    return enc, extra.get("data", {}), str(checkpoint)


def load_labeled(data, labels_csv, data_settings: dict, task: Task = Task(), split_seed: int = 0,
                 out: Path | None = None, allow_outside: bool = False, strict: bool = False,
                 max_bad_fraction: float = 0.2, progress: bool = True, log=print, select=None,
                 checkpoint=None) -> LabeledData:
    source = open_source(data, Preprocessing.of(data_settings).dims, "all", select)
    table = task.read(labels_csv, source.root if not source.arrays else None, source.records, allow_outside)
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
    scans = build_for_encoder(source, data_settings, checkpoint, strict=strict, max_bad_fraction=max_bad_fraction,
                              cache_dir=(out / "cache") if out else None, num_workers=2, progress=progress, log=log)
    if out is not None:
        write_skipped(scans.skipped, out / "skipped.csv")
    if scans.skipped:
        log(f"skipped {len(scans.skipped)} unusable labeled scans" + (f" (see {out / 'skipped.csv'})" if out else ""))
    table = table.subset([table.row_of(r.key) for r in scans.records])
    y = table.y()
    groups = np.array(table.patients, dtype=object)
    if all(s is not None for s in table.splits):
        split = np.array(table.splits, dtype=object)
        how = "npz" if source.arrays else "csv"  # train and val are both non-test: labels are drawn from either
    elif any(s is not None for s in table.splits):
        raise LabelsError("the labels' split column is filled for some rows only; fill it for every row or drop it.")
    else:
        split = make_splits(y, groups, seed=split_seed)
        how = f"made (patient-grouped, stratified, seed {split_seed})"
    for name in ("train", "test"):
        if len(np.unique(y[split == name])) < 2:
            raise LabelsError(f"the {name} split holds a single class: need both healthy and diseased scans there.")
    return LabeledData(scans, table, y, split, groups, how)


def write_splits(ld: LabeledData, path: Path, train_idx=None) -> None:
    """splits.csv: every labeled scan's split and, for one classifier, its role: trained_on (its label was used, to
    fit and, by cross-validation, to choose the model and threshold), test, or unlabeled (a non-test scan outside the
    label budget, which semi-supervised heads use without its label)."""
    role = np.where(ld.split == "test", "test", "unlabeled").astype(object)
    if train_idx is not None:
        role[np.asarray(train_idx, dtype=int)] = "trained_on"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient", "split"] + (["role"] if train_idx is not None else []))
        for i, (r, lab, p, s) in enumerate(zip(ld.scans.records, ld.table.labels, ld.groups, ld.split)):
            w.writerow([r.key, lab, p, s] + ([role[i]] if train_idx is not None else []))


def read_splits(path: Path) -> dict:
    """{scan key: (split, role)} from a finetune folder's splits.csv ('' where a column is absent)."""
    with open(path, newline="") as f:
        return {r["path"]: (r.get("split") or "", r.get("role") or "") for r in csv.DictReader(f)}


# ---- one run: labeled rows, unlabeled pool, test rows; one head; its operating threshold ----------------------

def budget_rows(ld: LabeledData, label_fraction=None, labels_per_class=None, seed=0, selection=None,
                features=None):
    """(labeled, unlabeled, test) row indices. The label budget is drawn, reproducible from `seed`, from every
    non-test scan; the other non-test scans are the unlabeled pool; test rows are never seen by anything fitted or
    chosen.

    selection None: stratified at random, at least 2 per class (so cross-validation can choose and threshold).
    selection: a medcl.select strategy: label-blind, as a user choosing scans to label would,
    from `features`; the budget is then a count (fraction x non-test scans, or labels_per_class x classes) and a
    class may come out missing (heads then predict the prior)."""
    non_test = np.flatnonzero(ld.split != "test")
    if label_fraction is None and labels_per_class is None:
        label_fraction = 1.0
    if label_fraction is not None and not (0 < label_fraction <= 1):
        raise LabelsError(f"--label-fraction {label_fraction}: must be in (0, 1].")
    if labels_per_class is not None and labels_per_class < 2:
        raise LabelsError(f"--labels-per-class {labels_per_class}: need at least 2 (one to learn from, one to check).")
    if selection is not None:
        from .select import choose

        n = labels_per_class * ld.n_classes if labels_per_class is not None else \
            max(2 * ld.n_classes, int(round(label_fraction * len(non_test))))
        groups = ld.groups if len(set(ld.groups)) < len(ld.groups) else None
        if n >= len(non_test):
            lab = non_test
        else:  # one scan per patient while the budget allows it
            many = groups is None or n > len(set(ld.groups[non_test]))
            lab = np.sort(choose(features, n, selection, seed, candidates=non_test, groups=groups,
                                 same_patient=many).order)
    else:
        # a fraction takes at least 2 of each class where there are 2 (a class with 1 cannot be cross-validated:
        # the threshold rule then says so); an explicit --labels-per-class that a class cannot meet is an error
        lab = select_budget(ld.y, non_test, label_fraction, labels_per_class, seed, min_per_class=2,
                            cap=labels_per_class is None)
    pool = np.setdiff1d(non_test, lab)
    te = np.flatnonzero(ld.split == "test")
    assert not (set(lab.tolist()) | set(pool.tolist())) & set(te.tolist()), "test rows leaked into training"
    return lab, pool, te


def run_head(head: str, encoder, ld: LabeledData, lab, pool, te, device, seed: int, features=None, epochs=30,
             pretrained=True, progress=False) -> tuple:
    """Fit one head on the labeled rows (and the unlabeled pool for semi-supervised heads); returns
    (HeadFit, test probabilities). Test rows are only ever predicted."""
    groups = ld.groups if len(set(ld.groups)) < len(ld.groups) else None
    if len(np.unique(ld.y[lab])) < 2:  # a label-blind selection can miss a class: nothing to learn but the prior
        prior = np.bincount(ld.y[lab], minlength=ld.n_classes) / len(lab)
        return feature_heads.HeadFit(np.full((len(lab), ld.n_classes), np.nan), None,
                                     {"single_class": True, "folds": 0}), np.tile(prior, (len(te), 1))
    if head in feature_heads.HEAD_TYPES:
        f = features if features is not None else encode(encoder, ld.scans, device)
        fit = feature_heads.fit_feature_head(head, f, ld.y, lab, pool, groups, ld.n_classes, seed)
        layer = fit.head.to_module() if encoder is not None else None  # a head that is one linear layer (linear)
        if layer is not None:  # the same probe as a torch module over the encoder: classifier.pt, saliency, predict
            fit.classifier = heads.Classifier(encoder, ld.n_classes)
            fit.classifier.head = layer
        return fit, fit.predict(f[te])
    if head == "finetune":
        fit = heads.fit_finetune(encoder, ld.scans, ld.y, lab, groups, ld.n_classes, device, seed, epochs,
                                 pretrained=pretrained, progress=progress, features=features)
        return fit, fit.predict(te)
    raise MedclError(f"unknown head '{head}' (choose {', '.join(feature_heads.head_names())})")


def choose_threshold(ld: LabeledData, lab, fit: feature_heads.HeadFit, operating_point: str = "youden") -> tuple:
    """(threshold, rule text, expected {sensitivity, specificity} on the labeled scans' OOF predictions)."""
    if ld.n_classes != 2:
        return 0.5, "argmax (multi-class)", {}
    rule, target = parse_operating_point(operating_point)
    y, p = ld.y[lab], fit.oof[:, 1]
    if not np.all(np.isfinite(p)) or len(np.unique(y)) < 2:
        return 0.5, "0.5: too few labels per class to cross-validate (need 2 per class)", {}
    thr = operating_threshold(y, p, rule, target)
    m = score(y, fit.oof, thr)
    what = "Youden J" if rule == "youden" else f"{rule} >= {target:g}"
    return thr, (f"{what} on out-of-fold predictions of the {len(lab)} labeled scans "
                 f"({fit.info.get('folds')}-fold cross-validation)"), \
        {"sensitivity": m["sensitivity"], "specificity": m["specificity"], "auc": m["auc"]}


def threshold_warning(ld: LabeledData, lab, fit: feature_heads.HeadFit, expected: dict,
                      operating_point: str) -> str | None:
    """A warning when the threshold cannot be trusted: too few labels for its cross-validation, or a threshold that
    calls every labeled scan one class (a classifier that will call every new scan that class too)."""
    if ld.n_classes != 2:
        return None
    names = ld.table.class_names()
    per_class = np.bincount(ld.y[lab], minlength=2)
    if not expected:
        return (f"warning: {len(lab)} labels ({per_class.min()} in the smaller class) are too few for the "
                f"cross-validation that chooses the threshold: it is 0.5, and what to expect of it is unknown. "
                f"Label more scans (at least 2 per class; 10 or more per class for a stable threshold).")
    sens, spec = expected.get("sensitivity"), expected.get("specificity")
    if sens is None or spec is None or not ({sens, spec} == {0.0, 1.0}):
        folds = fit.info.get("folds")
        if isinstance(folds, int) and folds < 3:
            return (f"warning: the threshold was chosen by {folds}-fold cross-validation over {len(lab)} labels "
                    f"({per_class.min()} in the smaller class): expect it to move with more labels.")
        return None
    called = names[-1] if sens == 1.0 else names[0]
    return (f"warning: the threshold for {operating_point} calls every one of the {len(lab)} labeled scans "
            f"'{called}' (expected sensitivity {sens:.3f}, specificity {spec:.3f}): this classifier will call "
            f"(nearly) every new scan '{called}'. Label more scans, or choose another operating point "
            f"(--operating-point youden, or a lower target).")


def save_classifier(model: Classifier, spec: dict, extra: dict, class_names, threshold, path: Path) -> None:
    atomic_save({"format": CLASSIFIER_FORMAT, "spec": dict(spec), "extra": extra,
                 "encoder": {k: v.detach().cpu() for k, v in model.encoder.state_dict().items()},
                 "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
                 "classes": list(class_names), "threshold": float(threshold)}, path)


def read_classifier_file(path) -> tuple[Classifier, dict]:
    from .encoders import safe_load
    from .errors import CheckpointError

    obj = safe_load(path, "classifier")
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(fmt, str) and fmt.startswith("medcl-classifier-") and fmt != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} was written by another medcl version (format {fmt}; this medcl reads "
                              f"{CLASSIFIER_FORMAT}): use the medcl that wrote it, or upgrade.")
    if fmt != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not a medcl classifier (written by medcl finetune as classifier.pt).")
    enc = Encoder(**obj["spec"])
    enc.load_state_dict(obj["encoder"], strict=True)
    model = Classifier(enc, len(obj["classes"]))
    model.head.load_state_dict(obj["head"], strict=True)
    return model, obj


def write_predictions(path: Path, ld: LabeledData, te, pte, thr: float) -> None:
    """predictions.csv: each test scan's label, probabilities and predicted class at the threshold."""
    names, binary = ld.table.class_names(), pte.shape[1] == 2
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "target"] + [f"prob_{n}" for n in names] + ["predicted"])
        for i, p in zip(te, pte):
            name = names[int(p[1] >= thr) if binary else int(p.argmax())]
            w.writerow([ld.scans.records[i].key, ld.table.labels[i], int(ld.y[i]), *(f"{v:.6f}" for v in p), name])


def finetune(checkpoint, data, labels, out, label_fraction=None, labels_per_class=None, mode="probe", seed=0,
             task: Task = Task(), cfg: MedclConfig | None = None, overwrite=False, epochs=30, allow_outside=False,
             progress=True, log=print, select=None) -> dict:
    """Train a classifier on a few labels and evaluate it on the held-out test split. Returns metrics.json's dict.

    mode: probe (linear head on frozen features), finetune (the network end to end), or a head name of
    medcl.feature_heads.HEAD_TYPES (e.g. proto; spread and selftrain also learn from the unlabeled scans).
    task: which classes are diseased and the operating point (medcl.Task(positive="diseased"))."""
    cfg, operating_point = cfg or MedclConfig(), task.operating_point
    head = {"probe": "linear"}.get(mode, mode)
    if head not in feature_heads.head_names():
        raise MedclError(f"--mode {mode}: choose probe, finetune, or a head: {', '.join(feature_heads.head_names())}")
    if label_fraction is not None and labels_per_class is not None:
        raise MedclError("give either --label-fraction or --labels-per-class, not both.")
    try:
        parse_operating_point(operating_point)
    except ValueError as e:
        raise MedclError(str(e)) from None
    out, t0 = prepare_out_dir(out, data, overwrite=overwrite, marker="metrics.json"), time.perf_counter()
    device = pick_device(cfg.train.device)
    encoder, settings, ck = load_encoder_or_scratch(checkpoint, cfg, data, select, log)
    if ck == "none" and head != "finetune":
        log(f"note: --checkpoint none with a frozen-feature head ({head}) is the random-init control (random "
            "features, the same head): what a pretrained encoder must beat; --mode finetune trains the network "
            "from scratch instead")
    ld = load_labeled(data, labels, settings, task, split_seed=0, out=out, allow_outside=allow_outside,
                      progress=progress, log=log, select=select, checkpoint=ck)
    lab, pool, te = budget_rows(ld, label_fraction, labels_per_class, seed)
    write_splits(ld, out / "splits.csv", lab)
    log(f"{len(ld.scans)} labeled scans (splits {ld.split_source}): {len(lab)} labels used of "
        f"{(ld.split != 'test').sum()} non-test scans ({len(pool)} unlabeled), test {len(te)}; positive class: "
        f"{ld.table.class_names()[-1] if ld.table.binary else 'multi-class'}")
    encoder = encoder.to(device)
    fit, pte = run_head(head, encoder, ld, lab, pool, te, device, seed, epochs=epochs, pretrained=ck != "none",
                        progress=progress)
    binary = pte.shape[1] == 2
    thr, rule, expected = choose_threshold(ld, lab, fit, operating_point)
    warning = threshold_warning(ld, lab, fit, expected, operating_point)
    test = score(ld.y[te], pte, thr)
    lo, hi = bootstrap_ci(ld.y[te], pte, "auc", n=500, seed=seed, threshold=thr)
    test["auc_ci95"] = [lo, hi]
    metrics = {"test": test, "n_labeled": int(len(lab)), "n_unlabeled": int(len(pool)),
               "label_fraction": label_fraction if label_fraction is not None else (None if labels_per_class else 1.0),
               "labels_per_class": labels_per_class, "seed": seed,
               "positive_class": "/".join(ld.table.positive) if binary else None,
               "classes": ld.table.class_names(), "mode": mode, "head": head, "head_info": fit.info,
               "operating_point": operating_point, "threshold": thr, "threshold_rule": rule,
               "expected_at_threshold": expected, "warning": warning, "checkpoint": ck, "splits": ld.split_source,
               "n_skipped": len(ld.scans.skipped), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "metrics.json", metrics)
    write_predictions(out / "predictions.csv", ld, te, pte, thr)
    if fit.classifier is not None:
        # the labeled scans' out-of-fold predictions travel with the classifier: `medcl predict` can then choose
        # another operating point without the training data
        oof = ({"y": ld.y[lab].tolist(), "p": fit.oof[:, 1].tolist()}
               if binary and np.all(np.isfinite(fit.oof)) else None)
        save_classifier(fit.classifier, encoder.spec, {"data": settings, "operating_point": operating_point,
                                                       "threshold_rule": rule, "oof": oof},
                        ld.table.class_names(), thr, out / "classifier.pt")
    writer = tb.open_writer(out / "tb")
    try:
        from .report import log_evaluation

        log_evaluation(writer, ld, te, pte, thr, metrics)
    finally:
        writer.close()
    log(f"threshold {thr:.4f}: {rule}" + (f"; expected sensitivity {expected['sensitivity']:.3f}, specificity "
                                         f"{expected['specificity']:.3f}" if expected else ""))
    if warning:
        log(warning)
    log(f"test ({len(te)} scans): AUC {test['auc']:.3f} [95% CI {lo:.3f}-{hi:.3f}], accuracy {test['accuracy']:.3f}, "
        f"balanced accuracy {test['balanced_accuracy']:.3f}" +
        (f", sensitivity {test['sensitivity']:.3f}, specificity {test['specificity']:.3f}" if binary else ""))
    clf = f", {out / 'classifier.pt'}" if fit.classifier is not None else ""
    log(f"wrote {out / 'metrics.json'}, {out / 'predictions.csv'}, {out / 'splits.csv'}{clf}, TensorBoard events in "
        f"{out / 'tb'}")
    return metrics
