"""Readers on real files from ../shared/data, and clear errors on bad ones."""
from pathlib import Path

import numpy as np
import pytest

from medcl.data import discover, read_scan
from medcl.data.cache import build_cache, to_model_array
from medcl.errors import MedclError, ScanReadError
from conftest import shared


@pytest.mark.parametrize("name,ndim", [("nibabel_anatomical.nii", 3), ("dipy_aniso_vox.nii.gz", 3),
                                        ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", 3)])
def test_nifti(name, ndim):
    arr, spacing = read_scan(shared("pypi_bundled", "nifti", name))
    assert arr.dtype == np.float32 and arr.ndim == ndim + 1 and arr.shape[0] == 1
    assert spacing is not None and len(spacing) == ndim
    out = to_model_array(arr, spacing, name, 3, 24, 1, "percentile")
    assert out.shape == (1, 24, 24, 24) and 0 <= out.min() and out.max() <= 1


def test_nifti_anisotropic_spacing_keeps_physical_aspect():
    arr, spacing = read_scan(shared("pypi_bundled", "nifti", "dipy_aniso_vox.nii.gz"))  # 58x58x24 at 4x4x5 mm
    assert spacing == pytest.approx((4.0, 4.0, 5.0))
    out = to_model_array(arr, spacing, "x", 3, 32, 1, "percentile")
    # physical extent 232 x 232 x 120 mm -> the last axis fills about half the cube, the rest is zero padding
    filled = np.flatnonzero(out[0].max(axis=(0, 1)) > 0)
    assert 12 <= len(filled) <= 20


def test_spacing_does_not_depend_on_monai_metadata_tracking():
    # the views switch MONAI's (process-wide) metadata tracking off for speed; reading a scan afterwards must still
    # find its spacing, or an anisotropic volume would be stretched
    from monai.data import get_track_meta, set_track_meta

    was = get_track_meta()
    set_track_meta(False)
    try:
        _, spacing = read_scan(shared("pypi_bundled", "nifti", "dipy_aniso_vox.nii.gz"))
    finally:
        set_track_meta(was)
    assert spacing == pytest.approx((4.0, 4.0, 5.0))


def test_4d_nifti_uses_first_volume():
    arr, spacing = read_scan(shared("pypi_bundled", "nifti", "nibabel_example4d.nii.gz"))
    assert arr.shape[0] == 2  # frames come in as channels
    out = to_model_array(arr, spacing, "x", 3, 16, 1, "percentile")
    assert out.shape == (1, 16, 16, 16)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "pydicomdata_US1_UNCR.dcm", "pydicomdata_emri_small.dcm"])
def test_dicom(name):
    arr, spacing = read_scan(shared("pypi_bundled", "dicom", name))
    assert arr.dtype == np.float32 and arr.shape[0] in (1, 3) and np.isfinite(arr).all()


def test_dicom_ct_applies_rescale():
    import pydicom

    p = shared("pypi_bundled", "dicom", "CT_small.dcm")
    ds = pydicom.dcmread(str(p))
    arr, _ = read_scan(p)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(arr[0], expected)


def test_dicom_series_folder_is_one_volume(tmp_path):
    import pydicom

    src = shared("pypi_bundled", "dicom", "CT_small.dcm")
    for k in range(4):  # a 4-slice series made from one real CT slice
        ds = pydicom.dcmread(str(src))
        ds.ImagePositionPatient = [0, 0, float(3 - k)]
        ds.InstanceNumber = k + 1
        ds.save_as(str(tmp_path / f"slice{k}.dcm"))
    src3 = discover(tmp_path, dims=3)
    assert len(src3.records) == 1 and len(src3.records[0].files) == 4
    arr, spacing = src3.read(src3.records[0])
    assert arr.shape == (1, 128, 128, 4)
    assert len(discover(tmp_path, dims=2).records) == 4  # a 2D run sees slices


@pytest.mark.parametrize("name", ["skimage_cell.png", "skimage_retina.jpg", "dermapred_dermoscopy_example.jpg"])
def test_png_jpeg(name):
    arr, _ = read_scan(shared("pypi_bundled", "image2d", name))
    assert arr.ndim == 3 and arr.shape[0] in (1, 3)
    out = to_model_array(arr, None, name, 2, 32, 1, "percentile")
    assert out.shape == (1, 32, 32)


def test_npy():
    arr, _ = read_scan(shared("pypi_bundled", "npy", "dipy_t1_coronal_slice.npy"))
    assert arr.shape == (1, 256, 256)


def test_medmnist_npz_records_and_labels():
    src = discover(shared("pneumoniamnist", "pneumoniamnist_reconstructed.npz"))
    splits = {s: sum(r.split == s for r in src.records) for s in ("train", "val", "test")}
    assert splits == {"train": 4708, "val": 524, "test": 624}
    test_labels = [r.label for r in src.records if r.split == "test"]
    assert sum(test_labels) == 390
    arr, _ = src.read(src.records[0])
    assert arr.shape == (1, 28, 28)


def test_rgb_medmnist():
    src = discover(shared("retinamnist", "retinamnist.npz"))
    arr, _ = src.read(src.records[0])
    assert arr.shape == (3, 28, 28)


def test_jpeg_folder_discovery():
    root = shared("chest_xray_pneumonia_224")
    src = discover(root / "val" / "NORMAL")
    assert len(src.records) == 237 and all(r.fmt == "image" for r in src.records)


@pytest.mark.parametrize("content,ext,why", [
    (b"", ".png", "empty"),
    (b"this is not an image at all", ".png", "cannot be read"),
    (b"\x1f\x8b\x08\x00garbage", ".nii.gz", "cannot be read"),
    (b"not dicom", ".dcm", "not a readable DICOM"),
])
def test_bad_files_raise_scan_read_error(tmp_path, content, ext, why):
    p = tmp_path / f"bad{ext}"
    p.write_bytes(content)
    with pytest.raises(ScanReadError) as e:
        read_scan(p)
    assert str(p) in str(e.value) and why in str(e.value)


def test_truncated_nifti(tmp_path):
    good = shared("pypi_bundled", "nifti", "dipy_aniso_vox.nii.gz").read_bytes()
    p = tmp_path / "trunc.nii.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ScanReadError) as e:
        read_scan(p)
    assert "trunc.nii.gz" in str(e.value)


def test_unusable_arrays_are_reported(tmp_path):
    with pytest.raises(ScanReadError, match="NaN"):
        to_model_array(np.full((1, 8, 8), np.nan, np.float32), None, "x", 2, 8, 1, "percentile")
    with pytest.raises(ScanReadError, match="constant"):
        to_model_array(np.ones((1, 8, 8), np.float32), None, "x", 2, 8, 1, "percentile")
    with pytest.raises(ScanReadError, match="3D volume"):
        to_model_array(np.random.rand(1, 8, 8, 8).astype(np.float32), None, "x", 2, 8, 1, "percentile")
    with pytest.raises(ScanReadError, match="2D image"):
        to_model_array(np.random.rand(1, 8, 8).astype(np.float32), None, "x", 3, 8, 1, "percentile")


def test_cache_skips_bad_and_lists_them(tmp_path, phantoms2d):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(phantoms2d / "scans", data)
    (data / "broken.png").write_bytes(b"nope")
    src = discover(data)
    scans = build_cache(src, 2, 16, progress=False)
    assert len(scans) == 48 and len(scans.skipped) == 1 and "broken.png" in scans.skipped[0][0]
    with pytest.raises(ScanReadError):
        build_cache(discover(data), 2, 16, strict=True, progress=False)
    with pytest.raises(MedclError, match="max_bad_fraction"):
        build_cache(discover(data), 2, 16, max_bad_fraction=0.0, progress=False)


def test_cache_above_its_memory_cap_is_a_memmap_in_the_run_folder(tmp_path, phantoms2d):
    # folders larger than RAM with the scan cache off: above data.cache_max_gb the decoded scans go to a .npy memmap
    # under the run folder (with the scan cache on, batches are read from its files: tests/test_store.py)
    import shutil

    data = tmp_path / "d"
    shutil.copytree(phantoms2d / "scans", data)
    (data / "broken.png").write_bytes(b"nope")
    in_ram = build_cache(discover(data), 2, 16, progress=False, store=None)
    on_disk = build_cache(discover(data), 2, 16, cache_dir=tmp_path / "run" / "cache", cache_max_gb=0.0,
                          progress=False, store=None)
    assert not isinstance(in_ram.images, np.memmap) and isinstance(on_disk.images, np.memmap)
    assert (tmp_path / "run" / "cache" / "scans.npy").is_file() and not list(data.rglob("*.npy"))
    assert [r.key for r in on_disk.records] == [r.key for r in in_ram.records] and len(on_disk) == 48
    idx = np.array([0, 47, 5, 5])
    np.testing.assert_array_equal(on_disk.batch(idx), in_ram.batch(idx))  # the skipped scan's row is never served


def test_empty_folder(tmp_path):
    with pytest.raises(MedclError, match="no scans found"):
        discover(tmp_path)


# ---- one axis convention for every format (issue: PNG/JPEG were read width-first, .npy/DICOM were not) ----------

def _dicom(path, pixels, z=0.0, series="1.2.3.4"):
    """A minimal uncompressed MONOCHROME2 DICOM slice with exactly these pixels (rows x columns)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.ImagePositionPatient, ds.InstanceNumber = series, [0, 0, z], int(z) + 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_every_2d_format_reads_the_same_pixels_rows_first(tmp_path):
    import nibabel as nib
    from PIL import Image

    a = ((np.arange(40 * 60).reshape(40, 60) * 7) % 251).astype(np.uint8)  # 40 rows (H) x 60 columns (W), asymmetric
    for ext in ("png", "tif", "bmp"):
        Image.fromarray(a).save(tmp_path / f"t.{ext}")
    Image.fromarray(np.stack([a, a, a], -1)).save(tmp_path / "rgb.png")
    np.save(tmp_path / "t.npy", a)
    nib.save(nib.Nifti1Image(a.astype(np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    _dicom(tmp_path / "t.dcm", a)
    for name in ("t.png", "t.tif", "t.bmp", "t.npy", "t.nii.gz", "t.dcm"):
        arr, _ = read_scan(tmp_path / name)
        assert arr.shape == (1, 40, 60), name
        np.testing.assert_array_equal(arr[0], a, err_msg=name)
    arr, _ = read_scan(tmp_path / "rgb.png")
    assert arr.shape == (3, 40, 60) and np.array_equal(arr[1], a)
    Image.fromarray(a).save(tmp_path / "t.jpg", quality=95)  # lossy: the same orientation, nearly the same values
    arr, _ = read_scan(tmp_path / "t.jpg")
    assert arr.shape == (1, 40, 60) and np.abs(arr[0] - a).mean() < 4
    # and through the cache: a tall image stays tall (rows are padded on the sides, not on top)
    out = to_model_array(read_scan(tmp_path / "t.png")[0], None, "t.png", 2, 30, 1, "minmax")
    filled_rows = np.flatnonzero(out[0].max(axis=1) > 0)
    assert len(filled_rows) == 20  # 40x60 fit into 30: 20 rows x 30 columns


def test_every_3d_format_reads_the_same_voxels(tmp_path):
    import nibabel as nib

    v = ((np.arange(12 * 10 * 6).reshape(12, 10, 6) * 5) % 199).astype(np.uint16)
    np.save(tmp_path / "v.npy", v)
    nib.save(nib.Nifti1Image(v.astype(np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    series = tmp_path / "series"
    series.mkdir()
    for k in range(v.shape[2]):
        _dicom(series / f"s{k}.dcm", v[:, :, k], z=float(k))
    vols = {"npy": read_scan(tmp_path / "v.npy")[0], "nifti": read_scan(tmp_path / "v.nii.gz")[0]}
    src = discover(series, dims=3)
    vols["dicom series"] = src.read(src.records[0])[0]
    for name, arr in vols.items():
        assert arr.shape == (1, 12, 10, 6), name
        np.testing.assert_array_equal(arr[0], v, err_msg=name)


# ---- label maps and masks beside the images; choosing scans with --include/--exclude/--files --------------------

def _nifti(path, arr):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.eye(4)), str(path))


def test_label_maps_and_masks_are_skipped_with_a_reason(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "p1"
    p.mkdir()
    _nifti(p / "t1.nii.gz", rng.normal(size=(20, 20, 12)))
    _nifti(p / "ct.nii.gz", rng.integers(-1000, 2000, (20, 20, 12)))  # integer HU: an image, many values
    _nifti(p / "brainmask.nii.gz", rng.random((20, 20, 12)) > 0.5)  # {0, 1}
    _nifti(p / "tumour.nii.gz", rng.choice([0, 1, 2, 4], (20, 20, 12)))  # BraTS-style labels
    _nifti(p / "t1_seg_gif.nii.gz", rng.integers(0, 150, (20, 20, 12)))  # a parcellation: 150 labels, named so
    scans = build_cache(discover(tmp_path, dims=3), 3, 8, progress=False, max_bad_fraction=0.9)
    assert sorted(r.key for r in scans.records) == ["p1/ct.nii.gz", "p1/t1.nii.gz"]
    reasons = {Path(path).name: reason for path, reason in scans.skipped}
    assert set(reasons) == {"brainmask.nii.gz", "tumour.nii.gz", "t1_seg_gif.nii.gz"}
    assert "label map or mask" in reasons["tumour.nii.gz"] and "0, 1, 2, 4" in reasons["tumour.nii.gz"]
    kept = build_cache(discover(tmp_path, dims=3), 3, 8, progress=False, skip_label_maps=False)
    assert len(kept) == 5  # asked to, it pretrains on them


def test_brats_folder_pretrains_on_images_not_on_label_maps():
    from medcl.data.discover import Selection, open_source

    folder = shared("brats2013_deepmedic_examples", "train", "brats_2013_pat0005_1")
    scans = build_cache(discover(folder, dims=3), 3, 8, progress=False, max_bad_fraction=0.9)
    assert sorted(r.key for r in scans.records) == ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
    assert sorted(Path(p).name for p, _ in scans.skipped) == ["OTMultiClass.nii.gz", "brainmask.nii.gz"]
    only = open_source(folder, 3, select=Selection.make(include=["*Flair*"]))
    assert [r.key for r in only.records] == ["Flair_subtrMeanDivStd.nii.gz"] and len(only.left_out) == 3


def test_include_exclude_and_file_list_select_scans(tmp_path, phantoms2d):
    from medcl.data.discover import Selection, open_source

    every = [r.key for r in open_source(phantoms2d).records]
    src = open_source(phantoms2d, select=Selection.make(include="*p000*", exclude=["*_1.png,*nothing*"]))
    assert [r.key for r in src.records] == [k for k in every if "p000" in k and not k.endswith("_1.png")]
    listed = tmp_path / "list.txt"
    listed.write_text(f"# two scans\n{every[3]}\n\n{every[7]}\n")
    assert [r.key for r in open_source(phantoms2d, select=Selection.make(files=listed)).records] == [every[3], every[7]]
    listed.write_text("scans/nope.png\n")
    with pytest.raises(MedclError, match="not scans under"):
        open_source(phantoms2d, select=Selection.make(files=listed))
    with pytest.raises(MedclError, match="no scans left"):
        open_source(phantoms2d, select=Selection.make(include="*.nii.gz"))
