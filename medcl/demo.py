"""`medcl demo`: the whole journey on synthetic phantoms, offline, with both controls beside the result."""
from __future__ import annotations

import time

from .config import MedclConfig, apply_overrides
from .data.labels import Task
from .data.synthetic import make_phantoms
from .embed import embed
from .finetune import finetune
from .runs import prepare_out_dir, write_json
from .train import pretrain

DISEASED = Task(positive="diseased")  # the phantoms' labels.csv: healthy / diseased
DEMO_SETTINGS = {
    # 2D (--dims 2): 800 images, 32 labels (5%) and 160 test scans, for an interval narrow enough to show the gain;
    # with the lesions of medcl/data/synthetic.py the interval was above 0 on 10 of 12 seeds (docs/results.md,
    # "The demo"). The default demo stays the 3D one: above 0 on every seed we ran, with larger gains.
    2: {"data": {"dims": 2, "size": 48}, "encoder": {"name": "resnet18", "widen_factor": 0.5},
        "train": {"epochs": 8, "batch_size": 64, "log_every": 2, "monitor_every": 5},
        "optim": {"lr": 2e-3, "warmup_epochs": 1}},
    # 3D: the stride-2 stem of the CPU folder defaults (medcl/auto.py), 16x cheaper a step than the small stem at 32^3,
    # so 24 epochs fit: at 6 epochs with the small stem the loss hardly fell (3.9 -> 3.4) and the gain was seed noise.
    # 320 volumes: 64 test scans. What else was tried, and each seed's numbers: docs/results.md, "The demo".
    3: {"data": {"dims": 3, "size": 32}, "encoder": {"name": "resnet10", "widen_factor": 0.25, "stem": "standard"},
        "train": {"epochs": 24, "batch_size": 24, "log_every": 2, "monitor_every": 5},
        "optim": {"lr": 2e-3, "warmup_epochs": 1}},
}
DEMO_DATA = {2: (800, 0.05), 3: (320, 0.1)}  # phantoms, and the share of the training scans labeled for the probe


def paired_gain(pred_a, pred_b, seed: int = 0) -> tuple:
    """(gain, lo, hi) of test AUC, classifier a over b, bootstrapped over the test scans both predicted."""
    import csv

    import numpy as np

    from .metrics import paired_auc_gain_ci

    def read(path):
        with open(path, newline="") as f:
            return {r["path"]: (int(r["target"]), float(r["prob_diseased"])) for r in csv.DictReader(f)}

    a, b = read(pred_a), read(pred_b)
    keys = sorted(a.keys() & b.keys())
    assert all(a[k][0] == b[k][0] for k in keys)  # the same scans with the same labels
    y = np.array([a[k][0] for k in keys])
    return paired_auc_gain_ci(y, [a[k][1] for k in keys], [b[k][1] for k in keys], seed=seed)


def _patients(data, cfg):
    """labels.csv for its patient column, when positives=patient pairs two acquisitions of one patient (MICLe);
    the pretraining reads no disease label from it."""
    if cfg.method.positives != "patient":
        return None
    from .data.labels import read_labels_csv

    return read_labels_csv(data / "labels.csv", data, DISEASED.positive)


def demo(out, dims: int = 3, n: int | None = None, epochs: int | None = None, label_fraction: float | None = None,
         seed: int = 0, overwrite: bool = False, progress: bool = True, log=print,
         overrides: dict | None = None) -> dict:
    """overrides: {section: {key: value}} on top of DEMO_SETTINGS (`medcl demo --set`), to try another design."""
    t0 = time.perf_counter()
    cfg = apply_overrides(MedclConfig(), DEMO_SETTINGS[dims], "demo settings")
    cfg = apply_overrides(cfg, overrides or {}, "--set")
    cfg.train.seed = seed
    if epochs:
        cfg.train.epochs = epochs
    out = prepare_out_dir(out, None, overwrite=overwrite, marker="demo.json")
    n = n or DEMO_DATA[dims][0]
    label_fraction = label_fraction or DEMO_DATA[dims][1]
    size = cfg.data.size
    log(f"[1/6] generating {n} synthetic {dims}D phantoms in {out / 'data'}: half with lesions (the disease, a "
        "local finding), every scan with its own position, rotation, gain, contrast, bias field and noise (what "
        "differs between acquisitions, and what contrastive views teach the encoder to ignore)")
    data = make_phantoms(out / "data", n=n, dims=dims, size=size, seed=seed, nuisance=True)
    log("[2/6] contrastive pretraining (SimCLR) without labels")
    pretrain(data, out / "pretrain", cfg, progress=progress, log=log, labels=_patients(data, cfg))
    log(f"[3/6] linear probe with {label_fraction:.0%} of the training labels")
    common = dict(label_fraction=label_fraction, seed=seed, task=DISEASED, progress=progress, log=log)
    m = finetune(out / "pretrain", data, data / "labels.csv", out / "finetune", mode="probe", **common)
    log("[4/6] control: the same network with random weights and the same probe, on the same labeled scans")
    controls = {"random-init": finetune("none", data, data / "labels.csv", out / "control", mode="probe", cfg=cfg,
                                        **common)}
    log("[5/6] control: the same network trained end to end from random weights on the same labeled scans")
    controls["scratch"] = finetune("none", data, data / "labels.csv", out / "scratch", mode="finetune", cfg=cfg,
                                   **common)
    log("[6/6] embeddings for the TensorBoard projector")
    embed(out / "pretrain", data, out / "embed", labels=data / "labels.csv",
          classifier=out / "finetune", progress=progress, log=log)
    best = max(controls, key=lambda k: controls[k]["test"]["auc"])  # the stronger control on the test scans
    folder = {"random-init": "control", "scratch": "scratch"}
    gain, glo, ghi = paired_gain(out / "finetune" / "predictions.csv", out / folder[best] / "predictions.csv", seed)
    c, sc = controls["random-init"], controls["scratch"]
    summary = {"dims": dims, "n_scans": n, "test_auc": m["test"]["auc"], "test_auc_ci95": m["test"]["auc_ci95"],
               "control_test_auc": c["test"]["auc"], "control_test_auc_ci95": c["test"]["auc_ci95"],
               "scratch_test_auc": sc["test"]["auc"], "scratch_test_auc_ci95": sc["test"]["auc_ci95"],
               "best_control": best, "gain_over_control": gain, "gain_ci95": [glo, ghi],
               "test_accuracy": m["test"]["accuracy"], "n_labeled": m["n_labeled"],
               "settings_changed": overrides or {},
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "demo.json", summary)
    log("")
    log(f"demo finished in {summary['seconds']:.0f}s (healthy vs lesion phantoms, {m['n_labeled']} labeled "
        f"training scans, {m['test']['n']} test scans):")
    for name, r in [("pretrained encoder + linear probe", m), ("random-init encoder + the same probe", c),
                    ("the same network trained from scratch", sc)]:
        lo, hi = r["test"]["auc_ci95"]
        log(f"  {name + ':':<44}test AUC {r['test']['auc']:.3f} [95% CI {lo:.3f}-{hi:.3f}]")
    log(f"  what pretraining adds over the stronger control ({best}): {gain:+.3f} AUC [95% CI {glo:+.3f} to "
        f"{ghi:+.3f}, paired by test scan] (one labeled subset; `medcl evaluate` makes this comparison over seeds "
        "and label budgets)")
    log(f"look at it: tensorboard --logdir {out}")
    return summary
