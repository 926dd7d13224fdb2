"""Which scans to label: does choosing them pay, and how fast is the choice? Prints tables; not a test.

speed:   `medcl.select.choose` on N synthetic embeddings (default 100,000 x 256-d, the default encoder's width: a
         mixture of 50 anisotropic clusters on the sphere), per strategy and budget. Encoding the scans is not
         included: that is `medcl embed`'s cost, the same for every strategy.
quality: `medcl evaluate --selection centroid typiclust kcenter random --per-class 10 25 --heads linear
         --baseline none`
         (20 and 50 labels, binary tasks) on the suite's 2D datasets, with the encoders benchmarks/suite.py
         pretrained (RUNS/<dataset>/pretrain); every strategy against random selection with the same head. Also the
         same head on every non-test label (`--fractions 1.0`): the ceiling of the encoder, so "room" (ceiling minus
         random selection) says how much any choice of 20 or 50 scans could add.

pooled:  the `quality` tables of several pretraining runs (one per --seed of `medcl pretrain`), pooled: the
         selection gain per run and its interval over runs, since one run's gain can change sign with the next.

end-to-end: `medcl select --budget 100` on an .npz of N scans (PneumoniaMNIST's images repeated with noise): the
         whole command (decode + encode + choose + outputs), then `medcl embed` once and `medcl select --embeddings`
         per strategy (later rounds of the loop); wall time of each command and of the choice alone.

Usage:  python benchmarks/selection.py speed [--n 100000] [--dim 256]
        python benchmarks/selection.py end-to-end [--n 100000] [--runs runs/suite]
        python benchmarks/selection.py quality [--runs runs/suite] [--seeds 5] [--datasets pneumoniamnist ...]
        python benchmarks/selection.py pooled --outs Q0 Q1 Q2 --out DIR   # quality runs of 3 pretraining runs
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

ROOT = Path(__file__).resolve().parents[1]
from medcl.select import STRATEGIES  # noqa: E402  (every strategy `medcl select` offers, random last)
QUALITY_2D = ("pneumoniamnist", "retinamnist", "chest_xray_pneumonia_224", "isic")


def speed(a):
    from medcl.select import choose

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, a.dim))
    scales = rng.uniform(0.2, 1.0, size=(50, a.dim))
    which = rng.integers(0, 50, a.n)
    x = (centres[which] + rng.normal(size=(a.n, a.dim)) * scales[which]).astype(np.float32)
    print(f"{a.n} embeddings x {a.dim}-d; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| strategy | budget | already labeled | seconds |")
    print("|---|---|---|---|")
    for budget, labeled in ((20, 0), (100, 0), (1000, 0), (100, 1000)):
        done = rng.choice(a.n, labeled, replace=False) if labeled else None
        for s in STRATEGIES:
            t0 = time.perf_counter()
            choose(x, budget, s, seed=0, labeled=done)
            print(f"| {s} | {budget} | {labeled} | {time.perf_counter() - t0:.1f} |", flush=True)


def end_to_end(a):
    """`medcl select` as a user runs it on N scans: PneumoniaMNIST's images repeated with a little noise to N, in an
    .npz outside the repo, encoded by the suite's PneumoniaMNIST encoder (decode + encode + choose + outputs)."""
    from suite import DATASETS, medcl

    src = np.load(DATASETS["pneumoniamnist"][0])
    imgs = np.concatenate([src[f"{s}_images"] for s in ("train", "val")])
    rng = np.random.default_rng(0)
    reps = imgs[np.arange(a.n) % len(imgs)].astype(np.int16) + rng.integers(-8, 9, (a.n,) + imgs.shape[1:])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    npz = out / "data" / f"pneumonia_x{a.n}.npz"  # the outputs may not sit in the data's folder
    np.savez(npz, train_images=np.clip(reps, 0, 255).astype(np.uint8), train_labels=np.zeros((a.n, 1), np.uint8))
    ck = Path(a.runs) / "pneumoniamnist" / "pretrain"
    print("| command | scans | budget | wall s | choice s |\n|---|---|---|---|---|")

    def select(strategy, *extra):
        args = ["select", "--checkpoint", ck, "--data", npz, "--budget", 100, "--strategy", strategy, "--out",
                out / f"sel_{strategy}{'_emb' if extra else ''}", "--overwrite", *extra]
        wall = medcl(args, out / f"sel_{strategy}{'_emb' if extra else ''}.log")
        sel = json.loads((out / f"sel_{strategy}{'_emb' if extra else ''}" / "selection.json").read_text())
        print(f"| medcl {' '.join(map(str, args[::]))} | {a.n} | 100 | {wall:.0f} | {sel['select_seconds']:.1f} |",
              flush=True)

    select("typiclust")  # the first round: decode + encode every scan
    wall = medcl(["embed", "--checkpoint", ck, "--data", npz, "--out", out / "emb", "--overwrite"], out / "emb.log")
    print(f"| medcl embed --checkpoint {ck} --data {npz} --out {out / 'emb'} | {a.n} | | {wall:.0f} | |", flush=True)
    for s in STRATEGIES:  # later rounds: the stored features, only the shown scans decoded
        select(s, "--embeddings", out / "emb")


def quality(a):
    from suite import DATASETS, medcl

    runs = Path(a.runs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| dataset | labels | selection | linear AUC (mean ± sd) | random | difference | both classes | "
             "pretrained − random-init (same subsets) | every label (ceiling) | room over random |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    walls = []
    for name in a.datasets:
        data, labels, task, _ = DATASETS[name]
        pre = runs / name / "pretrain"
        if not data.exists() or not (pre / "encoder.pt").is_file():
            print(f"{name}: skipped ({data if not data.exists() else pre / 'encoder.pt'} is absent; run "
                  f"benchmarks/suite.py --stage pretrain first)")
            continue
        data_args = ["--data", data, *(["--labels", labels] if labels else []), *task]
        wall = 0.0
        for run, budget in ((name, ["--seeds", a.seeds, "--per-class", "10", "25", "--selection", *STRATEGIES]),
                            (f"{name}_all", ["--seeds", 1, "--fractions", "1.0"])):  # the ceiling: every label
            args = ["evaluate", "--checkpoint", pre, *data_args, "--out", out / run, "--overwrite", *budget,
                    "--heads", "linear", "--baseline", "none"]
            if not (out / run / "results.csv").is_file() or a.rerun:
                w = medcl(args, out / f"{run}.log")
                (out / f"{run}.json").write_text(json.dumps({"wall_s": w, "command": "medcl " +
                                                             " ".join(map(str, args))}))
            wall += json.loads((out / f"{run}.json").read_text())["wall_s"]
        walls.append(f"{name} {wall / 60:.1f} min")
        rows = list(csv.DictReader(open(out / name / "results.csv")))
        ceiling = next(float(r["auc"]) for r in csv.DictReader(open(out / f"{name}_all" / "results.csv"))
                       if r["encoder"] == "pretrained")

        def aucs(sel, n, enc="pretrained"):
            return np.array([float(r["auc"]) for r in rows if r["selection"] == sel and r["encoder"] == enc
                             and int(r["n_labeled"]) == n])

        for n in sorted({int(r["n_labeled"]) for r in rows}):
            ref = aucs("random", n)
            for sel in STRATEGIES:
                v = aucs(sel, n)
                both = sum(int(r["classes_labeled"]) >= 2 for r in rows if r["selection"] == sel and
                           r["encoder"] == "pretrained" and int(r["n_labeled"]) == n)
                ctrl = v - aucs(sel, n, "random-init")
                lines.append(f"| {name} | {n} | {sel} | {v.mean():.3f} ± {v.std(ddof=1):.3f} | "
                             + (f"{ref.mean():.3f} ± {ref.std(ddof=1):.3f} | {v.mean() - ref.mean():+.3f}"
                                if sel != "random" else "| ") + f" | {both}/{len(v)} | {ctrl.mean():+.3f} | "
                             f"{ceiling:.3f} | {ceiling - ref.mean():+.3f} |")
    table = ("\n".join(lines) + "\n\nwall time (encode both encoders + every run, the ceiling's included): "
             + ", ".join(walls) + "\n")
    (out / "selection_table.md").write_text(table)
    print(table)


def pooled(a):
    """Several `quality` outputs, each from its own pretraining run, pooled: the encoder is a source of variance too.

    One pretraining run per dataset can decide the sign of a selection gain by itself (docs/selection.md), so the
    interval is over the encoder runs' mean differences (each run: the mean over its seeds, paired by seed)."""
    from medcl.metrics import mean_ci

    outs = [Path(o) for o in a.outs]
    lines = [f"{len(outs)} pretraining runs: " + ", ".join(map(str, outs)), "",
             "| dataset | labels | selection | linear AUC (mean over runs x seeds) | random | difference, per run | "
             "difference [95% CI over runs] | sd over seeds (selection / random) | both classes | "
             "pretrained − random-init (same subsets) | ceiling | room over random |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in a.datasets:
        found = [o for o in outs
                 if (o / name / "results.csv").is_file() and (o / f"{name}_all" / "results.csv").is_file()]
        if not found:
            continue
        per_run, controls = [], []  # (rows, ceiling) per pretraining run; its random-init control's rows
        for o in found:
            every = list(csv.DictReader(open(o / name / "results.csv")))
            rows = [r for r in every if r["encoder"] == "pretrained"]
            controls.append([r for r in every if r["encoder"] == "random-init"])
            ceiling = next(float(r["auc"]) for r in csv.DictReader(open(o / f"{name}_all" / "results.csv"))
                           if r["encoder"] == "pretrained")
            per_run.append((rows, ceiling))
        ceil = np.mean([c for _, c in per_run])

        def by_seed(rows, sel, n):
            return {int(r["seed"]): r for r in rows if r["selection"] == sel and int(r["n_labeled"]) == n}

        for n in sorted({int(r["n_labeled"]) for rows, _ in per_run for r in rows}):
            ref_all = [float(r["auc"]) for rows, _ in per_run for r in by_seed(rows, "random", n).values()]
            for sel in [s for s in STRATEGIES if any(r["selection"] == s for rows, _ in per_run for r in rows)]:
                v_all, diffs, sds, ref_sds, both, vs_ctrl = [], [], [], [], 0, []
                for (rows, _), ctrl_rows in zip(per_run, controls):
                    mine, ref = by_seed(rows, sel, n), by_seed(rows, "random", n)
                    ctrl = by_seed(ctrl_rows, sel, n)
                    vs_ctrl += [float(mine[s]["auc"]) - float(ctrl[s]["auc"]) for s in mine if s in ctrl]
                    seeds = sorted(set(mine) & set(ref))
                    v = np.array([float(mine[s]["auc"]) for s in seeds])
                    r = np.array([float(ref[s]["auc"]) for s in seeds])
                    v_all += v.tolist()
                    diffs.append(float((v - r).mean()))
                    sds.append(v.std(ddof=1))
                    ref_sds.append(r.std(ddof=1))
                    both += sum(int(mine[s]["classes_labeled"]) >= 2 for s in seeds)
                m, _, half = mean_ci(diffs)
                diff = ("| | " if sel == "random" else
                        f"| {', '.join(f'{d:+.3f}' for d in diffs)} | {m:+.3f} [{m - half:+.3f}, {m + half:+.3f}] ")
                lines.append(f"| {name} | {n} | {sel} | {np.mean(v_all):.3f} | {np.mean(ref_all):.3f} {diff}| "
                             f"{np.mean(sds):.3f} / {np.mean(ref_sds):.3f} | {both}/{len(v_all)} | "
                             f"{np.mean(vs_ctrl):+.3f} | {ceil:.3f} | "
                             f"{ceil - np.mean(ref_all):+.3f} |")
    table = "\n".join(lines) + "\n"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "selection_pooled.md").write_text(table)
    print(table)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("speed", "end-to-end", "quality", "pooled"))
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "suite"), help="benchmarks/suite.py's --out")
    ap.add_argument("--out", default=str(ROOT / "runs" / "selection"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--datasets", nargs="*", default=list(QUALITY_2D))
    ap.add_argument("--rerun", action="store_true", help="evaluate again even where results exist")
    ap.add_argument("--outs", nargs="+", default=[], help="pooled: the --out folders of several quality runs, each "
                    "from its own pretraining run (suite.py --stage pretrain --pretrain-args --seed S)")
    a = ap.parse_args()
    {"speed": speed, "end-to-end": end_to_end, "quality": quality, "pooled": pooled}[a.stage](a)


if __name__ == "__main__":
    main()
