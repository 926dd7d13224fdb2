"""Resume as users type it, never on other data; a step that would not fit in memory is lowered or refused."""
import hashlib

import pytest
import torch
import yaml

from conftest import medcl
from medcl.errors import MedclError

TINY = ["--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125", "--set", "data.size=16",
        "--batch-size", "8"]


def digest(*paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    from medcl.data.synthetic import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("other"), n=16, dims=2, size=32, seed=9)


@pytest.mark.slow
def test_resume_on_other_data_is_refused_unless_asked(tmp_path, phantoms2d, other_folder):
    run = tmp_path / "run"
    medcl("pretrain", phantoms2d, "--out", run, "--epochs", 1, "--quiet", *TINY)
    saved = yaml.safe_load((run / "config.yaml").read_text())["trained_on"]
    assert saved["n_scans"] == 48 and len(saved["file_list_sha256"]) == 16
    assert torch.load(run / "encoder.pt", weights_only=True)["extra"]["trained_on"] == saved
    before = digest(run / "encoder.pt", run / "skipped.csv", run / "config.yaml")
    r = medcl("pretrain", other_folder, "--out", run, "--resume", "--epochs", 2, "--quiet", check=False)
    assert r.returncode == 2 and "--allow-different-data" in r.stderr and "48 scans" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert digest(run / "encoder.pt", run / "skipped.csv", run / "config.yaml") == before  # nothing overwritten
    r = medcl("pretrain", other_folder, "--out", run, "--resume", "--epochs", 2, "--allow-different-data", "--quiet")
    assert "continuing on different data" in r.stdout
    now = yaml.safe_load((run / "config.yaml").read_text())["trained_on"]
    assert now["n_scans"] == 16 and now["earlier"][0]["n_scans"] == 48


@pytest.mark.slow
def test_resume_accepts_the_original_command_and_names_a_changed_flag(tmp_path, phantoms2d):
    run = tmp_path / "run"
    original = ["pretrain", phantoms2d, "--out", run, "--dims", 2, "--epochs", 1, "--quiet", *TINY]
    medcl(*original)
    outputs = [run / "encoder.pt", run / "checkpoints" / "last.pt", run / "loss.csv", run / "config.yaml"]
    before = digest(*outputs)
    r = medcl(*original, "--resume")  # the original command plus --resume: the run is already complete
    assert "is complete" in r.stdout and "--epochs" in r.stdout
    assert digest(*outputs) == before  # a finished run is not re-run or rewritten
    r = medcl(*original[:-len(TINY)], "--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125",
              "--set", "data.size=16", "--batch-size", 4, "--resume", check=False)
    assert r.returncode == 2 and "train.batch_size" in r.stderr and "8" in r.stderr and "4" in r.stderr
    r = medcl("pretrain", phantoms2d, "--out", run, "--epochs", 2, "--resume", "--quiet")  # --epochs may change
    assert "resuming at epoch 2" in r.stdout
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 12


@pytest.mark.slow
def test_resume_of_a_run_without_checkpoint_says_so(tmp_path, phantoms2d):
    run = tmp_path / "run"
    medcl("pretrain", phantoms2d, "--out", run, "--epochs", 1, "--quiet", *TINY)
    (run / "checkpoints" / "last.pt").unlink()  # as if killed before its first checkpoint
    r = medcl("pretrain", phantoms2d, "--out", run, "--resume", "--quiet")
    assert "has no checkpoint" in r.stdout and "starting from the beginning" in r.stdout


def test_memory_estimate_scales_with_the_batch_and_matches_a_real_step():
    from medcl.config import MedclConfig, apply_overrides
    from medcl.encoders import build_encoder
    from medcl.memory import measure_step
    from medcl.methods import build_method

    cfg = apply_overrides(MedclConfig(), {"data": {"dims": 3, "size": 16}, "encoder": {"name": "resnet10",
                                                                                        "widen_factor": 0.25}})
    method = build_method("simclr", build_encoder(cfg), cfg.method)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    mem = measure_step(method, (1, 16, 16, 16), 8)
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())  # the dry step left no trace
    assert mem.at(16) - mem.at(8) == pytest.approx(8 * mem.per_item)
    # a real step at batch 96, in a fresh process (this one's peak memory already holds earlier tests' larger steps):
    # its peak growth vs the estimate
    import subprocess
    import sys

    big = 96
    code = ("import resource, torch\n"
            "from medcl.config import MedclConfig, apply_overrides\n"
            "from medcl.encoders import build_encoder\n"
            "from medcl.methods import build_method\n"
            "cfg = apply_overrides(MedclConfig(), {'data': {'dims': 3, 'size': 16}, 'encoder': {'name': 'resnet10', "
            "'widen_factor': 0.25}})\n"
            "m = build_method('simclr', build_encoder(cfg), cfg.method)\n"
            "v = torch.rand(%d, 1, 16, 16, 16)\n"
            "def kb(field):\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"  # resets the peak (VmHWM): import-time peaks drop out
            "base = kb('VmRSS:')\n"
            "m(v, v.flip(0))['loss'].backward()\n"
            "print(kb('VmHWM:') - base)\n" % big)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    grown = int(res.stdout.split()[-1])
    activations = mem.at(big) - mem.fixed
    assert 0.4 * activations < grown < 2.0 * activations, (grown / 2**20, activations / 2**20)


def test_fit_batch_lowers_or_refuses():
    from medcl.memory import StepMemory, fit_batch

    mem = StepMemory(fixed=0.1 * 2**30, per_item=0.01 * 2**30)  # 0.1 GB + 10 MB per item
    said = []
    assert fit_batch(mem, 64, torch.device("cpu"), limit_gb=2.0, log=said.append) == 64 and not said
    assert fit_batch(mem, 256, torch.device("cpu"), limit_gb=1.0, log=said.append) == 64  # 90 fit: power of two
    assert "batch 256" in said[0] and "using batch 64" in said[0] and "--batch-size" in said[0]
    with pytest.raises(MedclError, match="even at batch 2.*encoder.widen_factor"):
        fit_batch(mem, 64, torch.device("cpu"), limit_gb=0.1)


@pytest.mark.slow
def test_pretrain_lowers_a_batch_that_does_not_fit_and_refuses_one_that_never_can(tmp_path, phantoms3d):
    args = ["pretrain", phantoms3d, "--dims", 3, "--epochs", 1, "--quiet", "--set", "encoder.name=resnet10",
            "--set", "encoder.widen_factor=0.25", "--set", "data.size=16", "--set", "encoder.stem=small"]
    r = medcl(*args, "--out", tmp_path / "low", "--batch-size", 16, "--set", "train.memory_gb=0.06")
    assert "note: batch 16 needs about" in r.stdout and "using batch" in r.stdout
    saved = yaml.safe_load((tmp_path / "low" / "config.yaml").read_text())
    assert 2 <= saved["train"]["batch_size"] < 16  # and a --resume continues with the batch that fits
    r = medcl(*args, "--out", tmp_path / "never", "--batch-size", 16, "--set", "train.memory_gb=0.02", check=False)
    assert r.returncode == 2 and "even at batch 2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never" / "encoder.pt").exists()


@pytest.mark.slow
def test_pretrain_selection_is_saved_and_kept_on_resume(tmp_path, phantoms2d):
    run = tmp_path / "run"
    r = medcl("pretrain", phantoms2d, "--out", run, "--epochs", 1, "--exclude", "*_1.png", "--quiet", *TINY)
    assert "found 24 scans" in r.stdout and "24 more left out" in r.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["exclude"] == "*_1.png"
    r = medcl("pretrain", phantoms2d, "--out", run, "--epochs", 2, "--resume", "--quiet")  # same 24 scans: accepted
    assert "resuming at epoch 2" in r.stdout
