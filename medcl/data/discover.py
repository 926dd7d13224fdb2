"""Folder (or MedMNIST .npz) -> scan records. Nothing is read here beyond DICOM headers."""
from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedclError
from .readers import read_scan, scan_format

NPZ_SPLITS = ("train", "val", "test")


@dataclass
class ScanRecord:
    key: str  # path relative to DATA (posix), or "split/index" inside an .npz; what labels CSVs refer to
    fmt: str
    path: Path | None = None
    files: tuple = ()  # DICOM series: the slice files
    label: object = None  # labels carried by the source (MedMNIST .npz)
    split: str | None = None
    patient: str | None = None
    index: int = -1  # row in an .npz split


@dataclass
class Source:
    """Where scans come from. `read(record)` gives (array[C, *spatial], spacing)."""

    root: Path
    records: list
    problems: list = field(default_factory=list)  # (path, reason) found while walking
    arrays: dict = field(default_factory=dict)  # .npz: split -> images
    left_out: set = field(default_factory=set)  # keys found but not selected (--include/--exclude/--files)

    def read(self, rec: ScanRecord):
        if rec.fmt == "npz":
            img = np.asarray(self.arrays[rec.split][rec.index], dtype=np.float32)
            if img.ndim == 2:
                return img[None], None
            if img.ndim == 3 and img.shape[-1] in (3, 4):  # (H, W, RGB)
                return np.moveaxis(img, -1, 0), None
            return img[None], None  # (X, Y, Z)
        return read_scan(rec.path, rec.fmt, rec.files or None)


def _dicom_groups(folder: Path, names: list[str], problems: list):
    """Group a folder's .dcm files by series; one file per group for single images."""
    import pydicom

    series = defaultdict(list)
    singles = []
    for n in names:
        p = folder / n
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            uid = str(getattr(ds, "SeriesInstanceUID", "")) or None
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        except Exception:
            singles.append(p)  # the reader reports it properly later
            continue
        if uid is None or frames > 1:
            singles.append(p)
        else:
            series[uid].append(p)
    groups = [(p,) for p in singles]
    for uid, files in series.items():
        if len(files) == 1:
            groups.append((files[0],))
        else:
            groups.append(tuple(sorted(files)))
    return groups


def discover(root: str | os.PathLike, dims: int = 2) -> Source:
    """Walk DATA recursively (symlinked folders are not followed, so loops cannot hang it)."""
    root = Path(root)
    if not root.exists():
        raise MedclError(f"data not found: {root}")
    if root.is_file():
        if root.suffix.lower() == ".npz":
            return open_npz(root)
        fmt = scan_format(root)
        if fmt is None:
            raise MedclError(f"{root} is neither a folder of scans nor a MedMNIST .npz file.")
        return Source(root.parent, [ScanRecord(root.name, fmt, root)])
    records, problems = [], []

    def onerror(err):
        problems.append((str(err.filename), f"folder cannot be listed ({err.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        folder = Path(dirpath)
        dcm = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            fmt = scan_format(name)
            if fmt is None:
                continue
            if fmt == "dicom":
                dcm.append(name)
                continue
            p = folder / name
            records.append(ScanRecord(p.relative_to(root).as_posix(), fmt, p))
        if dcm:
            series = dims == 3 and len(dcm) > 1
            groups = _dicom_groups(folder, dcm, problems) if series else [(folder / n,) for n in dcm]
            n_series = sum(len(g) > 1 for g in groups)
            for i, g in enumerate(groups):
                if len(g) == 1:
                    records.append(ScanRecord(g[0].relative_to(root).as_posix(), "dicom", g[0]))
                else:
                    key = folder.relative_to(root).as_posix() or "."
                    if n_series > 1:
                        key = f"{key}#series{i}"
                    records.append(ScanRecord(key, "dicom", g[0], files=g))
    if not records:
        raise MedclError(f"no scans found in {root}: expected NIfTI (.nii/.nii.gz), DICOM (.dcm), "
                         "PNG/JPEG/TIFF or .npy files (searched recursively), or pass a MedMNIST .npz file.")
    return Source(root, records, problems)


def open_npz(path: Path) -> Source:
    try:
        z = np.load(str(path), allow_pickle=False)
    except Exception as e:
        raise MedclError(f"{path}: cannot open as .npz ({type(e).__name__}: {e}).") from None
    arrays, records = {}, []
    for split in NPZ_SPLITS:
        if f"{split}_images" not in z:
            continue
        imgs = z[f"{split}_images"]
        labels = z[f"{split}_labels"] if f"{split}_labels" in z else None
        arrays[split] = imgs
        for i in range(len(imgs)):
            lab = None
            if labels is not None:
                row = np.asarray(labels[i]).ravel()
                lab = int(row[0]) if row.size == 1 else tuple(int(v) for v in row)
            records.append(ScanRecord(f"{split}/{i}", "npz", path, label=lab, split=split, index=i))
    if not records:
        raise MedclError(f"{path}: no '<split>_images' arrays (expected MedMNIST keys train_images, val_images, "
                         f"test_images).")
    return Source(path.parent, records, arrays=arrays)


def _patterns(value) -> list:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c']: the same on the command line and in config.yaml."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


@dataclass
class Selection:
    """Which of the found scans a command uses. Patterns are shell globs on the path relative to DATA (`*` also
    crosses folders, so `*mask*` matches `p1/brainmask.nii.gz`); `files` is a text file of such paths, one a line."""

    include: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    files: str | None = None

    @classmethod
    def make(cls, include=None, exclude=None, files=None) -> "Selection":
        return cls(_patterns(include), _patterns(exclude), str(files) if files else None)

    def __bool__(self):
        return bool(self.include or self.exclude or self.files)

    def listed(self) -> set | None:
        if not self.files:
            return None
        p = Path(self.files)
        if not p.is_file():
            raise MedclError(f"--files {p}: file not found (expected one scan path relative to DATA per line).")
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
        return {posixpath.normpath(ln.replace("\\", "/")) for ln in lines if ln and not ln.startswith("#")}

    def apply(self, src: Source, data) -> Source:
        if not self:
            return src
        listed = self.listed()

        def keep(key):
            base = key.split("#")[0]  # a DICOM series is named by its folder
            if listed is not None and base not in listed and key not in listed:
                return False
            if self.include and not any(fnmatch.fnmatchcase(base, p) for p in self.include):
                return False
            return not any(fnmatch.fnmatchcase(base, p) for p in self.exclude)

        kept = [r for r in src.records if keep(r.key)]
        if listed is not None:
            unknown = sorted(listed - {r.key.split("#")[0] for r in src.records} - {r.key for r in src.records})
            if unknown:
                raise MedclError(f"--files {self.files}: {len(unknown)} listed path(s) are not scans under {data} "
                                 f"(first: {unknown[:3]}); paths must be relative to DATA.")
        if not kept:
            raise MedclError(f"no scans left in {data} after --include {self.include or '-'} --exclude "
                             f"{self.exclude or '-'}{' --files ' + self.files if self.files else ''} "
                             f"({len(src.records)} found). Check the patterns: they match paths relative to DATA.")
        src.left_out = {r.key for r in src.records} - {r.key for r in kept}
        src.records = kept
        return src


def open_source(data, dims: int = 2, npz_split: str = "all", select: Selection | None = None) -> Source:
    src = discover(data, dims)
    if src.arrays and npz_split != "all":
        src.records = [r for r in src.records if r.split == npz_split]
        if not src.records:
            raise MedclError(f"{data}: no '{npz_split}' split in this .npz.")
    return (select or Selection()).apply(src, data)


def selection_of(data_cfg) -> Selection:
    """The Selection a DataConfig asks for (data.include / data.exclude / data.files)."""
    return Selection.make(data_cfg.include, data_cfg.exclude, data_cfg.files)


def trained_on(src: Source, data) -> dict:
    """What a run was trained on: the DATA path, the number of scans selected, and a fingerprint of their file list
    (paths relative to DATA, so a moved folder still matches while another folder does not)."""
    h = hashlib.sha256()
    for key in sorted(r.key for r in src.records):
        h.update(key.encode() + b"\n")
    return {"data": str(Path(data).resolve()), "n_scans": len(src.records), "file_list_sha256": h.hexdigest()[:16]}
