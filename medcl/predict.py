"""Put a classifier to work: `medcl predict` on new scans, and the Python API (medcl.load_classifier).

A classifier folder (written by `medcl finetune`) carries everything prediction needs: the network, the class names,
the threshold and its rule, the preprocessing the encoder was trained with, and the out-of-fold predictions of its
labeled scans, so another operating point can be chosen later without its training data.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from .data.preprocessing import Preprocessing
from .errors import CheckpointError, MedclError
from .metrics import bootstrap_ci, operating_threshold, parse_operating_point, score


class LoadedClassifier:
    """`clf = medcl.load_classifier(FT_DIR)`; `clf.predict(paths_or_arrays)` -> probabilities (N, classes).

    Arrays are one scan each, channel-first (C, *spatial) or spatial only; paths are scan files medcl reads (NIfTI,
    PNG/JPEG/TIFF, .npy, one DICOM file). Either is preprocessed exactly as the classifier's training scans were."""

    def __init__(self, path, device="cpu"):
        from .finetune import read_classifier_file

        p = Path(path)
        self.path = p / "classifier.pt" if p.is_dir() else p
        self.model, meta = read_classifier_file(self.path)
        self.device = torch.device(device)
        self.model = self.model.to(self.device).eval()
        self.classes = list(meta["classes"])
        self.threshold = float(meta["threshold"])
        extra = meta.get("extra", {})
        self.data = dict(extra.get("data", {}))  # as saved; `preprocessing` is the value every reader uses
        self.preprocessing = Preprocessing.of(self.data)
        self.threshold_rule = extra.get("threshold_rule", "chosen at fine-tuning")
        self.operating_point = extra.get("operating_point")
        self.oof = extra.get("oof")  # {"y": [...], "p": [...]}: labeled scans' out-of-fold P(positive)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def threshold_for(self, operating_point=None) -> tuple:
        """(threshold, rule): the stored one, or one chosen now from the stored out-of-fold predictions."""
        if operating_point is None or operating_point == self.operating_point or not self.binary:
            return self.threshold, self.threshold_rule
        try:
            rule, target = parse_operating_point(operating_point)
        except ValueError as e:
            raise MedclError(str(e)) from None
        if not self.oof or len(set(self.oof["y"])) < 2:
            raise MedclError(f"{self.path} holds no cross-validation predictions to choose '{operating_point}' from "
                             "(written by an older medcl, or too few labels): run medcl finetune --operating-point "
                             f"{operating_point} again.")
        thr = operating_threshold(np.asarray(self.oof["y"]), np.asarray(self.oof["p"]), rule, target)
        return thr, f"{operating_point} on the out-of-fold predictions of the {len(self.oof['y'])} labeled scans"

    def preprocess(self, item, name="array") -> np.ndarray:
        from .data.cache import to_model_array
        from .data.readers import read_scan

        p = self.preprocessing
        dims = p.dims
        if isinstance(item, (str, Path)):
            arr, spacing = read_scan(item)
            name = str(item)
        else:
            arr, spacing = np.asarray(item, dtype=np.float32), None
            if arr.ndim == dims:
                arr = arr[None]
        return to_model_array(arr, spacing, name, dims, p.size, p.channels, p.intensity, skip_label_maps=False)

    @torch.no_grad()
    def predict_arrays(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities for preprocessed scans (N, C, *[size]*dims)."""
        out = [torch.softmax(self.model(torch.as_tensor(x[s:s + batch_size]).to(self.device)).float(), 1).cpu()
               for s in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)))

    def predict(self, items, batch_size: int = 64) -> np.ndarray:
        items = list(items) if not isinstance(items, np.ndarray) else list(items)
        x = np.stack([self.preprocess(it, f"array[{i}]") for i, it in enumerate(items)]) if items else \
            np.zeros((0,))
        return self.predict_arrays(x, batch_size)


def load_classifier(path, device="cpu") -> LoadedClassifier:
    """The classifier of a `medcl finetune` folder (or its classifier.pt), loaded with weights_only=True."""
    return LoadedClassifier(path, device)


def _trained_on(ft_dir: Path, keys: list) -> int:
    """How many of `keys` the classifier's splits.csv lists as trained on (0 when it has none)."""
    from .finetune import read_splits

    if not (ft_dir / "splits.csv").is_file():
        return 0
    roles = read_splits(ft_dir / "splits.csv")
    return sum(roles.get(k, ("", ""))[1] == "trained_on" for k in keys)


def _score_labeled(clf, table, labels, keys, proba, thr: float, out: Path, log, about: dict) -> None:
    """metrics.json for the predicted scans that --labels labels, and a note when they were trained on."""
    from .runs import write_json

    rows = [i for i, k in enumerate(keys) if table.row_of(k) is not None]
    if not rows:
        raise MedclError(f"none of the predicted scans is in {labels}: paths must be relative to DATA.")
    y = table.y()[[table.row_of(keys[i]) for i in rows]]
    seen = _trained_on(clf.path.parent, [keys[i] for i in rows])
    if seen:
        log(f"note: {seen} of the scored scans have the paths of scans this classifier was trained on "
            f"({clf.path.parent / 'splits.csv'}): if they are the same scans, this score is not a test result")
    m = score(y, proba[rows], thr)
    m["auc_ci95"] = list(bootstrap_ci(y, proba[rows], "auc", n=500, seed=0, threshold=thr))
    write_json(out / "metrics.json", {"test": m, "n_scored": len(rows), "n_scored_trained_on_paths": seen, **about})
    log(f"scored {len(rows)} labeled scans: AUC {m['auc']:.3f} [95% CI {m['auc_ci95'][0]:.3f}-"
        f"{m['auc_ci95'][1]:.3f}]" + (f", sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}"
                                      if clf.binary else ""))


def _write_saliency(clf, scans, source, proba, saliency, method, out: Path, log) -> None:
    """Maps for the `saliency` scans most probably diseased (or all): saliency/, saliency.csv, TensorBoard."""
    from . import tensorboard as tb
    from .saliency import write_maps

    order = np.argsort(-proba[:, 1], kind="stable")
    order = order if str(saliency) == "all" else order[:int(saliency)]
    log(f"saliency ({method}) for the {len(order)} scans most probably {clf.classes[-1]}")
    writer = tb.open_writer(out / "tb")
    try:
        maps = write_maps(clf, scans, source, order, proba[:, 1], out / "saliency", method, writer)
    finally:
        writer.close()
    with open(out / "saliency.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "rank", "probability", "overlay_png", "nifti"])
        w.writerows(maps)


def predict(classifier, data, out, operating_point=None, labels=None, positive=None, overwrite=False, device="auto",
            strict=False, progress=True, log=print, select=None, saliency=None, saliency_method=None) -> Path:
    """Predict every scan of `data`: predictions.csv, skipped.csv, and with `labels` also metrics.json.

    saliency: K (or "all"): maps for the K scans most probably diseased, in saliency/ and TensorBoard
    (medcl.saliency; saliency_method gradcam | occlusion)."""
    from .saliency import DEFAULT_METHOD, METHODS

    saliency_method = saliency_method or DEFAULT_METHOD
    if saliency_method not in METHODS:
        raise MedclError(f"--saliency-method {saliency_method}: choose {', '.join(METHODS)}")
    if saliency is not None and str(saliency) != "all" and not (str(saliency).isdigit() and int(saliency) > 0):
        raise MedclError(f"--saliency {saliency}: a number of scans (e.g. 20) or 'all'.")
    from .data.cache import build_for_encoder, write_skipped
    from .data.discover import open_source
    from .data.labels import read_labels_csv
    from .runs import prepare_out_dir
    from .runtime import pick_device

    t0 = time.perf_counter()
    if not Path(classifier).exists():
        raise CheckpointError(f"classifier not found: {classifier}")
    clf = load_classifier(classifier)
    if saliency is not None and not clf.binary:
        raise MedclError("--saliency needs a binary (healthy vs diseased) classifier.")
    thr, rule = clf.threshold_for(operating_point)
    dims = clf.preprocessing.dims
    source = open_source(data, dims, "all", select)
    table = None
    if labels:
        table = read_labels_csv(labels, source.root if not source.arrays else None,
                                positive or clf.classes[-1].replace("/", ","), multiclass=not clf.binary)
    out = prepare_out_dir(out, data, overwrite=overwrite, marker="predictions.csv")
    clf.device = pick_device(device)
    clf.model = clf.model.to(clf.device)
    scans = build_for_encoder(source, clf.preprocessing, classifier, strict=strict, cache_dir=out / "cache",
                              progress=progress, log=log)
    write_skipped(scans.skipped, out / "skipped.csv")
    keys = [r.key for r in scans.records]
    proba = np.concatenate([clf.predict_arrays(scans.batch(np.arange(s, min(len(keys), s + 256))))
                            for s in range(0, len(keys), 256)])
    pred = (proba[:, 1] >= thr).astype(int) if clf.binary else proba.argmax(1)
    op = operating_point or clf.operating_point or "as fine-tuned"
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "probability", "prediction", "threshold", "operating_point"])
        for k, p, c in zip(keys, proba, pred):
            w.writerow([k, f"{p[-1] if clf.binary else p[c]:.6f}", clf.classes[c], f"{thr:.6f}", op])
    counts = {name: int((pred == i).sum()) for i, name in enumerate(clf.classes)}
    log(f"predicted {len(keys)} scans ({', '.join(f'{n} {c}' for n, c in counts.items())}); threshold {thr:.4f}: "
        f"{rule}" + (f"; {len(scans.skipped)} skipped (see {out / 'skipped.csv'})" if scans.skipped else ""))
    if clf.binary and len(keys) >= 10 and max(counts.values()) == len(keys):
        only = next(n for n, c in counts.items() if c)
        log(f"warning: every one of the {len(keys)} scans is predicted '{only}' at threshold {thr:.4f}: the "
            f"threshold may be degenerate (see the classifier's metrics.json); try --operating-point youden, or "
            f"fine-tune with more labels")
    if table is not None:
        _score_labeled(clf, table, labels, keys, proba, thr, out, log, {
            "threshold": thr, "threshold_rule": rule, "operating_point": op, "classes": clf.classes,
            "classifier": str(classifier), "seconds": round(time.perf_counter() - t0, 1)})
    if saliency is not None:
        _write_saliency(clf, scans, source, proba, saliency, saliency_method, out, log)
    log(f"wrote {out / 'predictions.csv'}" + (f", {out / 'metrics.json'}" if table is not None else "") +
        (f", {out / 'saliency.csv'} and maps in {out / 'saliency'}, TensorBoard in {out / 'tb'}"
         if saliency is not None else ""))
    return out
