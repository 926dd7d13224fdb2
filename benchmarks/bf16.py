"""bf16 autocast against float32 pretraining on a CPU: the epoch time, and the few-label AUC of the two encoders.

  python benchmarks/bf16.py speed DATA [DATA ...]
      `medcl pretrain DATA --epochs 2` with train.amp=off, then bf16; prints the 2nd epoch's seconds (the 1st holds
      the memory probe and the warm-up) and their ratio. Run it on idle cores.
  python benchmarks/bf16.py quality FLOAT32_EVAL BF16_EVAL
      two `medcl evaluate` folders of the same data, seeds and heads (one encoder pretrained each way): the pretrained
      rows paired by seed (the same labeled subset), bf16 minus float32 with a 95% t-interval. Any two encoders'
      evaluations on the same subsets pair the same way: `--names default 64x` names the columns.
  python benchmarks/bf16.py nan3d
      where 3D bf16 diverges on a CPU: the folder defaults' 3D SimCLR model (ResNet-18 x0.5, 28^3, batch 32, AdamW
      lr 2.5e-4) on random volumes for 60 steps, in float32 and in bf16; prints the first step with a non-finite
      loss or gradient, and which parameters.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from medcl.timebudget import parse_duration  # noqa: E402

EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+: .*elapsed (\S+?),")


def epoch_seconds(data: str, amp: str, out: Path) -> tuple[float, str]:
    """The 2nd epoch's wall seconds of a 2-epoch run, and the run's header line (or why it stopped)."""
    cmd = [sys.executable, "-m", "medcl", "pretrain", data, "--out", str(out), "--epochs", "2", "--overwrite",
           "--set", f"train.amp={amp}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    elapsed = {int(m[1]): parse_duration(m[2]) for m in map(EPOCH_LINE.match, lines) if m}
    if proc.returncode or 2 not in elapsed:
        return float("nan"), (lines[-1] if lines else f"exit {proc.returncode}")
    return elapsed[2] - elapsed[1], next((ln for ln in lines if ln.startswith("pretraining ")), "")


def speed(datasets: list[str]) -> None:
    print("| data | run | float32 s/epoch | bf16 s/epoch | bf16 / float32 |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for data in datasets:
            f32, head = epoch_seconds(data, "off", Path(tmp) / "off")
            b16, why = epoch_seconds(data, "bf16", Path(tmp) / "bf16")
            stopped = re.search(r"loss became \S+ at epoch \d+, step \d+", why)
            note = "" if b16 == b16 else f" (bf16: {stopped[0] if stopped else why})"
            print(f"| {Path(data).name} | {head.split(' on ')[0].removeprefix('pretraining ')}{note} | {f32:.1f} | "
                  f"{b16:.1f} | {b16 / f32:.2f} |")


def pretrained_rows(eval_dir: Path) -> dict:
    with open(eval_dir / "results.csv") as f:
        return {(r["budget_kind"], float(r["budget"]), r["head"], r["seed"]): (float(r["auc"]), r["subset"])
                for r in csv.DictReader(f) if r["encoder"] == "pretrained"}


def quality(f32_dir: Path, bf16_dir: Path, names=("float32", "bf16")) -> None:
    from medcl.metrics import mean_ci

    a, b = pretrained_rows(f32_dir), pretrained_rows(bf16_dir)
    keys = sorted(set(a) & set(b))
    if not keys or any(a[k][1] != b[k][1] for k in keys):
        sys.exit("the two evaluations share no rows on the same labeled subsets: use the same data, seeds and heads")
    first, second = names
    print(f"| labels | head | seeds | {first} | {second} | {second} - {first} [95% CI] |\n|---|---|---|---|---|---|")
    for cell in sorted({k[:3] for k in keys}):
        ks = [k for k in keys if k[:3] == cell]
        x, y = np.array([a[k][0] for k in ks]), np.array([b[k][0] for k in ks])
        gain, _, ci = mean_ci(y - x)
        labels = f"{cell[1]:.0%}" if cell[0] == "fraction" else f"{int(cell[1] * 2)} (10/class)"
        print(f"| {labels} | {cell[2]} | {len(ks)} | {x.mean():.3f} | {y.mean():.3f} | "
              f"{gain:+.3f} [{gain - ci:+.3f}, {gain + ci:+.3f}] |")


def nan3d(steps: int = 60) -> None:
    import torch

    from medcl.config import MedclConfig, apply_overrides
    from medcl.encoders import build_encoder
    from medcl.methods import build_method
    from medcl.train import build_optimizer

    cfg = apply_overrides(MedclConfig(), {"data": {"dims": 3, "size": 28}, "optim": {"lr": 2.5e-4},
                                          "encoder": {"name": "resnet18", "stem": "standard", "widen_factor": 0.5},
                                          "method": {"temperature": 0.2}})
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_method("simclr", build_encoder(cfg, 28), cfg.method)
        opt = build_optimizer(cfg.optim, model, torch.device("cpu"), fused=False)
        for step in range(1, steps + 1):
            x = torch.rand(32, 1, 28, 28, 28)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(x + 0.05 * torch.randn_like(x), x.flip(-1))["loss"]
            opt.zero_grad()
            loss.backward()
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            if bad or not torch.isfinite(loss):
                print(f"{'bf16' if amp else 'float32'}: step {step}, loss {loss.item():.4f}, non-finite gradient in "
                      f"{', '.join(bad) or 'none'}")
                break
            opt.step()
        else:
            print(f"{'bf16' if amp else 'float32'}: {steps} steps finite, loss {loss.item():.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["speed", "quality", "nan3d"])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--names", nargs=2, default=["float32", "bf16"], metavar=("FIRST", "SECOND"),
                    help="quality: the two evaluations' column names")
    a = ap.parse_args()
    if a.stage == "nan3d":
        nan3d()
    elif a.stage == "speed" and a.paths:
        speed(a.paths)
    elif a.stage == "speed":
        ap.error("speed takes one or more DATA paths")
    elif len(a.paths) != 2:
        ap.error("quality takes two evaluation folders: FLOAT32_EVAL BF16_EVAL")
    else:
        quality(Path(a.paths[0]), Path(a.paths[1]), a.names)


if __name__ == "__main__":
    main()
