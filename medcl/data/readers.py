"""One way to read any scan: a channel-first float32 array plus its voxel spacing.

NIfTI and PNG/JPEG/TIFF/BMP go through MONAI's LoadImage; DICOM through pydicom (so a series of slices can be
stacked in order); .npy through numpy without pickles. Every failure becomes a ScanReadError naming the file.

Axis convention, the same for every format: the array axes as the file stores them, channel first.
2D: (C, H, W) = (C, rows, columns), as numpy, PIL and DICOM (`pixel_array`) index an image.
3D: (C, *voxel index), i.e. NIfTI's (i, j, k), a DICOM series' (rows, columns, slices), a .npy as saved.
So one set of pixels saved as PNG, TIFF, .npy, NIfTI or DICOM reads back as the same array.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ScanReadError

# the reader registry: format name -> Reader. A new format is one function with @register_reader plus its test
# (docs/contributing.md); discovery, the scan cache and every command then read it.
READERS: dict = {}


@dataclass(frozen=True)
class Reader:
    read: Callable  # (files: list[Path]) -> (array (C, *S) float32, spacing or None); raises ScanReadError
    exts: tuple  # lower-case endings, with the dot
    series: bool = False  # one scan may span several files (DICOM): discovery groups them, `read` checks each


def register_reader(fmt: str, exts: tuple, series: bool = False):
    def add(read):
        READERS[fmt] = Reader(read, tuple(e.lower() for e in exts), series)
        return read
    return add


def scan_format(path: str | os.PathLike) -> str | None:
    name = str(path).lower()
    return next((fmt for fmt, r in READERS.items() if name.endswith(r.exts)), None)


def scan_exts() -> tuple:
    return tuple(e for r in READERS.values() for e in r.exts)


_loaders: dict = {}


def _monai_loader(fmt: str):
    if fmt not in _loaders:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from monai.data import NibabelReader, PILReader
            from monai.transforms import LoadImage

            # PILReader reverses the axes by default (width first): a chest X-ray would come out sideways, and
            # differently from the same pixels as .npy or DICOM. Naming the reader also keeps MONAI from handing
            # .tif files to its DICOM reader.
            reader = PILReader(reverse_indexing=False) if fmt == "image" else NibabelReader()
            # image_only=False: the header comes back as a dict even when another part of the process has turned
            # MONAI's metadata tracking off (the views do, for speed), so the spacing never depends on that switch
            _loaders[fmt] = LoadImage(reader=reader, image_only=False, ensure_channel_first=True, dtype=np.float32)
    return _loaders[fmt]


def _read_monai(path: Path, fmt: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img, meta = _monai_loader(fmt)(str(path))
    arr = np.asarray(img.numpy() if hasattr(img, "numpy") else img, dtype=np.float32)
    spacing = None
    try:
        from monai.data.utils import affine_to_spacing

        affine = np.asarray(meta["affine"], dtype=float)  # spacing from the affine, as MetaTensor.pixdim computes it
        pix = np.asarray(affine_to_spacing(affine, r=arr.ndim - 1), dtype=float).ravel()
        if pix.size == arr.ndim - 1 and np.all(pix > 0):
            spacing = tuple(float(p) for p in pix)
    except Exception:
        pass
    return arr, spacing


@register_reader("nifti", (".nii", ".nii.gz"))
def _read_nifti(files):
    return _read_monai(files[0], "nifti")


@register_reader("image", (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"))
def _read_image(files):
    return _read_monai(files[0], "image")


def _dicom_pixels(ds, path) -> np.ndarray:
    if "PixelData" not in ds:
        raise ScanReadError(path, "DICOM file has no pixel data (a report, SEG or presentation state?); "
                                  "remove it from the folder or ignore this skip.")
    try:
        px = ds.pixel_array.astype(np.float32)
    except Exception as e:  # missing codec, truncated data
        raise ScanReadError(path, f"DICOM pixel data cannot be decoded ({type(e).__name__}: {e}). "
                                  "Compressed transfer syntaxes may need pylibjpeg or gdcm installed.") from None
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return px * slope + intercept


@register_reader("dicom", (".dcm",), series=True)
def _read_dicom(files: list[Path]):
    import pydicom

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(str(f)))
        except Exception as e:
            raise ScanReadError(f, f"not a readable DICOM file ({type(e).__name__}: {e}).") from None
    if len(datasets) > 1:  # one series: sort slices along the scanner axis, then by instance number
        def pos(ds):
            ipp = getattr(ds, "ImagePositionPatient", None)
            return (float(ipp[2]) if ipp is not None else 0.0, int(getattr(ds, "InstanceNumber", 0) or 0))

        order = sorted(range(len(datasets)), key=lambda i: pos(datasets[i]))
        slices = [_dicom_pixels(datasets[i], files[i]) for i in order]
        if len({s.shape for s in slices}) != 1:
            raise ScanReadError(files[0].parent, "DICOM series has slices of different sizes.")
        vol = np.stack(slices, axis=-1)  # rows, cols, slices
        ds = datasets[0]
        ps = [float(v) for v in getattr(ds, "PixelSpacing", [1, 1])]
        thick = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or ps[0])
        return vol[None], (ps[0], ps[1], thick)
    ds, f = datasets[0], files[0]
    px = _dicom_pixels(ds, f)
    ps = tuple(float(v) for v in getattr(ds, "PixelSpacing", [1, 1]))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", ""))
    if photometric == "MONOCHROME1":  # inverted grayscale: make bright mean dense everywhere
        px = px.max() - px
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples > 1:  # colour: (..., rows, cols, 3) -> channels first
        px = np.moveaxis(px, -1, 0)
        if frames > 1:
            px = px.mean(axis=0, keepdims=True)[0]
            return np.moveaxis(px, 0, -1)[None], (ps[0], ps[1], ps[0])
        return px, ps
    if frames > 1:  # multi-frame: (frames, rows, cols) -> (1, rows, cols, frames)
        return np.moveaxis(px, 0, -1)[None], (ps[0], ps[1], ps[0])
    return px[None], ps


@register_reader("npy", (".npy",))
def _read_npy(files):
    path = files[0]
    try:
        arr = np.load(str(path), allow_pickle=False)
    except Exception as e:
        raise ScanReadError(path, f"not a readable .npy array ({type(e).__name__}: {e}).") from None
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.complex128:
        raise ScanReadError(path, f".npy holds {arr.dtype}, not a numeric image.")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim in (2, 3) and not (arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4):
        return arr[None], None  # (H, W) or (X, Y, Z): add a channel
    if arr.ndim == 3:  # (H, W, RGB)
        return np.moveaxis(arr, -1, 0), None
    if arr.ndim == 4:  # assume channel-first (C, X, Y, Z)
        return arr, None
    raise ScanReadError(path, f".npy array of shape {arr.shape} is not a 2D or 3D image.")


def read_scan(path, fmt: str | None = None, files=None):
    """Read one scan. Returns (array[C, *spatial] float32, spacing or None). Raises ScanReadError."""
    path = Path(path)
    fmt = fmt or scan_format(path)
    reader = READERS.get(fmt)
    try:
        if reader is None:
            raise ScanReadError(path, f"unknown scan format (medcl reads {', '.join(scan_exts())}).")
        if not reader.series:
            if not path.exists():
                raise ScanReadError(path, "file not found.")
            if path.stat().st_size == 0:
                raise ScanReadError(path, "file is empty (0 bytes).")
            if not os.access(path, os.R_OK):
                raise ScanReadError(path, "permission denied: medcl cannot read this file.")
        arr, spacing = reader.read([Path(f) for f in (files or [path])])
    except ScanReadError:
        raise
    except MemoryError:
        raise ScanReadError(path, "scan too large to decode in memory.") from None
    except Exception as e:  # anything a reader throws: report the file, not the reader's internals
        msg = str(e).split("\n")[0][:200]
        raise ScanReadError(path, f"cannot be read as {fmt} ({type(e).__name__}: {msg}). "
                                  "Is the file truncated or mislabeled?") from None
    if arr.size == 0:
        raise ScanReadError(path, "scan has no pixels.")
    return arr, spacing
