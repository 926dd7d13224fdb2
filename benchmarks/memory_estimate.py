"""How close medcl's pre-step memory estimate (medcl/memory.py) comes to a real training step on this CPU.

Each case runs in a fresh process: the estimate (a dry step on the meta device), then two real SimCLR-style steps
with AdamW at the same batch, reading the growth of peak resident memory. Prints a table; not a test.

    python benchmarks/memory_estimate.py            # about 8 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

CASES = [  # dims, size, batch, stem, method
    (3, 32, 16, "small", "simclr"),
    (3, 32, 8, "small", "byol"),
    (3, 48, 8, "standard", "simclr"),
    (2, 64, 128, "standard", "simclr"),
    (2, 28, 256, "small", "moco_v2"),
    (2, 128, 64, "standard", "vicreg"),
]

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from medcl.config import MedclConfig, apply_overrides
from medcl.encoders import build_encoder
from medcl.memory import measure_step
from medcl.methods import build_method
dims, size, batch, stem, name = json.loads(sys.argv[1])
cfg = apply_overrides(MedclConfig(), {"data": {"dims": dims, "size": size}, "encoder": {"stem": stem},
                                      "method": {"name": name}})
method = build_method(name, build_encoder(cfg), cfg.method)
t = time.perf_counter()
mem = measure_step(method, (1,) + (size,) * dims, batch)
est_s = time.perf_counter() - t
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
opt = torch.optim.AdamW(method.parameters())
v = torch.rand((batch, 1) + (size,) * dims)
for _ in range(2):
    loss = method(v, v.flip(0), torch.randint(0, 2, (batch,)))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
real = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps({"estimate": mem.at(batch), "real": real, "estimate_s": est_s}))
"""


def main():
    print("| case | estimate (GB) | real peak growth (GB) | estimate / real | estimate took |")
    print("|---|---|---|---|---|")
    t0 = time.perf_counter()
    for case in CASES:
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], capture_output=True, text=True)
        if r.returncode:
            print(f"| {case} | failed: {r.stderr.strip().splitlines()[-1]} | | | |")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        dims, size, batch, stem, name = case
        print(f"| {dims}D {size}px, batch {batch}, {stem} stem, {name} | {m['estimate'] / 2**30:.2f} | "
              f"{m['real'] / 2**30:.2f} | {m['estimate'] / m['real']:.2f} | {m['estimate_s']:.1f} s |")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
