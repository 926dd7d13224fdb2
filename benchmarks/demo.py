"""`medcl demo` over seeds: does the first command a user runs show what pretraining adds, and how long does it take?

Runs `medcl demo --dims D --seed S` as a user would (a fresh process each: the wall time includes starting Python and
importing torch) and prints one row per run: the pretrained probe, both controls (the same probe on the random-init
network; the network trained from scratch on the same labels), the gain over the stronger control with its interval
paired by test scan, and the wall time. Targets (issue 31): gain >= +0.05 with the interval above 0, in <= 90 s (2D)
and <= 5 min (3D) on 2 idle CPU cores. Time the runs with nothing else on the cores.
    python benchmarks/demo.py --dims 2 3 --seeds 0 1 2 --out runs/demo_bench
Another design, beside the default (its folders are named after --name):
    python benchmarks/demo.py --dims 2 --name b24 --set train.batch_size=24 --n 800 --label-fraction 0.05
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import ROOT, medcl  # noqa: E402


def run(dims: int, seed: int, out: Path, name: str = "", extra: tuple = ()) -> dict:
    stem = f"{name + '_' if name else ''}demo{dims}d_seed{seed}"
    folder = out / stem
    if not (folder / "demo.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        seconds = medcl(["demo", "--out", folder, "--dims", dims, "--seed", seed, "--overwrite", *extra],
                        out / f"{stem}.log")
        (folder / "wall_s.txt").write_text(f"{seconds:.1f}\n")
    d = json.loads((folder / "demo.json").read_text())
    return dict(d, seed=seed, wall_s=float((folder / "wall_s.txt").read_text()))


def row(d: dict) -> str:
    lo, hi = d["gain_ci95"]
    met = d["gain_over_control"] >= 0.05 and lo > 0 and d["wall_s"] <= (90 if d["dims"] == 2 else 300)
    return (f"| {d['dims']}D | {d['seed']} | {d['n_scans']} | {d['n_labeled']} | {d['test_auc']:.3f} | "
            f"{d['control_test_auc']:.3f} | {d['scratch_test_auc']:.3f} | {d['gain_over_control']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] ({d['best_control']}) | {d['wall_s']:.0f} | {'met' if met else 'not met'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", nargs="*", type=int, default=[2, 3], choices=[2, 3])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo_bench"), help="kept: a finished run is not repeated")
    ap.add_argument("--name", default="", help="a design's name, in front of its folders (with --set, --n ...)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to medcl demo")
    ap.add_argument("--n", type=int, help="phantoms (medcl demo --n)")
    ap.add_argument("--label-fraction", type=float, help="medcl demo --label-fraction")
    a = ap.parse_args()
    extra = [x for kv in a.set for x in ("--set", kv)]
    extra += ["--n", a.n] if a.n else []
    extra += ["--label-fraction", a.label_fraction] if a.label_fraction else []
    print("| demo | seed | scans | labels | pretrained | random-init | scratch | gain over the stronger control "
          "[95% CI] | wall s | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dims in a.dims:
        for seed in a.seeds:
            print(row(run(dims, seed, Path(a.out), a.name, extra)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
