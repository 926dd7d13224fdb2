"""Why the classifier called a scan diseased: saliency maps from MONAI's visualize module.

- `gradcam`: Grad-CAM on the encoder's last stage (monai.visualize.GradCAM): one backward pass per batch; coarse
  (the last stage's grid, upsampled).
- `occlusion`: occlusion sensitivity (monai.visualize.OcclusionSensitivity): how much P(diseased) drops when a
  region is blurred away; many forward passes per scan, finer.

benchmarks/saliency.py measures on lesion phantoms, where the lesions are known, how often each map's peak lies in
a lesion (docs/saliency.md); `medcl predict --saliency` uses the better one (occlusion) by default.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import MedclError

METHODS = ("gradcam", "occlusion")
DEFAULT_METHOD = "occlusion"  # benchmarks/saliency.py: Grad-CAM's peak never fell in a lesion of the phantoms


def saliency_maps(model, x: torch.Tensor, method: str = DEFAULT_METHOD, target: int = 1) -> np.ndarray:
    """(N, C, *S) preprocessed scans -> (N, *S) maps in [0, 1], high where the evidence for class `target` is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.visualize import GradCAM, OcclusionSensitivity
    model = model.eval()
    if method == "gradcam":
        layer = getattr(model.encoder, "cam_layer", None)
        if layer is None:
            raise MedclError(f"Grad-CAM needs a convolutional encoder; {model.encoder.spec['name']} is a transformer. "
                             "Use --saliency-method occlusion.")
        cam = GradCAM(nn_module=model, target_layers=f"encoder.{layer}")
        with torch.enable_grad():
            maps = cam(x.clone().requires_grad_(False), class_idx=target)
        return maps[:, 0].detach().cpu().numpy()
    if method == "occlusion":
        size, dims = x.shape[-1], x.ndim - 2
        # a coarser grid in 3D: the number of occluded copies grows with the cube of size / mask
        # activate=True would be a sigmoid per logit; the classifier's probabilities are a softmax over classes
        occ = OcclusionSensitivity(nn_module=model, mask_size=max(4, size // (8 if dims == 2 else 4)), n_batch=64,
                                   verbose=False, activate=lambda t: torch.softmax(t, 1))
        out = []
        with torch.no_grad():
            for i in range(len(x)):
                base = torch.softmax(model(x[i:i + 1]), 1)[0, target]
                occ_map, _ = occ(x[i:i + 1])
                # MONAI 1.6 returns (1, classes, *S); older versions (1, C, *S, classes)
                occluded = occ_map[0, target] if occ_map.ndim == x.ndim else occ_map[0, 0, ..., target]
                drop = (base - occluded).clamp(min=0)  # what hiding each region costs P(target)
                out.append((drop / drop.max().clamp(min=1e-8)).cpu().numpy())
        return np.stack(out)
    raise ValueError(f"unknown saliency method '{method}' (choose {', '.join(METHODS)})")


def content_box(native_shape, spacing, size: int) -> tuple:
    """Where a scan sits inside the padded model input (medcl.data.cache.to_model_array): slices per axis."""
    shape = np.array(native_shape, dtype=float)
    sp = np.array(spacing if spacing is not None and len(spacing) == len(shape) else [1.0] * len(shape), dtype=float)
    phys = shape * sp
    target = np.maximum(1, np.round(phys * size / phys.max())).astype(int)
    before = (size - target) // 2
    return tuple(slice(int(b), int(b + t)) for b, t in zip(before, target))


def to_native(smap: np.ndarray, native_shape, spacing, size: int) -> np.ndarray:
    """A map on the model's grid, back on the scan's own voxel grid (undo the padding and the resize)."""
    crop = smap[content_box(native_shape, spacing, size)]
    t = torch.as_tensor(np.ascontiguousarray(crop), dtype=torch.float32)[None, None]
    mode = "bilinear" if crop.ndim == 2 else "trilinear"
    return torch.nn.functional.interpolate(t, size=tuple(int(s) for s in native_shape), mode=mode,
                                           align_corners=False)[0, 0].numpy()


def peak_in(smap: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum lies inside the mask (same grid)."""
    return bool(mask.ravel()[int(np.argmax(smap))])


def overlay(image: np.ndarray, smap: np.ndarray) -> np.ndarray:
    """(C, *S) scan and (*S) map -> RGB (H, W, 3) picture: the scan in gray with the map in colour over it; a volume
    shows its three central planes side by side."""
    from matplotlib import colormaps

    img = image.mean(0)
    if img.ndim == 3:
        a, b, c = (s // 2 for s in img.shape)
        img = np.concatenate([img[a], img[:, b], img[:, :, c]], axis=1)
        smap = np.concatenate([smap[a], smap[:, b], smap[:, :, c]], axis=1)
    gray = np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=2)
    heat = colormaps["jet"](np.clip(smap, 0, 1))[..., :3]
    alpha = 0.45 * np.clip(smap, 0, 1)[..., None]
    return (1 - alpha) * gray + alpha * heat


def write_maps(clf, scans, source, rows, proba, out: Path, method: str = DEFAULT_METHOD, writer=None,
               log=print) -> list:
    """Maps for the scans `rows` of a ScanSet, in the order given: a PNG overlay each (a volume: its three central
    planes), and for a volume also a NIfTI heat map on the scan's own voxel grid with its affine, so it opens over
    the scan in 3D Slicer or ITK-SNAP. Returns saliency.csv's rows."""
    from PIL import Image

    from .data.readers import read_scan

    out.mkdir(parents=True, exist_ok=True)
    dims, size = clf.preprocessing.dims, clf.preprocessing.size
    table = []
    for s in range(0, len(rows), 16):
        chunk = rows[s:s + 16]
        x = torch.as_tensor(scans.batch(chunk)).to(clf.device)
        maps = saliency_maps(clf.model, x, method)
        for j, (i, smap) in enumerate(zip(chunk, maps)):
            rank = s + j + 1
            rec = scans.records[i]
            name = rec.key.split("#")[0]
            for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", ".dcm"):
                if name.lower().endswith(ext):
                    name = name[:-len(ext)]
                    break
            stem = f"{rank:03d}_" + "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name)[-80:]
            pic = (overlay(x[j].cpu().numpy(), smap) * 255).round().astype(np.uint8)
            zoom = max(1, 256 // pic.shape[0])  # small scans are enlarged (pixels kept sharp) to be looked at
            pic = np.repeat(np.repeat(pic, zoom, axis=0), zoom, axis=1)
            Image.fromarray(pic).save(out / f"{stem}.png")
            if writer is not None and rank <= 32:
                writer.add_image(f"saliency/{rank:03d}", pic, 0, dataformats="HWC")
            nifti = ""
            if dims == 3:
                nifti = f"{stem}.nii.gz"
                _save_native_nifti(smap, rec, source, size, out / nifti, read_scan)
            table.append([rec.key, rank, f"{proba[i]:.6f}", f"{stem}.png", nifti])
    return table


def _save_native_nifti(smap, rec, source, size, path, read_scan):
    import nibabel as nib

    arr, spacing = source.read(rec) if rec.fmt == "npz" else read_scan(rec.path, rec.fmt, rec.files or None)
    native = to_native(smap, arr.shape[1:], spacing, size)
    if rec.fmt == "nifti":
        affine = nib.load(str(rec.path)).affine
    else:  # no affine in the file: voxel spacing on the diagonal
        affine = np.diag(list(spacing if spacing is not None else [1.0] * 3) + [1.0])
    nib.save(nib.Nifti1Image(native.astype(np.float32), affine), str(path))
