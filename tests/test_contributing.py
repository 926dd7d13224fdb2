"""docs/contributing.md's worked examples, run as written, so the page cannot drift from the code."""
import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


def test_the_worked_head_example_is_one_class_that_every_command_accepts():
    from medcl import feature_heads
    from medcl.cli import build_parser

    block = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    before = dict(feature_heads.HEAD_TYPES)
    try:
        exec(block, vars(feature_heads).copy())  # as if the class were written in medcl/feature_heads.py
        assert "lda" in feature_heads.HEAD_TYPES
        rng = np.random.default_rng(0)
        y = (rng.random(300) < 0.4).astype(int)
        f = rng.normal(size=(300, 16))
        f[:, 0] += 2.0 * y
        lab = np.concatenate([np.flatnonzero(y == 1)[:10], np.flatnonzero(y == 0)[:10]])
        fit = feature_heads.fit_feature_head("lda", f, y, lab, np.arange(20, 200), None, 2)
        from medcl.metrics import score

        assert score(y[200:], fit.predict(f[200:]))["auc"] > 0.8
        assert fit.info["shrinkage"] == "auto" and fit.oof.shape == (20, 2)
        parser = build_parser()  # the CLI's choices come from the registry
        assert parser.parse_args(["finetune", "--checkpoint", "c", "--data", "d", "--out", "o", "--mode",
                                  "lda"]).mode == "lda"
        assert "lda" in parser.parse_args(["evaluate", "--checkpoint", "c", "--data", "d", "--out", "o",
                                           "--heads", "lda", "knn"]).heads
    finally:
        feature_heads.HEAD_TYPES.clear()
        feature_heads.HEAD_TYPES.update(before)



def _block(n: int) -> str:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[n]


def test_the_worked_encoder_example_is_one_function_that_every_part_accepts(tmp_path):
    import torch

    from medcl import networks
    from medcl.config import MedclConfig, apply_overrides
    from medcl.encoders import Encoder, export_encoder, load_encoder

    before = dict(networks.ENCODERS)
    try:
        exec(_block(1), vars(networks).copy())  # as if the function were written in medcl/networks.py
        cfg = apply_overrides(MedclConfig(), {"encoder": {"name": "densenet169"}})  # the config validates it
        assert cfg.encoder.name == "densenet169"
        for dims in (2, 3):
            enc = Encoder("densenet169", dims, 1, "standard").eval()
            with torch.no_grad():
                assert enc(torch.rand((2, 1) + (32,) * dims)).shape == (2, 1664)
        export_encoder(enc, tmp_path / "encoder.pt")
        again, _ = load_encoder(tmp_path / "encoder.pt")  # strict: every tensor back in place
        assert again.spec == enc.spec and again.cam_layer == "net.features"
    finally:
        networks.ENCODERS.clear()
        networks.ENCODERS.update(before)


def test_the_worked_reader_example_is_one_function_that_discovery_and_reading_accept(tmp_path):
    from PIL import Image

    from medcl.data import readers
    from medcl.data.discover import discover

    before = dict(readers.READERS)
    try:
        exec(_block(2), vars(readers).copy())  # as if the function were written in medcl/data/readers.py
        pixels = (np.arange(40 * 60).reshape(40, 60) % 251).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "a.pgm")
        Image.fromarray(pixels).save(tmp_path / "b.png")
        src = discover(tmp_path)
        assert sorted((r.key, r.fmt) for r in src.records) == [("a.pgm", "netpbm"), ("b.png", "image")]
        a, b = (readers.read_scan(tmp_path / n)[0] for n in ("a.pgm", "b.png"))
        assert a.shape == (1, 40, 60) and np.array_equal(a, b)
    finally:
        readers.READERS.clear()
        readers.READERS.update(before)
