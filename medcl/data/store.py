"""The persistent scan cache: every command reads decoded scans from here instead of decoding the folder again.

One file per (scan file state, preprocessing): `ROOT/v1/<settings>/<k[:2]>/<k>.npy`, where <settings> hashes the
preprocessing (dims, size, channels, intensity, label-map rule) and <k> hashes the scan's absolute path, size and
modification time (every file of a DICOM series). A changed file gets a new key and is decoded again; a deleted one is
simply never asked for. A scan that cannot be used is stored as `<k>.err` (its reason), so it is not read again.

Safety: an entry is written to a temporary name in the same folder and renamed into place, so a killed decode never
leaves a half entry under a real name, and two commands (or ranks) writing the same entry both write the same bytes.
Like MONAI's PersistentDataset, but keyed by the file's state rather than its name alone, one array per scan, and
shared by every command of medcl.

Where: `--cache-dir`, else $MEDCL_CACHE, else $XDG_CACHE_HOME/medcl (~/.cache/medcl). MEDCL_CACHE=off disables it.
It is never inside DATA.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np

from ..errors import MedclError

FORMAT = "v1"
ENV = "MEDCL_CACHE"
OFF = ("off", "none", "0", "false", "no")


def default_root() -> Path | None:
    """The cache folder for this process, or None when disabled (MEDCL_CACHE=off)."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in OFF:
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medcl"


def settings_key(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ScanStore:
    """Decoded scans of one preprocessing setting. `get`/`put` by the key of a record (see `key`)."""

    def __init__(self, root: Path, settings: dict):
        self.root = Path(root)
        self.settings = dict(settings)
        self.dir = self.root / FORMAT / settings_key(self.settings)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._real_dirs: dict[str, str] = {}
        info = self.dir / "settings.json"
        if not info.is_file():
            _atomic_write(info, json.dumps(self.settings, sort_keys=True).encode())

    def key(self, rec) -> str | None:
        """Hash of the files' absolute paths, sizes and modification times; None for arrays inside an .npz (reading
        them is already as fast as reading the cache)."""
        if rec.fmt == "npz" or rec.path is None:
            return None
        h = hashlib.sha256()
        for f in (rec.files or (rec.path,)):
            p, st = self._resolved_stat(f)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]

    def _resolved_stat(self, f) -> tuple[str, os.stat_result]:
        """Path(f).resolve() and its stat, in one system call for a plain file: its folder's real path is looked up
        once per folder (resolving every one of 20k paths cost more than reading their cache entries)."""
        f = os.fspath(f)
        st = os.lstat(f)
        if stat.S_ISLNK(st.st_mode):  # a linked file: its target is the scan
            p = Path(f).resolve()
            return str(p), p.stat()
        folder, name = os.path.split(os.path.abspath(f))
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = os.path.realpath(folder)
        return os.path.join(real, name), st

    def _path(self, key: str, suffix: str) -> Path:
        return self.dir / key[:2] / f"{key}{suffix}"

    def entry(self, key: str) -> Path:
        """The .npy file of a decoded scan."""
        return self._path(key, ".npy")

    def has(self, key: str) -> bool:
        return self._path(key, ".npy").is_file() or self._path(key, ".err").is_file()

    def get(self, key: str, shape: tuple | None = None):
        """The array, or ('error', path, reason) for an unusable scan (the path its error named), or None when absent
        (or unreadable: decoded again). `shape`: the float32 shape every entry of these settings has (a faster read)."""
        p = self._path(key, ".npy")
        try:
            return read_entry(p, shape)
        except FileNotFoundError:
            pass
        except (OSError, ValueError):  # damaged by something outside medcl: treated as absent, rewritten
            return None
        try:
            e = json.loads(self._path(key, ".err").read_text())
            return ("error", e["path"], e["reason"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, value) -> None:
        """An array, or ('error', path, reason)."""
        if isinstance(value, tuple):
            _atomic_write(self._path(key, ".err"), json.dumps({"path": str(value[1]), "reason": value[2]}).encode())
            return
        p = self._path(key, ".npy")
        p.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(value), allow_pickle=False)
            os.replace(tmp, p)
        except BaseException:
            _unlink(tmp)
            raise


@functools.lru_cache(maxsize=8)
def _npy_header(shape: tuple) -> bytes:
    """The exact bytes np.save writes before a C-ordered float32 array of this shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def read_entry(path, shape: tuple | None = None) -> np.ndarray:
    """np.load of one cache entry. With `shape`, an entry whose header is exactly what np.save writes for float32 of
    that shape is read straight into an array: np.load's header parsing cost 4x the read itself for a 64^2 scan."""
    if shape is None:
        return np.load(path, allow_pickle=False)
    header = _npy_header(tuple(shape))
    with open(path, "rb") as f:
        if f.read(len(header)) == header:
            out = np.empty(shape, dtype=np.float32)
            if f.readinto(memoryview(out).cast("B")) == out.nbytes and not f.read(1):
                return out
    return np.load(path, allow_pickle=False)  # anything else: numpy's reader decides (or raises ValueError)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def open_store(data_root: Path, settings: dict, root: Path | None = None, log=print) -> ScanStore | None:
    """The store for these settings, or None if the cache is disabled or cannot be created (a note, never a failure)."""
    root = default_root() if root is None else root
    if root is None:
        return None
    root = Path(root).expanduser().resolve()
    data_root = Path(data_root).resolve()
    if root == data_root or data_root in root.parents:
        raise MedclError(f"the scan cache {root} is inside DATA ({data_root}); medcl never writes into a data folder. "
                         f"Choose another with --cache-dir or {ENV}=..., or {ENV}=off.")
    try:
        return ScanStore(root, settings)
    except OSError as e:
        log(f"note: scan cache {root} cannot be used ({e.strerror}); decoding without it "
            f"(choose a writable folder with --cache-dir or {ENV})")
        return None


def describe(root: Path | None = None) -> list[dict]:
    """One dict per preprocessing setting in the cache: settings, entries, unusable scans, bytes."""
    root = default_root() if root is None else Path(root)
    out = []
    base = (root / FORMAT) if root else None
    if base is None or not base.is_dir():
        return out
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        try:
            settings = json.loads((d / "settings.json").read_text())
        except (OSError, ValueError):
            settings = {}
        n = err = tmp = size = 0
        for sub in d.iterdir():
            if not sub.is_dir():
                continue
            with os.scandir(sub) as it:
                for e in it:
                    if e.name.endswith(".tmp"):
                        tmp += 1
                    elif e.name.endswith(".npy"):
                        n += 1
                    elif e.name.endswith(".err"):
                        err += 1
                    size += e.stat().st_size
        out.append({"folder": str(d), "settings": settings, "scans": n, "unusable": err, "partial": tmp, "bytes": size})
    return out


def clear(root: Path | None = None) -> int:
    """Delete the cache's entries (only medcl's own folder); returns the bytes freed."""
    root = default_root() if root is None else Path(root)
    if root is None or not (root / FORMAT).is_dir():
        return 0
    freed = sum(d["bytes"] for d in describe(root))
    shutil.rmtree(root / FORMAT)
    return freed
