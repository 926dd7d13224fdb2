"""Which scans to label first: cold-start selection from the pretrained embeddings.

A few-label user can afford N labels; random picks spend them on near-duplicates and outliers. `centroid` (the
default) and `typiclust` cluster the embedding (k-means, as many clusters as labels so far plus the budget) and label
one scan of each cluster not yet covered, largest clusters first: `centroid` the scan nearest the cluster's mean,
`typiclust` its most *typical* scan (the densest: the smallest mean distance to its nearest neighbours; Hacohen et
al., TypiClust, ICML 2022; Chen et al., MIDL 2023, for medical images). Density favours the compact class: healthy
scans are alike, diseased ones differ, so typicality can leave the diseased class short (docs/selection.md: on
RetinaMNIST 35-45% of its picks, from a pool with 55%); the centre has no such pull. `kcenter` is greedy
farthest-first coverage; `random` is the control. All are label-blind: they read features, never labels.

Patient-aware: a scan whose patient already has a labeled or chosen scan is not chosen (unless asked), so a small
budget is not spent twice on one patient. Test scans are never candidates.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.preprocessing import Preprocessing
from .errors import MedclError

STRATEGIES = ("centroid", "typiclust", "kcenter", "random")
MAX_CLUSTERS = 500  # TypiClust's cap: past this, more clusters add time, not coverage
MIN_CLUSTER = 5  # smaller clusters are outlier groups: covered only after every larger one
TYPICALITY_K = 20  # neighbours in the density estimate
TYPICALITY_REF = 2000  # a big cluster's density is measured against a seeded sample of this many of its scans
CONTACT_SHEET_MAX = 100


class SelectionError(MedclError):
    pass


@dataclass
class Picked:
    order: np.ndarray  # row indices into the features, in the order to label
    cluster: np.ndarray  # k-means cluster of each picked row
    typicality: np.ndarray  # each picked row's typicality within its cluster
    info: dict = field(default_factory=dict)


def _unit(f):
    f = np.asarray(f, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _clusters(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if k <= 1:
        return np.zeros(len(x), dtype=int)
    if len(x) > 20000:  # mini-batch k-means: 100k scans in seconds on a CPU (docs/selection.md)
        km = MiniBatchKMeans(k, random_state=seed, batch_size=4096, n_init=1)  # k-means++ init is most of the time
    else:
        km = KMeans(k, random_state=seed, n_init=3)
    return km.fit_predict(x)


def typicality(x: np.ndarray, seed: int = 0, k: int = TYPICALITY_K, ref_cap: int = TYPICALITY_REF,
               rows=None) -> np.ndarray:
    """1 / mean distance to the k nearest other members (TypiClust's density), for `rows` of x (default: all).
    x: one cluster's unit-norm features (distances come from dot products)."""
    n = len(x)
    rows_wanted = np.arange(n) if rows is None else np.asarray(rows, dtype=int)
    if n < 2:
        return np.ones(len(rows_wanted))
    ref_idx = np.arange(n) if n <= ref_cap else np.sort(np.random.default_rng([seed, 5]).choice(n, ref_cap, False))
    ref = x[ref_idx]
    k = min(k, len(ref) - 1)
    self_col = np.full(n, -1)
    self_col[ref_idx] = np.arange(len(ref_idx))
    out = np.empty(len(rows_wanted))
    for s in range(0, len(rows_wanted), 4096):  # chunks keep the distance matrix small for a cluster of 100k scans
        rows = rows_wanted[s:s + 4096]
        d = np.sqrt(np.maximum(2.0 - 2.0 * (x[rows] @ ref.T), 0.0))
        own = self_col[rows] >= 0
        d[np.flatnonzero(own), self_col[rows][own]] = np.inf  # a scan is not its own neighbour
        out[s:s + len(rows)] = 1.0 / (np.partition(d, k - 1, axis=1)[:, :k].mean(1) + 1e-12)
    return out


def _pool(n: int, cand, labeled, groups, budget: int, same_patient: bool) -> tuple:
    """(patient codes per row, which rows may be chosen); refuses a budget larger than the patients left."""
    if budget < 1:
        raise SelectionError(f"--budget {budget}: must be at least 1.")
    # patients as integer codes: marking a patient used is then one vectorised comparison
    groups = np.arange(n) if groups is None else np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    used = set() if same_patient else set(groups[labeled].tolist())
    eligible = np.zeros(n, dtype=bool)
    eligible[cand] = True
    if not same_patient:
        eligible[cand] = [g not in used for g in groups[cand].tolist()]
    n_patients = len(set(groups[eligible])) if not same_patient else int(eligible.sum())
    if budget > n_patients:
        why = (f"{len(cand)} candidate scans" + ("" if same_patient else f" of {n_patients} patients not yet labeled")
               + (f" ({len(labeled)} already labeled)" if len(labeled) else ""))
        raise SelectionError(f"--budget {budget} is larger than the pool: {why}. Lower --budget"
                             + ("" if same_patient or n_patients == len(cand) else
                                ", or pass --allow-same-patient to take several scans of one patient") + ".")
    return groups, eligible


def _kcenter(x, cand, labeled, groups, eligible, budget: int, same_patient: bool, rng, take) -> list:
    """Greedy k-center: each pick is the candidate farthest from every labeled or chosen scan."""
    order = []
    xc = np.ascontiguousarray(x[cand])  # one copy: each step is then a matrix-vector product over the pool
    gc = groups[cand]
    # squared distance of each candidate to its nearest labeled or chosen scan; -1 marks one that cannot be chosen
    mind = np.where(eligible[cand], np.inf, -1.0).astype(np.float32)
    for s in range(0, len(labeled), 1024):
        mind = np.minimum(mind, np.maximum(2.0 - 2.0 * (xc @ x[labeled[s:s + 1024]].T), 0.0).min(1))
    for _ in range(budget):
        if np.isinf(mind).any():  # nothing labeled yet: a seeded random start
            j = rng.choice(np.flatnonzero(mind > 0))
        else:
            j = int(np.argmax(mind))
        order.append(cand[j])
        take(cand[j])
        mind[j] = -1.0
        if not same_patient:
            mind[gc == gc[j]] = -1.0
        mind = np.minimum(mind, np.maximum(2.0 - 2.0 * (xc @ xc[j]), 0.0))
    return order


def choose(features: np.ndarray, budget: int, strategy: str = "centroid", seed: int = 0, candidates=None,
           labeled=None, groups=None, same_patient: bool = False) -> Picked:
    """Pick `budget` rows of `candidates` (default: every row not in `labeled`) to label next.

    labeled: rows already labeled; they count as covering their cluster (centroid, typiclust), as centres (kcenter)
    and as patients already used. groups: patient per row (None: every scan its own patient)."""
    if strategy not in STRATEGIES:
        raise SelectionError(f"--strategy {strategy}: choose {', '.join(STRATEGIES)}")
    n = len(features)
    labeled = np.unique(np.asarray([] if labeled is None else labeled, dtype=int))
    cand = np.setdiff1d(np.arange(n) if candidates is None else np.asarray(candidates, dtype=int), labeled)
    groups, eligible = _pool(n, cand, labeled, groups, budget, same_patient)
    x = _unit(features)
    universe = np.union1d(cand, labeled)
    k = int(min(len(labeled) + budget, MAX_CLUSTERS, len(universe)))
    cl = np.full(n, -1)
    cl[universe] = _clusters(x[universe], k, seed)
    sizes = np.bincount(cl[universe], minlength=k)
    covered = np.bincount(cl[labeled], minlength=k) if len(labeled) else np.zeros(k, dtype=int)
    before = int((covered > 0).sum())
    typ = np.full(n, np.nan)

    def typ_of(c):
        members = universe[cl[universe] == c]
        if np.isnan(typ[members[0]]):
            typ[members] = typicality(x[members], seed + int(c))
        return typ

    def take(i):
        covered[cl[i]] += 1
        eligible[i] = False
        if not same_patient:
            eligible[groups == groups[i]] = False

    order = []
    rng = np.random.default_rng([seed, 17])
    if strategy in ("typiclust", "centroid"):
        for _ in range(budget):
            open_ = np.flatnonzero(np.bincount(cl[eligible], minlength=k) > 0)
            # the least-covered cluster, a real cluster before an outlier group, then the largest
            c = open_[np.lexsort((-sizes[open_], sizes[open_] < MIN_CLUSTER, covered[open_]))[0]]
            members = np.flatnonzero(eligible & (cl == c))
            if strategy == "typiclust":
                i = members[np.argmax(typ_of(c)[members])]
            else:  # the scan nearest the cluster's mean: its centre, not its densest point
                centre = x[universe[cl[universe] == c]].mean(0)
                i = members[np.argmax(x[members] @ centre)]
            order.append(i)
            take(i)
    elif strategy == "kcenter":
        order = _kcenter(x, cand, labeled, groups, eligible, budget, same_patient, rng, take)
    else:
        for i in rng.permutation(cand):
            if len(order) == budget:
                break
            if eligible[i]:
                order.append(i)
                take(i)
    order = np.array(order, dtype=int)
    for c in np.unique(cl[order]):  # the other strategies: typicality of the chosen scans only, for the report
        if np.isnan(typ[order[cl[order] == c]]).any():
            members = universe[cl[universe] == c]
            mine = np.flatnonzero(np.isin(members, order))
            typ[members[mine]] = typicality(x[members], seed + int(c), rows=mine)
    info = {"strategy": strategy, "clusters": k, "clusters_covered_before": before,
            "clusters_covered": int((covered > 0).sum()), "candidates": int(len(cand)),
            "already_labeled": int(len(labeled))}
    return Picked(order, cl[order], typ[order], info)


# ---- the command: encode, choose, write to_label.csv, the contact sheet and the projector --------------------

def _short(key: str, most: int = 22) -> str:
    name = key.rsplit("/", 1)[-1]
    return name if len(name) <= most else "…" + name[-(most - 1):]


def _stored_embeddings(path, keys: list) -> tuple:
    """(keys, features) of DATA's scans from a `medcl embed` output, in DATA's order; refuses another folder's."""
    p = Path(path)
    p = p / "embeddings.npz" if p.is_dir() else p
    if not p.is_file():
        raise SelectionError(f"--embeddings {path}: no embeddings.npz there (write one with medcl embed).")
    with np.load(p, allow_pickle=False) as z:
        feats, paths = z["features"], [str(k) for k in z["paths"]]
    pos = {k: i for i, k in enumerate(paths)}
    have = [k for k in keys if k in pos]
    if len(have) < 0.9 * len(keys):
        raise SelectionError(f"--embeddings {path}: holds {len(have)} of DATA's {len(keys)} scans: it was made from "
                             "another folder or selection. Run medcl embed on this DATA, or leave --embeddings out.")
    return have, feats[[pos[k] for k in have]]


def contact_sheet(images: np.ndarray, dims: int, titles: list, path: Path):
    """A grid of the chosen scans (middle axial slice of a volume), titled with rank and cluster; returns the figure."""
    from . import tensorboard as tb
    from .report import _plt

    plt = _plt()
    pics = tb.thumbnail(images, dims)
    n = len(pics)
    cols = int(min(10, max(1, np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, pic, t in zip(axes.ravel(), pics, titles):
        ax.imshow(np.moveaxis(pic, 0, -1) if pic.shape[0] == 3 else pic[0], cmap="gray", vmin=0, vmax=1)
        ax.set_title(t, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def layout_split(key: str) -> str | None:
    """'test' for a scan under a folder named test (train/val/test layouts: Kaggle chest X-rays, BraTS exports)."""
    return "test" if any(part.lower() == "test" for part in key.split("/")[:-1]) else None


def _patients_and_test(source, labels, root, log) -> tuple:
    """({scan: patient}, {test scans}) from the records, the --labels CSV (never its labels) or a test/ folder."""
    from .data.labels import read_scan_list

    patient = {r.key: r.patient for r in source.records if r.patient}
    test = {r.key for r in source.records if r.split == "test"}
    for key, p, s in read_scan_list(labels, root) if labels else []:
        if p:
            patient[key] = p
        if s == "test":
            test.add(key)
    if not labels and not source.arrays:
        test = {r.key for r in source.records if layout_split(r.key) == "test"}
        log(f"holding out the {len(test)} scans under a test/ folder (the folder layout's test split); --labels "
            f"CSV with a split column decides instead" if test else
            "note: without --labels no scan is held out: any scan of DATA may be chosen. To keep test scans out, "
            "pass --labels CSV with a split column (or keep them under a test/ folder)")
    return patient, test


def _already_labeled(csvs: list, root, known: set, data, patient: dict) -> list:
    """The scans labeled so far, in order, from one CSV per round (or one holding them all); adds their patients."""
    from .data.labels import read_scan_list

    done = []
    for csv_path in csvs:
        listed = read_scan_list(csv_path, root)
        unknown = [k for k, _, _ in listed if k not in known]
        if unknown:
            raise SelectionError(f"--already-labeled {csv_path}: {len(unknown)} path(s) are not scans under "
                                 f"{data} (first: {unknown[:3]}); paths must be relative to DATA.")
        for key, p, _ in listed:
            if p:
                patient[key] = p
        done += [k for k, _, _ in listed]
    return list(dict.fromkeys(done))


def _check_pool(budget: int, keys, test: set, done: list, patient: dict, same_patient: bool) -> None:
    """A budget the pool cannot meet is refused before anything is decoded or written."""
    done_set = set(done)
    free = [k for k in keys if k not in test and k not in done_set]
    free_patients = len({patient.get(k, k) for k in free} - {patient.get(k, k) for k in done})
    if budget > (len(free) if same_patient else free_patients):
        raise SelectionError(f"--budget {budget} is larger than the pool: {len(free)} scans can be chosen "
                             f"({len(keys)} found, {len(test)} in the test split, {len(done)} already labeled"
                             + ("" if same_patient or free_patients == len(free) else
                                f"; {free_patients} patients not yet labeled: --allow-same-patient lifts that")
                             + "). Lower --budget.")


def _write_to_label(path: Path, picked: Picked, keys, groups, has_patient: bool) -> None:
    """to_label.csv in the order to label, with an empty label column to fill in."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "rank", "cluster", "typicality"] + (["patient"] if has_patient else []) + ["label"])
        for rank, (i, c, t) in enumerate(zip(picked.order, picked.cluster, picked.typicality), 1):
            w.writerow([keys[i], rank, int(c), f"{t:.4f}"] + ([groups[i]] if has_patient else []) + [""])


def _features(source, decode, encoder, device, out, log) -> tuple:
    """(keys, features, scans): every readable scan of DATA decoded and encoded; the unreadable ones in skipped.csv."""
    from .data.cache import write_skipped
    from .runtime import encode, pick_device

    scans = decode(source)
    write_skipped(scans.skipped, out / "skipped.csv")
    if scans.skipped:
        log(f"skipped {len(scans.skipped)} unreadable scans (see {out / 'skipped.csv'})")
    keys = [r.key for r in scans.records]
    log(f"encoding {len(keys)} scans")
    dev = pick_device(device)
    return keys, encode(encoder.to(dev), scans, dev), scans


def _decode_shown(source, keys: list, order, decode, max_points: int) -> tuple:
    """With features from an embed folder, decode only what is shown: the chosen scans and, up to max_points, a
    sample for the projector. Returns (scans, their rows in `keys`)."""
    shown = np.arange(len(keys))
    if len(keys) > max_points:
        rest = np.setdiff1d(shown, order)
        shown = np.sort(np.concatenate([order, np.random.default_rng(0).choice(
            rest, max(0, max_points - len(order)), replace=False)]))
    by_key = {r.key: r for r in source.records}
    source.records = [by_key[keys[i]] for i in shown]
    scans = decode(source)
    kept = {r.key for r in scans.records}
    return scans, np.array([i for i in shown if keys[i] in kept], dtype=int)


def select_scans(checkpoint, data, budget: int, out, strategy: str = "centroid", already_labeled=None, seed: int = 0,
                 labels=None, same_patient: bool = False, overwrite: bool = False, device="auto",
                 max_points: int = 10000, progress=True, log=print, select=None, embeddings=None) -> Path:
    """Choose `budget` scans of `data` to label next; writes to_label.csv, to_label.png and TensorBoard events.

    labels: an optional CSV whose patient and split columns are read (never its labels): test scans are never
    chosen, and patients are respected. already_labeled: CSV(s) of the scans labeled so far (path column).
    embeddings: a `medcl embed` folder (or its embeddings.npz) of DATA made with this checkpoint: its features are
    used instead of encoding every scan again, and only the scans shown are decoded (later rounds of the loop)."""
    from . import tensorboard as tb
    from .data.cache import build_for_encoder
    from .data.discover import open_source
    from .runs import prepare_out_dir, write_json
    from .weights import open_checkpoint

    if strategy not in STRATEGIES:
        raise SelectionError(f"--strategy {strategy}: choose {', '.join(STRATEGIES)}")
    if budget < 1:
        raise SelectionError(f"--budget {budget}: must be at least 1.")
    t0 = time.perf_counter()
    encoder, extra = open_checkpoint(checkpoint, data, select, log)
    prep = Preprocessing.of(extra.get("data", {}))
    dims = prep.dims
    source = open_source(data, dims, "all", select)
    root = source.root if not source.arrays else None
    keys = [r.key for r in source.records]
    patient, test = _patients_and_test(source, labels, root, log)
    already_labeled = [already_labeled] if isinstance(already_labeled, (str, Path)) else list(already_labeled or [])
    done = _already_labeled(already_labeled, root, set(keys), data, patient)
    done_set = set(done)
    _check_pool(budget, keys, test, done, patient, same_patient)  # before anything is written
    stored = _stored_embeddings(embeddings, keys) if embeddings else None
    out = prepare_out_dir(out, data, overwrite=overwrite, marker="to_label.csv")

    def decode(src):
        return build_for_encoder(src, prep, checkpoint, cache_dir=out / "cache", progress=progress, log=log)

    if stored is None:
        keys, feats, scans = _features(source, decode, encoder, device, out, log)
    else:
        (keys, feats), scans = stored, None
        if len(keys) < len(source.records):
            log(f"{len(source.records) - len(keys)} scans of DATA are not in {embeddings} (unreadable when it was "
                f"made?): they are not candidates")
    t_sel = time.perf_counter()
    rows_labeled = np.array([i for i, k in enumerate(keys) if k in done_set], dtype=int)
    rows_cand = np.array([i for i, k in enumerate(keys) if k not in test and k not in done_set], dtype=int)
    groups = np.array([patient.get(k, k) for k in keys], dtype=object)
    picked = choose(feats, budget, strategy, seed, rows_cand, rows_labeled, groups, same_patient)
    select_s = time.perf_counter() - t_sel
    _write_to_label(out / "to_label.csv", picked, keys, groups, any(k in patient for k in keys))
    rank_of = {int(i): r for r, i in enumerate(picked.order, 1)}
    shown = np.arange(len(keys))
    if stored is not None:
        scans, shown = _decode_shown(source, keys, picked.order, decode, max_points)
    at = {int(i): j for j, i in enumerate(shown)}  # row of `scans` for a row of `keys`
    sheet = [i for i in picked.order[:CONTACT_SHEET_MAX] if int(i) in at]
    fig = contact_sheet(scans.batch([at[int(i)] for i in sheet]), dims,
                        [f"#{rank_of[int(i)]} c{picked.cluster[rank_of[int(i)] - 1]}\n{_short(keys[i])}"
                         for i in sheet], out / "to_label.png")
    role = ["to label" if i in rank_of else "labeled" if k in done_set else "test" if k in test else "-"
            for i, k in enumerate(keys)]
    meta = [[k, role[i], str(rank_of.get(i, "-")), groups[i]] for i, k in enumerate(keys)]
    writer = tb.open_writer(out / "tb")
    try:
        tb.log_figure(writer, "selection/to_label", fig)
        tb.log_text(writer, "selection/summary", f"{strategy}: {budget} scans to label; " +
                    ", ".join(f"{k} {v}" for k, v in picked.info.items()))
        tb.write_projector(writer, feats[shown], scans, dims, ["path", "selection", "rank", "patient"],
                           [meta[i] for i in shown], max_points,
                           keep=[at[int(i)] for i in picked.order if int(i) in at], log=log)
    finally:
        writer.close()
    info = {**picked.info, "budget": budget, "seed": seed, "checkpoint": str(checkpoint), "data": str(data),
            "already_labeled_csv": [str(p) for p in already_labeled], "same_patient": same_patient,
            "embeddings": str(embeddings) if embeddings else None,
            "n_scans": len(keys), "n_test_excluded": int(sum(k in test for k in keys)),
            "select_seconds": round(select_s, 2), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "selection.json", info)
    new = info["clusters_covered"] - info["clusters_covered_before"]
    log(f"{strategy}: {budget} scans to label of {info['candidates']} candidates; they cover {new} new of "
        f"{info['clusters']} clusters of the embedding ({info['clusters_covered']} covered with the labeled ones); "
        f"selection took {select_s:.1f}s")
    log(f"wrote {out / 'to_label.csv'} (in the order to label: fill in its label column, then pass it to finetune/"
        f"evaluate as --labels), {out / 'to_label.png'}, TensorBoard in {out / 'tb'} (IMAGES, PROJECTOR: colour by "
        f"selection)")
    return out
