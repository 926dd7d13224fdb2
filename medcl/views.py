"""Augmented views: one recipe (ViewsConfig), two engines.

- `monai_transform`: MONAI transforms per sample on CPU (the reference; runs in DataLoader workers).
- `BatchedViews`: the same recipe for a whole batch on the training device: crop-scale, rotation and flips as one
  `affine_grid`/`grid_sample` resampling, then gamma, intensity, noise and blur as batched tensor ops. On a GPU this
  keeps augmentation off the critical path (CPU workers cannot feed a modern GPU).

Parameter meanings are shared: `crop_scale` is the share of the image area (volume) kept, sampled as a side
fraction per axis in [min^(1/d), max^(1/d)] (MONAI RandScaleCrop with random_size); rotation is uniform in
+-rotate_deg per axis; gamma as in RandAdjustContrast; noise std ~ U(0, noise_std) as in RandGaussianNoise.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .config import ViewsConfig


def side_range(cfg: ViewsConfig, dims: int):
    lo, hi = cfg.crop_scale
    return lo ** (1.0 / dims), hi ** (1.0 / dims)


def monai_transform(cfg: ViewsConfig, dims: int, size: int):
    """Per-sample MONAI pipeline: channel-first array/tensor -> augmented tensor of shape (C, *[size]*dims)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import monai.transforms as T
        from monai.data import set_track_meta

    set_track_meta(False)  # metadata tracking costs ~3x in 2D and is not needed for views
    lo, hi = side_range(cfg, dims)
    rad = math.radians(cfg.rotate_deg)
    ts = [T.RandScaleCrop(roi_scale=lo, max_roi_scale=hi, random_size=True),
          T.Resize(spatial_size=(size,) * dims, mode="bilinear" if dims == 2 else "trilinear")]
    ts += [T.RandFlip(prob=cfg.flip_prob, spatial_axis=a) for a in range(dims)]
    if rad > 0:
        ts.append(T.RandAffine(prob=1.0, rotate_range=(rad,) if dims == 2 else (rad, rad, rad),
                               padding_mode="zeros", mode="bilinear"))
    ts += [T.RandAdjustContrast(prob=cfg.gamma_prob, gamma=tuple(cfg.gamma)),
           T.RandScaleIntensity(factors=cfg.intensity_scale, prob=cfg.intensity_prob),
           T.RandShiftIntensity(offsets=cfg.intensity_shift, prob=cfg.intensity_prob),
           T.RandGaussianNoise(prob=cfg.noise_prob, mean=0.0, std=cfg.noise_std, sample_std=True),
           T.RandGaussianSmooth(sigma_x=tuple(cfg.blur_sigma), sigma_y=tuple(cfg.blur_sigma),
                                sigma_z=tuple(cfg.blur_sigma), prob=cfg.blur_prob)]
    return T.Compose(ts)


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) % (2**32) for p in parts]).generate_state(1)[0])


class TwoViewDataset(torch.utils.data.Dataset):
    """Two MONAI-augmented views per item. Randomness is a function of (seed, epoch, index), so results do not
    depend on the number of workers and a resumed run sees the same views."""

    def __init__(self, scans, transform, seed: int = 0, partner=None):
        self.scans, self.transform, self.seed = scans, transform, seed
        self.epoch = 0
        self.partner = partner  # optional: index -> index of the positive partner (patient/neighbour positives)

    def __len__(self):
        return len(self.scans)

    def __getitem__(self, i):
        j = self.partner(i, self.epoch) if self.partner else i
        views = []
        for k, src in enumerate((i, j)):
            self.transform.set_random_state(seed=_seed(self.seed, self.epoch, i, k))
            x = torch.as_tensor(self.scans.batch([src])[0])
            views.append(torch.as_tensor(self.transform(x)).float().contiguous())
        return views[0], views[1], i


def _rotation(angles: torch.Tensor, dims: int) -> torch.Tensor:
    """angles: (B,) in 2D, (B, 3) in 3D -> (B, d, d) rotation matrices."""
    if dims == 2:
        c, s = torch.cos(angles), torch.sin(angles)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    out = None
    for axis in range(3):
        a = angles[:, axis]
        c, s = torch.cos(a), torch.sin(a)
        eye = torch.eye(3, device=a.device, dtype=a.dtype).expand(len(a), 3, 3).clone()
        i, j = [k for k in range(3) if k != axis]
        eye[:, i, i], eye[:, i, j], eye[:, j, i], eye[:, j, j] = c, -s, s, c
        out = eye if out is None else out @ eye
    return out


def _blur_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2*radius+1) normalised gaussian taps per sample; sigma 0 gives the identity tap."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma.float().clamp_min(1e-3)[:, None]) ** 2)
    return torch.where((sigma > 0)[:, None], k / k.sum(1, keepdim=True), (t == 0).float()[None])


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float, banded: bool | None = None) -> torch.Tensor:
    """Per-sample separable gaussian blur, edge-replicate padded. x: (B, C, *S); sigma: (B,) in pixels (0 = untouched).

    On a GPU each axis is one batched matmul with a banded (n x n) matrix: three kernel launches in all, instead of
    a depthwise convolution with one group per sample. On a CPU the band's zeros cost real time, so there each axis
    is a weighted sum of 2*radius+1 shifted copies (fewer multiply-adds than either). `banded` forces a choice."""
    radius = max(1, int(math.ceil(3 * max_sigma)))
    k = _blur_kernels(sigma, radius).to(x.dtype)
    taps = 2 * radius + 1
    bshape = (len(sigma),) + (1,) * (x.ndim - 1)  # per-sample tap weights broadcast over channels and space
    banded = x.device.type == "cuda" if banded is None else banded
    b = len(sigma)
    mats: dict = {}
    y = x
    for axis in range(2, x.ndim):
        n = x.shape[axis]
        if banded:
            if n not in mats:  # (B, n, n), out = m @ in along the axis; replicate padding folds into the end columns
                cols = (torch.arange(n, device=x.device)[:, None] + torch.arange(-radius, radius + 1, device=x.device))
                m = torch.zeros(b, n, n, device=x.device, dtype=x.dtype)
                mats[n] = m.scatter_add_(2, cols.clamp(0, n - 1).expand(b, n, taps), k[:, None, :].expand(b, n, taps))
            moved = y.movedim(axis, 1)  # (B, n, everything else): one bmm per axis, no broadcast copies of m
            y = torch.bmm(mats[n], moved.reshape(b, n, -1)).view(moved.shape).movedim(1, axis)
        else:
            edge = torch.arange(-radius, n + radius, device=x.device).clamp(0, n - 1)  # replicate padding
            padded = y.index_select(axis, edge)
            acc = padded.narrow(axis, 0, n) * k[:, 0].view(bshape)
            for j in range(1, taps):
                acc.addcmul_(padded.narrow(axis, j, n), k[:, j].view(bshape))
            y = acc
    return y


class BatchedViews:
    """The view recipe applied to a whole batch on its own device. Call with a (B, C, *S) tensor in [0, 1]."""

    def __init__(self, cfg: ViewsConfig, dims: int, size: int):
        self.cfg, self.dims, self.size = cfg, dims, size

    def _u(self, lo, hi, shape, g, device):
        return torch.rand(shape, generator=g, device=device) * (hi - lo) + lo

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg, d = self.cfg, self.dims
        b, dev = x.shape[0], x.device
        x = x.float()
        g = generator
        lo, hi = side_range(cfg, d)
        side = self._u(lo, hi, (b, d), g, dev)  # crop side fraction per axis
        # keep the crop inside the span of input pixel centres, so no view samples the zero padding at the edge
        # (per-axis python constants: a small host->device tensor copy would stall the CUDA stream every call)
        inner = [1 - 1 / n for n in x.shape[2:][::-1]]  # grid axes run x, y(, z): reversed tensor axes
        max_c = torch.stack([(inner[a] - side[:, a] * (1 - 1 / self.size)).clamp_min(0) for a in range(d)], 1)
        center = self._u(-1, 1, (b, d), g, dev) * max_c
        flip = torch.where(torch.rand((b, d), generator=g, device=dev) < cfg.flip_prob, -1.0, 1.0)
        rad = math.radians(cfg.rotate_deg)
        angles = self._u(-rad, rad, (b,) if d == 2 else (b, 3), g, dev)
        theta = torch.diag_embed(side) @ _rotation(angles, d) @ torch.diag_embed(flip)
        theta = torch.cat([theta, center[..., None]], -1)  # (B, d, d+1): output grid -> input coordinates
        out_shape = (b, x.shape[1]) + (self.size,) * d
        grid = F.affine_grid(theta, out_shape, align_corners=False)
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        red = tuple(range(1, v.ndim))

        def bshape(t):
            return t.view((b,) + (1,) * (v.ndim - 1))

        def coin(p):
            return bshape(torch.rand((b,), generator=g, device=dev) < p)

        # gamma, as MONAI RandAdjustContrast: rescale to [0,1], power, scale back
        gamma = bshape(self._u(cfg.gamma[0], cfg.gamma[1], (b,), g, dev))
        vmin, vmax = v.amin(red, keepdim=True), v.amax(red, keepdim=True)
        rng_ = vmax - vmin + 1e-7
        v = torch.where(coin(cfg.gamma_prob), ((v - vmin) / rng_).clamp_min(0) ** gamma * rng_ + vmin, v)
        scale = bshape(self._u(-cfg.intensity_scale, cfg.intensity_scale, (b,), g, dev))
        v = torch.where(coin(cfg.intensity_prob), v * (1 + scale), v)
        shift = bshape(self._u(-cfg.intensity_shift, cfg.intensity_shift, (b,), g, dev))
        v = torch.where(coin(cfg.intensity_prob), v + shift, v)
        # noise and blur touch only the chosen samples: exactly round(p * B) of them, picked by a random
        # permutation on the device (same per-sample probability as a coin flip, and no host sync to count them)
        sel = self._pick(cfg.noise_prob, b, g, dev)
        if sel is not None:
            std = self._u(0, cfg.noise_std, (len(sel),), g, dev).view((-1,) + (1,) * (v.ndim - 1))
            v = v.index_add(0, sel, torch.randn((len(sel),) + v.shape[1:], generator=g, device=dev) * std)
        sel = self._pick(cfg.blur_prob, b, g, dev)
        if sel is not None:
            sigma = self._u(cfg.blur_sigma[0], cfg.blur_sigma[1], (len(sel),), g, dev)
            v = v.index_copy(0, sel, _gaussian_blur(v.index_select(0, sel), sigma, cfg.blur_sigma[1]))
        return v

    @staticmethod
    def _pick(p: float, b: int, g, dev):
        k = int(round(p * b)) if p < 1 else b
        if p > 0 and k == 0:  # small batches: keep the expected rate with a coin for a single sample
            k = int(torch.rand((), generator=g, device=dev).item() < p * b)
        if k == 0:
            return None
        return torch.randperm(b, generator=g, device=dev)[:k]


def resolve_backend(cfg: ViewsConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "batched"
