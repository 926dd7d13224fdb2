"""What a pretraining step hands on besides its gradient: the loss log, the collapse monitor, the time estimate, and
the checkpoints (with the exported encoder and the online kNN monitor at each epoch's end)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import dist
from .. import tensorboard as tb
from ..encoders import atomic_save, export_encoder
from ..errors import TrainingDiverged
from ..monitors import collapse_metrics, is_collapsed, knn_probe
from ..progress import duration, eta_text
from ..runtime import encode
from .resume import checkpoint_state


def _to_host_async(t: torch.Tensor):
    """(host tensor, event): a copy of a device scalar queued on the current stream; the event says when it landed.
    A plain .item() later would wait for everything queued after the value too."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


class LossLog:
    """loss.csv, one line per step. The loss of a step is read on the host a step late: reading it at once would make
    the host wait for the device every step and leave a GPU idle while the next step is launched. The logged loss is
    the mean over ranks: a NaN on any rank reaches all, so all stop at the same step. On resume, the lines after the
    checkpoint (lost with the killed process) are dropped."""

    def __init__(self, out: Path, resume: bool, global_step: int, main: bool, amp: bool = False):
        self.out, self.pending, self.last, self.file, self.amp = out, [], float("nan"), None, amp
        if main:
            lp = out / "loss.csv"
            kept = []
            if resume and lp.is_file():
                kept = [ln for ln in lp.read_text().splitlines()[1:] if ln and int(ln.split(",")[0]) <= global_step]
            lp.write_text("step,epoch,loss\n" + "".join(ln + "\n" for ln in kept))
            self.file = open(lp, "a")

    def push(self, global_step: int, epoch: int, step: int, loss: torch.Tensor) -> None:
        self.pending.append((global_step, epoch, step) + _to_host_async(dist.mean_over_ranks(loss.detach())))

    def settle(self, keep_last: bool = False) -> float:
        """Reads queued losses (a host sync), appends them to loss.csv and stops on a non-finite one. A NaN step is
        caught here, at most one step late, and always before the next checkpoint is written."""
        while len(self.pending) > (1 if keep_last else 0):
            g, ep, st, t, copied = self.pending.pop(0)
            if copied is not None:
                copied.synchronize()  # waits for that step only, not for the steps queued after it
            value = t.item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} at epoch {ep + 1}, step {st}: stopped; the last good checkpoint is kept in "
                    f"{self.out / 'checkpoints' / 'last.pt'}. Lower optim.lr or raise method.temperature"
                    + (", or train in float32 (--set train.amp=off; bf16 diverged in 3D on a CPU)" if self.amp else "")
                    + ", then start again (--overwrite, or another --out): a resume keeps the run's settings.")
            self.last = value
            if self.file is not None:
                self.file.write(f"{g},{ep + 1},{value:.8g}\n")
                self.file.flush()
        return self.last

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class CollapseMonitor:
    """Collapse metrics to TensorBoard every train.monitor_every steps, and one warning when they say collapse."""

    def __init__(self, every: int, steps_per_epoch: int):
        self.every, self.steps_per_epoch, self.warned = every, steps_per_epoch, False

    def __call__(self, res: dict, global_step: int, writer, log) -> None:
        if global_step % self.every and global_step != 1:
            return
        z2 = res.get("z2")
        m = collapse_metrics(res["z"].detach(), None if z2 is None else z2.detach())
        tb.log_scalars(writer, m, global_step, "monitor/")
        reason = is_collapsed(m, res["z"].shape[1])
        if reason and global_step > self.steps_per_epoch and not self.warned:
            self.warned = True
            msg = f"WARNING: representation collapse suspected at step {global_step}: {reason}."
            log(msg)
            tb.log_text(writer, "monitor/warning", msg, global_step)


class Pace:
    """The time estimate, within the first ~5% of the steps (at least steps 2-3 timed, at most 2-10), and each
    epoch's ETA. The first step pays for warm-up: the ones after it are timed."""

    def __init__(self, steps_left: int):
        self.start, self.steps, self.timed_from = time.perf_counter(), 0, None
        self.estimate_after = min(steps_left, int(np.clip(round(0.05 * steps_left), 3, 10)))

    def step(self, run) -> None:
        self.steps += 1
        if self.steps == 1:
            self.timed_from = time.perf_counter()
        elif self.steps == self.estimate_after and run.main and run.budget is None:
            per_step = (time.perf_counter() - self.timed_from) / (self.steps - 1)
            run.log(f"estimated time: about {duration(per_step * (run.total - run.global_step + self.steps))} in "
                    f"all, {duration(per_step * run.steps_per_epoch)} per epoch (timed over steps 2-{self.steps})")

    def eta(self, run) -> str:
        return eta_text(self.steps, run.total - run.global_step + self.steps, time.perf_counter() - self.start)


def save_checkpoint(run, epoch: int, step: int, epoch_complete: bool = False) -> None:
    atomic_save(checkpoint_state(run.method, run.opt, run.sched, epoch, step, run.global_step, run.cfg,
                                 epoch_complete=epoch_complete, planned_total=run.planned_total(),
                                 amp=run.speed["amp"]),
                run.out / "checkpoints" / "last.pt")


def end_epoch(run, epoch: int, pace: Pace) -> None:
    """Rank 0 at each epoch's end: the checkpoint, encoder.pt, the online kNN monitor and the epoch's line."""
    save_checkpoint(run, epoch, run.steps_per_epoch, epoch_complete=True)
    encoder = run.method.encoder if not run.speed["compile"] else run.method.encoder._orig_mod
    export_encoder(encoder, run.out / "encoder.pt", run.extra)
    if run.probe is not None:
        feats = encode(run.method.encoder, run.probe[0], run.device, amp=run.speed["amp"])
        k = knn_probe(feats, run.probe[1], seed=run.cfg.train.seed)
        tb.log_scalars(run.writer, k, run.global_step, "monitor/")
        if k:
            run.log(f"epoch {epoch + 1}: online kNN on {len(run.probe[1])} probe scans: " +
                    ", ".join(f"{a}={b:.3f}" for a, b in k.items()))
    run.log(f"epoch {epoch + 1}/{run.epochs_text()}: loss {run.losses.last:.4f}, {pace.eta(run)}")
    run.writer.flush()
