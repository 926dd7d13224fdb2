"""Synthetic 2D/3D phantoms: a body with organs and texture; diseased scans also carry small bright lesions.

Used by `medcl demo` (the embedded default: no downloads, no user data) and by the tests.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter


def _ellipsoid(grid, center, axes, angle=0.0):
    x = [g - c for g, c in zip(grid, center)]
    if len(grid) >= 2 and angle:  # rotate in the first plane
        ca, sa = np.cos(angle), np.sin(angle)
        x[0], x[1] = ca * x[0] + sa * x[1], -sa * x[0] + ca * x[1]
    return sum((xi / a) ** 2 for xi, a in zip(x, axes))


def make_anatomy(rng: np.random.Generator, dims: int, size: int) -> dict:
    """Random anatomy of one patient: body, organs and (for diseased) lesion sites."""
    c = size / 2
    body = dict(center=c + rng.uniform(-0.04, 0.04, dims) * size, axes=rng.uniform(0.34, 0.44, dims) * size,
                angle=rng.uniform(-0.3, 0.3))
    organs = []
    for _ in range(rng.integers(2, 4)):
        organs.append(dict(center=body["center"] + rng.uniform(-0.18, 0.18, dims) * size,
                           axes=rng.uniform(0.06, 0.14, dims) * size, angle=rng.uniform(0, np.pi),
                           value=rng.uniform(0.25, 0.75)))
    return dict(body=body, organs=organs, texture_seed=int(rng.integers(2**31)))


# Lesion radius, as a share of the image side, times this: 9-16% of the side, in 2D and 3D alike, so that a lesion is
# larger than most organs (semi-axes 6-14%) and differs from anatomy. At 5-9% a 3D lesion covered about 0.4% of the
# body, which global pooling averages away (both encoders scored at chance at 32^3), and a 2D lesion was no larger
# than an organ: with every label a probe on either encoder's features reached only 0.81 (docs/results.md, "The demo").
LESION_SCALE = 1.8


def add_lesions(rng: np.random.Generator, anatomy: dict, dims: int, size: int, n=None) -> dict:
    lesions = []
    for _ in range(n if n is not None else rng.integers(1, 4)):
        r = rng.uniform(0.05, 0.09) * size * LESION_SCALE
        u = rng.normal(size=dims)
        u /= np.linalg.norm(u)
        pos = anatomy["body"]["center"] + u * rng.uniform(0, 0.6) * anatomy["body"]["axes"].min()
        lesions.append(dict(center=pos, radius=r, value=rng.uniform(0.3, 0.45)))
    return dict(anatomy, lesions=lesions)


def acquisition(rng: np.random.Generator, dims: int, size: int, nuisance: bool) -> dict:
    """How one scan was acquired. Real scans differ by factors that dominate raw pixels while disease is a local
    finding: positioning and rotation, scanner gain and contrast, a smooth bias field, noise. With `nuisance` they
    vary as widely as between scanners and sessions; without it, only a little (the earlier phantoms)."""
    if not nuisance:
        return dict(shift=rng.uniform(-0.02, 0.02, dims) * size, angle=0.0, gain=1.0, offset=0.0, gamma=1.0,
                    bias=np.zeros((dims, 2)), noise=0.03)
    return dict(shift=rng.uniform(-0.08, 0.08, dims) * size, angle=rng.uniform(-0.35, 0.35),  # +-20 degrees
                gain=rng.uniform(0.6, 1.3), offset=rng.uniform(-0.1, 0.1), gamma=np.exp(rng.uniform(-0.5, 0.5)),
                bias=rng.uniform(-0.3, 0.3, (dims, 2)), noise=rng.uniform(0.01, 0.06))


def _rotate_grid(grid, angle: float, size: int):
    """The sampling grid turned by `angle` about the image centre, in the first plane."""
    if not angle:
        return grid
    c = size / 2
    ca, sa = np.cos(angle), np.sin(angle)
    x, y = grid[0] - c, grid[1] - c
    return [ca * x - sa * y + c, sa * x + ca * y + c, *grid[2:]]


def _bias_field(grid, coeffs: np.ndarray, size: int) -> np.ndarray:
    """A smooth multiplicative field, 1 + linear and quadratic terms per axis (as an MR coil's or an X-ray's)."""
    field = np.ones_like(grid[0])
    for g, (c1, c2) in zip(grid, coeffs):
        u = 2 * g / size - 1
        field = field + c1 * u + c2 * (u * u - 1 / 3)
    return np.clip(field, 0.3, None)


def render(anatomy: dict, dims: int, size: int, rng: np.random.Generator, noise: float = 0.03, lesion_mask=None,
           nuisance: bool = False):
    """One acquisition of an anatomy: float32 image in [0, 1] of shape (size,)*dims. With `lesion_mask` (a bool
    array of that shape), the lesions' extent (within one radius of each centre) is marked in it. `nuisance`: see
    `acquisition`."""
    acq = acquisition(rng, dims, size, nuisance)
    noise = acq["noise"] if nuisance else noise
    pixels = np.meshgrid(*[np.arange(size, dtype=np.float32) + 0.5] * dims, indexing="ij")
    grid = _rotate_grid(pixels, acq["angle"], size)
    b = anatomy["body"]
    shift = acq["shift"]  # positioning differs between acquisitions
    body = _ellipsoid(grid, b["center"] + shift, b["axes"], b["angle"]) <= 1
    tex_rng = np.random.default_rng(anatomy["texture_seed"])
    img = np.where(body, 0.5, 0.0).astype(np.float32)
    img += body * gaussian_filter(tex_rng.normal(0, 1, (size,) * dims), 1.5).astype(np.float32) * 0.15
    for o in anatomy["organs"]:
        m = _ellipsoid(grid, o["center"] + shift, o["axes"], o["angle"]) <= 1
        img[m & body] = o["value"]
    for les in anatomy.get("lesions", []):
        d2 = sum((g - c) ** 2 for g, c in zip(grid, les["center"] + shift))
        blob = np.exp(-d2 / (2 * (les["radius"] / 1.5) ** 2)).astype(np.float32)
        img += body * blob * les["value"]
        if lesion_mask is not None:
            lesion_mask |= body & (d2 <= les["radius"] ** 2)
    img = gaussian_filter(img, 0.6)
    if nuisance:  # the scanner: contrast curve, gain and offset, and the field over the image
        img = acq["gain"] * np.clip(img, 0, 1) ** acq["gamma"] * _bias_field(pixels, acq["bias"], size) + acq["offset"]
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def make_phantoms(out: str | Path, n: int = 300, dims: int = 2, size: int = 64, seed: int = 0,
                  diseased_fraction: float = 0.5, scans_per_patient: int = 2, masks_to: str | Path | None = None,
                  nuisance: bool = False) -> Path:
    """Write n phantom scans (PNG for 2D, NIfTI for 3D) plus labels.csv (path,label,patient). Returns the folder.
    masks_to: a folder (outside `out`, so no command takes them for scans) for each scan's lesion mask as .npy,
    at the scan's path with .npy appended: where the disease is, to check saliency maps against."""
    out = Path(out)
    (out / "scans").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    n_patients = int(np.ceil(n / scans_per_patient))
    sick = rng.permutation(n_patients) < round(diseased_fraction * n_patients)
    for p in range(n_patients):
        anatomy = make_anatomy(rng, dims, size)
        if sick[p]:
            anatomy = add_lesions(rng, anatomy, dims, size)
        for k in range(scans_per_patient):
            if len(rows) >= n:
                break
            mask = np.zeros((size,) * dims, dtype=bool)
            img = render(anatomy, dims, size, rng, lesion_mask=mask, nuisance=nuisance)
            if dims == 2:
                from PIL import Image

                rel = f"scans/p{p:04d}_{k}.png"
                Image.fromarray((img * 255).round().astype(np.uint8)).save(out / rel)
            else:
                import nibabel as nib

                rel = f"scans/p{p:04d}_{k}.nii.gz"
                nib.save(nib.Nifti1Image(img, np.eye(4)), str(out / rel))
            rows.append((rel, "diseased" if sick[p] else "healthy", f"p{p:04d}"))
            if masks_to is not None:
                (Path(masks_to) / rel).parent.mkdir(parents=True, exist_ok=True)
                np.save(Path(masks_to) / f"{rel}.npy", mask)
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient"])
        w.writerows(rows)
    return out
