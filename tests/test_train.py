"""The pieces of medcl/train called directly (the end-to-end runs are in test_reliability, test_timebudget and
test_methods): the loss log across a resume and a NaN, the collapse warning, the learning-rate schedule, and when a
run counts as finished."""
import pytest
import torch

from medcl.errors import TrainingDiverged
from medcl.train.hooks import CollapseMonitor, LossLog, Pace
from medcl.train.optim import lr_lambda
from medcl.train.resume import trained_all_epochs


def test_the_loss_log_keeps_the_steps_up_to_the_checkpoint_on_resume_and_stops_on_a_nan(tmp_path):
    log = LossLog(tmp_path, resume=False, global_step=0, main=True)
    for g in range(1, 6):
        log.push(g, 0, g - 1, torch.tensor(1.0 / g))
    assert log.settle(keep_last=True) == pytest.approx(0.25)  # the last step's loss is read a step late
    assert log.settle() == pytest.approx(0.2)
    log.close()
    # a process killed after step 5 had checkpointed at step 3: steps 4-5 are dropped, not logged twice
    resumed = LossLog(tmp_path, resume=True, global_step=3, main=True, amp=True)
    resumed.push(4, 0, 3, torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match="last.pt.*train.amp=off"):
        resumed.settle()
    resumed.close()
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


class Recorder:
    """Stands in for a SummaryWriter: what the monitor logs, as (tag, step)."""

    def __init__(self):
        self.logged = []

    def add_scalar(self, tag, value, step):
        self.logged.append((tag, step))

    def add_text(self, tag, text, step):
        self.logged.append((tag, step))


def test_the_collapse_warning_comes_once_and_not_in_the_first_epoch():
    said, writer, collapsed = [], Recorder(), {"z": torch.ones(16, 8) + 1e-6 * torch.randn(16, 8)}
    monitor = CollapseMonitor(every=2, steps_per_epoch=4)
    for step in range(1, 11):
        monitor(collapsed, step, writer, said.append)
    assert len(said) == 1 and "step 6" in said[0]  # the first epoch may look collapsed; then one warning
    assert sorted({s for tag, s in writer.logged if tag == "monitor/rankme"}) == [1, 2, 4, 6, 8, 10]
    assert ("monitor/warning", 6) in writer.logged
    healthy = CollapseMonitor(every=1, steps_per_epoch=1)
    healthy({"z": torch.randn(64, 8)}, 5, Recorder(), said.append)
    assert len(said) == 1


def test_the_schedule_warms_up_then_ends_at_its_floor_exactly_at_the_last_step():
    f = lr_lambda(warmup_steps=10, total_steps=100, min_ratio=0.1)
    assert [round(f(s), 6) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # never below the floor
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_a_run_is_finished_only_when_its_last_epoch_completed():
    assert not trained_all_epochs(None, 3)
    assert not trained_all_epochs({"epoch": 2, "epoch_complete": False}, 3)  # killed inside the last epoch
    assert not trained_all_epochs({"epoch": 1, "epoch_complete": True}, 3)
    assert trained_all_epochs({"epoch": 2, "epoch_complete": True}, 3)
    assert trained_all_epochs({"epoch": 2, "epoch_complete": True}, 2)  # --epochs lowered after the run


def test_the_time_estimate_comes_within_the_first_steps():
    assert [Pace(n).estimate_after for n in (2, 20, 100, 1000, 10 ** 6)] == [2, 3, 5, 10, 10]
