"""`medcl select`: which scans to label first. Deterministic, label-blind, never a test scan, patient-aware, a loop."""
import csv
import json
import re

import numpy as np
import pytest

from medcl.cli import main
from medcl.data.labels import Task, read_labels_csv
from medcl.encoders import Encoder, export_encoder
from medcl.select import STRATEGIES, SelectionError, choose, typicality


def _blobs(sizes=(60, 45, 30, 20, 12), outliers=6, dim=16, seed=0):
    """Well-separated clusters of different sizes, and a few far-away outliers; returns (features, blob id)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 10
    x = [c + rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)]
    blob = [np.full(n, i) for i, n in enumerate(sizes)]
    x.append(rng.normal(size=(outliers, dim)) * 30)
    blob.append(np.full(outliers, -1))
    return np.concatenate(x), np.concatenate(blob)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_choose_is_deterministic_and_keeps_to_candidates_and_patients(strategy):
    x, _ = _blobs()
    n = len(x)
    groups = np.arange(n) // 2  # two scans per patient
    test = np.arange(0, n, 5)
    labeled = np.array([1, 2, 3])
    cand = np.setdiff1d(np.arange(n), test)
    a = choose(x, 12, strategy, seed=3, candidates=cand, labeled=labeled, groups=groups)
    b = choose(x, 12, strategy, seed=3, candidates=cand, labeled=labeled, groups=groups)
    assert np.array_equal(a.order, b.order) and len(a.order) == 12
    assert not set(a.order) & set(test) and not set(a.order) & set(labeled)
    chosen_patients = groups[a.order].tolist()
    assert len(set(chosen_patients)) == 12 and not set(chosen_patients) & set(groups[labeled].tolist())
    assert np.all(np.isfinite(a.typicality)) and np.all(a.cluster >= 0)
    same = choose(x, 12, strategy, seed=3, candidates=cand, labeled=labeled, groups=groups, same_patient=True)
    assert len(same.order) == 12


def test_typiclust_labels_one_typical_scan_per_cluster_then_what_is_not_covered():
    x, blob = _blobs()
    first = choose(x, 5, "typiclust", seed=0)
    assert sorted(blob[first.order].tolist()) == [0, 1, 2, 3, 4]  # every region once, no outlier
    assert blob[first.order[0]] == 0  # the largest cluster first
    for i, c in zip(first.order, first.cluster):  # the most typical member of its cluster: near the centre
        members = np.flatnonzero(blob == blob[i])
        dist = np.linalg.norm(x[members] - x[members].mean(0), axis=1)
        assert np.linalg.norm(x[i] - x[members].mean(0)) <= np.quantile(dist, 0.5)
    # the loop: two clusters labeled already, so the next 3 go to the other three
    done = np.concatenate([np.flatnonzero(blob == 0)[:4], np.flatnonzero(blob == 2)[:2]])
    nxt = choose(x, 3, "typiclust", seed=0, labeled=done)
    assert sorted(blob[nxt.order].tolist()) == [1, 3, 4]
    assert nxt.info["clusters_covered"] > nxt.info["clusters_covered_before"]


def test_centroid_labels_the_centre_of_each_cluster_not_its_densest_corner():
    x, blob = _blobs()
    first = choose(x, 5, "centroid", seed=0)
    assert sorted(blob[first.order].tolist()) == [0, 1, 2, 3, 4]  # every region once, no outlier, as typiclust
    # one cluster: a wide spread, and a tight clump off its centre (the compact class beside a varied one)
    rng = np.random.default_rng(0)
    base = np.eye(8)[0] * 3
    spread = base + rng.normal(size=(200, 8)) * 0.5
    clump = base + np.eye(8)[1] * 0.8 + rng.normal(size=(30, 8)) * 0.02
    x1 = np.concatenate([spread, clump])
    in_clump = np.arange(len(x1)) >= 200
    assert in_clump[choose(x1, 1, "typiclust", seed=0).order[0]]  # the densest scan: in the clump
    pick = choose(x1, 1, "centroid", seed=0).order[0]
    u = x1 / np.linalg.norm(x1, axis=1, keepdims=True)
    assert not in_clump[pick] and pick == np.argmax(u @ u.mean(0))


def test_kcenter_goes_far_from_what_is_labeled_and_typicality_prefers_dense_scans():
    x, blob = _blobs(outliers=0)
    done = np.flatnonzero(blob == 0)
    pick = choose(x, 1, "kcenter", seed=0, labeled=done).order[0]
    d = np.linalg.norm(x[:, None] - x[done][None], axis=2).min(1)
    assert blob[pick] != 0 and d[pick] >= np.quantile(d, 0.8)
    rng = np.random.default_rng(1)
    dense = np.concatenate([rng.normal(size=(40, 4)) * 0.1, [[0, 3, 0, 0]]]) + [5, 0, 0, 0]
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    t = typicality(dense)
    assert t.argmin() == 40  # the outlier is the least typical
    big = np.random.default_rng(2).normal(size=(3000, 8)) * 0.3 + [3, 0, 0, 0, 0, 0, 0, 0]  # dense at the centre
    big /= np.linalg.norm(big, axis=1, keepdims=True)  # past the reference sample: the same ranking, roughly
    full, sub = typicality(big, ref_cap=5000), typicality(big, ref_cap=500)
    assert np.corrcoef(full, sub)[0, 1] > 0.7


def test_budget_beyond_the_pool_is_refused():
    x, _ = _blobs()
    with pytest.raises(SelectionError, match="larger than the pool"):
        choose(x, len(x) + 1, "typiclust")
    groups = np.arange(len(x)) // 4  # fewer patients than scans
    with pytest.raises(SelectionError, match="--allow-same-patient"):
        choose(x, int(groups.max()) + 2, "random", groups=groups)


# ---- the command --------------------------------------------------------------------------------------------

def _encoder(tmp_path, dims, size=16):
    enc = Encoder("resnet10", dims, 1, "small", 0.125)
    export_encoder(enc, tmp_path / f"enc{dims}.pt", {"data": {"dims": dims, "size": size, "channels": 1}})
    return tmp_path / f"enc{dims}.pt"


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_select_command_writes_the_list_never_a_test_scan_and_works_as_a_loop(tmp_path, phantoms2d, capsys):
    enc = _encoder(tmp_path, 2)
    labels = _rows(phantoms2d / "labels.csv")
    meta = tmp_path / "meta.csv"  # patients, and a test split by patient (every third patient)
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "split"])
        for r in labels:
            w.writerow([r["path"], r["patient"], "test" if int(r["patient"][1:]) % 3 == 0 else "train"])
    test = {r["path"] for r in labels if int(r["patient"][1:]) % 3 == 0}
    patient = {r["path"]: r["patient"] for r in labels}
    base = ["select", "--checkpoint", enc, "--data", phantoms2d, "--labels", meta, "--seed", "1"]
    assert main([*map(str, base), "--budget", "6", "--out", str(tmp_path / "r1")]) == 0
    out = tmp_path / "r1"
    got = _rows(out / "to_label.csv")
    assert list(got[0]) == ["path", "rank", "cluster", "typicality", "patient", "label"]
    assert [int(r["rank"]) for r in got] == list(range(1, 7))
    first = [r["path"] for r in got]
    assert not set(first) & test and len({patient[p] for p in first}) == 6
    assert (out / "to_label.png").stat().st_size > 1000
    assert json.loads((out / "selection.json").read_text())["n_test_excluded"] == len(test)
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").rglob("*"))
    assert any(p.name == "projector_config.pbtxt" for p in (out / "tb").rglob("*"))
    tsv = next((out / "tb").rglob("metadata.tsv")).read_text()
    assert tsv.count("to label") == 6
    # deterministic for a seed
    assert main([*map(str, base), "--budget", "6", "--out", str(tmp_path / "r1b")]) == 0
    assert [r["path"] for r in _rows(tmp_path / "r1b" / "to_label.csv")] == first
    # an existing output folder is not overwritten without --overwrite
    before = (out / "to_label.csv").read_bytes()
    assert main([*map(str, base), "--budget", "3", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "to_label.csv").read_bytes() == before
    # the loop: fill in the label column of to_label.csv; it is then a LABELS.csv; ask for the next ones
    filled = tmp_path / "labeled.csv"
    truth = {r["path"]: r["label"] for r in labels}
    with open(filled, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(got[0]))
        w.writeheader()
        w.writerows({**r, "label": truth[r["path"]]} for r in got)
    table = read_labels_csv(filled, phantoms2d, multiclass=True)
    assert table.keys == first and table.has_patient
    assert main([*map(str, base), "--budget", "5", "--already-labeled", str(filled), "--out",
                 str(tmp_path / "r2")]) == 0
    second = [r["path"] for r in _rows(tmp_path / "r2" / "to_label.csv")]
    assert len(second) == 5 and not set(second) & set(first) and not set(second) & test
    assert not {patient[p] for p in second} & {patient[p] for p in first}  # a labeled patient is not chosen again
    assert main([*map(str, base), "--budget", "4", "--already-labeled", str(filled), "--already-labeled",
                 str(tmp_path / "r2" / "to_label.csv"), "--out", str(tmp_path / "r3")]) == 0  # one list per round
    third = [r["path"] for r in _rows(tmp_path / "r3" / "to_label.csv")]
    assert len(third) == 4 and not set(third) & (set(first) | set(second) | test)
    # later rounds on a large folder: features from a `medcl embed` output instead of encoding again; same choice
    assert main(["embed", "--checkpoint", str(enc), "--data", str(phantoms2d), "--out", str(tmp_path / "emb")]) == 0
    assert main([*map(str, base), "--budget", "6", "--embeddings", str(tmp_path / "emb"), "--max-points", "20",
                 "--out", str(tmp_path / "r1e")]) == 0
    assert [r["path"] for r in _rows(tmp_path / "r1e" / "to_label.csv")] == first
    assert next((tmp_path / "r1e" / "tb").rglob("metadata.tsv")).read_text().count("to label") == 6
    assert main([*map(str, base), "--budget", "3", "--overwrite", "--out", str(out)]) == 0
    assert len(_rows(out / "to_label.csv")) == 3


def test_select_on_a_3d_folder(tmp_path, phantoms3d):
    enc = _encoder(tmp_path, 3)
    for strategy in ("typiclust", "kcenter"):
        out = tmp_path / strategy
        assert main(["select", "--checkpoint", str(enc), "--data", str(phantoms3d), "--budget", "4", "--strategy",
                     strategy, "--out", str(out)]) == 0
        got = _rows(out / "to_label.csv")
        assert len(got) == 4 and all(r["path"].endswith(".nii.gz") for r in got)
        assert (out / "to_label.png").is_file()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, phantoms2d, capsys):
    enc = _encoder(tmp_path, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    stranger = tmp_path / "stranger.csv"
    stranger.write_text("path,label\nscans/p0000_0.png,healthy\nnot/here.png,diseased\n")
    np.savez(tmp_path / "other.npz", features=np.zeros((2, 8)), paths=np.array(["a.png", "b.png"]))
    cases = [(["--data", phantoms2d, "--budget", "49"], "larger than the pool"),
             (["--data", phantoms2d, "--budget", "2", "--embeddings", tmp_path / "other.npz"], "another folder"),
             (["--data", phantoms2d, "--budget", "25", "--labels", phantoms2d / "labels.csv"], "same-patient"),
             (["--data", empty, "--budget", "2"], "no scans found"),
             (["--data", phantoms2d, "--budget", "2", "--already-labeled", stranger], "not/here.png")]
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["select", "--checkpoint", str(enc), *map(str, args), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and err.startswith("medcl select: error:")
        assert not out.exists()


def test_evaluate_draws_each_subset_with_the_strategy_from_non_test_scans(tmp_path, phantoms2d):
    from medcl.evaluate import evaluate
    from medcl.finetune import budget_rows, load_labeled

    enc = _encoder(tmp_path, 2)
    rows = evaluate(enc, phantoms2d, phantoms2d / "labels.csv", tmp_path / "ev", per_class=[3], seeds=2,
                    heads=("linear",), baseline="none", task=Task("diseased"), progress=False, log=lambda *a: None,
                    selection=["typiclust", "random"])
    assert {r["selection"] for r in rows} == {"typiclust", "random"} and {r["n_labeled"] for r in rows} == {6}
    assert all(r["classes_labeled"] in (1, 2) and 0 <= r["auc"] <= 1 for r in rows)
    text = (tmp_path / "ev" / "summary.md").read_text()
    assert "selection strategies against random selection" in text and "3/class (typiclust)" in text
    # the positive share of the chosen scans against the pool's: a strategy's class skew is visible
    ld0 = load_labeled(phantoms2d, phantoms2d / "labels.csv", {"dims": 2, "size": 16}, task=Task("diseased"),
                       progress=False)
    pool_share = np.mean(ld0.y[ld0.split != "test"] == 1)
    assert f"against {pool_share:.0%} of the non-test scans" in text and "positive share: selection / random" in text
    row = next(line for line in text.splitlines() if line.startswith("| 3/class | 6 | linear | typiclust |"))
    assert re.search(r"\| \d+% \(\d+-\d+\) / \d+% \(\d+-\d+\) \|$", row)  # mean (range), strategy / random
    ld = load_labeled(phantoms2d, phantoms2d / "labels.csv", {"dims": 2, "size": 16}, task=Task("diseased"),
                      progress=False)
    feats = np.random.default_rng(0).normal(size=(len(ld.y), 8))
    test = set(np.flatnonzero(ld.split == "test"))
    for strategy in STRATEGIES:
        lab, pool, te = budget_rows(ld, None, 4, seed=1, selection=strategy, features=feats)
        assert len(lab) == 8 and not set(lab) & test and set(te) == test
        assert len(set(ld.groups[lab])) == 8  # patients repeat in the phantoms: one scan each
    n_pat = len(set(ld.groups[ld.split != "test"]))
    for fraction in (0.9, 1.0):  # past one scan per patient, or every non-test scan: still a valid subset
        lab, pool, te = budget_rows(ld, fraction, None, seed=0, selection="typiclust", features=feats)
        assert len(lab) > n_pat and not set(lab) & test


def test_a_subset_with_one_class_predicts_the_prior(phantoms2d):
    from medcl.finetune import load_labeled, run_head

    ld = load_labeled(phantoms2d, phantoms2d / "labels.csv", {"dims": 2, "size": 16}, task=Task("diseased"),
                      progress=False)
    non_test = np.flatnonzero(ld.split != "test")
    lab = non_test[ld.y[non_test] == 0][:4]
    te = np.flatnonzero(ld.split == "test")
    feats = np.random.default_rng(0).normal(size=(len(ld.y), 8))
    fit, p = run_head("linear", None, ld, lab, np.setdiff1d(non_test, lab), te, "cpu", 0, features=feats)
    assert fit.info["single_class"] and np.allclose(p, [1.0, 0.0])
