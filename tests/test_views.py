import numpy as np
import pytest
import torch

from medcl.config import ViewsConfig
from medcl.data.cache import ScanSet
from medcl.views import BatchedViews, TwoViewDataset, monai_transform

IDENTITY = dict(crop_scale=(1.0, 1.0), rotate_deg=0.0, flip_prob=0.0, gamma_prob=0.0, intensity_prob=0.0,
                noise_prob=0.0, blur_prob=0.0)


def scans(dims, n=4, size=16):
    rng = np.random.default_rng(0)
    imgs = rng.random((n, 1) + (size,) * dims).astype(np.float32)
    return ScanSet(imgs, list(range(n)))


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_views_shapes_differ_and_deterministic(dims):
    s = scans(dims)
    t = monai_transform(ViewsConfig(), dims, 16)
    ds = TwoViewDataset(s, t, seed=3)
    v1, v2, i = ds[1]
    assert v1.shape == (1,) + (16,) * dims and v1.dtype == torch.float32
    assert not torch.allclose(v1, v2)
    again = TwoViewDataset(s, t, seed=3)[1]
    assert torch.equal(v1, again[0]) and torch.equal(v2, again[1])
    assert not torch.equal(v1, TwoViewDataset(s, t, seed=4)[1][0])


@pytest.mark.parametrize("dims", [2, 3])
def test_batched_views_shapes_and_determinism(dims):
    x = torch.as_tensor(scans(dims, 6).images)
    bv = BatchedViews(ViewsConfig(), dims, 12)
    a = bv(x, torch.Generator().manual_seed(0))
    b = bv(x, torch.Generator().manual_seed(0))
    c = bv(x, torch.Generator().manual_seed(1))
    assert a.shape == (6, 1) + (12,) * dims and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("dims", [2, 3])
def test_identity_parameters_give_the_same_image_in_both_engines(dims):
    x = torch.as_tensor(scans(dims, 3).images)
    cfg = ViewsConfig(**IDENTITY)
    out = BatchedViews(cfg, dims, 16)(x)
    assert torch.allclose(out, x, atol=1e-5)
    m = monai_transform(cfg, dims, 16)
    assert torch.allclose(torch.as_tensor(m(x[0])), x[0], atol=1e-5)


def test_batched_crop_scale_range_and_flip():
    # a horizontal ramp: a flip reverses it; crop scale bounds how much of the ramp a view spans
    size = 64
    ramp = torch.linspace(0, 1, size).expand(size, size)[None, None].repeat(200, 1, 1, 1)
    cfg = ViewsConfig(**{**IDENTITY, "crop_scale": (0.25, 0.25)})  # side fraction exactly 0.5
    out = BatchedViews(cfg, 2, size)(ramp, torch.Generator().manual_seed(0))
    span = out[:, 0, size // 2, -1] - out[:, 0, size // 2, 0]
    assert torch.allclose(span.abs(), torch.full_like(span, 0.5 * (size - 1) / size), atol=0.02)
    flipped = BatchedViews(ViewsConfig(**{**IDENTITY, "flip_prob": 1.0}), 2, size)(ramp[:2])
    assert torch.allclose(flipped, ramp[:2].flip(-1), atol=1e-5)


def test_batched_intensity_ranges():
    x = torch.full((500, 1, 8, 8), 0.5)
    cfg = ViewsConfig(**{**IDENTITY, "intensity_prob": 1.0, "intensity_scale": 0.1, "intensity_shift": 0.0})
    out = BatchedViews(cfg, 2, 8)(x, torch.Generator().manual_seed(0))
    means = out.mean((1, 2, 3))
    assert means.min() >= 0.45 - 1e-6 and means.max() <= 0.55 + 1e-6 and means.std() > 0.01
    noise = BatchedViews(ViewsConfig(**{**IDENTITY, "noise_prob": 1.0, "noise_std": 0.1}), 2, 8)(x)
    stds = (noise - 0.5).std((1, 2, 3))
    assert stds.max() <= 0.13 and stds.mean() == pytest.approx(0.05, abs=0.01)  # std ~ U(0, 0.1)


def test_monai_and_batched_agree_in_statistics():
    x = torch.as_tensor(scans(2, 64, 32).images)
    cfg = ViewsConfig()
    b = BatchedViews(cfg, 2, 32)(x, torch.Generator().manual_seed(0))
    m = monai_transform(cfg, 2, 32)
    m.set_random_state(0)
    mm = torch.stack([torch.as_tensor(m(xi)) for xi in x])
    assert abs(b.mean().item() - mm.mean().item()) < 0.08
    assert abs(b.std().item() - mm.std().item()) < 0.08


@pytest.mark.parametrize("size", [12, 2])  # 2: narrower than the kernel's reach, all padding
@pytest.mark.parametrize("banded", [True, False])  # the GPU (banded matmul) and CPU (shifted sums) formulations
@pytest.mark.parametrize("dims", [2, 3])
def test_blur_equals_monai_gaussian_smooth(dims, banded, size):
    # per sample and per axis sigmas, zero padding and MONAI's erf kernel truncated at 4 sigma
    from monai.transforms import GaussianSmooth

    from medcl.views import gaussian_blur

    x = torch.rand((4, 2) + (size,) * dims, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([[0.0] * dims, [0.5] * dims, [0.8, 0.3, 1.0][:dims], [1.0, 0.6, 0.2][:dims]])
    out = gaussian_blur(x, sigma, max_sigma=1.0, banded=banded)
    for i, s in enumerate(sigma.tolist()):
        if i == 0:
            assert torch.equal(out[0], x[0])  # sigma 0 leaves the sample untouched
            continue
        ref = torch.as_tensor(GaussianSmooth(sigma=s)(x[i]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def _stream(n=20, batch=4, seed=0):
    from medcl.config import MedclConfig, apply_overrides
    from medcl.train import BatchStream

    cfg = apply_overrides(MedclConfig(), {"data": {"size": 12}, "train": {"seed": seed},
                                          "views": {"backend": "batched"}})
    return BatchStream(scans(2, n), cfg, torch.device("cpu"), batch, n // batch)


def test_stream_views_depend_only_on_seed_epoch_and_step():
    # views are made ahead in a background thread: which thread made them must not matter, and a resumed epoch
    # (start_step > 0) must see the very views the uninterrupted epoch saw
    full = {s: (v1, v2, idx) for s, v1, v2, idx, _ in _stream().epoch(0)}
    assert sorted(full) == [0, 1, 2, 3, 4]
    assert sorted(np.concatenate([full[s][2] for s in full]).tolist()) == list(range(20))  # every scan once
    resumed = {s: (v1, v2) for s, v1, v2, _, _ in _stream().epoch(0, start_step=3)}
    assert sorted(resumed) == [3, 4]
    for s in resumed:
        assert torch.equal(resumed[s][0], full[s][0]) and torch.equal(resumed[s][1], full[s][1])
    v1, v2, _ = full[0]
    assert v1.shape == (4, 1, 12, 12) and not torch.allclose(v1, v2)
    other = next(iter(_stream().epoch(1)))
    assert not torch.allclose(other[1], v1)


def test_stream_surfaces_a_producer_error_and_stops_its_thread_when_abandoned():
    import threading

    st = _stream()
    gen = st.epoch(0)
    next(gen)
    gen.close()  # the training loop stopped early (max_steps, an exception): the producer must not linger
    assert not any(t.name.startswith("medcl-views") and t.is_alive() for t in threading.enumerate())

    class Broken(ScanSet):
        def batch(self, idx):
            raise OSError("disk vanished")

    st = _stream()
    st.scans = Broken(st.scans.images, st.scans.records)
    with pytest.raises(OSError, match="disk vanished"):
        list(st.epoch(0))
