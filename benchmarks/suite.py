"""One few-label suite over every labeled dataset in ../shared/data: does pretraining on your own unlabeled scans pay,
against the best control, on data nobody tuned for?

Per dataset:
1. `medcl pretrain DATA` with NO recipe: the defaults medcl picks from the folder's own properties (medcl/auto.py),
   on the non-test scans only (the test split's images are never seen, not even unlabeled);
2. `medcl evaluate`: budgets 1%, 10% and 20 labels (10 per class) x seeds; rows: the random-init control (same network,
   random weights, same heads), the scratch fine-tune (same network trained end to end), pretrained kNN / linear /
   fine-tune, and the semi-supervised heads (label spreading, self-training) that also see the unlabeled pool;
3. a table: best pretrained-or-semi-supervised row vs the best control, paired by seed, with the 95% interval.

Writes docs/results.md (tables, learning curves, the command and the wall time per dataset) unless --no-docs.

Usage:  python benchmarks/suite.py [--out runs/suite] [--datasets pneumoniamnist retinamnist ...] [--seeds 10]
        python benchmarks/suite.py --stage pretrain      # only the pretraining runs (reused when complete)
        python benchmarks/suite.py --stage report        # tables and docs from the runs already in --out
On our 2-core CPU, the evaluation with `--seeds 5 --finetune-max-labels 60 --epochs 15` took 4.5-8.7 minutes a
dataset on idle cores (pretraining: 1.7-3.8 minutes more on the 2D sets; docs/results.md). The network-training rows
at 10% are the slow part: 310 s per row on average on PneumoniaMNIST (523 labels), 53 minutes for its 5 seeds; with
every row, a dataset took 28 (ISIC) to about 80 minutes (PneumoniaMNIST), pretraining included (with pretraining
timed on idle cores: 18 to about 65). Run the script again after an interruption, with more --seeds or without
--finetune-max-labels: each evaluation continues (`medcl evaluate --resume`) and only what is missing runs.
Datasets missing from ../shared/data are skipped with the reason.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# name: (DATA, labels CSV, task flags, what the published fully supervised models reach on the same task)
DATASETS = {
    "pneumoniamnist": (DATA / "pneumoniamnist" / "pneumoniamnist_reconstructed.npz", None, [],
                       "MedMNIST v2 ResNet-18 (28 px), all 4708 labels: AUC 0.944; ResNet-50 (224 px): 0.962"),
    "retinamnist": (DATA / "retinamnist" / "retinamnist.npz", None, ["--positive", "1,2,3,4"],
                    "none for grade 0 vs >0 (MedMNIST v2 reports the 5-grade task)"),
    "chest_xray_pneumonia_224": (DATA / "chest_xray_pneumonia_224", DATA / "chest_xray_pneumonia_224" / "labels.csv",
                                 ["--positive", "pneumonia"], "none at this split (patient-grouped, made by medcl)"),
    "isic": (DATA / "isic_skin_9class", DATA / "isic_skin_9class" / "labels.csv", ["--positive", "malignant"],
             "none for benign vs malignant on this subset"),
    "vesselmnist3d": (DATA / "vesselmnist3d" / "vesselmnist3d.npz", None, [],
                      "see MedMNIST v2 (ResNet-18+3D, all labels); binary masks, not intensities"),
}
BUDGETS = ["--fractions", "0.01", "0.1", "--per-class", "10"]
HEADS = ["knn", "linear", "proto", "spread", "selftrain", "finetune"]
NOTES = "<!-- written by hand below this line; benchmarks/suite.py keeps it -->"


def medcl(args, log_path: Path) -> float:
    """Run the medcl CLI (as a user would), log to a file, return the wall time."""
    t0 = time.perf_counter()
    env = dict(os.environ, MEDCL_PROGRESS="lines", PYTHONWARNINGS="ignore")
    with open(log_path, "w") as f:
        f.write("$ medcl " + " ".join(map(str, args)) + "\n")
        f.flush()
        r = subprocess.run([sys.executable, "-m", "medcl", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                           env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"medcl {' '.join(map(str, args[:3]))} failed; see {log_path}")
    return time.perf_counter() - t0


def non_test_files(name: str, data: Path, labels: Path | None, out: Path) -> list:
    """--files for pretraining on a folder: every labeled scan outside the test split medcl evaluate will use."""
    if labels is None:
        return []  # .npz: pretraining reads the train split only
    import numpy as np

    from medcl.data.labels import make_splits, read_labels_csv

    table = read_labels_csv(labels, data, multiclass=True)
    if all(s is not None for s in table.splits):
        test = {k for k, s in zip(table.keys, table.splits) if s == "test"}
    else:  # the same patient-grouped split load_labeled makes (seed 0)
        split = make_splits(table.y(), np.array(table.patients, dtype=object), seed=0)
        test = {k for k, s in zip(table.keys, split) if s == "test"}
    listed = out / "pretrain_files.txt"
    listed.write_text("\n".join(k for k in table.keys if k not in test) + "\n")
    return ["--files", listed]


def run_dataset(name, a) -> dict | None:
    data, labels, task, anchor = DATASETS[name]
    if not Path(data).exists():
        print(f"{name}: skipped ({data} not found)")
        return None
    out = Path(a.out) / name
    out.mkdir(parents=True, exist_ok=True)
    pre = out / "pretrain"
    times_file = out / "timings.json"
    timings = json.loads(times_file.read_text()) if times_file.is_file() else {}
    if a.stage in ("all", "pretrain"):
        from medcl.train.resume import finished

        if finished(pre):
            print(f"{name}: reusing the pretraining run in {pre}")
        else:  # encoder.pt is written after every epoch: an interrupted run continues from its checkpoint
            again = "--resume" if (pre / "checkpoints" / "last.pt").is_file() else "--overwrite"
            args = ["pretrain", data, "--out", pre, again, *non_test_files(name, data, labels, out), *a.pretrain_args]
            timings["pretrain_s"] = medcl(args, out / "pretrain.log")
            times_file.write_text(json.dumps(timings))
            print(f"{name}: pretrained in {timings['pretrain_s'] / 60:.1f} min "
                  f"({open(out / 'pretrain.log').readlines()[1].strip()})")
    if a.stage == "pretrain":
        return None
    ev = out / "eval"
    if a.stage == "all":
        args = ["evaluate", "--checkpoint", pre, "--data", data, "--out", ev, "--seeds", a.seeds,
                *BUDGETS, "--heads", *a.heads, "--epochs", a.epochs, *(["--labels", labels] if labels else []), *task,
                *(["--finetune-max-labels", a.finetune_max_labels] if a.finetune_max_labels else [])]
        # an evaluation this suite started before (interrupted, or with fewer seeds) continues: finished rows are kept
        resume = (ev / "settings.json").is_file()
        if not resume and ev.is_dir() and not (ev / "results.csv").is_file():  # an older medcl's interrupted one
            shutil.rmtree(ev)
        seconds = medcl(args + ["--resume" if resume else "--overwrite"], out / "evaluate.log")
        timings["evaluate_s"] = timings.get("evaluate_s", 0.0) + seconds if resume else seconds
        timings["evaluate_runs"] = timings.get("evaluate_runs", 0) + 1 if resume else 1
        timings["evaluate_command"] = "medcl " + " ".join(map(str, args + ["--overwrite"]))
        times_file.write_text(json.dumps(timings))
        print(f"{name}: evaluated in {seconds / 60:.1f} min" + (" (resumed)" if resume else ""))
    if not (ev / "protocol.json").is_file():
        print(f"{name}: no evaluation in {ev} yet")
        return None
    proto = json.loads((ev / "protocol.json").read_text())
    with open(ev / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {"name": name, "gain": proto["gain_over_best_control"], "timings": timings, "summary": (ev / "summary.md").read_text(),
            "anchor": anchor, "rows": rows, "curve": ev / "learning_curve.png",
            "defaults": next((l for l in open(out / "pretrain.log") if l.startswith("defaults")), "(reused run)").strip()
            if (out / "pretrain.log").is_file() else "(reused run)"}


def gain_table(results) -> str:
    lines = ["| dataset | budget | labels | best pretrained / semi-supervised | AUC | best control | AUC | gain [95% CI] | "
             "verdict | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    missing = False
    for r in results:
        for g in r["gain"]:
            b = f"{g['budget']:.0%}" if g["budget_kind"] == "fraction" else f"{g['budget'] * 2} labels"
            target = 0.02 if (g["budget_kind"], g["budget"]) == ("fraction", 0.1) else 0.03
            ci = g["gain_ci95"]
            iv = f" [{g['gain_mean'] - ci:+.3f}, {g['gain_mean'] + ci:+.3f}]" if ci == ci and ci is not None else ""
            met = "met" if g["gain_mean"] >= target else "not met"
            if met == "met" and ci == ci and g["gain_mean"] - ci <= 0:
                met += " by the mean; the interval includes 0"
            # the scratch network is a control only where the network-training rows ran (--finetune-max-labels)
            scratch = any(x["encoder"] == "scratch" and x["budget_kind"] == g["budget_kind"]
                          and float(x["budget"]) == float(g["budget"]) for x in r["rows"])
            missing |= not scratch
            lines.append(f"| {r['name']} | {b} | {g['n_labeled']:.0f} | {g['best']} | {g['best_auc']:.3f} | "
                         f"{g['control']}{'' if scratch else ' ‡'} | {g['control_auc']:.3f} | "
                         f"{g['gain_mean']:+.3f}{iv} | {g.get('verdict', '')} | +{target:.2f}: {met} |")
    if missing:
        lines += ["", "‡ the network-training rows (pretrained `finetune`, the `scratch` control) were not run at this "
                      "budget: the best control is the best random-init head."]
    return "\n".join(lines)


def sensitivity_spread(rows) -> str:
    """Sd over seeds of the sensitivity at the chosen operating point, 1% budget, per head (the issue's 3rd target)."""
    import numpy as np

    out = []
    for enc_head in sorted({(r["encoder"], r["head"]) for r in rows}):
        s = [float(r["sensitivity"]) for r in rows if (r["encoder"], r["head"]) == enc_head
             and r["budget_kind"] == "fraction" and float(r["budget"]) == 0.01 and r["sensitivity"] not in ("", "nan")]
        if len(s) > 1:
            out.append(f"{enc_head[0]}/{enc_head[1]} {np.mean(s):.3f} ± {np.std(s, ddof=1):.3f}")
    return "; ".join(out)


def resumed_text(r) -> str:
    """An evaluation resumed after an interruption: its finished invocations' wall time misses the interrupted ones,
    so the rows' own times (every head fit, excluding loading and encoding) are given as well."""
    runs = r["timings"].get("evaluate_runs", 1)
    if runs <= 1:
        return ""
    rows_min = sum(float(x["seconds"]) for x in r["rows"]) / 60
    return (f" over {runs} finished invocations (--resume; an invocation killed before it finished is not counted; "
            f"the rows' own fitting time, summed: {rows_min:.1f} min)")


def write_docs(results, machine, command, path: Path) -> None:
    figs = path.parent / "results"
    figs.mkdir(exist_ok=True)
    parts = ["# Few-label results over every dataset we have", "",
             f"Produced by `{command}` on {machine} (with `--stage report`: collected from the runs whose medcl commands and wall times are listed per dataset). Every number is a test "
             "AUC on the dataset's held-out test split, mean over seeds (a seed = one labeled subset; every row of a "
             "seed uses the same subset). Gains are paired by seed; the interval is the 95% t-interval of the mean "
             "paired difference. Controls: `random-init` (the same network at random weights with the same heads, "
             "including the semi-supervised ones) and `scratch` (the same network trained end to end on the labels). "
             "Pretraining used medcl's folder defaults, no recipe, and never saw a test scan.", "",
             "## Best pretrained or semi-supervised row vs the best control", "", gain_table(results), ""]
    for r in results:
        t = r["timings"]
        shutil.copy(r["curve"], figs / f"{r['name']}.png")
        pre_log = Path(r["curve"]).parents[1] / "pretrain.log"
        pre_cmd = open(pre_log).readline().strip().lstrip("$ ") if pre_log.is_file() else "(reused run)"
        parts += [f"## {r['name']}", "",
                  f"- pretraining: `{pre_cmd}`; {r['defaults']}",
                  f"- wall time: pretrain {t.get('pretrain_s', float('nan')) / 60:.1f} min, evaluate "
                  f"{t.get('evaluate_s', float('nan')) / 60:.1f} min{resumed_text(r)}; "
                  f"`{t.get('evaluate_command', '')}`",
                  f"- published fully supervised reference: {r['anchor']}",
                  f"- sensitivity at the chosen operating point, 1% labels, mean ± sd over seeds: "
                  f"{sensitivity_spread(r['rows'])}", "",
                  f"![learning curve](results/{r['name']}.png)", "", r["summary"].split("\n", 1)[1], ""]
    kept = ""
    if path.is_file() and NOTES in path.read_text():  # hand-written reading of the numbers survives a re-run
        kept = path.read_text().split(NOTES, 1)[1]
    path.write_text(portable("\n".join(parts)) + "\n" + NOTES + kept)


def portable(text: str) -> str:
    """This checkout's absolute paths as a reader's: runs/... from the repo root, ../shared/... beside it."""
    return text.replace(f"{ROOT}/", "").replace(f"{ROOT.parent}/", "../")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "suite"))
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--seeds", type=int, default=10, help="labeled subsets per budget (docs/results.md: at 5 the "
                    "intervals were wider than most gains)")
    ap.add_argument("--heads", nargs="*", default=HEADS)
    ap.add_argument("--stage", choices=("all", "pretrain", "report"), default="all")
    ap.add_argument("--epochs", type=int, default=30, help="max epochs of the network training rows")
    ap.add_argument("--finetune-max-labels", type=int, default=None,
                    help="network training rows (pretrained finetune, scratch) only up to this many labels")
    ap.add_argument("--pretrain-args", nargs=argparse.REMAINDER, default=[],
                    help="extra flags for medcl pretrain (last on the line), e.g. --set train.device=cuda")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md")
    a = ap.parse_args()
    import platform

    import torch

    machine = (f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else
               f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    results, t0 = [], time.perf_counter()
    for name in a.datasets:
        r = run_dataset(name, a)
        if r:
            results.append(r)
            print(gain_table([r]))
    if results:
        print("\n" + gain_table(results))
        print(f"\ntotal wall time {(time.perf_counter() - t0) / 60:.1f} min on {machine}")
        if not a.no_docs:
            command = "python benchmarks/suite.py " + " ".join(sys.argv[1:])
            write_docs(results, machine, command.strip(), ROOT / "docs" / "results.md")
            print(f"wrote {ROOT / 'docs' / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
