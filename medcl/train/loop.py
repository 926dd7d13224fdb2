"""The one pretraining loop: a step is views -> method -> loss -> optimiser; everything else a step hands on (loss log,
monitors, checkpoints, the time budget) lives in medcl.train.hooks, the run folder in medcl.train.resume, the batches in
medcl.train.stream."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist, timebudget
from .. import tensorboard as tb
from ..config import MedclConfig, load_config, save_config, saved_run
from ..data.cache import build_cache, write_skipped
from ..data.preprocessing import Preprocessing
from ..encoders import build_encoder
from ..errors import CheckpointError, MedclError
from ..memory import fit_batch, measure_step
from ..methods import build_method, local_view_size
from ..progress import Progress
from ..runs import NEVER_TRAINED, never_trained
from ..runtime import pick_device, seed_everything
from ..timebudget import TimeBudget, parse_duration
from .hooks import CollapseMonitor, LossLog, Pace, end_epoch, save_checkpoint
from .optim import build_optimizer, fit_schedule, lr_lambda, speed_settings
from .resume import _quiet, load_init, set_rng_state, start
from .stream import BatchStream, _pair_arrays, check_patients, make_partner, neighbor_pairing, patients_of

BUDGET_SYNC = 5  # under torchrun, rank 0's time-budget plan reaches every rank at steps that are multiples of this
UNTIL_PLANNED = 10**9  # the epoch count of a time-budget run until its first plan


@dataclass
class Run:
    """What one pretraining run holds while it trains."""
    cfg: MedclConfig
    out: Path
    device: torch.device
    method: object
    model: object  # the method, or its DistributedDataParallel wrapper
    opt: object
    sched: object
    stream: BatchStream
    speed: dict
    labels: torch.Tensor | None
    steps_per_epoch: int
    total: int
    n_epochs: int
    schedule: tuple  # (warm-up steps, min_lr_ratio)
    budget: TimeBudget | None
    planned: int | None  # the step count a killed time-budget run had planned
    writer: object
    losses: LossLog
    probe: tuple | None
    extra: dict
    now_on: dict
    log: object
    progress: object
    global_step: int = 0

    @property
    def main(self) -> bool:
        return dist.is_main()

    def epochs_text(self):
        return self.n_epochs if self.n_epochs < UNTIL_PLANNED else "?"

    def planned_total(self):
        """The planned step count a checkpoint carries (a time-budget run), else None."""
        return self.total if self.budget is not None and self.budget.total is not None or self.planned else None

    def planned_steps_done(self) -> bool:
        """A time-budget run (or its resumption) stops at its planned step, not at an epoch count."""
        applied = self.budget is not None and self.n_epochs < UNTIL_PLANNED or self.planned  # the same on every rank
        return bool(applied) and self.global_step >= self.total

    def replan(self) -> None:
        """Apply the time budget's (new) step count: the schedule, the epochs, the saved config."""
        self.total = fit_schedule(self.sched, self.method, self.budget.total, self.schedule)
        self.n_epochs = self.cfg.train.epochs = self.budget.epochs
        if self.main:
            save_config(self.cfg, self.out / "config.yaml", trained_on=self.now_on)


def _budget_changed(budget, step: int, applied, device) -> bool:
    """Time the step; True when the plan in force should change. Under torchrun every rank takes rank 0's plan, at
    the same steps, so that all stop together (a rank stopping alone would leave the others in a collective)."""
    replanned = budget.step_done(step)
    if dist.world_size() == 1:
        return replanned
    if step % BUDGET_SYNC:
        return False
    total, fixed = dist.broadcast_ints([budget.total or 0, budget.fixed], device)
    budget.total, budget.fixed = (total or None), bool(fixed)
    return budget.total is not None and budget.total != applied


def _device_for_run(cfg) -> torch.device:
    """Join torchrun's process group first: rank 0 alone prepares the run folder, the other ranks wait for it."""
    device = pick_device(cfg.train.device)
    dist.init_from_env(device.type)
    if device.type == "cuda" and dist.world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _read_scans(source, cfg, out: Path, data, progress, log):
    """The decoded scans from the shared scan cache (each rank decodes its share of what it lacks); only with the cache
    off does a dataset too big for memory get a memmap file, one per rank (no shared writes)."""
    main = dist.is_main()
    if main:
        log(f"found {len(source.records)} scans in {data}" +
            (f" ({len(source.left_out)} more left out by --include/--exclude/--files)" if source.left_out else ""))
    cache_dir = out / "cache" if dist.world_size() == 1 else out / "cache" / f"rank{dist.rank()}"
    cache_dims = 3 if cfg.method.positives == "neighbors" else cfg.data.dims
    scans = build_cache(source, cache_dims, cfg.data.size, cfg.data.channels, cfg.data.intensity, cfg.data.strict,
                        cfg.data.max_bad_fraction, cache_dir, cfg.data.cache_max_gb, cfg.data.num_workers,
                        progress if main else False, skip_label_maps=cfg.data.skip_label_maps, log=log)
    if main:
        write_skipped(scans.skipped, out / "skipped.csv")
        if scans.skipped:
            log(f"skipped {len(scans.skipped)} unusable scans (listed in {out / 'skipped.csv'})")
    return scans, cache_dims


def _global_batch(cfg, n_items: int, n_scans: int, log) -> int:
    world = dist.world_size()
    global_batch = min(cfg.train.batch_size, n_items // world * world)
    if global_batch < 2 * world:
        raise MedclError(f"only {n_items} usable items: need at least {2 * world} for a contrastive batch.")
    global_batch -= global_batch % world
    if global_batch < cfg.train.batch_size and dist.is_main():
        log(f"note: batch size lowered to {global_batch} (only {n_scans} scans)")
    return global_batch


def _fit_in_memory(method, cfg, global_batch, n_local, local_size, device, now_on, out, log) -> int:
    """A step too big for memory is lowered (or refused) here, not killed by the OS; the config keeps the batch that
    fits, so a --resume continues with it."""
    item = (cfg.data.channels,) + (cfg.data.size,) * cfg.data.dims
    mem = measure_step(method, item, global_batch, amp=speed_settings(cfg, device)["amp"],
                       extra_views=n_local * (local_size / cfg.data.size) ** cfg.data.dims)
    fitted = fit_batch(mem, global_batch, device, limit_gb=cfg.train.memory_gb,
                       log=log if dist.is_main() else _quiet)
    if fitted != global_batch:
        cfg.train.batch_size = fitted
        if dist.is_main():
            save_config(cfg, out / "config.yaml", trained_on=now_on)
    return fitted


def _labels_for_steps(method, cfg, labels, pairs, scans):
    """Label ids per item for the methods that use them (SupCon; the pair loss reads each pair's similar flag)."""
    lab = None
    if method.needs_labels:
        if labels is None:
            raise MedclError(f"method {cfg.method.name} needs labels: pass --labels LABELS.csv (test rows are never "
                             f"used).")
        lab = torch.as_tensor(labels.train_label_ids([r.key for r in scans.records]), dtype=torch.long)
    if pairs is not None:
        lab = torch.tensor([s for _, _, s in pairs], dtype=torch.long)
    return lab


def _restore(run: Run, ckpt, resume: bool) -> tuple:
    """(start epoch, start step) from a checkpoint, with the model, optimiser, schedule and RNG state."""
    if ckpt is None:
        if resume:
            run.log("no checkpoint yet: starting from the beginning")
        return 0, 0
    try:
        run.method.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{run.out}/checkpoints/last.pt does not match this run's model "
                              f"({str(e)[:200]}).") from None
    start_epoch, start_step, run.global_step = ckpt["epoch"], ckpt["step"], ckpt["global_step"]
    set_rng_state(ckpt["rng"])
    _keep_precision(run, ckpt)
    if start_step >= run.steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0
    run.log(f"resuming at epoch {start_epoch + 1}, step {start_step} (global step {run.global_step})")
    return start_epoch, start_step


def _keep_precision(run: Run, ckpt) -> None:
    """A resumed run goes on in the precision it learned in, even where train.amp=auto now resolves otherwise (it
    became bf16 for 2D on CPUs with native bf16; a checkpoint from before that records no `amp` and ran in bf16
    only on a GPU or when asked)."""
    was = ckpt.get("amp", run.cfg.train.amp == "bf16" or (run.device.type == "cuda" and run.cfg.train.amp == "auto"))
    if was != run.speed["amp"]:
        run.log(f"resuming in {'bf16 autocast' if was else 'float32'}, the precision this run started in")
        run.speed["amp"] = was


def _plan(run: Run, ckpt, add_time: bool, t_start: float) -> None:
    """How long to train: the epochs; or the steps a killed time-budget run planned, on the same schedule; or as
    many as fit in train.time_budget (the first steps run inside the warm-up, whatever the total)."""
    run.planned = ckpt.get("planned_total") if ckpt is not None and not add_time else None
    if run.planned:
        run.total = fit_schedule(run.sched, run.method, run.planned, run.schedule)
        run.n_epochs = math.ceil(run.planned / run.steps_per_epoch)
    elif run.cfg.train.time_budget:
        run.budget = TimeBudget(parse_duration(run.cfg.train.time_budget), timebudget.now() if add_time else t_start,
                                run.steps_per_epoch, max_steps=run.cfg.train.max_steps)
        run.n_epochs = UNTIL_PLANNED


def _step(run: Run, v1, v2, idx, local) -> tuple:
    """One optimisation step; returns (the method's outputs, its extra scalars)."""
    if run.speed["channels_last"]:
        v1 = v1.contiguous(memory_format=torch.channels_last)
        v2 = v2.contiguous(memory_format=torch.channels_last)
        local = tuple(v.contiguous(memory_format=torch.channels_last) for v in local)
    y = None
    if run.labels is not None:  # pinned, so the upload does not wait for the device
        y = run.labels[torch.as_tensor(idx)]
        y = y.pin_memory().to(run.device, non_blocking=True) if run.device.type == "cuda" else y
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.speed["amp"]):
        res = run.model(v1, v2, y, local)
    run.opt.zero_grad(set_to_none=True)
    res["loss"].backward()
    run.opt.step()
    run.sched.step()
    run.global_step += 1
    return res, run.method.step_end(run.global_step / max(1, run.total))


def _follow_budget(run: Run) -> None:
    """Time the step against the time budget; apply a new plan, and say so when it is the first or the fixed one."""
    applied = run.total if run.n_epochs < UNTIL_PLANNED else None
    if run.budget is not None and _budget_changed(run.budget, run.global_step, applied, run.device):
        first_plan = run.n_epochs == UNTIL_PLANNED
        run.replan()
        if run.main and (first_plan or run.budget.fixed):
            run.log(run.budget.plan_text() + (" (fixed from here)" if run.budget.fixed else ""))


def _log_scalars(run: Run, extra_scalars: dict, images: int, seconds: float) -> None:
    scalars = {"loss": run.losses.last, "lr": run.opt.param_groups[0]["lr"],
               "images_per_s": images / max(seconds, 1e-9)}
    scalars.update(extra_scalars)
    if run.device.type == "cuda":
        scalars["gpu_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    tb.log_scalars(run.writer, scalars, run.global_step, "pretrain/")


def _must_stop(run: Run) -> bool:
    """max_steps reached, the planned steps done, or the time budget spent (the machine slowed down?)."""
    if run.cfg.train.max_steps and run.global_step >= run.cfg.train.max_steps or run.planned_steps_done():
        return True
    if run.budget is not None and run.budget.over_time():
        run.log(f"note: the time budget ran out at step {run.global_step} of {run.total} planned (the machine "
                f"slowed down?): stopping here")
        return True
    return False


def _epoch(run: Run, epoch: int, first: int, pace: Pace, monitor: CollapseMonitor) -> None:
    """One epoch from step `first`; every rank checks the stop conditions at the same steps."""
    cfg, main = run.cfg, run.main
    run.model.train()
    # bar on a terminal; elsewhere the epoch line is the progress report
    bar = Progress(run.steps_per_epoch, f"epoch {epoch + 1}/{run.epochs_text()}", run.progress if main else False,
                   initial=first, line_every=None)
    t_last, n_last = time.perf_counter(), 0
    for step, v1, v2, idx, local in run.stream.epoch(epoch, first):
        res, extra_scalars = _step(run, v1, v2, idx, local)
        n_last += len(v1) * dist.world_size()
        run.losses.push(run.global_step, epoch, step, res["loss"])
        run.losses.settle(keep_last=True)
        bar.set_postfix(loss=f"{run.losses.last:.4f}",
                        img_s=f"{n_last / max(time.perf_counter() - t_last, 1e-9):.0f}")
        bar.update()
        _follow_budget(run)
        pace.step(run)
        log_now = run.global_step % cfg.train.log_every == 0 or step == run.steps_per_epoch - 1
        save_now = bool(cfg.train.checkpoint_every) and run.global_step % cfg.train.checkpoint_every == 0
        if log_now or save_now:  # on every rank at the same steps, so ranks stop together on a NaN
            run.losses.settle()  # and no checkpoint holds weights that a non-finite loss has touched
        if main and log_now:
            _log_scalars(run, extra_scalars, n_last, time.perf_counter() - t_last)
            t_last, n_last = time.perf_counter(), 0
        if main:
            monitor(res, run.global_step, run.writer, run.log)
        if main and (run.global_step == 1 or step == 0 and epoch == cfg.train.epochs - 1):
            tb.log_view_pairs(run.writer, v1, v2, run.global_step)
        if main and save_now:
            save_checkpoint(run, epoch, step + 1)
        if _must_stop(run):
            break
    bar.close()


def _train(run: Run, start_epoch: int, start_step: int) -> None:
    pace = Pace(run.total - run.global_step)
    monitor = CollapseMonitor(run.cfg.train.monitor_every, run.steps_per_epoch)
    for epoch in range(start_epoch, run.n_epochs):
        if run.planned_steps_done():
            break
        _epoch(run, epoch, start_step if epoch == start_epoch else 0, pace, monitor)
        end_from = timebudget.now()
        run.losses.settle()
        if run.main:
            end_epoch(run, epoch, pace)
        if run.budget is not None:
            run.budget.epoch_end(timebudget.now() - end_from)
        if run.cfg.train.max_steps and run.global_step >= run.cfg.train.max_steps:
            break


def _log_plan(run: Run, n_scans: int, global_batch: int, n_local: int, local_size: int) -> None:
    cfg = run.cfg
    run.log(f"pretraining {cfg.method.name} / {cfg.encoder.name} ({cfg.data.dims}D, {cfg.data.size}px) on "
            f"{run.device}{' (bf16 autocast)' if run.speed['amp'] else ''}: {n_scans} scans, batch {global_batch}, "
            f"{run.steps_per_epoch} steps x "
            + (f"the epochs that fit in {cfg.train.time_budget}" if run.budget is not None
               else f"{run.n_epochs} epochs") + f", views={run.stream.backend}")
    run.log(f"method settings: {run.method.describe()}"
            + (f", {n_local} local crops of {local_size} px" if n_local else ""))
    run.log("views, and the engine each transform runs in:\n" + "\n".join(f"  {line}" for line in run.stream.report))
    tb.log_text(run.writer, "views/engines", "\n".join(f"- {line}" for line in run.stream.report))


def _build_method(cfg, device, init, now_on, pairs, out, log):
    """The encoder (from --init's weights, if any) inside its method; (method, local crops, their size)."""
    encoder = build_encoder(cfg)
    if init is not None:  # before the method copies the encoder into its momentum/teacher branch
        load_init(encoder, init, now_on, log if dist.is_main() else _quiet)
        if dist.is_main():
            save_config(cfg, out / "config.yaml", trained_on=now_on)
    method = build_method(cfg.method.name, encoder, cfg.method, image_size=cfg.data.size).to(device)
    n_local = method.cfg.local_crops
    local_size = local_view_size(cfg.method, cfg.data.size, encoder.spec) if n_local else 0
    if n_local and pairs is not None:
        raise MedclError("multi-crop (method.local_crops) does not combine with a pairs CSV: set method.local_crops=0.")
    return method, n_local, local_size


def _optimiser(cfg, method, device, speed, steps_per_epoch) -> tuple:
    """AdamW or LARS, and the warm-up + cosine schedule over the run's epochs: (opt, sched, total, schedule)."""
    opt = build_optimizer(cfg.optim, method, device, fused=speed["fused"])
    total = steps_per_epoch * cfg.train.epochs
    if method.uses_momentum:
        method.total_steps = total
    warm = max(1, int(cfg.optim.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warm, total, cfg.optim.min_lr_ratio))
    return opt, sched, total, (warm, cfg.optim.min_lr_ratio)


def _wrap(method, cfg, device, speed):
    """(model, method): channels-last, DistributedDataParallel under torchrun, torch.compile when asked."""
    if speed["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = speed["cudnn_benchmark"]  # shapes are fixed: every batch is full
    model = method
    if dist.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
        method.gather, method.rank = dist.gather_with_grad, dist.rank()
    if speed["compile"]:
        method.encoder = torch.compile(method.encoder)
    return model, method


def pretrain(data, out, cfg: MedclConfig | None = None, resume: bool = False, overwrite: bool = False,
             labels=None, probe_labels=None, epochs: int | None = None, pairs=None, progress: bool = True,
             log=print, allow_different_data: bool = False, add_time: bool = False,
             started_at: float | None = None, typed: dict | None = None) -> Path:
    """Pretrain an encoder on the scans in `data` (folder or MedMNIST .npz). Returns the run folder.

    Writes config.yaml, checkpoints/last.pt (every epoch, atomically), encoder.pt, skipped.csv and TensorBoard events.
    `labels`: a LabelsTable used by SupCon and patient positives; `probe_labels`: a LabelsTable for the online kNN
    monitor. With `resume`, the run's saved config is used; a `cfg` given too may differ from it only in how the run
    runs (epochs, device, logging: config.RESUME_MAY_CHANGE), and DATA must be the scans it was trained on unless
    `allow_different_data`. A finished run is reported complete and left as it is.
    `pairs`: [(key_a, key_b, similar)] from a pairs CSV, for method.name=pair.
    `cfg.train.time_budget` (e.g. "20m"): as many steps as fit, the schedule fitted to them (medcl.timebudget); a
    resumed run finishes its planned steps, or with `add_time` trains that much longer.
    `cfg.encoder.init`: weights to start from (medcl.weights); they decide the architecture, except that a key in
    `typed` ({section: {key: value}}, what the user set by hand) that contradicts them is an error.
    """
    # a time budget counts from the command's start (started_at) or from here: setup and decoding are part of it
    t_start = started_at if started_at is not None else timebudget.now()
    out = Path(out)
    if resume and never_trained(out):
        log(NEVER_TRAINED.format(out=out))
        resume = False
    saved = out / "config.yaml"
    saved_cfg = load_config(base=saved_run(saved)[0]) if resume and saved.is_file() else None
    cfg = cfg or saved_cfg or MedclConfig()
    if epochs is not None:
        cfg.train.epochs = epochs
    device = _device_for_run(cfg)
    main = dist.is_main()
    begin = start(data, out, cfg, saved_cfg, resume, overwrite, add_time, allow_different_data, typed, log)
    if begin.complete:
        dist.cleanup()
        return out
    ckpt, now_on = begin.ckpt, begin.now_on
    seed_everything(cfg.train.seed)
    scans, cache_dims = _read_scans(begin.source, cfg, out, data, progress, log)
    pair_arrays = _pair_arrays(pairs, scans, cfg, data)
    global_batch = _global_batch(cfg, len(pairs) if pairs is not None else len(scans), len(scans), log)
    method, n_local, local_size = _build_method(cfg, device, begin.init, now_on, pairs, out, log)
    if ckpt is None and dist.world_size() == 1:
        global_batch = _fit_in_memory(method, cfg, global_batch, n_local, local_size, device, now_on, out, log)
    steps_per_epoch = (len(pairs) if pairs is not None else len(scans)) // global_batch
    speed = speed_settings(cfg, device)
    partner = None
    if cfg.method.positives == "patient":
        patients = patients_of(scans.records, labels)
        check_patients(patients, log)
        partner = make_partner("patient", patients, cfg.train.seed)
    model, method = _wrap(method, cfg, device, speed)
    opt, sched, total, schedule = _optimiser(cfg, method, device, speed, steps_per_epoch)
    pairing = neighbor_pairing(cfg) if cfg.method.positives == "neighbors" else None
    run = Run(cfg, out, device, method, model, opt, sched, None, speed,
              _labels_for_steps(method, cfg, labels, pairs, scans), steps_per_epoch, total, cfg.train.epochs,
              schedule, None, None, None, None,
              probe_labels.probe_set(scans) if probe_labels is not None and cache_dims == cfg.data.dims else None,
              {"data": Preprocessing.of(cfg.data).to_dict(), "method": cfg.method.name, "trained_on": now_on},
              now_on, log, progress)
    start_epoch, start_step = _restore(run, ckpt, resume)
    _plan(run, ckpt, add_time, t_start)
    run.stream = BatchStream(scans, cfg, device, global_batch, steps_per_epoch, partner, pairing=pairing,
                             pairs=pair_arrays, local_crops=n_local, local_size=local_size)
    run.writer = tb.open_writer(out / "tb") if main else None
    run.losses = LossLog(out, resume, run.global_step, main, amp=run.speed["amp"])
    if main:
        (out / "checkpoints").mkdir(exist_ok=True)
        _log_plan(run, len(scans), global_batch, n_local, local_size)
    try:
        _train(run, start_epoch, start_step)
    finally:
        if run.writer is not None:
            run.writer.close()
        run.losses.close()
    dist.barrier()
    if main:
        log(f"wrote {out / 'encoder.pt'}, {out / 'checkpoints' / 'last.pt'}, {out / 'config.yaml'}, TensorBoard "
            f"events in {out / 'tb'}")
        log(f"inspect: tensorboard --logdir {out}")
    dist.cleanup()
    return out
