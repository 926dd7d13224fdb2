"""CUDA-only checks of the GPU data path (skipped without a GPU; `bash benchmarks/gpu_run.sh tests` runs them on one).

The CPU suite covers the same code with the CPU formulations; these cover what only exists on a GPU: the banded
matmul blur, views made on a side stream and handed over by event, the device-resident cache and the async loss
copy in the training loop."""
import numpy as np
import pytest
import torch

from medcl.config import MedclConfig, apply_overrides
from medcl.data.cache import ScanSet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def test_banded_blur_on_the_gpu_equals_the_cpu_blur():
    from medcl.views import gaussian_blur

    for dims in (2, 3):
        x = torch.rand((6, 1) + (20,) * dims)
        sigma = torch.tensor([0.0, 0.5, 0.7, 0.9, 1.0, 0.6])
        ref = gaussian_blur(x, sigma, 1.0)  # shifted sums on the CPU
        out = gaussian_blur(x.cuda(), sigma.cuda(), 1.0)  # banded matmul on the GPU
        torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("on_device", [True, False])
def test_side_stream_views_are_deterministic_and_survive_the_step(on_device):
    from medcl.train import BatchStream

    dev = torch.device("cuda")
    imgs = np.random.default_rng(0).random((64, 1, 32, 32), dtype=np.float32)
    cfg = apply_overrides(MedclConfig(), {"data": {"size": 32}, "views": {"backend": "batched"}})

    def run():
        st = BatchStream(ScanSet(imgs, list(range(64))), cfg, dev, 16, 4)
        if not on_device:
            st.on_device = None  # the pinned-host path of caches too large for the GPU
        out = []
        for s, v1, v2, idx, _ in st.epoch(0):
            # consume on the training stream, as a step would, then keep a host copy
            w = torch.nn.functional.conv2d(v1, torch.ones(1, 1, 3, 3, device=dev)) + v2[..., 1:-1, 1:-1]
            out.append((v1.cpu(), v2.cpu(), w.sum().item()))
        return out

    a, b = run(), run()
    assert len(a) == 4
    for (x1, x2, s1), (y1, y2, s2) in zip(a, b):
        assert x1.shape == (16, 1, 32, 32) and torch.isfinite(x1).all()
        # same seed, same views (a tolerance, not bitwise: cuBLAS on a side stream need not be bitwise repeatable)
        torch.testing.assert_close(x1, y1, atol=1e-5, rtol=0)
        torch.testing.assert_close(x2, y2, atol=1e-5, rtol=0)
        assert s1 == pytest.approx(s2, rel=1e-4)
        assert (x1 - x2).abs().mean() > 0.01


def test_pretrain_on_the_gpu_logs_every_step_and_checkpoints(tmp_path, phantoms2d):
    from medcl.train import pretrain

    cfg = apply_overrides(MedclConfig(), {"encoder": {"name": "resnet10", "widen_factor": 0.25},
                                          "data": {"size": 32}, "train": {"epochs": 2, "batch_size": 8,
                                                                          "device": "cuda", "checkpoint_every": 4}})
    pretrain(phantoms2d, tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    lines = (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]
    assert [int(ln.split(",")[0]) for ln in lines] == list(range(1, 13))
    assert all(np.isfinite(float(ln.split(",")[2])) for ln in lines)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["global_step"] == 12
