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

