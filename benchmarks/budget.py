"""The compute curve: how long must pretraining run before it pays on data like mine?

Per dataset and per multiple M of the CPU default's views (1, 4, 16; 64 with --multiples ... 64; the default is
medcl/auto.py's VIEWS_BUDGET at the time: the curve in docs/results.md was measured when it was 40k views in 2D):
1. `medcl pretrain DATA` with no recipe (the folder defaults, medcl/auto.py), `--epochs` = M x the 1x run's epochs,
   on the non-test scans only;
2. `medcl evaluate` at 1%, 20 labels (10 per class) and every label, seeds x heads (knn, linear, and the
   semi-supervised spread and selftrain), against the random-init control on the same subsets (--baseline none:
   the scratch network is the slow part on a CPU, and at these budgets it was the weakest control, docs/results.md);
3. a table (views, pretraining minutes, best pretrained row and its gain over the best control, with the 95%
   interval paired by seed) and one figure: gain vs views, log x, a line per dataset, a panel per budget.

Every step is kept as it finishes: run the script again after an interruption and only what is missing runs (a
pretraining killed midway continues with --resume; an evaluation with `medcl evaluate --resume`). Long: at 16x a 2D
dataset pretrains for 30-60 minutes on 2 CPU cores. Start it in the background:
    nohup python benchmarks/budget.py --datasets pneumoniamnist --out runs/budget > runs/budget.log 2>&1 &
    python benchmarks/budget.py --out runs/budget --report      # the table and figure from what has finished
    python benchmarks/budget.py --out runs/budget --report --table docs/results.md   # with the rows printed before
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import DATASETS, ROOT, medcl, non_test_files  # noqa: E402

from medcl.train.resume import finished  # noqa: E402

BUDGETS = ["--fractions", "0.01", "1.0", "--per-class", "10"]
HEADS = ["knn", "linear", "proto", "spread", "selftrain"]


def epochs_of(run: Path) -> int:
    import yaml

    return int(yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"])


def pretrain(name: str, mult: int, out: Path, base_epochs: int | None, extra: list) -> tuple[Path, dict]:
    data, labels, _, _ = DATASETS[name]
    run = out / f"pretrain_x{mult}"
    times_file = out / "timings.json"
    timings = json.loads(times_file.read_text()) if times_file.is_file() else {}
    if finished(run):
        return run, timings
    args = ["pretrain", data, "--out", run, *non_test_files(name, data, labels, out), *extra]
    if mult > 1:
        args += ["--epochs", mult * base_epochs]
    resume = (run / "checkpoints" / "last.pt").is_file()
    seconds = medcl(args + (["--resume"] if resume else ["--overwrite"]), out / f"pretrain_x{mult}.log")
    timings[f"pretrain_x{mult}_s"] = timings.get(f"pretrain_x{mult}_s", 0.0) * resume + seconds
    times_file.write_text(json.dumps(timings))
    print(f"{name} x{mult}: pretrained in {seconds / 60:.1f} min", flush=True)
    return run, timings


def evaluate(name: str, mult: int, run: Path, out: Path, seeds: int) -> dict:
    data, labels, task, _ = DATASETS[name]
    ev = out / f"eval_x{mult}"
    if not (ev / "protocol.json").is_file() or json.loads((ev / "protocol.json").read_text())["seeds"] < seeds:
        args = ["evaluate", "--checkpoint", run, "--data", data, "--out", ev, "--seeds", seeds, *BUDGETS,
                "--heads", *HEADS, "--baseline", "none", *(["--labels", labels] if labels else []), *task]
        seconds = medcl(args + (["--resume"] if (ev / "settings.json").is_file() else ["--overwrite"]),
                        out / f"eval_x{mult}.log")
        print(f"{name} x{mult}: evaluated in {seconds / 60:.1f} min", flush=True)
    return json.loads((ev / "protocol.json").read_text())


def n_scans(run: Path) -> int:
    import yaml

    return int(yaml.safe_load((run / "config.yaml").read_text())["trained_on"]["n_scans"])


def collect(out: Path, datasets, multiples) -> list:
    """One row per dataset x multiple x budget that has finished."""
    rows = []
    for name in datasets:
        d = out / name
        timings = json.loads((d / "timings.json").read_text()) if (d / "timings.json").is_file() else {}
        for m in multiples:
            run, proto = d / f"pretrain_x{m}", d / f"eval_x{m}" / "protocol.json"
            if not finished(run) or not proto.is_file():
                continue
            views = 2 * n_scans(run) * epochs_of(run)
            for g in json.loads(proto.read_text())["gain_over_best_control"]:
                rows.append({"dataset": name, "multiple": m, "views": views, "epochs": epochs_of(run),
                             "pretrain_min": timings.get(f"pretrain_x{m}_s", float("nan")) / 60, **g})
    return sorted(rows, key=lambda g: (g["dataset"], g["n_labeled"], g["multiple"]))


def budget_name(g) -> str:
    if g["budget_kind"] == "fraction":
        return "every label" if float(g["budget"]) == 1.0 else f"{float(g['budget']):.0%}"
    return f"{int(g['budget']) * 2} labels"


def table(rows) -> str:
    lines = ["| dataset | views (x default) | epochs | pretrain min | budget | labels | best pretrained row | AUC | "
             "best control | AUC | gain [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in rows:
        ci = g["gain_ci95"]
        lo, hi = g.get("interval") or (g["gain_mean"] - (ci or 0), g["gain_mean"] + (ci or 0))
        iv = f" [{lo:+.3f}, {hi:+.3f}]" if ci is not None and ci == ci else ""
        lines.append(f"| {g['dataset']} | {g['views']:,} (x{g['multiple']}) | {g['epochs']} | "
                     f"{g['pretrain_min']:.1f} | {budget_name(g)} | {g['n_labeled']:.0f} | {g['best']} | "
                     f"{g['best_auc']:.3f} | {g['control']} | {g['control_auc']:.3f} | {g['gain_mean']:+.3f}{iv} |")
    return "\n".join(lines)


ROW = re.compile(r"\| (\S+) \| ([\d,]+) \(x(\d+)\) \| (\d+) \| ([\d.]+) \| ([^|]+?) \| (\d+) \| (\S+) \| ([\d.]+) \| "
                 r"(\S+) \| ([\d.]+) \| ([+-][\d.]+)(?: \[([+-][\d.]+), ([+-][\d.]+)\])? \|$")


def rows_from_table(text: str) -> list:
    """The rows of tables this script printed (e.g. pasted into docs/results.md), for a figure whose runs are gone."""
    rows = []
    for m in filter(None, map(ROW.match, text.splitlines())):
        b = m[6]  # budget_name's words back to (kind, budget): "every label", "1%", "20 labels"
        if b == "every label":
            kind, budget = "fraction", 1.0
        elif b.endswith("%"):
            kind, budget = "fraction", float(b[:-1]) / 100
        else:
            kind, budget = "per_class", int(b.split()[0]) // 2
        lo, hi = (float(m[13]), float(m[14])) if m[13] else (float(m[12]),) * 2
        rows.append({"dataset": m[1], "views": int(m[2].replace(",", "")), "multiple": int(m[3]), "epochs": int(m[4]),
                     "pretrain_min": float(m[5]), "budget_kind": kind, "budget": budget, "n_labeled": float(m[7]),
                     "best": m[8], "best_auc": float(m[9]), "control": m[10], "control_auc": float(m[11]),
                     "gain_mean": float(m[12]), "gain_ci95": (hi - lo) / 2, "interval": (lo, hi)})  # as printed
    return rows


def merge(old: list, new: list) -> list:
    """Rows from the table, then the runs' rows, a run replacing the table's row at the same point. A run's multiple
    is restated against the table's smallest budget for its dataset (the runs' 1x may be a later default: 4x the
    old one in 2D), rounded as the runs' own multiples are."""
    key = lambda g: (g["dataset"], g["views"], budget_name(g))  # noqa: E731
    base = {}
    for g in old:
        base[g["dataset"]] = min(base.get(g["dataset"], g["views"]), g["views"])
    new = [dict(g, multiple=g["multiple"] * round(g["views"] / g["multiple"] / base.get(g["dataset"], g["views"])))
           for g in new]
    seen = {key(g) for g in new}
    rows = [g for g in old if key(g) not in seen] + new
    return sorted(rows, key=lambda g: (g["dataset"], g["n_labeled"], g["views"]))


def figure(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(budget_name(g) for g in rows))
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.6), dpi=110, squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for name in dict.fromkeys(g["dataset"] for g in rows):
            pts = sorted((g["views"], g["gain_mean"], g["gain_ci95"] or 0.0) for g in rows
                         if g["dataset"] == name and budget_name(g) == b)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", title=b, xlabel="pretraining views (log)", ylabel="AUC gain over the best control")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "budget"))
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--multiples", nargs="*", type=int, default=[1, 4, 16])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--report", action="store_true", help="only the table and figure from what has finished")
    ap.add_argument("--table", help="a Markdown file holding this script's earlier table (docs/results.md): its rows "
                    "join the finished runs' in the table and figure")
    ap.add_argument("--pretrain-args", nargs=argparse.REMAINDER, default=[],
                    help="extra flags for medcl pretrain (last on the line), e.g. --set train.device=cuda")
    a = ap.parse_args()
    out = Path(a.out)
    t0 = time.perf_counter()
    if not a.report:
        # the cheap points of every dataset first: an interrupted curve still has every dataset's start
        for mult in sorted(a.multiples):
            for name in a.datasets:
                if not Path(DATASETS[name][0]).exists():
                    print(f"{name}: skipped ({DATASETS[name][0]} not found)")
                    continue
                d = out / name
                d.mkdir(parents=True, exist_ok=True)
                base, _ = pretrain(name, 1, d, None, a.pretrain_args)
                run, _ = pretrain(name, mult, d, epochs_of(base), a.pretrain_args)
                evaluate(name, mult, run, d, a.seeds)
    rows = collect(out, a.datasets, sorted(a.multiples))
    if a.table:
        rows = merge(rows_from_table(Path(a.table).read_text()), rows)
    if rows:
        print(table(rows))
        figure(rows, out / "budget.png")
        print(f"wrote {out / 'budget.png'}; wall time {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
