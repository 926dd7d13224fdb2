"""The few-label protocol: no leakage, grouping, tiny-budget stratification, reproducibility, CIs, outputs."""
import csv
import json

import numpy as np
import pytest
from scipy import stats

from medcl.data.labels import Task
from medcl.encoders import Encoder, export_encoder
from medcl.evaluate import evaluate
from medcl.finetune import budget_rows, load_labeled
from medcl.metrics import bootstrap_ci, mean_ci, score
from conftest import medcl, shared


def test_mean_ci_matches_direct_t_interval():
    v = [0.91, 0.93, 0.90, 0.95, 0.92]
    m, sd, half = mean_ci(v)
    direct = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert m == pytest.approx(np.mean(v)) and sd == pytest.approx(np.std(v, ddof=1))
    assert (m - half, m + half) == pytest.approx(direct)


def test_bootstrap_ci_matches_direct_loop():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(y * 0.4 + rng.random(80) * 0.6, 0, 1)
    proba = np.stack([1 - p, p], 1)
    lo, hi = bootstrap_ci(y, proba, "auc", n=200, seed=3)
    r = np.random.default_rng(3)  # stratified: each class resampled within itself, at its own count
    neg, pos = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    vals = []
    for _ in range(200):
        i = np.concatenate([r.choice(neg, len(neg)), r.choice(pos, len(pos))])
        vals.append(score(y[i], proba[i])["auc"])
    assert (lo, hi) == pytest.approx((np.quantile(vals, 0.025), np.quantile(vals, 0.975)))


def test_budget_rows_never_touch_test_and_keep_patients_and_classes(phantoms2d):
    ld = load_labeled(phantoms2d, phantoms2d / "labels.csv", {"dims": 2, "size": 16}, task=Task("diseased"),
                      progress=False)
    for p in set(ld.groups):  # patient grouping of the made splits
        assert len(set(ld.split[ld.groups == p])) == 1
    test = set(np.flatnonzero(ld.split == "test"))
    for seed in range(10):
        lab, pool, te = budget_rows(ld, 0.01, None, seed)
        assert not (set(lab) | set(pool)) & test and set(te) == test
        assert set(lab) | set(pool) | test == set(range(len(ld.y)))  # every non-test scan: labeled or unlabeled
        assert min(np.bincount(ld.y[lab])) >= 2  # 1% of a tiny split still has 2 per class: CV can threshold
    a = budget_rows(ld, 0.3, None, 5)
    b = budget_rows(ld, 0.3, None, 5)
    assert all((x == y).all() for x, y in zip(a, b))


def _tiny_encoder(tmp_path, dims, size):
    enc = Encoder("resnet10", dims, 1, "small", 0.125)
    export_encoder(enc, tmp_path / "encoder.pt", {"data": {"dims": dims, "size": size, "channels": 1}})
    return tmp_path / "encoder.pt"


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_outputs_on_folders(tmp_path, phantoms2d, phantoms3d, dims):
    data = phantoms2d if dims == 2 else phantoms3d
    enc = _tiny_encoder(tmp_path, dims, 16)
    rows = evaluate(enc, data, data / "labels.csv", tmp_path / "ev", fractions=[0.5], per_class=[2], seeds=2,
                    heads=("knn", "linear"), baseline="finetune", epochs=1, task=Task("diseased"), progress=False,
                    log=lambda *a: None)
    assert len(rows) == 2 * 2 * 5  # budgets x seeds x (2 heads + the same 2 heads at random init + scratch)
    out = tmp_path / "ev"
    for f in ("results.csv", "summary.md", "learning_curve.png", "splits.csv"):
        assert (out / f).is_file()
    got = list(csv.DictReader(open(out / "results.csv")))
    assert {r["encoder"] for r in got} == {"pretrained", "random-init", "scratch"}
    # the controls use exactly the labeled subsets the pretrained heads use
    for key in {(r["budget_kind"], r["budget"], r["seed"]) for r in got}:
        same = [r for r in got if (r["budget_kind"], r["budget"], r["seed"]) == key]
        assert len({r["subset"] for r in same}) == 1 and len({r["n_labeled"] for r in same}) == 1
    text = (out / "summary.md").read_text()
    assert "| budget |" in text and "## Gain over the best control" in text


@pytest.mark.slow
def test_evaluate_on_medmnist_npz(tmp_path):
    npz = shared("pneumoniamnist", "pneumoniamnist_reconstructed.npz")
    enc = _tiny_encoder(tmp_path, 2, 28)
    rows = evaluate(enc, npz, None, tmp_path / "ev", per_class=[5], seeds=1, heads=("knn", "linear"),
                    baseline="none", progress=False, log=lambda *a: None)
    assert {r["n_test"] for r in rows} == {624} and {r["n_labeled"] for r in rows} == {10}
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)


def test_summary_intervals_stay_in_range_and_flag_few_seeds():
    from medcl.evaluate import summarize, summary_markdown

    rows = [{"budget_kind": "fraction", "budget": 0.1, "encoder": "pretrained", "head": "linear", "n_labeled": 9,
             "auc": a, "accuracy": 0.5, "balanced_accuracy": 0.5, "sensitivity": float("nan"), "specificity": 0.5,
             "f1": 0.5} for a in (0.925, 0.769)]  # two seeds: mean 0.847, t-interval ±0.99, past 1 unclipped
    text = summary_markdown(summarize(rows), None, "x", 2, "youden", short=True)
    cell = text.strip().splitlines()[-1].split("|")[5]
    assert "[0.000-1.000] †" in cell and "undefined" in text


@pytest.mark.slow
def test_a_collapsed_encoder_shows_no_gain_over_the_control(tmp_path, phantoms2d):
    import torch

    enc = Encoder("resnet10", 2, 1, "small", 0.125)
    with torch.no_grad():
        for p in enc.parameters():
            p.zero_()  # every scan maps to the same features: a collapsed encoder
    export_encoder(enc, tmp_path / "collapsed.pt", {"data": {"dims": 2, "size": 16, "channels": 1}})
    evaluate(tmp_path / "collapsed.pt", phantoms2d, phantoms2d / "labels.csv", tmp_path / "ev", per_class=[8],
             seeds=3, heads=("linear",), baseline="none", task=Task("diseased"), progress=False, log=lambda *a: None)
    gain = json.loads((tmp_path / "ev" / "protocol.json").read_text())["gain_over_best_control"]
    assert len(gain) == 1 and gain[0]["control"] == "random-init/linear" and gain[0]["gain_mean"] <= 0
    assert gain[0]["verdict"] in ("the control is better", "no clear difference")
    assert gain[0]["verdict"] in (tmp_path / "ev" / "summary.md").read_text()


def test_the_gain_verdict_reads_the_interval_not_the_mean():
    from medcl.evaluate import gain_verdict

    g = {"n_seeds": 5, "gain_ci95": 0.01}
    assert gain_verdict({**g, "gain_mean": 0.02}) == "pretraining helps"
    assert gain_verdict({**g, "gain_mean": 0.005}) == "no clear difference"  # positive mean, interval across 0
    assert gain_verdict({**g, "gain_mean": -0.02}) == "the control is better"
    assert gain_verdict({"n_seeds": 2, "gain_ci95": 0.01, "gain_mean": 0.5}) == "too few seeds to tell"
    assert gain_verdict({"n_seeds": 5, "gain_ci95": float("nan"), "gain_mean": 0.5}) == "too few seeds to tell"


@pytest.mark.parametrize("head", ["linear", "knn", "mlp", "spread", "selftrain"])
def test_heads_never_see_a_test_scan_or_label(head):
    """Test rows carry NaN features and an impossible label: a head that read either would fail or return NaN."""
    from medcl.feature_heads import fit_feature_head

    rng = np.random.default_rng(0)
    n, d = 300, 16
    y = (rng.random(n) < 0.4).astype(int)
    f = rng.normal(size=(n, d)) + y[:, None] * 1.5
    test = np.arange(200, 300)
    lab, pool = np.r_[0:10, 100:110], np.setdiff1d(np.arange(200), np.r_[0:10, 100:110])
    y[lab] = np.r_[[0] * 5 + [1] * 5, [0] * 5 + [1] * 5]
    f_seen, y_seen = f.copy(), y.copy()
    f_seen[test], y_seen[test] = np.nan, 7
    fit = fit_feature_head(head, f_seen, y_seen, lab, pool, None, 2, seed=0)
    assert fit.oof.shape == (len(lab), 2) and np.isfinite(fit.oof).all()
    p = fit.predict(f[test])  # the only way test scans reach a head
    assert np.isfinite(p).all() and np.allclose(p.sum(1), 1)
    if head in ("spread", "selftrain"):
        assert fit.info["n_unlabeled"] == len(pool)


def test_out_of_fold_threshold_ignores_test_scans_and_meets_the_operating_point(phantoms2d):
    from medcl.finetune import choose_threshold, run_head

    ld = load_labeled(phantoms2d, phantoms2d / "labels.csv", {"dims": 2, "size": 16}, task=Task("diseased"),
                      progress=False)
    lab, pool, te = budget_rows(ld, None, 6, 0)
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(len(ld.y), 8)) + ld.y[:, None]
    fit, _ = run_head("linear", None, ld, lab, pool, te, "cpu", 0, features=feats)
    feats2 = feats.copy()
    feats2[te] = rng.normal(size=(len(te), 8)) * 100  # other test scans: the threshold must not move
    fit2, _ = run_head("linear", None, ld, lab, pool, te, "cpu", 0, features=feats2)
    for op in ("youden", "sensitivity=0.9", "specificity=0.8"):
        thr, rule, expected = choose_threshold(ld, lab, fit, op)
        assert thr == choose_threshold(ld, lab, fit2, op)[0]
        assert "out-of-fold" in rule and np.isfinite(expected["sensitivity"])
    thr, _, expected = choose_threshold(ld, lab, fit, "sensitivity=0.9")
    assert expected["sensitivity"] >= 0.9


def test_operating_point_parsing_and_thresholds():
    from medcl.metrics import binary_metrics, operating_threshold, parse_operating_point

    assert parse_operating_point("Sensitivity=0.95") == ("sensitivity", 0.95)
    with pytest.raises(ValueError, match="sensitivity=X"):
        parse_operating_point("recall=0.9")
    rng = np.random.default_rng(0)
    for _ in range(100):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        p = rng.random(40) + 0.3 * y
        for t in (0.5, 0.9, 1.0):
            assert binary_metrics(y, p, operating_threshold(y, p, "sensitivity", t))["sensitivity"] >= t
            assert binary_metrics(y, p, operating_threshold(y, p, "specificity", t))["specificity"] >= t


@pytest.mark.slow
def test_an_interrupted_evaluation_resumes_where_it_stopped_and_grows(tmp_path, phantoms2d):
    """Every finished budget x seed survives a kill; --resume reruns nothing finished, gives the rows an uninterrupted
    run gives, adds seeds to a finished evaluation, and refuses to mix rows of another encoder or other settings."""
    from medcl.errors import MedclError, RunDirError

    enc = _tiny_encoder(tmp_path, 2, 16)
    kw = dict(per_class=[4, 6], heads=("knn", "linear"), baseline="none", task=Task("diseased"), progress=False)
    whole = evaluate(enc, phantoms2d, phantoms2d / "labels.csv", tmp_path / "whole", seeds=2, log=lambda *a: None, **kw)

    def stop_after_first(msg):  # Ctrl-C right after the first budget x seed finished
        if str(msg).startswith("[1/"):
            raise KeyboardInterrupt

    ev = tmp_path / "ev"
    with pytest.raises(KeyboardInterrupt):
        evaluate(enc, phantoms2d, phantoms2d / "labels.csv", ev, seeds=2, log=stop_after_first, **kw)
    assert not (ev / "results.csv").exists() and len((ev / "runs.jsonl").read_text().splitlines()) == 4
    with open(ev / "runs.jsonl", "a") as f:
        f.write('{"budget_kind": "per_cl')  # a line torn by a kill while writing: skipped
    with pytest.raises(RunDirError, match="--resume"):  # no silent overwrite of a half-done evaluation
        evaluate(enc, phantoms2d, phantoms2d / "labels.csv", ev, seeds=2, log=lambda *a: None, **kw)

    said = []
    rows = evaluate(enc, phantoms2d, phantoms2d / "labels.csv", ev, seeds=2, resume=True, log=said.append, **kw)
    assert any("4 finished rows reused (1 torn lines skipped)" in str(s) for s in said)
    assert any("done in the earlier run" in str(s) for s in said)

    def cells(rs):
        return sorted((r["budget_kind"], r["budget"], r["seed"], r["encoder"], r["head"], r["subset"],
                       round(r["auc"], 10)) for r in rs)

    assert cells(rows) == cells(whole)  # the same numbers as the run that was never interrupted
    assert json.loads((ev / "protocol.json").read_text())["rows_reused"] == 4
    assert len(list(csv.DictReader(open(ev / "results.csv")))) == len(whole)

    # a finished evaluation grows by a seed: only seed 2 runs
    grown = evaluate(enc, phantoms2d, phantoms2d / "labels.csv", ev, seeds=3, resume=True, log=lambda *a: None, **kw)
    assert {r["seed"] for r in grown} == {0, 1, 2} and len(grown) == len(whole) * 3 // 2
    assert json.loads((ev / "protocol.json").read_text())["rows_reused"] == len(whole)
    assert "- 3 random labeled subsets per budget" in (ev / "summary.md").read_text()

    with pytest.raises(MedclError, match="epochs: was 30, now 5"):
        evaluate(enc, phantoms2d, phantoms2d / "labels.csv", ev, seeds=3, resume=True, epochs=5, log=lambda *a: None,
                 **kw)
    import torch

    other = Encoder("resnet10", 2, 1, "small", 0.125)
    other.load_state_dict(torch.load(enc, weights_only=True)["state_dict"])
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # the same network, one tensor nudged: another encoder
    export_encoder(other, tmp_path / "other.pt", {"data": {"dims": 2, "size": 16, "channels": 1}})
    with pytest.raises(MedclError, match="encoder_sha256"):
        evaluate(tmp_path / "other.pt", phantoms2d, phantoms2d / "labels.csv", ev, seeds=3, resume=True,
                 log=lambda *a: None, **kw)
    with pytest.raises(RunDirError, match="no run to resume"):
        evaluate(enc, phantoms2d, phantoms2d / "labels.csv", tmp_path / "never", seeds=1, resume=True,
                 log=lambda *a: None, **kw)


def test_resume_with_overwrite_is_a_one_line_error(tmp_path, phantoms2d):
    _tiny_encoder(tmp_path, 2, 16)
    for args in (["evaluate", "--checkpoint", tmp_path / "encoder.pt", "--data", phantoms2d],
                 ["pretrain", phantoms2d]):
        r = medcl(*args, "--out", tmp_path / "out", "--resume", "--overwrite", check=False)
        assert r.returncode == 2 and "pass one of them" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
