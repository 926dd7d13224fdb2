"""`medcl pretrain --time 20m`: as many steps as fit in the asked time, with the schedule fitted to exactly them.

The rate is measured, not guessed: the first steps run inside the warm-up (whose learning rate does not depend on
the total), then the step count is set from their pace, and set again from the pace since the last plan every 5% of
the budget until 60% of it has passed, with what epoch ends cost (checkpoint, export, monitors) planned for apart.
After that the plan is fixed, so the cosine schedule ends exactly at the last step. Torch-free: the planning is plain
arithmetic on a clock that tests replace.
"""
from __future__ import annotations

import math
import re
import time

UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
clock = time.perf_counter  # tests replace it with a fake clock


def now() -> float:
    return clock()


REPLAN_SHARE = 0.6  # the plan is made again from the recent pace until this share of the budget has passed,
REPLAN_EVERY = 0.05  # each time this share of it has passed
CALIBRATION_STEPS = (3, 10)  # steps timed (after the first) before the first plan: at least, at most


def parse_duration(text) -> float:
    """'20m', '90s', '1.5h', '1h30m' or a number of seconds -> seconds. Raises ValueError with the accepted forms."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)", s)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)", "", s).strip():
            raise ValueError(f"time '{text}': use a duration such as 20m, 90s, 1.5h or 1h30m")
        seconds = sum(float(v) * UNITS[u] for v, u in parts)
    if seconds <= 0:
        raise ValueError(f"time '{text}': must be more than zero, e.g. 20m")
    return seconds


class TimeBudget:
    """Plans the total step count of a run that must end `seconds` after `start` (both on `clock`)."""

    def __init__(self, seconds: float, start: float, steps_per_epoch: int, max_steps: int = 0, clock=None):
        self.seconds, self.start, self.steps_per_epoch = float(seconds), float(start), steps_per_epoch
        self.clock, self.max_steps = clock or now, max_steps
        self.total = None  # planned total steps (global, counting the steps of earlier invocations)
        self.fixed, self.planned_at = False, None
        self.timed_from = None  # (clock, steps) when the timed stretch began
        self.end_seconds, self.ends = 0.0, 0  # time spent in epoch ends since then, and how many

    def step_done(self, steps: int) -> bool:
        """Call after every step with the run's global step; True when the plan was (re)made. The first plan comes
        after at least CALIBRATION_STEPS[0] timed steps, and at most [1] or 1% of the budget, whichever is first;
        then it is made again from the pace since the last plan every REPLAN_EVERY of the budget, until
        REPLAN_SHARE of it has passed."""
        now = self.clock()
        if self.timed_from is None:
            self.timed_from = (now, steps)  # the first step pays for warm-up: time the ones after it
            return False
        n = steps - self.timed_from[1]
        dt = now - self.timed_from[0] - self.end_seconds  # the steps' own time: epoch ends are counted apart
        lo, hi = CALIBRATION_STEPS
        if self.total is None:
            if n >= lo and (n >= hi or dt >= 0.01 * self.seconds):
                self._plan(steps, dt / n)
                return True
            return False
        if self.fixed or now - self.planned_at < REPLAN_EVERY * self.seconds:
            return False
        if now - self.start > REPLAN_SHARE * self.seconds:
            self.fixed = True  # from here the schedule stays as it is, so that it ends exactly at the last step
        # the pace since the last plan: the first steps are often slower (caches, allocator) than the rest
        t0, s0, e0 = self.window
        recent = (now - t0 - (self.end_seconds - e0)) / (steps - s0) if steps - s0 >= CALIBRATION_STEPS[0] else None
        self._plan(steps, recent or dt / n)
        return True

    def epoch_end(self, seconds: float) -> None:
        """What an epoch end cost (checkpoint, export, monitors): future ones, and the final one after the last
        step, are planned for."""
        self.end_seconds += seconds
        self.ends += 1

    def _plan(self, steps: int, per_step: float) -> None:
        left = self.seconds - (self.clock() - self.start)
        per_end = self.end_seconds / self.ends if self.ends else 0.0
        # k more steps cost k * per_step, plus an epoch end every steps_per_epoch of them and one after the last
        k = math.floor((left - per_end) / max(per_step + per_end / self.steps_per_epoch, 1e-9))
        total = steps + max(0, k)
        if self.max_steps:
            total = min(total, self.max_steps)
        self.total = max(total, steps)
        self.per_step, self.per_end, self.planned_at = per_step, per_end, self.clock()
        self.window = (self.planned_at, steps, self.end_seconds)

    def plan_text(self) -> str:
        return (f"time budget {self.seconds / 60:.1f} min: {self.per_step:.3g} s per step measured"
                + (f" and {self.per_end:.3g} s per epoch end" if self.per_end else "") + ", so "
                f"{self.total} steps in all ({self.total / self.steps_per_epoch:.1f} epochs); the learning-rate "
                f"schedule ends at step {self.total}")

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.steps_per_epoch) if self.total else 0

    def over_time(self) -> bool:
        """A safety net: stop if the plan was wrong by more than 8% (a slower machine mid-run)."""
        return self.clock() - self.start > 1.08 * self.seconds
