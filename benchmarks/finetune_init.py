"""The fine-tune head started from a linear probe (LP-FT, medcl's default) against a random head, on the same encoder
and the same labeled subsets.

  python benchmarks/finetune_init.py random|probe EVALUATE_ARGS...
      `medcl evaluate EVALUATE_ARGS` in this process with the pretrained network's head started as named
      (medcl.heads.PROBE_INIT). Run it once each way with the same arguments but --out, then pair the two:
  python benchmarks/bf16.py quality OUT_RANDOM OUT_PROBE --names random-head probe-head

Example (the suite's PneumoniaMNIST encoder, its 1% and 20-label budgets):
  python benchmarks/finetune_init.py random --checkpoint runs/suite/pneumoniamnist/pretrain --data \
      ../shared/data/pneumoniamnist/pneumoniamnist_reconstructed.npz --fractions 0.01 --per-class 10 --seeds 10 \
      --heads finetune --baseline none --out runs/lpft/random
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv) -> int:
    if not argv or argv[0] not in ("random", "probe"):
        print(__doc__)
        return 2
    from medcl import heads
    from medcl.cli import main as medcl_main

    heads.PROBE_INIT = argv[0] == "probe"
    return medcl_main(["evaluate", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
