"""Every method: a short CPU training on tiny synthetic data lowers the loss without collapsing; every method runs
through `pretrain` in 2D and the main ones in 3D; patient and neighbour positives on real data."""
import csv

import numpy as np
import pytest
import torch

from medcl.config import MedclConfig, apply_overrides
from medcl.data.synthetic import make_anatomy, add_lesions, render
from medcl.encoders import build_encoder
from medcl.methods import METHODS, build_method
from medcl.monitors import collapse_metrics, is_collapsed
from medcl.train import pretrain
from medcl.views import BatchedViews
from conftest import medcl, shared

TINY = {"encoder": {"name": "resnet10", "widen_factor": 0.125}, "method": {"proj_hidden": 64, "proj_dim": 32,
                                                                           "pred_hidden": 64, "queue_size": 256}}


VIT = {"name": "vit", "width": 48, "depth": 2, "patch_size": 4}  # CPU-sized: 2 blocks of 48 channels


def tiny_images(n=32, size=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = make_anatomy(rng, 2, size)
        if i % 2:
            a = add_lesions(rng, a, 2, size)
        out.append(render(a, 2, size, rng))
    return torch.tensor(np.stack(out))[:, None]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_short_training_lowers_loss_without_collapse(name):
    torch.manual_seed(0)
    enc = VIT if name == "mae" else TINY["encoder"]
    cfg = apply_overrides(MedclConfig(), {**TINY, "encoder": enc, "data": {"size": 16}, "method": {**TINY["method"], "name": name}})
    method = build_method(name, build_encoder(cfg), cfg.method, image_size=16)
    opt = torch.optim.AdamW(method.parameters(), lr=2e-3)
    x = tiny_images()
    labels = torch.arange(len(x)) % 2
    views = BatchedViews(cfg.views, 2, 16)
    g = torch.Generator().manual_seed(0)
    losses = []
    steps = 120 if name == "moco_v2" else 40
    for step in range(steps):
        out = method(views(x, g), views(x, g), labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.step_end(step / steps)
        losses.append(out["loss"].item())
    assert np.isfinite(losses).all()
    # MoCo v2 begins with random queue negatives, which are easier than real keys: its loss first rises while real
    # keys fill the queue, then falls slowly (the paper's head has no BatchNorm), so it trains longer and is compared
    # from step 10.
    # DINO's loss is not a progress measure: its target softens as the teacher temperature warms up.
    if name != "dino":
        start = losses[10:20] if name == "moco_v2" else losses[4:12]
        assert np.mean(losses[-8:]) < np.mean(start), f"{name}: loss did not fall ({losses[:3]} -> {losses[-3:]})"
    with torch.no_grad():
        method.eval()
        m = collapse_metrics(method.embed(x))
    assert is_collapsed(m, 32) is None and m["rankme"] > 2, f"{name} collapsed: {m}"


@pytest.mark.slow
@pytest.mark.parametrize("dims,names", [(2, sorted(METHODS)), (3, ["simclr", "byol", "vicreg", "triplet"])])
def test_pretrain_runs_every_method(tmp_path, phantoms2d, phantoms3d, dims, names):
    from medcl.data.labels import read_labels_csv

    data = phantoms2d if dims == 2 else phantoms3d
    labels = read_labels_csv(data / "labels.csv", data)
    for name in names:
        cfg = apply_overrides(MedclConfig(), {**TINY, "data": {"dims": dims, "size": 16},
                                              "encoder": VIT if name == "mae" else TINY["encoder"],
                                              "method": {**TINY["method"], "name": name},
                                              "train": {"epochs": 1, "batch_size": 8, "max_steps": 2}})
        out = pretrain(data, tmp_path / f"{dims}_{name}", cfg, labels=labels, progress=False, log=lambda *a: None)
        assert (out / "encoder.pt").is_file()


@pytest.mark.slow
def test_patient_positives_on_real_csv(tmp_path):
    root = shared("chest_xray_pneumonia_224")
    # a small folder view of the real data: 40 scans of patients with 2+ images, via a CSV with a patient column
    rows = list(csv.DictReader(open(root / "labels.csv")))
    by_p = {}
    for r in rows:
        by_p.setdefault(r["patient"], []).append(r)
    multi = [rs[:2] for p, rs in sorted(by_p.items()) if len(rs) >= 2]
    multi = [rs for rs in multi if rs[0]["label"] == "normal"][:10] + [rs for rs in multi if rs[0]["label"] != "normal"][:10]
    sub = tmp_path / "labels.csv"
    with open(sub, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient"])
        for rs in multi:
            for r in rs:
                w.writerow([r["path"], r["label"], r["patient"]])
    from medcl.data.labels import read_labels_csv
    from medcl.train import make_partner, patients_of
    from medcl.data.discover import ScanRecord

    table = read_labels_csv(sub, root)
    recs = [ScanRecord(k, "image") for k in table.keys]
    pats = patients_of(recs, table)
    partner = make_partner("patient", pats, seed=0)
    idx = np.arange(len(recs))
    pj = partner(idx, 0)
    assert all(pats[i] == pats[j] and i != j for i, j in zip(idx, pj))
    # and a real pretraining run with patient positives on those JPEGs (folder = the labeled subset)
    import shutil

    data = tmp_path / "cxr"
    for k in table.keys:
        (data / k).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / k, data / k)
    cfg = apply_overrides(MedclConfig(), {**TINY, "data": {"size": 32}, "method": {**TINY["method"], "positives": "patient"},
                                          "train": {"epochs": 1, "batch_size": 16, "max_steps": 2}})
    pretrain(data, tmp_path / "run", cfg, labels=table, progress=False, log=lambda *a: None)
    assert (tmp_path / "run" / "encoder.pt").is_file()


def test_patient_positives_refuse_one_folder_of_scans(tmp_path, phantoms2d):
    """Without a patient column every scan in one folder is one 'patient': pairing them would pull unrelated scans
    together, so pretraining stops with what to do; with the phantoms' labels.csv (two scans a patient) it runs."""
    from medcl.data.labels import read_labels_csv
    from medcl.errors import MedclError

    cfg = apply_overrides(MedclConfig(), {**TINY, "data": {"size": 32},
                                          "method": {**TINY["method"], "positives": "patient"},
                                          "train": {"epochs": 1, "batch_size": 16, "max_steps": 1}})
    with pytest.raises(MedclError, match="belong to one patient.*patient column"):
        pretrain(phantoms2d, tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    said = []
    pretrain(phantoms2d, tmp_path / "run2", cfg, labels=read_labels_csv(phantoms2d / "labels.csv", phantoms2d),
             progress=False, log=said.append)
    assert any(s.startswith("patient positives:") and "patients;" in s for s in said)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
def test_neighbor_positives_on_real_volumes(tmp_path, dims):
    import shutil

    src = shared("brats2013_deepmedic_examples", "train")
    data = tmp_path / "vols"
    for f in sorted(src.rglob("Flair_subtrMeanDivStd.nii.gz")):
        dst = data / f.parent.name / f.name
        dst.parent.mkdir(parents=True)
        shutil.copy(f, dst)
    cfg = apply_overrides(MedclConfig(), {**TINY, "data": {"dims": dims, "size": 24},
                                          "method": {**TINY["method"], "positives": "neighbors", "neighbor_distance": 2},
                                          "train": {"epochs": 1, "batch_size": 2}})
    pretrain(data, tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    enc = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)
    assert enc["spec"]["spatial_dims"] == dims


def test_neighbor_pairing_picks_nearby_slices():
    from medcl.train import neighbor_pairing

    cfg = apply_overrides(MedclConfig(), {"method": {"positives": "neighbors", "neighbor_distance": 2}})
    vol = torch.arange(16, dtype=torch.float32).view(1, 1, 1, 1, 16).expand(50, 1, 4, 4, 16).contiguous()
    a, b = neighbor_pairing(cfg)(vol, torch.Generator().manual_seed(0))
    assert a.shape == (50, 1, 4, 4)
    gap = (a[:, 0, 0, 0] - b[:, 0, 0, 0]).abs()
    assert gap.min() >= 1 and gap.max() <= 2


@pytest.mark.slow
def test_pair_loss_from_a_pairs_csv(tmp_path, phantoms2d):
    rows = list(csv.DictReader(open(phantoms2d / "labels.csv")))
    by_p = {}
    for r in rows:
        by_p.setdefault(r["patient"], []).append(r["path"])
    pats = sorted(by_p)
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_a", "path_b", "similar"])
        for i, p in enumerate(pats):  # same patient: similar; next patient: dissimilar
            w.writerow([by_p[p][0], by_p[p][1], 1])
            w.writerow([by_p[p][0], by_p[pats[(i + 1) % len(pats)]][0], 0])
    r = medcl("--quiet", "pretrain", phantoms2d, "--out", tmp_path / "run", "--pairs", pairs, "--set",
              "method.name=pair", "--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125", "--set",
              "data.size=16", "--epochs", 2, "--batch-size", 8)
    assert "6 steps" in r.stdout  # 48 pairs / batch 8: the epoch runs over the CSV's pairs
    assert len((tmp_path / "run" / "loss.csv").read_text().splitlines()) == 13


def test_pairs_csv_errors(tmp_path):
    from medcl.data.labels import read_pairs_csv
    from medcl.errors import LabelsError

    p = tmp_path / "pairs.csv"
    p.write_text("a,b,similar\nx.png,y.png,1\n")
    with pytest.raises(LabelsError, match="path_a"):
        read_pairs_csv(p)
    p.write_text("path_a,path_b,similar\nx.png,y.png,maybe\n")
    with pytest.raises(LabelsError, match="1/0"):
        read_pairs_csv(p)
    p.write_text("path_a,path_b,similar\nx.png,y.png,1\nx.png,z.png,1\n")
    with pytest.raises(LabelsError, match="both kinds"):
        read_pairs_csv(p)
    p.write_text("path_a,path_b,similar\nx.png,y.png,1\nx.png,z.png,0\n")
    assert read_pairs_csv(p) == [("x.png", "y.png", 1), ("x.png", "z.png", 0)]


def test_moco_v2_queue_is_a_ring_buffer_of_the_newest_keys():
    cfg = apply_overrides(MedclConfig(), {**TINY, "data": {"size": 16}, "method": {**TINY["method"], "queue_size": 10}})
    method = build_method("moco_v2", build_encoder(cfg), cfg.method)
    first = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    second = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    method._enqueue(first)
    assert int(method.queue_ptr) == 6 and torch.allclose(method.queue[:6], first)
    method._enqueue(second)  # 4 slots left: the last two keys wrap to the front, over the oldest
    assert int(method.queue_ptr) == 2
    assert torch.allclose(method.queue[6:], second[:4]) and torch.allclose(method.queue[:2], second[4:])
    assert torch.allclose(method.queue[2:6], first[2:6])
