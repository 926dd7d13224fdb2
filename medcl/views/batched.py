"""The batched engine: a view recipe (a list of MONAI transform Specs) applied to a whole batch on its device.

Each transform it implements keeps MONAI's parameter meanings (the tests compare the two engines in distribution,
and exactly for identity parameters). Consecutive spatial transforms (RandAffine, RandFlip, RandAxisFlip, and a
RandScaleCrop/RandSpatialCrop followed by Resize) are fused into one `affine_grid` + `grid_sample`, so a view is
resampled once. A transform the engine does not implement, or implements but not with the given arguments, runs
through MONAI itself, per sample on the batch's device; `Plan.report` says which engine each transform used.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .recipe import Spec

LINEAR = ("bilinear", "trilinear")


def _pair(v, name: str, symmetric: bool = True) -> tuple:
    """MONAI's range convention: a number f means (-f, f) (or (f, f) when not symmetric); a pair is (min, max)."""
    if isinstance(v, (int, float)):
        return (min(-v, v), max(-v, v)) if symmetric else (float(v), float(v))
    v = list(v)
    if len(v) != 2:
        raise ConfigError(f"{name}: expected a number or a [min, max] pair, got {v!r}.")
    return float(min(v)), float(max(v))


def _per_axis(v, dims: int) -> list:
    return [v] * dims if isinstance(v, (int, float)) or v is None else list(v)[:dims] + [v[-1]] * (dims - len(v))


def _u(lo, hi, shape, g, dev):
    return torch.rand(shape, generator=g, device=dev) * (hi - lo) + lo


def _coin(p, b, g, dev):
    return torch.rand((b,), generator=g, device=dev) < p


def _bshape(t, ndim):
    return t.view((-1,) + (1,) * (ndim - 1))


def _pick(p: float, b: int, g, dev):
    """Exactly round(p * B) samples, chosen by a permutation on the device: the same per-sample probability as a
    coin, with no host sync to count the chosen ones (the expensive ops then touch only those)."""
    k = int(round(p * b)) if p < 1 else b
    if p > 0 and k == 0:  # small batches: keep the expected rate with a coin for a single sample
        k = int(torch.rand((), generator=g, device=dev).item() < p * b)
    if k == 0:
        return None
    return torch.randperm(b, generator=g, device=dev)[:k]


# ---------------------------------------------------------------- spatial: (B, d+1, d+1) maps, output -> input
def rotation(angles: torch.Tensor, dims: int) -> torch.Tensor:
    """MONAI's `create_rotate` for a batch: angles (B,) in 2D, (B, 3) in 3D (intrinsic x, y, z) -> (B, d, d)."""
    if dims == 2:
        c, s = torch.cos(angles), torch.sin(angles)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    out = None
    for axis in range(3):
        a = angles[:, axis]
        c, s = torch.cos(a), torch.sin(a)
        m = torch.eye(3, device=a.device, dtype=a.dtype).expand(len(a), 3, 3).clone()
        i, j = [k for k in range(3) if k != axis]
        sign = -1.0 if axis == 1 else 1.0  # MONAI's y rotation has the opposite handedness
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s * sign, s * sign, c
        out = m if out is None else out @ m
    return out


class CropResize:
    """RandScaleCrop / RandSpatialCrop followed by Resize: a box inside the scan, resampled to the Resize shape
    (what MONAI's crop then `interpolate(align_corners=False)` computes, with the box size continuous)."""
    spatial = True

    def __init__(self, lo, hi, random_center, out_shape, mode, in_shape):
        self.lo, self.hi, self.random_center, self.out_shape, self.mode = lo, hi, random_center, out_shape, mode
        self.identity = all(v == 1 for v in lo + hi) and tuple(out_shape) == tuple(in_shape)

    def matrix(self, b, shape, g, dev):
        d = len(shape)
        side = torch.stack([_u(self.lo[a], self.hi[a], (b,), g, dev) for a in range(d)], 1)
        center = _u(-1, 1, (b, d), g, dev) * (1 - side) if self.random_center else torch.zeros(b, d, device=dev)
        m = torch.diag_embed(torch.cat([side, torch.ones(b, 1, device=dev)], 1))
        m[:, :d, d] = center
        return m


class Flip:
    """RandFlip (the given axes together, one coin) or RandAxisFlip (one random axis)."""
    spatial = True
    mode = None

    def __init__(self, prob, axes=None):
        self.prob, self.axes = prob, axes  # axes None: one random axis (RandAxisFlip)
        self.identity = prob == 0
        self.out_shape = None

    def matrix(self, b, shape, g, dev):
        d = len(shape)
        on = _coin(self.prob, b, g, dev)
        if self.axes is None:
            which = torch.nn.functional.one_hot(torch.randint(d, (b,), generator=g, device=dev), d).bool()
        else:
            which = torch.zeros(b, d, dtype=torch.bool, device=dev)
            for ax in self.axes:  # basic indexing: a list index would be a host->device copy every batch
                which[:, ax] = True
        sign = torch.where(which & on[:, None], -1.0, 1.0)
        return torch.diag_embed(torch.cat([sign, torch.ones(b, 1, device=dev)], 1))


class Affine:
    """RandAffine's rotate/translate/scale (MONAI order: rotate @ translate @ scale, in pixels about the centre)."""
    spatial = True
    out_shape = None

    def __init__(self, prob, rotate, translate, scale, mode, padding, dims):
        self.prob, self.rotate, self.translate, self.scale = prob, rotate, translate, scale
        self.mode, self.padding = mode, padding
        self.identity = prob == 0 or all(r == (0.0, 0.0) for r in rotate + translate + scale)

    def matrix(self, b, shape, g, dev):
        d = len(shape)
        ang = torch.stack([_u(*r, (b,), g, dev) for r in self.rotate], 1)
        rot = rotation(ang[:, 0] if d == 2 else ang, d)
        t = torch.stack([_u(*r, (b,), g, dev) for r in self.translate], 1)
        s = torch.stack([_u(*r, (b,), g, dev) for r in self.scale], 1) + 1.0
        # pixel -> normalised units (align_corners=False): M -> D^-1 M D, t -> D^-1 t with D = diag(n / 2); python
        # scalars, so no small host->device copy stalls a CUDA stream each batch
        half = [n / 2 for n in shape]
        lin = rot @ torch.diag_embed(s)
        off = (rot @ t[..., None])[..., 0]
        if len(set(shape)) > 1:
            lin = torch.stack([torch.stack([lin[:, i, j] * (half[j] / half[i]) for j in range(d)], -1)
                               for i in range(d)], -2)
        off = torch.stack([off[:, i] / half[i] for i in range(d)], 1)
        on = _coin(self.prob, b, g, dev)[:, None, None]
        m = torch.eye(d + 1, device=dev).repeat(b, 1, 1)
        m[:, :d, :d] = torch.where(on, lin, m[:, :d, :d])
        m[:, :d, d] = torch.where(on[..., 0], off, 0.0)
        return m


class Resample:
    """A run of fused spatial transforms: one grid_sample per batch."""

    def __init__(self, steps, mode, padding):
        self.steps, self.mode, self.padding = steps, mode, padding

    def __call__(self, x, g):
        b, d, dev = x.shape[0], x.ndim - 2, x.device
        shape = tuple(x.shape[2:])
        m = torch.eye(d + 1, device=dev).repeat(b, 1, 1)
        for st in self.steps:
            m = m @ st.matrix(b, shape, g, dev)
            shape = st.out_shape or shape
        # affine_grid runs x, y(, z): tensor axes reversed (flips, not a list index: no host->device copy)
        theta = torch.cat([m[:, :d, :d].flip(1, 2), m[:, :d, d:].flip(1)], 2)
        grid = F.affine_grid(theta, (b, x.shape[1]) + shape, align_corners=False)
        return F.grid_sample(x, grid, mode="nearest" if self.mode == "nearest" else "bilinear",
                             padding_mode=self.padding, align_corners=False)


# ---------------------------------------------------------------- intensity
def _minmax(v):
    red = tuple(range(1, v.ndim))
    return v.amin(red, keepdim=True), v.amax(red, keepdim=True)


class Contrast:  # RandAdjustContrast
    def __init__(self, prob, gamma):
        self.prob, self.gamma = prob, gamma

    def __call__(self, v, g):
        b, dev = v.shape[0], v.device
        gamma = _bshape(_u(*self.gamma, (b,), g, dev), v.ndim)
        vmin, vmax = _minmax(v)
        rng = vmax - vmin
        out = ((v - vmin) / (rng + 1e-7)).clamp_min(0) ** gamma * rng + vmin
        return torch.where(_bshape(_coin(self.prob, b, g, dev), v.ndim), out, v)


class ScaleShift:  # RandScaleIntensity (v * (1 + f)) and RandShiftIntensity (v + f); channel_wise: f per channel
    def __init__(self, prob, rng, scale: bool, channel_wise: bool = False):
        self.prob, self.rng, self.scale, self.channel_wise = prob, rng, scale, channel_wise

    def __call__(self, v, g):
        b, dev = v.shape[0], v.device
        c = v.shape[1] if self.channel_wise else 1
        f = _u(*self.rng, (b, c), g, dev).view((b, c) + (1,) * (v.ndim - 2))
        return torch.where(_bshape(_coin(self.prob, b, g, dev), v.ndim), v * (1 + f) if self.scale else v + f, v)


class Noise:  # RandGaussianNoise
    def __init__(self, prob, mean, std, sample_std):
        self.prob, self.mean, self.std, self.sample_std = prob, mean, std, sample_std

    def __call__(self, v, g):
        sel = _pick(self.prob, v.shape[0], g, v.device)
        if sel is None:
            return v
        n = len(sel)
        std = (_u(0, self.std, (n,), g, v.device) if self.sample_std
               else torch.full((n,), float(self.std), device=v.device))
        noise = torch.randn((n,) + v.shape[1:], generator=g, device=v.device) * _bshape(std, v.ndim) + self.mean
        return v.index_add(0, sel, noise)


def gaussian_taps(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2*radius+1) taps of MONAI's `gaussian_1d(sigma, truncated=4.0, approx="erf")`, zero past each sample's
    own tail (int(max(4 sigma, 0.5) + 0.5))."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)[None]
    s = sigma.float().abs().clamp_min(1e-6)[:, None]
    t = 0.70710678 / s
    k = (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp_min(0)
    tail = (s * 4.0).clamp_min(0.5).add(0.5).floor()
    return torch.where(x.abs() <= tail, k, 0.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float, banded: bool | None = None) -> torch.Tensor:
    """Per-sample separable gaussian blur with zero padding, as MONAI's GaussianSmooth. x: (B, C, *S);
    sigma: (B,) or (B, d) in pixels, one per spatial axis.

    On a GPU each axis is one batched matmul with a banded (n x n) matrix: three kernel launches in all, instead of
    a depthwise convolution with one group per sample. On a CPU the band's zeros cost real time, so there each axis
    is a weighted sum of 2*radius+1 shifted copies (fewer multiply-adds than either). `banded` forces a choice."""
    b, d = x.shape[0], x.ndim - 2
    sigma = sigma[:, None].expand(b, d) if sigma.ndim == 1 else sigma
    radius = int(max(max_sigma * 4.0, 0.5) + 0.5)
    taps = 2 * radius + 1
    banded = x.device.type == "cuda" if banded is None else banded
    y = x
    for a, axis in enumerate(range(2, x.ndim)):
        k = gaussian_taps(sigma[:, a], radius).to(x.dtype)
        n = x.shape[axis]
        if banded:  # (B, n, n), out = m @ in along the axis; taps that fall off the end are dropped (zero padding)
            cols = torch.arange(n, device=x.device)[:, None] + torch.arange(-radius, radius + 1, device=x.device)
            inside = ((cols >= 0) & (cols < n)).to(x.dtype)
            m = torch.zeros(b, n, n, device=x.device, dtype=x.dtype)
            m = m.scatter_add_(2, cols.clamp(0, n - 1).expand(b, n, taps), k[:, None, :] * inside)
            moved = y.movedim(axis, 1)  # (B, n, everything else): one bmm per axis
            y = torch.bmm(m, moved.reshape(b, n, -1)).view(moved.shape).movedim(1, axis)
        else:
            pad = [0, 0] * (x.ndim - 1 - axis) + [radius, radius]
            padded = F.pad(y, pad)
            bshape = (b,) + (1,) * (x.ndim - 1)
            acc = padded.narrow(axis, 0, n) * k[:, 0].view(bshape)
            for j in range(1, taps):
                acc.addcmul_(padded.narrow(axis, j, n), k[:, j].view(bshape))
            y = acc
    return y


class Smooth:  # RandGaussianSmooth (approx="erf"): one sigma per axis
    def __init__(self, prob, sigmas):
        self.prob, self.sigmas = prob, sigmas

    def __call__(self, v, g):
        sel = _pick(self.prob, v.shape[0], g, v.device)
        if sel is None:
            return v
        sig = torch.stack([_u(*r, (len(sel),), g, v.device) for r in self.sigmas], 1)
        top = max(r[1] for r in self.sigmas)
        return v.index_copy(0, sel, gaussian_blur(v.index_select(0, sel), sig, top))


class WindowRange:  # ScaleIntensityRange (deterministic)
    def __init__(self, a_min, a_max, b_min, b_max, clip):
        self.a = (a_min, a_max)
        self.b = (b_min, b_max)
        self.clip = clip

    def __call__(self, v, g):
        (a0, a1), (b0, b1) = self.a, self.b
        if a1 == a0:
            return v - a0 + (b0 or 0.0)
        v = (v - a0) / (a1 - a0)
        if b0 is not None and b1 is not None:
            v = v * (b1 - b0) + b0
        if self.clip and (b0 is not None or b1 is not None):
            v = v.clamp(b0, b1)
        return v


class BiasField:  # RandBiasField: v * exp(sum of Legendre polynomials), MONAI's coefficient layout
    def __init__(self, prob, degree, coeff_range, dims):
        self.prob, self.degree, self.rng, self.dims = prob, degree, coeff_range, dims
        self.terms = self._terms(degree, dims)
        self.basis = {}

    @staticmethod
    def _terms(degree, dims):
        if dims == 2:
            return [tuple(t) for t in np.stack(np.tril_indices(degree + 1), 1)]
        return [(i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)]

    def _basis(self, shape, dev):
        key = (shape, str(dev))
        if key not in self.basis:
            polys = []
            for n in shape:  # P_0..P_degree at linspace(-1, 1, n)
                c = np.linspace(-1.0, 1.0, n, dtype=np.float32)
                polys.append(np.stack([np.polynomial.legendre.legval(c, np.eye(self.degree + 1)[i])
                                       for i in range(self.degree + 1)]))
            out = []
            for t in self.terms:
                term = polys[0][t[0]]
                for a in range(1, len(shape)):
                    term = np.multiply.outer(term, polys[a][t[a]])
                out.append(term)
            self.basis[key] = torch.as_tensor(np.stack(out), dtype=torch.float32, device=dev)
        return self.basis[key]

    def __call__(self, v, g):
        b, dev = v.shape[0], v.device
        basis = self._basis(tuple(v.shape[2:]), dev)
        coeff = _u(*self.rng, (b, len(self.terms)), g, dev)
        field = torch.exp(torch.tensordot(coeff, basis, dims=1))[:, None]
        return torch.where(_bshape(_coin(self.prob, b, g, dev), v.ndim), v * field, v)


class HistogramShift:  # RandHistogramShift: a random monotone piecewise-linear map of the intensity range
    def __init__(self, prob, points):
        self.prob, self.points = prob, points

    def __call__(self, v, g):
        b, dev = v.shape[0], v.device
        lo, hi = self.points
        n = torch.randint(lo, hi + 1, (b,), generator=g, device=dev)
        j = torch.arange(hi, device=dev)[None].float()
        last = (n - 1)[:, None].float()
        xp = torch.where(j <= last, j / last, 1.0 + j)  # past a sample's last point: beyond 1, never reached
        fp = xp.clone()
        for i in range(1, hi - 1):  # each floating point between its (already moved) left and the next reference
            inner = i < last[:, 0]
            val = fp[:, i - 1] + torch.rand(b, generator=g, device=dev) * (xp[:, i + 1] - fp[:, i - 1])
            fp[:, i] = torch.where(inner, val, fp[:, i])
        vmin, vmax = _minmax(v)
        span = vmax - vmin
        t = ((v - vmin) / span.clamp_min(1e-12)).reshape(b, -1).contiguous()
        idx = (torch.searchsorted(xp, t) - 1).clamp(0, hi - 2)
        x0, x1 = xp.gather(1, idx), xp.gather(1, idx + 1)
        f0, f1 = fp.gather(1, idx), fp.gather(1, idx + 1)
        f = (f0 + (t - x0) * (f1 - f0) / (x1 - x0)).view(v.shape) * span + vmin
        on = _coin(self.prob, b, g, dev) & (span.view(b) > 0)  # a constant scan is left as it is, as in MONAI
        return torch.where(_bshape(on, v.ndim), f, v)


class CoarseDropout:  # RandCoarseDropout: boxes filled (or everything but the boxes, dropout_holes=False)
    def __init__(self, prob, holes, max_holes, size, max_size, dropout_holes, fill_value):
        self.prob, self.holes, self.max_holes = prob, holes, max_holes
        self.size, self.max_size, self.dropout_holes, self.fill = size, max_size, dropout_holes, fill_value

    def __call__(self, v, g):
        b, dev, shape = v.shape[0], v.device, tuple(v.shape[2:])
        fall = [lambda s, n=n: n if s is None or s <= 0 else min(int(s), n) for n in shape]
        lo = [fall[a](self.size[a]) for a in range(len(shape))]
        hi = lo if self.max_size is None else [max(lo[a], fall[a](self.max_size[a])) for a in range(len(shape))]
        top = self.max_holes or self.holes
        count = torch.randint(self.holes, top + 1, (b,), generator=g, device=dev)
        mask = torch.zeros((b,) + shape, dtype=torch.bool, device=dev)
        for h in range(top):
            box = None
            for a, n in enumerate(shape):
                size = torch.randint(lo[a], hi[a] + 1, (b,), generator=g, device=dev)
                start = (torch.rand(b, generator=g, device=dev) * (n - size + 1)).floor()
                pos = torch.arange(n, device=dev)[None]
                inside = (pos >= start[:, None]) & (pos < (start + size)[:, None])  # (B, n)
                inside = inside.view((b,) + (1,) * a + (n,) + (1,) * (len(shape) - a - 1))
                box = inside if box is None else box & inside
            mask |= box & _bshape(h < count, box.ndim)
        mask = mask[:, None]
        if not self.dropout_holes:
            mask = ~mask
        if self.fill is None or isinstance(self.fill, (list, tuple)):
            if self.fill is None:
                f0, f1 = _minmax(v)
            else:
                f0, f1 = (torch.tensor(float(x), device=dev) for x in self.fill)
            fill = f0 + torch.rand(v.shape, generator=g, device=dev) * (f1 - f0)
        else:
            fill = torch.full_like(v, float(self.fill))
        on = _bshape(_coin(self.prob, b, g, dev), v.ndim)
        return torch.where(mask & on, fill, v)


class PerSample:
    """Transforms the batched engine does not implement: MONAI itself, one sample at a time on the batch's device.
    Randomness comes from the batch's generator, so a run stays repeatable."""

    def __init__(self, specs):
        from monai.transforms import Compose

        self.specs = specs
        self.compose = Compose([s.transform for s in specs])

    def __call__(self, v, g):
        seed = int(torch.randint(2**31 - 1, (1,), generator=g, device=v.device).item())
        self.compose.set_random_state(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a copy each: some MONAI transforms write into a numpy view of their input
            outs = [torch.as_tensor(self.compose(xi.clone())).to(v.device, torch.float32) for xi in v]
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) > 1:
            names = ", ".join(s.name for s in self.specs)
            raise ConfigError(f"views.transforms: {names} made views of different sizes {sorted(shapes)}; "
                              "follow them with a Resize to a fixed size.")
        return torch.stack(outs)


# ---------------------------------------------------------------- planning
def _resize_shape(spatial_size, shape):
    sz = _per_axis(spatial_size, len(shape))
    return tuple(int(n) if n is not None and int(n) > 0 else shape[a] for a, n in enumerate(sz))


def _crop_scales(spec: Spec, shape):
    a, d = spec.args, len(shape)
    if spec.name == "RandScaleCrop":
        lo = [float(v) for v in _per_axis(a["roi_scale"], d)]
        hi = lo if not a.get("random_size") else [float(v) if v is not None else 1.0
                                                 for v in _per_axis(a.get("max_roi_scale") or 1.0, d)]
    else:  # RandSpatialCrop, in pixels (non-positive: the whole axis)
        def frac(v, n):
            return 1.0 if v is None or v <= 0 else min(float(v), n) / n
        lo = [frac(v, n) for v, n in zip(_per_axis(a["roi_size"], d), shape)]
        if not a.get("random_size"):
            hi = lo
        elif a.get("max_roi_size") is None:
            hi = [1.0] * d
        else:
            hi = [frac(v, n) for v, n in zip(_per_axis(a["max_roi_size"], d), shape)]
    return [min(max(v, 1e-3), 1.0) for v in lo], [min(max(h, v), 1.0) for v, h in zip(lo, hi)]


def _unsupported(spec: Spec, keys) -> str | None:
    """The name of the first argument set to something the batched engine does not implement, else None."""
    for k, ok in keys.items():
        if k in spec.args and not ok(spec.args[k]):
            return f"{k}={spec.args[k]!r}"
    return None


def _off(v):
    return not v


def build_op(spec: Spec, nxt: Spec | None, dims: int, shape, after_crop: bool = False):
    """(op, consumed, reason): the batched op for `spec` (consuming the following Resize for a crop), or None and
    why MONAI runs it. `after_crop`: the input shape is not known to be `shape` (a Resize is then never a no-op)."""
    a, name = spec.args, spec.name
    cls = type(spec.transform)
    if cls.__module__.split(".")[0] != "monai" or cls.__name__ != name:  # e.g. your own class of the same name
        return None, 1, "not MONAI's own class"
    p = float(a.get("prob", 1.0))
    if name in ("RandScaleCrop", "RandSpatialCrop"):
        bad = _unsupported(spec, {"lazy": _off})
        if bad:
            return None, 1, f"{bad} is not batched"
        resize = (build_op(nxt, None, dims, shape, after_crop=True)[0] if nxt is not None and nxt.name == "Resize"
                  else None)
        if resize is None:
            return None, 1, "its views differ in size, so it is batched only when a batched Resize follows it"
        lo, hi = _crop_scales(spec, shape)
        return CropResize(lo, hi, bool(a.get("random_center", True)), resize.out_shape, resize.mode, shape), 2, None
    if name == "Resize":
        if not after_crop and _resize_shape(a["spatial_size"], shape) == tuple(shape) and not a.get("lazy"):  # a no-op
            return CropResize([1.0] * dims, [1.0] * dims, False, tuple(shape), None, shape), 1, None
        bad = _unsupported(spec, {"size_mode": lambda v: v == "all", "mode": lambda v: v in LINEAR + ("nearest",),
                                  "align_corners": lambda v: not v, "anti_aliasing": _off, "lazy": _off})
        if bad:
            return None, 1, f"{bad} is not batched (bilinear/trilinear/nearest are)"
        # after a crop the input shape varies, so a Resize is never taken for a no-op there
        return CropResize([1.0] * dims, [1.0] * dims, False, _resize_shape(a["spatial_size"], shape),
                          "nearest" if a.get("mode") == "nearest" else "bilinear", () if after_crop else shape), 1, None
    if name == "RandFlip":
        axes = a.get("spatial_axis")
        axes = list(range(dims)) if axes is None else ([axes] if isinstance(axes, int) else list(axes))
        return Flip(p, [ax % dims for ax in axes]), 1, None
    if name == "RandAxisFlip":
        return Flip(p, None), 1, None
    if name == "RandAffine":
        bad = _unsupported(spec, {"shear_range": lambda v: not v,
                                  "spatial_size": lambda v: v is None or _resize_shape(v, shape) == tuple(shape),
                                  "mode": lambda v: v in ("bilinear", "nearest"),
                                  "padding_mode": lambda v: v in ("zeros", "border", "reflection"), "lazy": _off})
        if bad:
            return None, 1, f"{bad} is not batched"

        def ranges(v, n, default=0.0):
            v = [] if v is None else ([v] if isinstance(v, (int, float)) else list(v))
            return [_pair(v[i], f"RandAffine {i}") if i < len(v) and v[i] is not None else (default, default)
                    for i in range(n)]
        return Affine(p, ranges(a.get("rotate_range"), 1 if dims == 2 else 3), ranges(a.get("translate_range"), dims),
                      ranges(a.get("scale_range"), dims), a.get("mode", "bilinear"),
                      a.get("padding_mode", "reflection"), dims), 1, None
    if name == "RandAdjustContrast":
        bad = _unsupported(spec, {"invert_image": _off, "retain_stats": _off})
        if bad:
            return None, 1, f"{bad} is not batched"
        gm = a.get("gamma", (0.5, 4.5))
        return Contrast(p, (0.5, float(gm)) if isinstance(gm, (int, float)) else _pair(gm, name)), 1, None
    if name in ("RandScaleIntensity", "RandShiftIntensity"):
        scale = name == "RandScaleIntensity"  # (`safe` only matters for integer images; views are float32)
        return ScaleShift(p, _pair(a["factors" if scale else "offsets"], name), scale,
                          bool(a.get("channel_wise", False))), 1, None
    if name == "RandGaussianNoise":
        return Noise(p, float(a.get("mean", 0.0)), float(a.get("std", 0.1)), bool(a.get("sample_std", True))), 1, None
    if name == "RandGaussianSmooth":
        if a.get("approx", "erf") != "erf":
            return None, 1, f"approx={a['approx']!r} is not batched (erf is)"
        sig = [_pair(a.get(k, (0.25, 1.5)), name, symmetric=False) for k in ("sigma_x", "sigma_y", "sigma_z")[:dims]]
        return Smooth(p, sig), 1, None
    if name == "ScaleIntensityRange":
        return WindowRange(float(a["a_min"]), float(a["a_max"]), a.get("b_min"), a.get("b_max"),
                           bool(a.get("clip", False))), 1, None
    if name == "RandBiasField":
        return BiasField(p, int(a.get("degree", 3)), _pair(a.get("coeff_range", (0.0, 0.1)), name), dims), 1, None
    if name == "RandHistogramShift":
        n = a.get("num_control_points", 10)
        return HistogramShift(p, (int(n),) * 2 if isinstance(n, (int, float)) else (int(min(n)), int(max(n)))), 1, None
    if name == "RandCoarseDropout":
        d = len(shape)
        return CoarseDropout(p, int(a["holes"]), a.get("max_holes"), _per_axis(a["spatial_size"], d),
                             None if a.get("max_spatial_size") is None else _per_axis(a["max_spatial_size"], d),
                             bool(a.get("dropout_holes", True)), a.get("fill_value")), 1, None
    return None, 1, "not in the batched engine"


class Plan:
    """The stages a recipe runs as, and a line per transform saying which engine ran it."""

    def __init__(self, specs: list, dims: int, size: int, in_size: int | None = None):
        self.stages, self.report = [], []
        shape = (in_size or size,) * dims  # what the cache holds; `size` is what the views come out at
        block, fallback = [], []  # a run of fusable spatial ops; a run of MONAI-only specs

        def flush_block():
            if block:
                ops = [op for op, _ in block]
                mode = next((op.mode for op in ops if getattr(op, "mode", None)), "bilinear")
                padding = next((op.padding for op in ops if isinstance(op, Affine)), "border")
                names = " + ".join(n for _, n in block)
                if all(op.identity for op in ops):
                    self.report.append(f"{names}: identity for these arguments, skipped")
                else:
                    self.stages.append(Resample([op for op in ops if not op.identity], mode, padding))
                    self.report.append(f"{names}: batched, one resampling ({mode}, {padding} padding)")
                block.clear()

        def flush_fallback():
            if fallback:
                self.stages.append(PerSample(list(fallback)))
                fallback.clear()

        i = 0
        while i < len(specs):
            spec = specs[i]
            op, used, reason = build_op(spec, specs[i + 1] if i + 1 < len(specs) else None, dims, shape,
                                        after_crop=bool(fallback))  # after MONAI's transforms the shape is unknown
            if op is not None and fallback and spec.name == "Resize":  # what MONAI made may vary in size per scan
                op, used, reason = None, 1, "it follows a transform MONAI runs, whose views may differ in size"
            names = " + ".join(s.name for s in specs[i:i + used])
            if op is None:
                flush_block()
                fallback.append(spec)
                self.report.append(f"{spec.name}: MONAI, per sample on the batch's device ({reason})")
            elif getattr(op, "spatial", False):
                flush_fallback()
                # fuse while the run shares one interpolation and padding, and nothing but flips follows a crop
                # (anything else would sample the scan beyond the box, where MONAI sees padding)
                modes = {o.mode for o, _ in block if getattr(o, "mode", None)}
                pads = {o.padding for o, _ in block if isinstance(o, Affine)}
                cropped = any(isinstance(o, CropResize) for o, _ in block)
                if block and ((op.mode and modes and op.mode not in modes)
                              or (isinstance(op, Affine) and pads and op.padding not in pads)
                              or (cropped and not isinstance(op, Flip))):
                    flush_block()
                block.append((op, names))
                shape = op.out_shape or shape
            else:
                flush_block()
                flush_fallback()
                self.stages.append(op)
                self.report.append(f"{names}: batched")
            i += used
        flush_block()
        flush_fallback()
        self.out_shape = shape

    def __call__(self, x: torch.Tensor, g) -> torch.Tensor:
        v = x.float()
        for st in self.stages:
            v = st(v, g)
        return v


def check_output(plan_call, dims: int, size: int, in_size: int | None = None, channels: int = 1) -> None:
    """Run the recipe once on a dummy batch: views must come out as (channels, size^dims) for the encoder."""
    x = torch.rand((2, channels) + (in_size or size,) * dims, generator=torch.Generator().manual_seed(0))
    out = plan_call(x, torch.Generator().manual_seed(0))
    want = (size,) * dims
    if tuple(out.shape[2:]) != want:
        raise ConfigError(f"views.transforms make views of {'x'.join(map(str, out.shape[2:]))}, but the encoder takes "
                          f"{'x'.join(map(str, want))} (data.size={size}); end the list with "
                          "{_target_: Resize, spatial_size: '@spatial_size', mode: bilinear}.")
