"""Decode and resample every scan once into one fixed-size array (N, C, *[size]*dims).

Per training step the work is then indexing + augmentation. Large datasets go to a memory-mapped .npy
in the run folder, so memory stays bounded for folders larger than RAM.
"""
from __future__ import annotations

import itertools
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
import torch

from ..errors import MedclError, ScanReadError
from ..progress import Progress
from .preprocessing import Preprocessing
from .discover import Source

MIN_SIDE = 4  # below this a scan carries no usable structure
LABEL_MAP_MAX_VALUES = 16  # an integer image with this few distinct values is a mask or label map, not a scan
LABEL_MAP_NAME_WORDS = ("seg", "mask", "label", "parc", "annot")  # ... or up to 256 values with a name like these


LABEL_MAP_REASON = "looks like a label map or mask"  # how skipped.csv (and the scan cache) tell masks from bad scans


def is_label_map(reason: str) -> bool:
    return reason.startswith(LABEL_MAP_REASON)


def label_map_values(arr: np.ndarray, path) -> np.ndarray | None:
    """The distinct values if `arr` looks like a segmentation (tumour labels, brain mask, parcellation), else None.

    Segmentations sit beside images in most 3D folders (BraTS: FLAIR, T1c, brainmask, tumour labels); pretraining on
    them teaches the encoder nothing about anatomy. A cheap subsample rejects most real scans at once."""
    name = Path(str(path)).name.lower()
    limit = 256 if any(w in name for w in LABEL_MAP_NAME_WORDS) else LABEL_MAP_MAX_VALUES
    flat = arr.ravel()
    if np.unique(flat[:: max(1, flat.size // 100_000)]).size > limit:
        return None
    if not np.array_equal(flat, np.round(flat)):
        return None
    values = np.unique(flat)
    return values if values.size <= limit else None


def to_model_array(arr: np.ndarray, spacing, path, dims: int, size: int, channels: int, intensity: str,
                   skip_label_maps: bool = True) -> np.ndarray:
    """Channel-first scan -> float32 (channels, *[size]*dims) in [0, 1]. Raises ScanReadError with the reason."""
    if not np.all(np.isfinite(arr)):
        raise ScanReadError(path, "contains NaN or Inf values; fix or remove the scan.")
    if skip_label_maps and arr.min() < arr.max() and (values := label_map_values(arr, path)) is not None:
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (" …" if len(values) > 8 else "")
        raise ScanReadError(path, f"{LABEL_MAP_REASON} ({len(values)} distinct integer values: {shown}), "
                                  "not an image; skipped (not counted as a bad scan). Keep it out with --exclude, or "
                                  "pretrain on it anyway with --set data.skip_label_maps=false.")
    spatial = arr.ndim - 1
    if dims == 2 and spatial == 3:
        if 1 in arr.shape[1:]:
            axis = 1 + arr.shape[1:].index(1)
            arr = np.squeeze(arr, axis=axis)
            if spacing is not None:
                spacing = tuple(s for i, s in enumerate(spacing) if i != axis - 1)
        else:
            raise ScanReadError(path, f"3D volume {arr.shape[1:]} in a 2D run: use --dims 3 for volumes, "
                                      "or method.positives=neighbors to train a 2D encoder on their slices.")
    elif dims == 3 and spatial == 2:
        raise ScanReadError(path, f"2D image {arr.shape[1:]} in a 3D run: use --dims 2, or keep 2D and 3D scans in "
                                  f"separate folders.")
    elif arr.ndim - 1 != dims:
        raise ScanReadError(path, f"array of shape {arr.shape} is neither a 2D image nor a 3D volume.")
    c = arr.shape[0]
    if dims == 3 and c > 1:  # 4D series (fMRI, DWI): the first volume stands for the scan
        arr = arr[:1]
    elif c == 4:  # RGBA: drop alpha
        arr = arr[:3]
    elif c not in (1, 3):
        raise ScanReadError(path, f"{c} channels: expected grayscale or RGB.")
    if arr.shape[0] == 3 and channels == 1:
        arr = arr.mean(axis=0, keepdims=True)
    elif arr.shape[0] == 1 and channels == 3:
        arr = np.repeat(arr, 3, axis=0)
    if min(arr.shape[1:]) < MIN_SIDE:
        raise ScanReadError(path, f"too small ({'x'.join(map(str, arr.shape[1:]))}); need at least {MIN_SIDE} pixels "
                                  f"per side.")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise ScanReadError(path, "constant image (every pixel equal): nothing to learn from.")
    if intensity == "percentile":
        plo, phi = np.percentile(arr, [0.5, 99.5])
        if phi > plo:
            lo, hi = float(plo), float(phi)
    if intensity != "none":
        arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    # resample: keep the physical aspect ratio, fit the longest side to `size`, zero-pad the rest
    shape = np.array(arr.shape[1:], dtype=float)
    sp = np.array(spacing if spacing is not None and len(spacing) == dims else [1.0] * dims, dtype=float)
    phys = shape * sp
    target = np.maximum(1, np.round(phys * size / phys.max())).astype(int)
    if np.array_equal(target, shape) and np.all(target == size):  # already the model's size (MedMNIST): as is
        out = np.ascontiguousarray(arr, dtype=np.float32)
        return np.clip(out, 0.0, 1.0) if intensity != "none" else out
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.transforms import Resize, SpatialPad

        shrink = bool(np.all(target <= shape))
        mode = "area" if shrink else ("bilinear" if dims == 2 else "trilinear")
        t = Resize(spatial_size=tuple(int(v) for v in target), mode=mode)(t)
        t = SpatialPad(spatial_size=(size,) * dims, mode="constant")(t)
    out = np.asarray(t.numpy() if hasattr(t, "numpy") else t, dtype=np.float32)
    return np.clip(out, 0.0, 1.0) if intensity != "none" else out


@dataclass
class ScanSet:
    """The decoded dataset: images[rows[i]] belongs to records[i]. Folders larger than data.cache_max_gb are not held
    at all: `files[i]` is record i's entry in the persistent scan cache, read per batch (memory stays flat)."""

    images: np.ndarray | None
    records: list
    skipped: list = field(default_factory=list)  # (path, reason)
    rows: np.ndarray | None = None  # row of images for each record
    files: list | None = None  # per record: its .npy in the scan cache (when images is None)
    item_shape: tuple = ()
    decoded: int = 0  # scans this process decoded (the rest came from the scan cache)

    def __post_init__(self):
        if self.rows is None:
            self.rows = np.arange(len(self.records))
        if self.images is not None:
            self.item_shape = tuple(self.images.shape[1:])

    def __len__(self):
        return len(self.records)

    def batch(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        out = np.empty((len(idx),) + self.item_shape, dtype=np.float32)
        if self.images is None:
            from .store import read_entry

            for j, i in enumerate(idx):
                out[j] = read_entry(self.files[i], self.item_shape)
            return out
        rows = self.rows[idx]
        order = np.argsort(rows)  # sorted reads are kinder to a memmap
        out[order] = self.images[rows[order]]
        return out

    @property
    def shape(self):
        return (len(self.records),) + self.item_shape


DECODER_VERSION = 1  # part of the scan cache's key: raise it when to_model_array changes its output


def _store_keys(store, recs) -> list:
    """Each record's key in the scan cache (None: no cache, or the file is gone since it was listed)."""
    keys = [None] * len(recs)
    if store is not None:
        for i, r in enumerate(recs):
            try:
                keys[i] = store.key(r)
            except OSError:  # gone since it was listed: decoding reports it by path
                pass
    return keys


def _allocate(n: int, item_shape: tuple, large: bool, cache_dir: Path | None):
    """Where the decoded scans go: memory, or a memmap file in the run's cache folder when they are too large."""
    if large and cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        return open_memmap(cache_dir / "scans.npy", mode="w+", dtype=np.float32, shape=(n,) + item_shape)
    return np.empty((n,) + item_shape, dtype=np.float32)


def _check_usable(n: int, n_ok: int, masks: int, skipped: list, max_bad_fraction: float, log) -> None:
    """Refuses a folder with no usable scan, or with more unusable ones than data.max_bad_fraction."""
    if n_ok == 0:
        raise MedclError(f"none of the {n} scans could be used. {summarize_problems(skipped)}")
    bad = n - n_ok - masks  # label maps beside images (BraTS) are not bad scans
    if masks:
        log(f"note: {masks} of {n} files are label maps or masks, not images: left out (listed in skipped.csv)")
    if bad / max(1, n - masks) > max_bad_fraction:
        raise MedclError(f"{bad} of {n - masks} scans cannot be used (more than data.max_bad_fraction="
                         f"{max_bad_fraction}). {summarize_problems([e for e in skipped if not is_label_map(e[1])])} "
                         f"Fix them, or raise the limit with --set data.max_bad_fraction=...")


def _decode_rank_share(store, keys: list, fill, progress, num_workers: int) -> int:
    """Under torchrun, each rank decodes 1/world of what the cache lacks into it; after the barrier every rank reads
    the same files. Returns how many this rank decoded (0 with one process)."""
    from .. import dist

    if dist.world_size() == 1:
        return 0
    missing = [i for i, k in enumerate(keys) if k is not None and not store.has(k)]
    mine = missing[dist.rank()::dist.world_size()]
    bar = Progress(len(mine), f"decode scans (this rank's 1/{dist.world_size()} of {len(missing)} new)",
                   progress, unit="scan", line_every=max(1, -(-len(mine) // 4)), min_total=50)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for _ in _bounded_map(pool, fill, mine):
            bar.update()
    bar.close()
    dist.barrier()
    return len(mine)


class _Decoding:
    """One pass over a folder's scans: what the scan cache has is read in this thread, the rest is decoded (and added
    to the cache) in a thread pool. Keeps which scans are usable, why the others are not, and how many were decoded."""

    def __init__(self, recs: list, store, keys: list, peeked: dict, item_shape: tuple, lazy: bool, images,
                 convert, strict: bool, read):
        self.recs, self.store, self.keys, self.peeked = recs, store, keys, peeked
        self.item_shape, self.lazy, self.images, self.convert, self.strict, self.read = \
            item_shape, lazy, images, convert, strict, read
        self.ok = np.zeros(len(recs), dtype=bool)
        self.errors = []  # (index, (path, reason)), reported in scan order whichever pass found them
        self.decoded = 0
        self.todo = [i for i in range(len(recs)) if keys[i] is None]

    def decode(self, i):
        """(array or None, (path, reason) or None)."""
        rec = self.recs[i]
        where = rec.path if rec.fmt != "npz" else f"{rec.path}:{rec.key}"
        try:
            got = self.peeked.pop(i, None) or self.read(rec)
            if isinstance(got, ScanReadError):
                raise got
            return self.convert(*got, where, rec), None
        except ScanReadError as e:
            return None, (e.path, e.reason)

    def fill(self, i):
        """Decode scan i and add it to the cache; returns (array or None, error or None)."""
        img, err = self.decode(i)
        self.store.put(self.keys[i], img if err is None else ("error",) + tuple(err))
        return img, err

    def work(self, i):
        """(i, array or None, error or None, decoded here?) for a scan the scan cache does not have."""
        if self.keys[i] is not None:  # not in the cache (new, or another node's share without a shared disk): add it
            img, err = self.fill(i)
            return i, (None if self.lazy else img), err, True
        img, err = self.decode(i)
        return i, img, err, True

    def cached(self):
        """(i, array or None, error or None, False) for the scans the cache has, read in this thread (a small entry
        reads faster than a thread pool hands it over); the rest are left for `work`."""
        for i, key in enumerate(self.keys):
            if key is None:
                continue
            got = self.store.get(key, self.item_shape)  # read even when lazy: a damaged entry is decoded again now
            if isinstance(got, tuple):
                yield i, None, (got[1], got[2]), False
            elif got is not None:
                yield i, (None if self.lazy else got), None, False
            else:
                self.todo.append(i)

    def take(self, results, bar):
        for i, img, err, here in results:
            bar.update()
            self.decoded += here
            if err is not None:
                if self.strict:
                    raise ScanReadError(*err)
                self.errors.append((i, err))
                continue
            if self.images is not None:
                self.images[i] = img
            self.ok[i] = True

    def run(self, progress: bool, num_workers: int) -> list:
        """Every scan once; returns the unusable ones as (path, reason), in scan order."""
        n = len(self.recs)
        bar = Progress(n, "decode scans", progress, unit="scan", line_every=max(1, -(-n // 4)), min_total=50)
        self.take(self.cached(), bar)
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            self.take(_bounded_map(pool, self.work, sorted(self.todo)), bar)
        bar.close()
        return [err for _, err in sorted(self.errors, key=lambda e: e[0])]

    def scan_set(self, skipped: list) -> ScanSet:
        """The usable scans: an in-memory array is compacted to them, a memmap stays on disk with its rows."""
        recs, images, rows = self.recs, self.images, np.flatnonzero(self.ok)
        files = [self.store.entry(self.keys[i]) for i in rows] if self.lazy else None
        if len(rows) < len(recs):
            recs = [recs[i] for i in rows]
            if images is not None and not isinstance(images, np.memmap):
                images, rows = images[rows], np.arange(len(rows))
        if self.lazy:
            rows = np.arange(len(rows))
        return ScanSet(images, list(recs), skipped, rows, files=files, item_shape=self.item_shape,
                       decoded=self.decoded)


def build_cache(source: Source, dims: int, size: int, channels: int = 1, intensity: str = "percentile",
                strict: bool = False, max_bad_fraction: float = 0.2, cache_dir: Path | None = None,
                cache_max_gb: float = 4.0, num_workers: int = 2, progress: bool = True,
                skip_label_maps: bool = True, store="auto", log=print, expect: str | None = None) -> ScanSet:
    """Every scan of `source` as float32 (channels, *[size]*dims) in [0, 1].

    Scans come from the persistent scan cache (medcl.data.store) when it has them and are decoded (and added to it)
    when not. Under torchrun each rank first decodes its share of the missing scans, then every rank reads them all.
    `store`: "auto" (the default cache folder), None (no cache), or a ScanStore."""
    from .. import dist
    from .store import open_store

    recs = source.records
    n = len(recs)
    store_arg = store
    item_shape = (channels,) + (size,) * dims
    if store == "auto":
        store = open_store(source.root, {"dims": dims, "size": size, "channels": channels, "intensity": intensity,
                                         "skip_label_maps": skip_label_maps, "decoder": DECODER_VERSION}, log=log)
    keys = _store_keys(store, recs)
    # under torchrun the ranks split what the cache lacks as they find it: a peek would read a scan twice
    # (the first three only: a warm command on 100k scans does not stat every entry twice)
    uncached = (i for i in range(n) if keys[i] is None or not store.has(keys[i])) if dist.world_size() == 1 else ()
    peeked = check_dims(source, list(itertools.islice(uncached, 3)), dims, expect)
    large = n * int(np.prod(item_shape)) * 4 > cache_max_gb * 2**30
    lazy = large and store is not None and all(k is not None for k in keys)  # read per batch from the scan cache
    images = None if lazy else _allocate(n, item_shape, large, cache_dir)  # lazy: read per batch, nothing held

    def convert(arr, spacing, where, rec):
        # a MedMNIST .npz is a declared dataset (VesselMNIST3D *is* binary masks): no label-map guess there
        return to_model_array(arr, spacing, where, dims, size, channels, intensity,
                              skip_label_maps and rec.fmt != "npz")

    run = _Decoding(recs, store, keys, peeked, item_shape, lazy, images, convert, strict, source.read)
    if store is not None:
        run.decoded = _decode_rank_share(store, keys, run.fill, progress, num_workers)
    skipped = list(source.problems) + run.run(progress, num_workers)
    n_ok = int(run.ok.sum())
    masks = sum(is_label_map(r) for _, r in skipped)
    if n_ok == 0 and masks and skip_label_maps:  # every scan that reads is a mask: they are the data (shape sets)
        log(f"all {masks} readable scans are binary or label volumes: treating them as shape data (masks are "
            f"skipped only among images; --exclude GLOB keeps files out)")
        return build_cache(source, dims, size, channels, intensity, strict, max_bad_fraction, cache_dir,
                           cache_max_gb, num_workers, progress, False, store_arg if store_arg == "auto" else None, log,
                           expect)
    _check_usable(n, n_ok, masks, skipped, max_bad_fraction, log)
    return run.scan_set(skipped)


def build_for_encoder(source: Source, settings, checkpoint=None, **kw) -> ScanSet:
    """build_cache with the preprocessing an encoder was pretrained with (a Preprocessing or its dict), so that every
    command after pretraining reads scans exactly as pretraining did."""
    p = Preprocessing.of(settings)
    expect = None if str(checkpoint).lower() == "none" else \
        f"the encoder{f' in {checkpoint}' if checkpoint else ''} was pretrained on {p.dims}D scans; pretrain one on " \
        f"these scans (medcl pretrain DATA --dims {5 - p.dims})"
    return build_cache(source, p.dims, p.size, p.channels, p.intensity, skip_label_maps=p.skip_label_maps,
                       expect=expect, **kw)


def summarize_problems(skipped: list, shown: int = 2) -> str:
    """'Problems: <reason> (N scans, first: <path>); ...': one entry per distinct reason, not one per scan."""
    by_reason = {}
    for path, reason in skipped:
        by_reason.setdefault(reason.split(" (")[0], []).append(path)
    parts = [f"{r} ({len(p)} scan{'s' * (len(p) > 1)}, first: {p[0]})" for r, p in list(by_reason.items())[:shown]]
    more = f"; and {len(by_reason) - shown} other problems (skipped.csv)" if len(by_reason) > shown else ""
    return "Problems: " + "; ".join(parts) + more + "."


def spatial_dims_of(arr: np.ndarray) -> int:
    """2 for an image (a 3D array with one singleton spatial axis counts as 2D), 3 for a volume."""
    return sum(s > 1 for s in arr.shape[1:]) if arr.ndim == 4 else arr.ndim - 1


def check_dims(source: Source, indices, dims: int, expect: str | None) -> dict:
    """Refuse at once, from the first scans not yet cached, a folder of the other dimensionality: decoding all of it
    to find out takes long and ends in one reason repeated per scan. `expect` says why `dims` is what it is (the
    encoder's). Returns what it read, {index: (array, spacing)}, so that decoding does not read those again."""
    peeked, found = {}, []
    for i in indices:
        try:
            peeked[i] = source.read(source.records[i])
        except ScanReadError as e:
            peeked[i] = e  # decoding reports it by path
            continue
        found.append((spatial_dims_of(peeked[i][0]), i))
    if not found or any(d == dims for d, _ in found):
        return peeked
    what = {2: "2D images", 3: "3D volumes"}.get(found[0][0], f"{found[0][0]}D arrays")
    rec = source.records[found[0][1]]
    why = expect or f"this run is {dims}D (data.dims); pass --dims {found[0][0]} for these scans"
    first = f"{rec.path}:{rec.key}" if rec.fmt == "npz" else str(rec.path)
    raise MedclError(f"{rec.path if rec.fmt == 'npz' else source.root} holds {what} (first: {first}), but {why}.")


def _bounded_map(pool, fn, items, chunk: int = 2048):
    """pool.map in chunks: at most `chunk` scans are queued or finished-but-unread at a time, so a folder of 100k
    scans does not hold 100k futures (and their arrays) at once."""
    items = list(items)
    for start in range(0, len(items), chunk):
        yield from pool.map(fn, items[start:start + chunk])


def write_skipped(skipped: list, path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)
