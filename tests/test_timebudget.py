"""`--time`: the step count follows the measured pace and the schedule spans exactly the planned steps (fake clock)."""
import math

import pytest

from medcl import timebudget
from medcl.timebudget import TimeBudget, parse_duration


class FakeClock:
    """Seconds that pass only when the test says so: `per_read` seconds each time the clock is read."""

    def __init__(self, per_read=0.0):
        self.t, self.per_read = 0.0, per_read

    def __call__(self):
        self.t += self.per_read
        return self.t


def test_durations_parse_and_bad_ones_say_what_is_accepted():
    assert parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("45s") == 45
    for bad in ("soon", "20 minutes please", "0m", "-5"):
        with pytest.raises(ValueError, match="20m"):
            parse_duration(bad)


def test_the_planned_steps_follow_the_measured_rate():
    clock = FakeClock()
    budget = TimeBudget(100.0, start=0.0, steps_per_epoch=7, clock=clock)
    clock.t = 10.0  # setup and decoding took 10 s of the 100
    for step in range(1, 5):
        assert not budget.step_done(step) or step == 4
        clock.t += 0.5  # 0.5 s per step
    assert budget.total is not None
    # planned at step 4 with 0.5 s per step measured and 100 - 11.5 s left: 4 + floor(88.5 / 0.5) = 181
    assert budget.total == 4 + math.floor((100 - 11.5) / 0.5) and budget.epochs == math.ceil(budget.total / 7)
    twice = TimeBudget(100.0, start=0.0, steps_per_epoch=7, clock=FakeClock())
    twice.clock.t = 10.0
    for step in range(1, 5):
        twice.step_done(step)
        twice.clock.t += 1.0  # twice as slow: about half the steps
    assert abs(twice.total - 4 - (budget.total - 4) / 2) <= 2


def test_a_slower_pace_later_is_replanned_then_the_plan_is_fixed():
    clock = FakeClock()
    budget = TimeBudget(100.0, start=0.0, steps_per_epoch=1000, clock=clock)
    step = 0
    while budget.total is None:
        step += 1
        budget.step_done(step)
        clock.t += 0.1
    first = budget.total
    while not budget.fixed:
        step += 1
        budget.step_done(step)
        clock.t += 0.3  # the machine got slower (or epoch ends cost more than the first steps showed)
    assert budget.total < first
    fixed = budget.total
    while clock.t < 200:
        step += 1
        assert not budget.step_done(step)  # fixed: the schedule keeps its end
        clock.t += 0.3
    assert budget.total == fixed


@pytest.mark.slow
def test_pretrain_with_a_time_budget_runs_exactly_the_planned_steps(tmp_path, phantoms2d, monkeypatch):
    """A fake clock that advances a fixed amount per read: the run plans from it, trains exactly that many steps,
    and its learning rate reaches the schedule's end at the last step."""
    import torch
    import yaml

    from conftest import medcl

    monkeypatch.setattr(timebudget, "clock", FakeClock(per_read=0.05))
    run = tmp_path / "run"
    r = medcl("--quiet", "pretrain", phantoms2d, "--out", run, "--time", "4s", "--set", "encoder.name=resnet10",
              "--set", "encoder.widen_factor=0.125", "--set", "data.size=16", "--batch-size", 8,
              "--set", "train.log_every=1")
    plan = next(ln for ln in r.stdout.splitlines() if ln.startswith("time budget"))
    planned = int(plan.split(" steps in all")[0].rsplit(" ", 1)[1])
    fixed = [ln for ln in r.stdout.splitlines() if "(fixed from here)" in ln]
    if fixed:
        planned = int(fixed[-1].split(" steps in all")[0].rsplit(" ", 1)[1])
    steps = [int(ln.split(",")[0]) for ln in (run / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, planned + 1)) and planned > 6
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["planned_total"] == planned and ck["global_step"] == planned
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == math.ceil(planned / 6) and cfg["train"]["time_budget"] == "4s"
    lr0, ratio = cfg["optim"]["lr"], cfg["optim"]["min_lr_ratio"]
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr0 * ratio, rel=1e-3, abs=1e-9)
    # the finished run is complete; --resume --time adds time (new steps beyond the plan)
    r = medcl("--quiet", "pretrain", phantoms2d, "--out", run, "--resume")
    assert "is complete" in r.stdout
    r = medcl("--quiet", "pretrain", phantoms2d, "--out", run, "--resume", "--time", "2s")
    more = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert more["global_step"] > planned and more["planned_total"] == more["global_step"]


def test_time_and_epochs_together_are_refused_before_torch(tmp_path, phantoms2d):
    import subprocess
    import sys

    code = ("import sys; from medcl.cli import main; rc = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(rc)")
    for extra, words in ((["--time", "5m", "--epochs", "3"], "pass one of them"), (["--time", "soon"], "20m")):
        r = subprocess.run([sys.executable, "-c", code, "pretrain", str(phantoms2d), "--out", str(tmp_path / "o"),
                            *extra], capture_output=True, text=True)
        assert r.returncode == 2 and words in r.stderr and "torch not imported" in r.stdout, r.stderr


@pytest.mark.slow
def test_a_time_budget_under_torchrun_stops_every_rank_at_rank_0s_plan(tmp_path, phantoms2d):
    """Each rank measures its own pace; the plan in force is rank 0's, so both ranks stop at the same step."""
    import subprocess
    import sys

    import torch

    from test_dist import _free_port

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "medcl", "pretrain", str(phantoms2d), "--out", str(out), "--time", "25s", "--batch-size", "16",
           "--set", "encoder.name=resnet10", "--set", "encoder.widen_factor=0.125", "--set", "data.size=16",
           "--set", "train.log_every=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    steps = [int(x.split(",")[0]) for x in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, ck["planned_total"] + 1)) and ck["global_step"] == ck["planned_total"]
