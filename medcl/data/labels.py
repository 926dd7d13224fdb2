"""Labels: the CSV (or MedMNIST .npz labels), the positive class, patient-grouped stratified splits, label budgets."""
from __future__ import annotations

import csv
import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LabelsError

DISEASE_WORDS = ("diseased", "disease", "abnormal", "tumor", "tumour", "lesion", "malignant", "pneumonia",
                 "positive", "sick", "pathological", "cancer")


def _norm_path(p: str, allow_outside: bool, row: int, data_root: Path | None) -> str:
    raw = p.strip().replace("\\", "/")
    if raw.startswith("/"):
        if data_root is not None:
            try:
                return Path(raw).resolve().relative_to(data_root.resolve()).as_posix()
            except ValueError:
                pass
        if not allow_outside:
            raise LabelsError(f"labels row {row}: absolute path '{p}' is outside DATA; paths must be relative to DATA.")
        return raw
    n = posixpath.normpath(raw)
    if (n == ".." or n.startswith("../")) and not allow_outside:
        raise LabelsError(f"labels row {row}: path '{p}' escapes DATA with '..'; paths must stay inside DATA.")
    return n


@dataclass
class LabelsTable:
    keys: list  # scan keys (paths relative to DATA, or 'split/index' in an .npz)
    labels: list  # class names as strings
    patients: list  # patient id per row (defaults to the key itself)
    splits: list  # 'train' | 'val' | 'test' | None
    has_patient: bool = False
    classes: list = field(default_factory=list)
    positive: list = field(default_factory=list)  # classes counted as "diseased" (binary task) or [] (multi-class)

    def __post_init__(self):
        self._index = {k: i for i, k in enumerate(self.keys)}

    @property
    def binary(self) -> bool:
        return bool(self.positive)

    def y(self) -> np.ndarray:
        """Targets: 1 = positive class(es), 0 = rest (binary); else the class index."""
        if self.binary:
            pos = set(self.positive)
            return np.array([1 if lab in pos else 0 for lab in self.labels], dtype=np.int64)
        idx = {c: i for i, c in enumerate(self.classes)}
        return np.array([idx[lab] for lab in self.labels], dtype=np.int64)

    def class_names(self) -> list:
        if self.binary:
            rest = [c for c in self.classes if c not in self.positive]
            return ["/".join(rest), "/".join(self.positive)]
        return list(self.classes)

    def patient_of(self, key):
        i = self._index.get(key)
        return self.patients[i] if (i is not None and self.has_patient) else None

    def row_of(self, key):
        return self._index.get(key)

    def train_label_ids(self, keys) -> np.ndarray:
        """For SupCon: label index per scan key; -1 for scans without a label or in the test split."""
        y = self.y()
        out = np.full(len(keys), -1, dtype=np.int64)
        for j, k in enumerate(keys):
            i = self._index.get(k)
            if i is not None and self.splits[i] != "test":
                out[j] = y[i]
        return out

    def probe_set(self, scans):
        """(images, y) of labeled scans for the online kNN monitor (validation rows if there are any)."""
        rows = [(j, self._index[r.key]) for j, r in enumerate(scans.records) if r.key in self._index]
        val = [(j, i) for j, i in rows if self.splits[i] == "val"]
        rows = val if len(val) >= 10 else rows
        if not rows:
            return None
        y = self.y()
        idx = np.array([j for j, _ in rows])
        return scans.batch(idx), y[[i for _, i in rows]]

    def subset(self, rows) -> "LabelsTable":
        rows = list(rows)
        t = LabelsTable([self.keys[i] for i in rows], [self.labels[i] for i in rows], [self.patients[i] for i in rows],
                        [self.splits[i] for i in rows], self.has_patient, list(self.classes), list(self.positive))
        return t


def _rows_text(rows: list, most: int = 5) -> str:
    shown = ", ".join(str(r) for r in rows[:most])
    return f"{shown}{' …' if len(rows) > most else ''}"


def _class_summary(classes: list, rows_of: dict) -> str:
    """"'normal' (1341 rows), 'maybe??' (1 row: 57)": rare classes name their rows; bare names when rows are unknown."""
    if not rows_of:
        return ", ".join(f"'{c}'" for c in classes)
    total = sum(len(v) for v in rows_of.values())
    parts = []
    for c in classes:
        rows = rows_of.get(c, [])
        rare = len(rows) <= 5 or len(rows) < 0.01 * total
        parts.append(f"'{c}' ({len(rows)} row{'s' if len(rows) != 1 else ''}" +
                     (f": {_rows_text(rows)})" if rare else ")"))
    return ", ".join(parts)


def resolve_positive(classes: list, positive: str | None, negative: str | None = None, multiclass: bool = False,
                     rows_of: dict | None = None, where: str = "labels") -> list:
    """Which class(es) are 'diseased'; [] for an explicit multi-class task.

    A task never changes silently: a third class (a typo such as 'maybe??') is an error naming its rows, unless the
    user says what it is: `positive` (one class or a comma list, e.g. '1,2,3,4'), `negative` (the healthy class(es)
    when more than one would be left) or `multiclass`. `rows_of`: class -> row numbers, for the messages."""
    rows_of = rows_of or {}

    def split_list(v):
        return [p.strip() for p in str(v).split(",") if p.strip()]

    def check_known(names, flag):
        missing = [p for p in names if p not in classes]
        if missing:
            raise LabelsError(f"{flag}: class(es) {missing} not in the labels; classes are: {', '.join(classes)}.")

    if multiclass:
        if positive or negative:
            raise LabelsError("--multiclass trains one output per class: drop --positive/--negative, or drop "
                              "--multiclass for a healthy-vs-diseased task.")
        return []
    if positive:
        wanted = split_list(positive)
        check_known(wanted, f"--positive {positive}")
        rest = [c for c in classes if c not in wanted]
        if not rest:
            raise LabelsError("--positive names every class; leave at least one as the healthy class.")
        if negative:
            healthy = split_list(negative)
            check_known(healthy, f"--negative {negative}")
            if set(healthy) & set(wanted):
                raise LabelsError(f"class(es) {sorted(set(healthy) & set(wanted))} are in both --positive and "
                                  f"--negative.")
            odd = [c for c in rest if c not in healthy]
            if odd:
                raise LabelsError(f"{where}: label(s) outside --positive/--negative: "
                                  f"{_class_summary(odd, rows_of)}. Fix those rows or add the classes to one side.")
        elif len(rest) > 1:
            raise LabelsError(f"{where}: with --positive {positive}, classes {_class_summary(rest, rows_of)} would all "
                              f"count as healthy. Fix mistyped rows, or say so with --negative {','.join(rest)}.")
        return wanted
    if negative:
        raise LabelsError("--negative needs --positive (the diseased class(es)).")
    if len(classes) != 2:
        raise LabelsError(f"{where}: {len(classes)} classes where a healthy-vs-diseased task needs 2: "
                          f"{_class_summary(classes, rows_of)}. Fix mistyped rows, or pass --positive CLASS[,CLASS] "
                          "(e.g. --positive 1,2,3,4 for graded labels), or --multiclass for one output per class.")
    if "1" in classes and "0" in classes:
        return ["1"]
    hits = [c for c in classes if c.lower() in DISEASE_WORDS]
    if len(hits) == 1:
        return hits
    raise LabelsError(f"cannot tell which class is the diseased one among {classes}: pass --positive CLASS.")


def _csv_rows(path, what: str, required: tuple, header: str) -> tuple:
    """(columns, [(line number, {column: stripped value})]) of a CSV; one clear error for a missing file, an
    unreadable file or a missing column."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{what} not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise LabelsError(f"{path}: not a readable CSV ({e}).") from None
    missing = [c for c in required if c not in cols]
    if missing:
        raise LabelsError(f"{path}: missing column(s) {missing}; found {cols}. Expected a header '{header}'.")
    return cols, [(n, {k.strip(): (v or "").strip() for k, v in r.items() if k is not None})
                  for n, r in enumerate(rows, start=2)]


def read_labels_csv(path, data_root=None, positive=None, allow_outside: bool = False, negative=None,
                    multiclass: bool = False) -> LabelsTable:
    path = Path(path)
    cols, rows = _csv_rows(path, "labels file", ("path", "label"), "path,label[,patient][,split]")
    keys, labels, patients, splits = [], [], [], []
    seen, rows_of = {}, {}
    has_patient = "patient" in cols and any(r.get("patient") for _, r in rows)
    root = Path(data_root) if data_root is not None and Path(data_root).is_dir() else None
    for n, r in rows:
        if not r.get("path"):
            raise LabelsError(f"{path} row {n}: empty path.")
        if r.get("label", "") == "":
            raise LabelsError(f"{path} row {n}: empty label for {r['path']}.")
        key = _norm_path(r["path"], allow_outside, n, root)
        if key in seen:
            raise LabelsError(f"{path}: '{key}' appears twice (rows {seen[key]} and {n}); keep one row per scan.")
        seen[key] = n
        sp = r.get("split", "").lower() or None
        if sp is not None and sp not in ("train", "val", "test"):
            raise LabelsError(f"{path} row {n}: split '{sp}' must be train, val or test.")
        keys.append(key)
        labels.append(r["label"])
        rows_of.setdefault(r["label"], []).append(n)
        patients.append(r.get("patient") or key)
        splits.append(sp)
    if not keys:
        raise LabelsError(f"{path}: no rows.")
    classes = sorted(set(labels), key=lambda c: (not c.lstrip("-").isdigit(),
                                                 int(c) if c.lstrip("-").isdigit() else 0, c))
    if len(classes) < 2:
        raise LabelsError(f"{path}: only one class ({classes[0]}): a classifier needs at least two.")
    task = resolve_positive(classes, positive, negative, multiclass, rows_of, where=f"{path} (rows are CSV lines)")
    table = LabelsTable(keys, labels, patients, splits, has_patient, classes, task)
    check_patient_splits(table, str(path))
    return table


def labels_from_records(records, positive=None, negative=None, multiclass: bool = False) -> LabelsTable:
    """MedMNIST .npz: labels and official splits come with the file."""
    rows = [r for r in records if r.label is not None]
    if not rows:
        raise LabelsError("this data has no labels: pass --labels LABELS.csv.")
    labels = [str(r.label if not isinstance(r.label, tuple) else r.label[0]) for r in rows]
    classes = sorted(set(labels), key=lambda c: int(c) if c.lstrip("-").isdigit() else c)
    rows_of: dict = {}
    for r, lab in zip(rows, labels):
        rows_of.setdefault(lab, []).append(r.key)
    return LabelsTable([r.key for r in rows], labels, [r.key for r in rows], [r.split for r in rows], False, classes,
                       resolve_positive(classes, positive, negative, multiclass, rows_of, where="the .npz labels"))


@dataclass(frozen=True)
class Task:
    """What the labels ask of a classifier: the diseased class(es) (`positive`: "diseased", or "1,2,3,4" to make graded
    labels binary), the healthy ones when more classes remain (`negative`), or one output per class (`multiclass`);
    and the operating point its threshold is chosen at ("youden", "sensitivity=0.95"; metrics.parse_operating_point).
    The CLI's --positive/--negative/--multiclass/--operating-point."""
    positive: str | None = None
    negative: str | None = None
    multiclass: bool = False
    operating_point: str = "youden"

    def read(self, labels_csv, data_root=None, records=(), allow_outside: bool = False) -> LabelsTable:
        """The labels table of this task: from a CSV, else from the records' own labels (a MedMNIST .npz)."""
        if labels_csv:
            return read_labels_csv(labels_csv, data_root, self.positive, allow_outside, self.negative, self.multiclass)
        return labels_from_records(records, self.positive, self.negative, self.multiclass)


def check_patient_splits(t: LabelsTable, where: str) -> None:
    if not t.has_patient or not any(t.splits):
        return
    seen: dict = {}
    for k, p, s in zip(t.keys, t.patients, t.splits):
        if s is None:
            continue
        if p in seen and seen[p][0] != s:
            raise LabelsError(f"{where}: patient '{p}' is in split '{seen[p][0]}' ({seen[p][1]}) and '{s}' ({k}); "
                              "a patient must stay in one split, or the test score leaks.")
        seen.setdefault(p, (s, k))


def make_splits(y: np.ndarray, groups: np.ndarray, test_fraction: float = 0.2, val_fraction: float = 0.1,
                seed: int = 0) -> np.ndarray:
    """Patient-grouped, stratified hold-out: returns an array of 'train'/'val'/'test' per row."""
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(y)
    out = np.array(["train"] * n, dtype=object)

    def carve(idx, frac, name, s):
        k = max(2, int(round(1 / frac)))
        n_groups = len(np.unique(groups[idx]))
        k = min(k, n_groups, int(np.bincount(y[idx]).max()))  # a small folder: fewer, larger folds
        if k < 2:
            raise LabelsError(f"too few patients ({n_groups}) to hold out a {name} split.")
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=s)
        with warnings.catch_warnings():  # a class with fewer scans than folds cannot be stratified: it falls on one
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)  # side, which is all we need
            _, pick = next(cv.split(np.zeros(len(idx)), y[idx], groups[idx]))
        out[idx[pick]] = name

    carve(np.arange(n), test_fraction, "test", seed)
    rest = np.flatnonzero(out == "train")
    carve(rest, val_fraction / (1 - test_fraction), "val", seed + 1)
    return out


def select_budget(y: np.ndarray, candidates: np.ndarray, fraction: float | None = None, per_class: int | None = None,
                  seed: int = 0, min_per_class: int = 1, cap: bool = False) -> np.ndarray:
    """A stratified labeled subset of `candidates` (row indices), reproducible from `seed`; every class present."""
    rng = np.random.default_rng([seed, 1234])
    chosen = []
    for c in np.unique(y[candidates]):
        pool = candidates[y[candidates] == c]
        if per_class is not None:
            k = per_class
        else:
            k = max(min_per_class, int(round((fraction if fraction is not None else 1.0) * len(pool))))
        if cap:
            k = min(k, len(pool))
        if k > len(pool):
            raise LabelsError(f"budget asks for {k} labels of class {c} but the train split has only {len(pool)}.")
        chosen.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def read_pairs_csv(path, data_root=None, allow_outside: bool = False):
    """Pairs CSV for the classic pair loss: columns path_a,path_b,similar (1/0, true/false). Returns [(a, b, s)]."""
    _, rows = _csv_rows(path, "pairs file", ("path_a", "path_b", "similar"), "path_a,path_b,similar")
    root = Path(data_root) if data_root is not None and Path(data_root).is_dir() else None
    out = []
    for n, r in rows:
        s = r["similar"].lower()
        if s not in ("1", "0", "true", "false", "yes", "no"):
            raise LabelsError(f"{path} row {n}: similar must be 1/0 (or true/false), got '{r['similar']}'.")
        out.append((_norm_path(r["path_a"], allow_outside, n, root), _norm_path(r["path_b"], allow_outside, n, root),
                    1 if s in ("1", "true", "yes") else 0))
    if not out:
        raise LabelsError(f"{path}: no rows.")
    if len({s for _, _, s in out}) < 2:
        raise LabelsError(f"{path}: all pairs are {'similar' if out[0][2] else 'dissimilar'}; the pair loss needs "
                          f"both kinds.")
    return out


def read_scan_list(path, data_root=None) -> list:
    """(key, patient or None, split or None) per row of a CSV with a path column; labels, if any, are not read."""
    root = Path(data_root) if data_root is not None and Path(data_root).is_dir() else None
    _, rows = _csv_rows(path, "file", ("path",), "path[,label][,patient][,split]")
    return [(_norm_path(r["path"], False, n, root), r.get("patient") or None, r.get("split", "").lower() or None)
            for n, r in rows if r.get("path")]
