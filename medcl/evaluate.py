"""The few-label protocol: label budgets x seeds x heads, pretrained vs. the controls on the same labeled subsets.

Controls, always: the same network with random weights and the same heads (what isolates the value of pretraining),
and the same network trained from scratch (`baseline="finetune"`). The summary reports the gain of the best pretrained
head over the best control, paired by seed (the seed picks the labeled subset).

Writes results.csv (one row per budget x seed x head x encoder), summary.md (mean +- sd and 95% CI over seeds, and the
gain over the best control), learning_curve.png, and TensorBoard scalars + hparams.

An evaluation is hours of CPU, so nothing finished is lost: every budget x seed is appended to runs.jsonl as soon as it
is done, and `resume=True` reuses those rows (after checking that the encoder, the data and every setting that changes
a number are the same, and that each seed drew the same labeled subset) and runs only what is missing. The same way, a
finished evaluation grows: more seeds, another budget or head.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import tensorboard as tb
from .data.labels import Task
from .data.preprocessing import Preprocessing
from .encoders import Encoder
from .errors import MedclError
from .feature_heads import DEFAULT_HEADS
from .finetune import budget_rows, choose_threshold, load_labeled, run_head, write_splits
from .metrics import bootstrap_ci, mean_ci, parse_operating_point, score
from .progress import duration, eta_text, progress_mode
from .runs import prepare_out_dir, write_json
from .runtime import encode, pick_device, seed_everything
from .weights import build_encoder_from, label, open_checkpoint, read_weights

DEFAULT_FRACTIONS = (0.01, 0.05, 0.1, 0.25, 1.0)
METRICS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
HEARTBEAT_S = 10  # in lines mode, a line at least this often while one budget's heads run
SETTINGS = "settings.json"  # what makes the numbers: a resume must match it
RUNS = "runs.jsonl"  # every finished row, appended as it finishes: what a resume reuses


def _budgets(fractions, per_class):
    out = []
    if fractions is None and per_class is None:
        fractions = DEFAULT_FRACTIONS
    for f in fractions or []:
        out.append(("fraction", float(f)))
    for k in per_class or []:
        out.append(("per_class", int(k)))
    return out


def evaluate(checkpoint, data, labels, out, fractions=None, per_class=None, seeds: int = 5,
             heads=DEFAULT_HEADS, baseline: str = "finetune", epochs: int = 30, task: Task = Task(), overwrite=False,
             device="auto", finetune_max_labels: int | None = None, progress=True, log=print, select=None,
             selection=None, resume: bool = False, compare=()) -> list:
    """task: which classes are diseased, and the operating point (medcl.Task). selection: None (stratified random
    subsets, the default), or label-blind strategies of medcl.select (centroid, typiclust, kcenter, random), each run
    on every budget and seed, so their gain is measured with the same protocol and controls. resume: continue the
    evaluation in `out` (see the module docstring). compare: WEIGHTS of other encoders (medcl.weights), each a frozen
    control with the same heads on the same subsets, named `external:<name>` in the results."""
    from .feature_heads import HEAD_TYPES

    operating_point = task.operating_point
    selections = _check_settings(heads, operating_point, selection)
    out = prepare_out_dir(out, data, resume=resume, overwrite=overwrite, marker=SETTINGS if resume else "results.csv",
                          resumable=True)
    t0 = time.perf_counter()
    dev = pick_device(device)
    encoder, extra = open_checkpoint(checkpoint, data, select, log)
    settings = extra.get("data", {})
    ld = load_labeled(data, labels, settings, task, split_seed=0, out=out, progress=progress, log=log, select=select,
                      checkpoint=checkpoint)
    external = _external_encoders(compare, Preprocessing.of(settings), log)
    identity = _identity(checkpoint, encoder, data, labels, ld, epochs=epochs, **dataclasses.asdict(task),
                         compare=[(name, w.sha256[:16]) for name, (w, _) in external.items()])
    done = _resume_rows(out, identity, log) if resume else {}
    if not resume:
        write_json(out / SETTINGS, identity)
        (out / RUNS).write_text("")
    write_splits(ld, out / "splits.csv")
    features = _encode_all(encoder.to(dev), external, ld, dev, progress, log)  # .to moves the module in place
    feature_heads = [h for h in heads if h in HEAD_TYPES]
    budgets = _budgets(fractions, per_class)
    rows = []
    plan = [(b, sel, s) for b in budgets for sel in selections for s in range(seeds)]
    writer = tb.open_writer(out / "tb")
    # lines mode: one line per run, and per epoch only for the heads that train a network (minutes each on a CPU)
    inner = progress if progress_mode(progress) == "bar" else False
    t_runs, computed, reused, planned_keys = time.perf_counter(), 0, 0, set()
    last_line = t_runs
    # label-blind strategies can skew the classes they pick (typicality favours the compact, often healthy, class):
    # the positive share of each chosen subset, against the pool's, goes into the selection table
    shares = {"pool": float(np.mean(ld.y[ld.split != "test"] == 1))} if ld.n_classes == 2 else None
    for i, ((kind, value), sel, seed) in enumerate(plan, 1):
        lab, pool, te = budget_rows(ld, value if kind == "fraction" else None, value if kind == "per_class" else None,
                                    seed, selection=sel, features=features["pretrained"])
        if shares is not None and sel:
            shares.setdefault((kind, value, sel), []).append(float(np.mean(ld.y[lab] == 1)))
        # the protocol's promise, checked on every run: test rows never train or select anything
        assert not (set(lab.tolist()) | set(pool.tolist())) & set(te.tolist())
        subset = hashlib.sha256(lab.astype(np.int64).tobytes()).hexdigest()[:12]
        # training the network is the slow part on a CPU: finetune_max_labels skips it above that many labels
        runs = _runs(heads, feature_heads, external, baseline,
                     train_net=finetune_max_labels is None or len(lab) <= finetune_max_labels)
        new_rows = []
        for enc_name, head in runs:
            key = _row_key(kind, value, sel or "stratified", seed, enc_name, head)
            planned_keys.add(key)
            if key in done:
                rows.append(_reused(done[key], subset, f"{kind}={value} seed {seed}"))
                reused += 1
                continue
            if progress_mode(progress) == "lines" and time.perf_counter() - last_line > HEARTBEAT_S:
                log(f"[{i}/{len(plan)}] {kind}={value} seed={seed}: {len(new_rows)} of {len(runs)} heads done, "
                    f"now {enc_name[:3]}/{head} (elapsed {duration(time.perf_counter() - t_runs)})")
                last_line = time.perf_counter()
            t1 = time.perf_counter()
            fit, pte = _fit(enc_name, head, encoder, features, ld, (lab, pool, te), dev, seed, epochs,
                            progress if enc_name == "scratch" or head == "finetune" else inner)
            row = _score_row(ld, lab, pool, te, fit, pte, operating_point, bootstrap=seeds == 1,
                             budget_kind=kind, budget=value, selection=sel or "stratified", seed=seed, subset=subset,
                             encoder=enc_name, head=head, seconds=round(time.perf_counter() - t1, 1))
            rows.append(row)
            new_rows.append(row)
            tag = f"{enc_name}_{head}" + (f"_{sel}" if sel else "")
            tb.log_scalars(writer, {"auc": row["auc"], "balanced_accuracy": row["balanced_accuracy"]}, len(lab),
                           f"eval_{kind}/{tag}/seed{seed}/")
        _append_rows(out / RUNS, new_rows)
        computed += bool(new_rows)
        left = len(plan) - i  # items not reached yet; a resume may find some of them done
        last_line = time.perf_counter()
        log(f"[{i}/{len(plan)}] {kind}={value}{' ' + sel if sel else ''} seed={seed} ({len(lab)} labels): " +
            ", ".join(f"{r['encoder'][0:3]}/{r['head']} AUC {r['auc']:.3f}" for r in rows[-len(runs):]) +
            (f" | {eta_text(computed, computed + left, time.perf_counter() - t_runs)}" if new_rows else
             " | done in the earlier run"))
    outside = [k for k in done if k not in planned_keys]
    if outside:
        log(f"note: {len(outside)} rows of the earlier run are outside this plan (other seeds, budgets or heads): kept "
            f"in {out / RUNS}, left out of results.csv and summary.md")
    protocol = {"checkpoint": str(checkpoint), "budgets": budgets, "seeds": seeds, "heads": list(heads),
                "baseline": baseline, "operating_point": operating_point,
                "selection": [s or "stratified" for s in selections], "splits": ld.split_source}
    _write_outputs(out, rows, ld, protocol, shares, writer, log, started=t0, reused=reused)
    return rows


def _runs(heads, feature_heads, external, baseline: str, train_net: bool) -> list:
    """(encoder, head) pairs of one budget x seed: the pretrained heads, the controls' frozen heads, the scratch net."""
    runs = ([("pretrained", h) for h in heads if train_net or h != "finetune"] +
            [(name, h) for name in ("random-init", *external) for h in feature_heads])
    if baseline == "finetune" and train_net:
        runs.append(("scratch", "finetune"))
    return runs


def _reused(row: dict, subset: str, what: str) -> dict:
    """A row an earlier run finished, if it was fitted on the same labeled subset."""
    if row["subset"] != subset:
        raise MedclError(f"--resume: {what} drew another labeled subset than the earlier run ({subset} vs "
                         f"{row['subset']}), so its rows cannot be compared; start a new --out")
    return row


def _fit(enc_name: str, head: str, encoder, features: dict, ld, rows: tuple, dev, seed: int, epochs: int,
         progress) -> tuple:
    """(HeadFit, test probabilities) of one head on one encoder: the scratch control trains a fresh network."""
    lab, pool, te = rows
    if enc_name == "scratch":
        seed_everything(seed)
        return run_head(head, Encoder(**encoder.spec).to(dev), ld, lab, pool, te, dev, seed, epochs=epochs,
                        pretrained=False, progress=progress)
    return run_head(head, encoder, ld, lab, pool, te, dev, seed, features=features[enc_name], epochs=epochs,
                    progress=progress)


def _write_outputs(out: Path, rows, ld, protocol: dict, shares, writer, log, started: float, reused: int) -> None:
    """results.csv, summary.md, learning_curve.png, protocol.json and the TensorBoard gain and hparams."""
    checkpoint, seeds, operating_point = protocol["checkpoint"], protocol["seeds"], protocol["operating_point"]
    _write_csv(rows, out / "results.csv")
    summary = summarize(rows)
    gain = gains_over_best_control(rows, summary)
    for g in gain:
        tb.log_scalars(writer, {"auc_gain_over_best_control": g["gain_mean"]}, int(round(g["n_labeled"])),
                       f"gain_{g['budget_kind']}/")
    (out / "summary.md").write_text(summary_markdown(summary, ld, checkpoint, seeds, operating_point) + "\n" +
                                    gain_markdown(gain) + selection_markdown(rows, shares))
    learning_curve(summary, out / "learning_curve.png")
    _write_hparams(summary, out / "tb" / "hparams")
    writer.close()
    write_json(out / "protocol.json", {**protocol, "gain_over_best_control": gain,
                                       "seconds": round(time.perf_counter() - started), "rows_reused": reused})
    log(summary_markdown(summary, ld, checkpoint, seeds, operating_point, short=True))
    log(gain_markdown(gain) + selection_markdown(rows, shares))
    log(f"wrote {out / 'results.csv'}, {out / 'summary.md'}, {out / 'learning_curve.png'}, TensorBoard in {out / 'tb'}")


CONTROLS = ("random-init", "scratch")


def _check_settings(heads, operating_point, selection) -> list:
    """Mistakes in the settings, before anything runs; returns the selection strategies (None: stratified)."""
    from .feature_heads import head_names
    from .select import STRATEGIES

    unknown = [h for h in heads if h not in head_names()]
    if unknown:
        raise MedclError(f"--heads {' '.join(unknown)}: unknown; choose from {', '.join(head_names())}")
    try:
        parse_operating_point(operating_point)
    except ValueError as e:
        raise MedclError(str(e)) from None
    selections = [None] if not selection else list(dict.fromkeys([selection] if isinstance(selection, str)
                                                                  else selection))
    bad = [s for s in selections if s is not None and s not in STRATEGIES]
    if bad:
        raise MedclError(f"--selection {' '.join(bad)}: unknown; choose from {', '.join(STRATEGIES)}")
    return selections


def _score_row(ld, lab, pool, te, fit, pte, operating_point, bootstrap: bool, **keys) -> dict:
    """One results.csv row: the test metrics at the threshold chosen out of fold, and what the labeled scans expect
    of it; with one seed, a bootstrap interval of the AUC over the test scans."""
    thr, _, expected = choose_threshold(ld, lab, fit, operating_point)
    m = score(ld.y[te], pte, thr)
    row = {"budget_kind": keys.pop("budget_kind"), "budget": keys.pop("budget"), "selection": keys.pop("selection"),
           "classes_labeled": len(np.unique(ld.y[lab])), "n_labeled": len(lab), "n_unlabeled": len(pool),
           "n_test": len(te), "seed": keys["seed"], "subset": keys["subset"], "encoder": keys["encoder"],
           "head": keys["head"], "threshold": round(thr, 4), **{k: m.get(k, float("nan")) for k in METRICS},
           "expected_sensitivity": expected.get("sensitivity", float("nan")),
           "expected_specificity": expected.get("specificity", float("nan")), "seconds": keys["seconds"]}
    if bootstrap:
        row["auc_boot_lo"], row["auc_boot_hi"] = bootstrap_ci(ld.y[te], pte, "auc", n=500, seed=keys["seed"],
                                                              threshold=thr)
    return row


def _write_hparams(summary, folder: Path) -> None:
    """One TensorBoard hparams entry per budget x head x encoder, so the HParams tab can compare them; a resumed
    evaluation writes them afresh, not twice."""
    shutil.rmtree(folder, ignore_errors=True)
    for s in summary:
        sel = "" if s["selection"] == "stratified" else f"_{s['selection']}"
        sub = tb.open_writer(folder / f"{s['encoder']}_{s['head']}_{s['budget_kind']}{s['budget']}{sel}")
        tb.log_hparams(sub, {"encoder": s["encoder"], "head": s["head"], "budget_kind": s["budget_kind"],
                             "selection": s["selection"], "budget": s["budget"], "n_labeled": s["n_labeled"],
                             "seeds": s["n_seeds"]},
                       {"auc_mean": s["auc_mean"], "auc_ci95": s["auc_ci95"],
                        "balanced_accuracy_mean": s["balanced_accuracy_mean"]})
        sub.close()


def is_control(encoder: str) -> bool:
    """random-init, scratch, and every --compare encoder (`external:...`): what a pretrained row must beat."""
    return encoder in CONTROLS or encoder.startswith("external:")


def _external_encoders(compare, prep: Preprocessing, log) -> dict:
    """{external:<name>: (Weights, encoder)} for --compare, input channels adapted to the evaluated scans."""
    out = {}
    for source in compare or ():
        w = read_weights(source, "--compare")
        if w.dims != prep.dims:
            raise MedclError(f"--compare {source}: {w.dims}D weights, but the scans are read as {prep.dims}D for the "
                             f"evaluated encoder; compare encoders of the same dimensionality")
        enc, report = build_encoder_from(w, prep.channels)
        name = label(source)
        name = name if name not in out else f"{name}-{len(out) + 1}"
        out[name] = (w, enc)
        log(f"--compare {source} as {name}: {w.layout}; {report['loaded']} of {report['of']} encoder tensors loaded"
            + "".join(f"; {a}" for a in report["adapted"]) + f"; fed the scans as read for the evaluated encoder "
            f"({prep.size} px, {prep.channels} channel(s))")
    return out


def _encode_all(encoder, external: dict, ld, dev, progress, log) -> dict:
    """{encoder name: features of every scan}: the pretrained encoder, the same network at random weights (the
    control) and each --compare encoder."""
    log(f"encoding {len(ld.scans)} scans with the pretrained encoder, and with the same network at random weights "
        f"(the control)" + (f" and {len(external)} --compare encoder(s)" if external else ""))
    features = {"pretrained": encode(encoder, ld.scans, dev, progress=progress, desc="encode (pretrained)")}
    seed_everything(0)
    features["random-init"] = encode(Encoder(**encoder.spec).to(dev), ld.scans, dev, progress=progress,
                                     desc="encode (random-init control)")
    for name, (_, enc) in external.items():
        features[name] = encode(enc.to(dev), ld.scans, dev, progress=progress, desc=f"encode ({name})")
    return features


def _row_key(kind, budget, selection, seed, encoder, head) -> tuple:
    return kind, float(budget), selection, int(seed), encoder, head


def _identity(checkpoint, encoder, data, labels, ld, **task) -> dict:
    """Everything that changes a number of the protocol, so a resume never mixes rows of two different evaluations.
    The encoder and the labeled data are fingerprinted by content, not by path: a pretrain re-run with --overwrite
    in the same folder is another encoder; the scans' keys, labels and splits cover --include/--exclude/--files."""
    import torch

    from . import __version__

    h = hashlib.sha256()
    for k, v in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    d = hashlib.sha256()
    d.update("\n".join(map(str, ld.table.keys)).encode())
    d.update(np.asarray(ld.y, dtype=np.int64).tobytes())
    d.update("\n".join(map(str, ld.split)).encode())
    return {"medcl_version": __version__, "torch_version": torch.__version__, "checkpoint": str(checkpoint),
            "encoder_sha256": h.hexdigest()[:16], "data": str(Path(data).resolve()),
            "labels": str(Path(labels).resolve()) if labels else None, "labeled_data_sha256": d.hexdigest()[:16],
            "n_scans": len(ld.y), **task}


def _resume_rows(out: Path, identity: dict, log) -> dict:
    """The rows an earlier run of this evaluation finished, keyed by budget x selection x seed x encoder x head;
    refuses when anything that changes a number differs."""
    saved = json.loads((out / SETTINGS).read_text())
    now = json.loads(json.dumps(identity))  # the same JSON types as the saved copy
    differ = [k for k in now if k != "checkpoint" and saved.get(k) != now[k]]
    if differ:
        raise MedclError(f"--resume: {out} was evaluated with other settings (" +
                         "; ".join(f"{k}: was {saved.get(k)!r}, now {now[k]!r}" for k in differ) +
                         "), so its rows cannot be mixed with new ones. Resume with the same checkpoint, data and "
                         "settings, or start a new --out.")
    done, torn = {}, 0
    path = out / RUNS
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):  # end a torn last line, or the next row appended would be torn with it
        with open(path, "a") as f:
            f.write("\n")
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            torn += 1
            continue
        done[_row_key(r["budget_kind"], r["budget"], r["selection"], r["seed"], r["encoder"], r["head"])] = r
    log(f"resuming {out}: {len(done)} finished rows reused" + (f" ({torn} torn lines skipped)" if torn else ""))
    return done


def _append_rows(path: Path, rows) -> None:
    """Append finished rows and make them durable before going on: a kill loses at most the run in progress."""
    if not rows:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, default=lambda o: o.item()) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def gains_over_best_control(rows, summary) -> list:
    """Per budget: the best pretrained head minus the best control (by mean AUC over seeds), paired by seed: the same
    seed means the same labeled subset, so the difference per seed removes the subset's luck from the interval."""
    out = []
    for kind, budget, sel in dict.fromkeys((s["budget_kind"], s["budget"], s["selection"]) for s in summary):
        cands = [s for s in summary if (s["budget_kind"], s["budget"], s["selection"]) == (kind, budget, sel)]
        mine = [s for s in cands if s["encoder"] == "pretrained" and np.isfinite(s["auc_mean"])]
        ctrl = [s for s in cands if is_control(s["encoder"]) and np.isfinite(s["auc_mean"])]
        if not mine or not ctrl:
            continue
        best, rival = max(mine, key=lambda s: s["auc_mean"]), max(ctrl, key=lambda s: s["auc_mean"])

        def by_seed(s):
            return {r["seed"]: r["auc"] for r in rows if _key(r) == _key(s)}

        a, b = by_seed(best), by_seed(rival)
        diffs = [a[k] - b[k] for k in sorted(set(a) & set(b))]
        mean, sd, half = mean_ci(diffs)
        out.append({"budget_kind": kind, "budget": budget, "selection": sel, "n_labeled": best["n_labeled"],
                    "best": f"{best['encoder']}/{best['head']}", "best_auc": best["auc_mean"],
                    "control": f"{rival['encoder']}/{rival['head']}", "control_auc": rival["auc_mean"],
                    "gain_mean": mean, "gain_sd": sd, "gain_ci95": half, "n_seeds": len(diffs)})
        out[-1]["verdict"] = gain_verdict(out[-1])
    return out


def gain_verdict(g) -> str:
    """The gain in words, from its interval rather than its mean: what a reader of summary.md should take away."""
    if g["n_seeds"] < 3 or not np.isfinite(g["gain_ci95"]):
        return "too few seeds to tell"
    low, high = g["gain_mean"] - g["gain_ci95"], g["gain_mean"] + g["gain_ci95"]
    if low > 0:
        return "pretraining helps"
    if high < 0:
        return "the control is better"
    return "no clear difference"


def gain_markdown(gain) -> str:
    lines = ["## Gain over the best control", "",
             "Best pretrained head minus the best control (random-init encoder with the same heads, or the network "
             "trained from scratch), AUC, paired by seed: mean [95% t-interval]; † fewer than 3 seeds. The verdict "
             "reads the interval: above 0, pretraining helps; below 0, the control is better; across 0, no clear "
             "difference at this many seeds.", "",
             "| budget | labels | best pretrained | AUC | best control | AUC | gain | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for g in gain:
        b = _budget_text(g["budget_kind"], g["budget"]) + (f" ({g['selection']})" if g["selection"] != "stratified"
                                                            else "")
        iv = (f" [{g['gain_mean'] - g['gain_ci95']:+.3f} to {g['gain_mean'] + g['gain_ci95']:+.3f}]"
              if np.isfinite(g["gain_ci95"]) else "")
        lines.append(f"| {b} | {g['n_labeled']:.0f} | {g['best']} | {g['best_auc']:.3f} | {g['control']} | "
                     f"{g['control_auc']:.3f} | {g['gain_mean']:+.3f}{iv}{' †' if g['n_seeds'] < 3 else ''} | "
                     f"{g['verdict']} |")
    return "\n".join(lines) + "\n"


def _write_csv(rows, path):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _key(r) -> tuple:
    """One series of the protocol: budget, how its subsets were chosen, encoder, head."""
    return r["budget_kind"], r["budget"], r.get("selection", "stratified"), r["encoder"], r["head"]


def _budget_text(kind, budget) -> str:
    return f"{budget:.0%}" if kind == "fraction" else f"{budget}/class"


def selection_markdown(rows, shares: dict | None = None) -> str:
    """Each label-blind strategy against random selection, pretrained encoder, same head and budget: mean AUC over
    seeds (each seed its own subset), sd, and in how many subsets both classes were labeled. shares (binary tasks):
    {"pool": positive share of the non-test scans, (kind, budget, selection): [positive share of each subset]}."""
    sels = list(dict.fromkeys(r.get("selection", "stratified") for r in rows))
    if "random" not in sels or len(sels) < 2:
        return ""
    lines = ["## Which scans to label: selection strategies against random selection", "",
             "Pretrained encoder, the same head and budget; each seed draws its own subset (label-blind strategies "
             "of `medcl select`): mean ± sd of test AUC over seeds, the difference of the means, and the subsets "
             "in which both classes were labeled." + (
                 f" Positive share: of the labeled scans, mean and range over seeds, against {shares['pool']:.0%} "
                 "of the non-test scans; a strategy far below it is leaving the positive class short."
                 if shares else ""), "",
             "| budget | labels | head | selection | AUC | random | difference | both classes |"
             + (" positive share: selection / random |" if shares else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if shares else "")]

    def share(kind, budget, sel):
        v = (shares or {}).get((kind, budget, sel))
        return f"{np.mean(v):.0%} ({100 * min(v):.0f}-{100 * max(v):.0f})" if v else "-"

    summary = {_key(s): s for s in summarize([r for r in rows if r["encoder"] == "pretrained"])}
    for (kind, budget, sel, enc, head), s in summary.items():
        ref = summary.get((kind, budget, "random", enc, head))
        if sel == "random" or ref is None:
            continue
        lines.append(f"| {_budget_text(kind, budget)} | {s['n_labeled']:.0f} | {head} | {sel} | "
                     f"{s['auc_mean']:.3f} ± {s['auc_sd']:.3f} | {ref['auc_mean']:.3f} ± {ref['auc_sd']:.3f} | "
                     f"{s['auc_mean'] - ref['auc_mean']:+.3f} | {s['both_classes']}/{s['n_seeds']} (random "
                     f"{ref['both_classes']}/{ref['n_seeds']}) |"
                     + (f" {share(kind, budget, sel)} / {share(kind, budget, 'random')} |" if shares else ""))
    return "\n" + "\n".join(lines) + "\n"


def summarize(rows) -> list:
    groups: dict = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for (kind, budget, sel, enc, head), rs in groups.items():
        s = {"budget_kind": kind, "budget": budget, "selection": sel, "encoder": enc, "head": head,
             "n_seeds": len(rs), "n_labeled": float(np.mean([r["n_labeled"] for r in rs])),
             "both_classes": int(sum(r.get("classes_labeled", 2) >= 2 for r in rs))}
        for k in METRICS:
            mean, sd, half = mean_ci([r[k] for r in rs])
            s[f"{k}_mean"], s[f"{k}_sd"], s[f"{k}_ci95"] = mean, sd, half
        if len(rs) == 1 and "auc_boot_lo" in rs[0]:
            s["auc_boot"] = (rs[0]["auc_boot_lo"], rs[0]["auc_boot_hi"])
        out.append(s)
    return out


def summary_markdown(summary, ld, checkpoint, seeds, operating_point, short=False) -> str:
    lines = []
    if not short:
        lines += ["# Few-label evaluation", "",
                  f"- encoder: `{checkpoint}`; data: {len(ld.scans)} labeled scans, splits {ld.split_source}; "
                  f"test n = {(ld.split == 'test').sum()}",
                  f"- {seeds} random labeled subsets per budget (stratified, from the non-test scans; the rest of them "
                  f"are the unlabeled pool of the semi-supervised heads); hyperparameters and the threshold for "
                  f"accuracy/sensitivity/specificity ({operating_point}) come from cross-validation inside the "
                  f"labeled scans (out-of-fold predictions); the test split is only ever predicted",
                  "- encoders: `pretrained`; controls on the same subsets: `random-init` (the same network with random "
                  "weights and the same heads), `scratch` (the network trained end to end from random weights) and "
                  "`external:*` (other weights given with --compare, frozen, with the same heads)",
                  "- cells: mean ± sd over seeds [95% t-interval of the mean, clipped to 0-1]; with one seed, a "
                  "bootstrap CI over test scans; † fewer than 3 seeds: the interval is not trustworthy", ""]
    lines += ["| budget | labels | encoder | head | AUC | balanced acc. | sensitivity | specificity |",
              "|---|---|---|---|---|---|---|---|"]

    def cell(s, k):
        m, sd, h = s[f"{k}_mean"], s[f"{k}_sd"], s[f"{k}_ci95"]
        if not np.isfinite(m):
            return "undefined"
        if k == "auc" and "auc_boot" in s:
            return f"{m:.3f} [{s['auc_boot'][0]:.3f}-{s['auc_boot'][1]:.3f}]"
        flag = " †" if s["n_seeds"] < 3 else ""
        if not np.isfinite(h):
            return f"{m:.3f}{flag}"
        lo, hi = max(0.0, m - h), min(1.0, m + h)  # every metric here is a rate in [0, 1]
        return f"{m:.3f} ± {sd:.3f} [{lo:.3f}-{hi:.3f}]{flag}"

    order = {"pretrained": 0, "random-init": 1, "scratch": 2}
    for s in sorted(summary, key=lambda s: (s["budget_kind"], s["budget"], s["selection"], order.get(s["encoder"], 3),
                                            s["head"])):
        b = _budget_text(s["budget_kind"], s["budget"]) + (f" ({s['selection']})" if s["selection"] != "stratified"
                                                            else "")
        lines.append(f"| {b} | {s['n_labeled']:.0f} | {s['encoder']} | {s['head']} | {cell(s, 'auc')} | "
                     f"{cell(s, 'balanced_accuracy')} | {cell(s, 'sensitivity')} | {cell(s, 'specificity')} |")
    return "\n".join(lines) + "\n"


def _best_per_budget(summary, encoders) -> list:
    """Per budget, the summary row with the highest mean AUC among `encoders` (names, or "controls": every control of
    is_control) on stratified subsets when there are any, else on whichever strategy drew them; ordered by labels."""
    best: dict = {}
    stratified = any(s["selection"] == "stratified" for s in summary)
    for s in summary:
        mine = is_control(s["encoder"]) if encoders == "controls" else s["encoder"] in encoders
        if mine and (s["selection"] == "stratified" or not stratified) \
                and np.isfinite(s["auc_mean"]):
            key = (s["budget_kind"], s["budget"])
            if key not in best or s["auc_mean"] > best[key]["auc_mean"]:
                best[key] = s
    return sorted(best.values(), key=lambda s: s["n_labeled"])


def _curve(ax, ss, style, label, names=False):
    x = np.array([s["n_labeled"] for s in ss])
    y = np.array([s["auc_mean"] for s in ss])
    h = np.nan_to_num(np.array([s["auc_ci95"] for s in ss]))
    line, = ax.plot(x, y, style, label=label)
    ax.fill_between(x, np.clip(y - h, 0, 1), np.clip(y + h, 0, 1), alpha=0.15, color=line.get_color())
    if names:  # which head is best changes between budgets
        for s, xi, yi in zip(ss, x, y):
            ax.annotate(s["head"] if s["encoder"] == "pretrained" else f"{s['encoder']}/{s['head']}", (xi, yi),
                        textcoords="offset points", xytext=(3, 4), fontsize=6, color=line.get_color())


def _counts_axis(ax, summary, title):
    ax.set_xscale("log")
    counts = sorted({int(s["n_labeled"]) for s in summary})  # ticks at the budgets measured, read as plain counts
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set(xlabel="labeled training scans", ylabel="test AUC", title=title)
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def learning_curve(summary, path: Path) -> None:
    """Left: the one comparison a reader looks for, the best pretrained row against the best control per budget,
    with their 95% bands. Right: every encoder / head series."""
    from .report import _plt

    plt = _plt()
    fig, (lead, ax) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    best = _best_per_budget(summary, ("pretrained",))
    control = _best_per_budget(summary, "controls")
    if best:
        _curve(lead, best, "o-", "best pretrained row", names=True)
    if control:
        _curve(lead, control, "s--", "best control (random-init, scratch or --compare)", names=True)
    _counts_axis(lead, summary, "Best pretrained vs best control (95% CI over seeds)")
    series: dict = {}
    for s in summary:
        series.setdefault((s["encoder"], s["head"], s["selection"]), []).append(s)
    several = len({k[2] for k in series}) > 1
    for (enc, head, sel), ss in sorted(series.items()):
        _curve(ax, sorted(ss, key=lambda s: s["n_labeled"]), "o-" if enc == "pretrained" else "s--",
               f"{enc} / {head}" + (f" / {sel}" if several else ""))
    _counts_axis(ax, summary, "Every encoder and head")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
