"""The one pretraining loop: device/AMP, optimizer and schedule, checkpoint/resume, monitors and logging."""
from __future__ import annotations

import contextlib
import json
import math
import queue
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import dist
from .config import MedclConfig, load_config, resume_differences, save_config, saved_run
from .data.cache import ScanSet, build_cache, write_skipped
from .data.discover import open_source, selection_of, trained_on
from .data.preprocessing import Preprocessing
from .encoders import atomic_save, build_encoder, export_encoder, safe_load
from .errors import CheckpointError, MedclError, TrainingDiverged
from .memory import fit_batch, measure_step
from .methods import build_method, local_view_size
from .monitors import collapse_metrics, is_collapsed, knn_probe
from .progress import Progress, duration, eta_text
from . import timebudget
from .runs import NEVER_TRAINED, never_trained, prepare_out_dir
from .timebudget import TimeBudget, parse_duration
from .runtime import encode, pick_device, seed_everything  # noqa: F401 (also medcl.train.encode, as before)
from .views import BatchedViews, TwoViewDataset, _seed, engine_report, monai_transform, resolve_backend
from .weights import apply_architecture, load_into, read_weights
from . import tensorboard as tb


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017); biases and norms skip adaptation."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.02):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if g["lars"] and p.ndim > 1:
                    pn, un = torch.norm(p), torch.norm(dp)
                    trust = torch.where((pn > 0) & (un > 0), g["eta"] * pn / un, torch.ones_like(pn))
                    dp = dp.mul(trust)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(dp)
                p.add_(buf, alpha=-g["lr"])


def speed_settings(cfg: MedclConfig, device: torch.device) -> dict:
    """What the speed switches of `cfg.train` mean on `device`: the one place the training loop and the throughput
    benchmark take them from."""
    t, cuda = cfg.train, device.type == "cuda"
    return {"amp": t.amp == "bf16" or (cuda and t.amp == "auto"),  # bf16 autocast
            "channels_last": cuda and cfg.data.dims == 2 and t.channels_last,
            "compile": t.compile,
            "cudnn_benchmark": cuda and t.cudnn_benchmark,
            "fused": cfg.optim.name == "adamw" and (t.fused_optimizer == "on" or (cuda and t.fused_optimizer == "auto"))}


def build_optimizer(cfg, model, device, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (fused when `fused`, default: on a GPU) or LARS, without weight decay on biases and norm layers."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norm layers
    if cfg.name == "lars":
        return LARS([{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars": False}], lr=cfg.lr,
                    weight_decay=cfg.weight_decay)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda" if fused is None else fused)


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


class BatchStream:
    """Yields (v1, v2, idx) for one epoch from `start_step`; idx are indices into the ScanSet."""

    def __init__(self, scans: ScanSet, cfg: MedclConfig, device, global_batch: int, steps: int, partner=None,
                 pairing=None, pairs=None, local_crops: int = 0, local_size: int = 0):
        self.scans, self.cfg, self.device = scans, cfg, device
        self.global_batch, self.steps = global_batch, steps
        self.local_batch = global_batch // dist.world_size()
        self.backend = resolve_backend(cfg.views, device)
        self.partner = partner
        self.pairing = pairing  # (x, generator) -> (x1, x2): positives made from one item (neighbouring slices)
        self.pairs = pairs  # (index_a, index_b) arrays from a pairs CSV: an epoch runs over pairs, not scans
        self.size = cfg.data.size
        self.on_device = None
        self.local_crops = local_crops  # multi-crop: this many small views of each item's first scan
        if self.backend == "batched":
            self.batched = BatchedViews(cfg.views, cfg.data.dims, cfg.data.size)
            if local_crops:
                self.local_views = BatchedViews(cfg.views, cfg.data.dims, local_size, cfg.method.local_crop_scale,
                                                in_size=cfg.data.size)
            nbytes = int(np.prod(scans.shape)) * 4
            if device.type == "cuda" and nbytes < 0.25 * torch.cuda.mem_get_info(device)[0]:
                # the whole decoded dataset fits on the GPU: a step is then indexing + augmentation, no host work
                self.on_device = torch.as_tensor(scans.batch(np.arange(len(scans)))).to(device)
            self.report = self.batched.report
        else:
            self.transform = monai_transform(cfg.views, cfg.data.dims, cfg.data.size)
            self.report = engine_report(cfg.views, cfg.data.dims, cfg.data.size, "monai")

    def _local(self, order, step):
        glob = order[step * self.global_batch:(step + 1) * self.global_batch]
        r = dist.rank()
        return glob[r * self.local_batch:(r + 1) * self.local_batch]

    def _host(self, idx):
        x = torch.from_numpy(self.scans.batch(idx))
        return x.pin_memory() if self.device.type == "cuda" else x

    def epoch(self, epoch: int, start_step: int = 0):
        seed = self.cfg.train.seed
        order = epoch_order(len(self.pairs[0]) if self.pairs is not None else len(self.scans), seed, epoch)
        if self.backend == "monai":
            if self.pairing is not None or self.pairs is not None or self.local_crops:
                raise MedclError("neighbour positives, pairs CSVs and multi-crop (method.local_crops) need "
                                 "views.backend=batched (or auto).")
            yield from self._monai_epoch(order, epoch, start_step)
            return
        def rows(i):  # items of the device-resident cache; the index goes up pinned, so the copy does not sync
            return self.on_device[torch.from_numpy(np.asarray(i, dtype=np.int64)).pin_memory().to(self.device,
                                                                                                   non_blocking=True)]

        def fetch(step):
            idx = self._local(order, step)
            if self.pairs is not None:  # idx are pair indices; the items are the pairs' two scans
                a, b = self.pairs[0][idx], self.pairs[1][idx]
                if self.on_device is not None:
                    return idx, rows(a), rows(b)
                return idx, self._host(a), self._host(b)
            pidx = self.partner(idx, epoch) if self.partner else idx
            if self.on_device is not None:
                return idx, rows(idx), (rows(pidx) if self.partner else None)
            return idx, self._host(idx), (self._host(pidx) if self.partner else None)

        def make_views(step, x1, x2):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_seed(seed, epoch, step, dist.rank()))  # views depend only on (seed, epoch, step, rank)
            if self.pairing is not None:
                x1, x2 = self.pairing(x1, gen)
            # both views in one batched call: half the kernel launches of two calls
            v1, v2 = self.batched(torch.cat([x1, x1 if x2 is None else x2]), gen).chunk(2)
            local = ()
            if self.local_crops:  # all local crops in one call too
                local = self.local_views(x1.repeat((self.local_crops,) + (1,) * (x1.ndim - 1)), gen).chunk(self.local_crops)
            return v1, v2, local

        # A background thread gathers the next batches and makes their views while the device runs the current step.
        # On a GPU it works on a side CUDA stream, so view kernels overlap the model's kernels instead of queueing
        # before them, and an event hands each batch to the training stream (no host synchronisation).
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream(self.device))  # the cached dataset was written on that stream
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def producer():
            try:
                with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                    for s in range(start_step, self.steps):
                        if stop.is_set():
                            return
                        idx, x1, x2 = fetch(s)
                        x1 = x1.to(self.device, non_blocking=True)
                        x2 = None if x2 is None else x2.to(self.device, non_blocking=True)
                        v1, v2, local = make_views(s, x1, x2)
                        ready = None
                        if cuda:
                            ready = torch.cuda.Event()
                            ready.record(side)
                        q.put((s, idx, v1, v2, local, ready))
            except BaseException as e:  # surface the error in the training loop
                q.put(e)
                return
            q.put(None)

        th = threading.Thread(target=producer, name="medcl-views", daemon=True)
        th.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                step, idx, v1, v2, local, ready = item
                if ready is not None:
                    main = torch.cuda.current_stream(self.device)
                    main.wait_event(ready)
                    # made on the side stream, used and freed on this one: keep the allocator from reusing the
                    # memory until this stream is done with it
                    for t in (v1, v2) + tuple(local):
                        t.record_stream(main)
                yield step, v1, v2, idx, local
        finally:
            stop.set()
            while th.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                th.join(0.05)

    def _monai_epoch(self, order, epoch, start_step):
        ds = TwoViewDataset(self.scans, self.transform, seed=self.cfg.train.seed, partner=self.partner_single())
        ds.epoch = epoch
        local = [self._local(order, s) for s in range(start_step, self.steps)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=local, num_workers=self.cfg.train.num_workers,
                                             pin_memory=self.device.type == "cuda",
                                             persistent_workers=False)
        for k, (v1, v2, idx) in enumerate(loader):
            yield (start_step + k, v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True),
                   idx.numpy(), ())

    def partner_single(self):
        if self.partner is None:
            return None
        return lambda i, epoch: int(self.partner(np.array([i]), epoch)[0])


def make_partner(kind: str, patients, seed: int):
    """Positives other than two views of one scan: `patient` pairs scans of the same patient (MICLe)."""
    if kind != "patient":
        return None
    # scans ordered by patient: each patient's scans are one run of `flat`, starting at start[i] for scan i
    _, group = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    flat = np.argsort(group, kind="stable")
    sizes = np.bincount(group)
    start = (np.cumsum(sizes) - sizes)[group]
    size = sizes[group]
    pos = np.empty(len(flat), dtype=np.int64)
    pos[flat] = np.arange(len(flat)) - (np.cumsum(sizes) - sizes)[group[flat]]  # scan's place within its patient

    def partner(idx, epoch):
        """Another scan of the same patient for each index, drawn for the whole batch at once; a single-scan patient
        falls back to its own views."""
        idx = np.asarray(idx)
        rng = np.random.default_rng([seed, epoch, 11])
        n = size[idx]
        r = (rng.random(len(idx)) * np.maximum(n - 1, 1)).astype(np.int64)  # uniform over the n - 1 others
        r += r >= pos[idx]  # skip the scan itself
        return np.where(n > 1, flat[start[idx] + np.minimum(r, n - 1)], idx)

    return partner


def patients_of(records, labels_table=None):
    """Patient id per record: the CSV's patient column, else the top folder (folder-per-patient layout)."""
    out = []
    for r in records:
        p = None
        if labels_table is not None:
            p = labels_table.patient_of(r.key)
        if p is None:
            parts = r.key.split("/")
            p = parts[0] if len(parts) > 1 else r.key
        out.append(p)
    return out


def _rng_state() -> dict:
    """Global RNG states as tensors/strings only, so the checkpoint loads with weights_only=True.
    (medcl's own randomness is keyed by (seed, epoch, step); these cover user code and libraries.)"""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_rest": json.dumps([int(pos), int(has_gauss), float(gauss)]), "python": json.dumps(random.getstate(), default=list)}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    pos, has_gauss, gauss = json.loads(st["numpy_rest"])
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, g = json.loads(st["python"])
    random.setstate((v, tuple(internal), g))


BUDGET_SYNC = 5  # under torchrun, rank 0's time-budget plan reaches every rank at steps that are multiples of this


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


def _fit_schedule(sched, method, total: int, schedule: tuple) -> int:
    """The cosine schedule (and a momentum method's own) made to end exactly at step `total`; returns it."""
    warm, min_ratio = schedule
    sched.lr_lambdas[0] = lr_lambda(min(warm, max(1, total // 10)), total, min_ratio)
    if method.uses_momentum:
        method.total_steps = total
    return total


def _planned(budget, planned, total):
    """The planned step count a checkpoint carries (a time-budget run), else None."""
    return total if budget is not None and budget.total is not None or planned else None


def _checkpoint_state(method, opt, sched, epoch, step, global_step, cfg, epoch_complete=False, planned_total=None):
    return {"format": "medcl-checkpoint-v1", "model": method.state_dict(), "optimizer": opt.state_dict(),
            "planned_total": planned_total,
            "scheduler": sched.state_dict(),  # bf16 autocast needs no gradient scaler
            "epoch": epoch, "step": step, "global_step": global_step, "epoch_complete": epoch_complete,
            "rng": _rng_state(),
            "config": cfg.to_dict()}


def _quiet(*args):
    pass


def _read_init(cfg, typed, ckpt, provenance, now_on: dict, log):
    """--init (encoder.init): the weights to start from, which decide the architecture, recorded in trained_on; None
    when there is none, or when a resumed run's checkpoint holds what it learned since."""
    if cfg.encoder.init and ckpt is None:
        init = read_weights(cfg.encoder.init, "--init")
        apply_architecture(cfg, init, typed, log)
        now_on["init"] = init.record()
        return init
    if provenance and provenance.get("init"):
        now_on["init"] = provenance["init"]
    return None


def _load_init(encoder, init, now_on: dict, log) -> None:
    now_on["init"].update(load_into(encoder, init))
    log(f"--init {init.source}: {init.layout}; {now_on['init']['loaded']} of {now_on['init']['of']} encoder tensors "
        f"loaded" + "".join(f"; {a}" for a in now_on["init"]["adapted"]) +
        (f"; {len(init.ignored)} other tensors of the file left out (its head, momentum copies)" if init.ignored else ""))


def _pair_arrays(pairs, scans, cfg, data):
    """(index of a, index of b) per pair of a pairs CSV, or None."""
    if pairs is None:
        return None
    if cfg.method.name != "pair":
        raise MedclError("a pairs CSV is for method.name=pair.")
    where = {r.key: i for i, r in enumerate(scans.records)}
    lost = [k for a, b, _ in pairs for k in (a, b) if k not in where]
    if lost:
        raise MedclError(f"{len(lost)} paths of the pairs CSV are not usable scans under {data} "
                         f"(first: {lost[:3]}); see skipped.csv for unreadable ones.")
    return np.array([where[a] for a, _, _ in pairs]), np.array([where[b] for _, b, _ in pairs])


def pretrain(data, out, cfg: MedclConfig | None = None, resume: bool = False, overwrite: bool = False,
             labels=None, probe_labels=None, epochs: int | None = None, pairs=None, progress: bool = True,
             log=print, allow_different_data: bool = False, add_time: bool = False,
             started_at: float | None = None, typed: dict | None = None) -> Path:
    """Pretrain an encoder on the scans in `data` (folder or MedMNIST .npz). Returns the run folder.

    Writes config.yaml, checkpoints/last.pt (every epoch, atomically), encoder.pt, skipped.csv and TensorBoard events.
    `labels`: a LabelsTable used by SupCon and patient positives; `probe_labels`: a LabelsTable for the online kNN monitor.
    With `resume`, the run's saved config is used; a `cfg` given too may differ from it only in how the run runs
    (epochs, device, logging: config.RESUME_MAY_CHANGE), and DATA must be the scans it was trained on unless
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
    # join torchrun's process group first: rank 0 alone prepares the run folder, the other ranks wait for it
    device = pick_device(cfg.train.device)
    dist.init_from_env(device.type)
    if device.type == "cuda" and dist.world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    main = dist.is_main()
    if main:
        prepare_out_dir(out, data, resume=resume, overwrite=overwrite)
    dist.barrier()
    ckpt, provenance = None, None
    if resume:
        if saved_cfg is None:
            saved_cfg = load_config(base=saved_run(saved)[0])
        changed = resume_differences(saved_cfg, cfg)
        if changed:
            key, was, now = changed[0]
            raise MedclError(f"--resume: {key} is {was!r} in the saved run but {now!r} was asked"
                             f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; a resumed run keeps "
                             f"what it learns with. Drop the flag, or start a new run with --out elsewhere.")
        ckpt_path = out / "checkpoints" / "last.pt"
        ckpt = safe_load(ckpt_path, "checkpoint") if ckpt_path.is_file() else None
        if ckpt is None:
            log(f"{out} has no checkpoint: the earlier run stopped before its first one (the end of epoch 1, or "
                f"train.checkpoint_every steps); starting from the beginning")
        elif ckpt.get("epoch_complete") and ckpt["epoch"] + 1 >= cfg.train.epochs and not add_time:
            log(f"{out} is complete: {ckpt['epoch'] + 1} of {cfg.train.epochs} epochs done, nothing to resume; "
                f"its outputs are left as they are. To train longer: --resume --epochs N (N > {ckpt['epoch'] + 1}).")
            dist.cleanup()
            return out
        provenance = saved_run(saved)[1]

    cache_dims = 3 if cfg.method.positives == "neighbors" else cfg.data.dims  # 2D neighbours are slices of volumes
    source = open_source(data, cache_dims, cfg.data.npz_split, selection_of(cfg.data))
    now_on = trained_on(source, data)
    if provenance and provenance.get("file_list_sha256") != now_on["file_list_sha256"]:
        was = (f"{provenance.get('data')} ({provenance.get('n_scans')} scans, file list "
               f"{provenance.get('file_list_sha256')})")
        if not allow_different_data:
            raise MedclError(f"--resume: {out} was trained on {was}, but {data} holds other scans "
                             f"({now_on['n_scans']}, file list {now_on['file_list_sha256']}). Resume with the "
                             f"original DATA (and the same --include/--exclude), or pass --allow-different-data to "
                             f"continue training on these scans.")
        log(f"note: continuing on different data (--allow-different-data): was {was}")
        now_on["earlier"] = list(provenance.get("earlier", [])) + [{k: v for k, v in provenance.items() if k != "earlier"}]
    elif provenance and provenance.get("earlier"):
        now_on["earlier"] = provenance["earlier"]
    init = _read_init(cfg, typed, ckpt, provenance, now_on, log if main else _quiet)
    if main:
        save_config(cfg, saved, trained_on=now_on)
    seed_everything(cfg.train.seed)
    if main:
        log(f"found {len(source.records)} scans in {data}" +
            (f" ({len(source.left_out)} more left out by --include/--exclude/--files)" if source.left_out else ""))
    # scans come from the shared scan cache (each rank decodes its share of what it lacks); only with the cache off
    # does a dataset too big for memory get a memmap file, one per rank (no shared writes)
    cache_dir = out / "cache" if dist.world_size() == 1 else out / "cache" / f"rank{dist.rank()}"
    scans = build_cache(source, cache_dims, cfg.data.size, cfg.data.channels, cfg.data.intensity, cfg.data.strict,
                        cfg.data.max_bad_fraction, cache_dir, cfg.data.cache_max_gb, cfg.data.num_workers,
                        progress if main else False, skip_label_maps=cfg.data.skip_label_maps, log=log)
    if main:
        write_skipped(scans.skipped, out / "skipped.csv")
        if scans.skipped:
            log(f"skipped {len(scans.skipped)} unusable scans (listed in {out / 'skipped.csv'})")

    pair_arrays = _pair_arrays(pairs, scans, cfg, data)
    n_items = len(pairs) if pairs is not None else len(scans)
    world = dist.world_size()
    global_batch = min(cfg.train.batch_size, n_items // world * world)
    if global_batch < 2 * world:
        raise MedclError(f"only {n_items} usable items: need at least {2 * world} for a contrastive batch.")
    global_batch -= global_batch % world
    if global_batch < cfg.train.batch_size and main:
        log(f"note: batch size lowered to {global_batch} (only {len(scans)} scans)")

    encoder = build_encoder(cfg)
    if init is not None:  # before the method copies the encoder into its momentum/teacher branch
        _load_init(encoder, init, now_on, log if main else _quiet)
        if main:
            save_config(cfg, saved, trained_on=now_on)
    method = build_method(cfg.method.name, encoder, cfg.method, image_size=cfg.data.size).to(device)
    n_local = method.cfg.local_crops
    local_size = local_view_size(cfg.method, cfg.data.size, encoder.spec) if n_local else 0
    if n_local and pairs is not None:
        raise MedclError("multi-crop (method.local_crops) does not combine with a pairs CSV: set method.local_crops=0.")
    if ckpt is None and world == 1:  # a step too big for memory is lowered (or refused) here, not killed by the OS
        item = (cfg.data.channels,) + (cfg.data.size,) * cfg.data.dims
        mem = measure_step(method, item, global_batch, amp=speed_settings(cfg, device)["amp"],
                           extra_views=n_local * (local_size / cfg.data.size) ** cfg.data.dims)
        fitted = fit_batch(mem, global_batch, device, limit_gb=cfg.train.memory_gb,
                           log=log if main else (lambda *a: None))
        if fitted != global_batch:
            global_batch = cfg.train.batch_size = fitted
            if main:
                save_config(cfg, saved, trained_on=now_on)  # a --resume continues with the batch that fits
    steps_per_epoch = n_items // global_batch
    speed = speed_settings(cfg, device)
    if speed["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = speed["cudnn_benchmark"]  # shapes are fixed: every batch is full
    lab = None
    if method.needs_labels:
        if labels is None:
            raise MedclError(f"method {cfg.method.name} needs labels: pass --labels LABELS.csv (test rows are never used).")
        lab = torch.as_tensor(labels.train_label_ids([r.key for r in scans.records]), dtype=torch.long)
    if pairs is not None:  # the pair loss reads each pair's similar flag as its label
        lab = torch.tensor([s for _, _, s in pairs], dtype=torch.long)
    partner = None
    if cfg.method.positives == "patient":
        partner = make_partner("patient", patients_of(scans.records, labels), cfg.train.seed)
    model = method
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
        method.gather, method.rank = dist.gather_with_grad, dist.rank()
    if speed["compile"]:
        method.encoder = torch.compile(method.encoder)
    opt = build_optimizer(cfg.optim, method, device, fused=speed["fused"])
    total = steps_per_epoch * cfg.train.epochs
    if method.uses_momentum:
        method.total_steps = total
    warm = max(1, int(cfg.optim.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warm, total, cfg.optim.min_lr_ratio))
    use_amp = speed["amp"]
    start_epoch, start_step, global_step = 0, 0, 0
    schedule = (warm, cfg.optim.min_lr_ratio)
    if ckpt is not None:
        try:
            method.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{out}/checkpoints/last.pt does not match this run's model ({str(e)[:200]}).") from None
        start_epoch, start_step, global_step = ckpt["epoch"], ckpt["step"], ckpt["global_step"]
        _set_rng_state(ckpt["rng"])
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        log(f"resuming at epoch {start_epoch + 1}, step {start_step} (global step {global_step})")
    elif resume:
        log("no checkpoint yet: starting from the beginning")
    budget, n_epochs = None, cfg.train.epochs
    planned = ckpt.get("planned_total") if ckpt is not None and not add_time else None
    if planned:  # a killed time-budget run finishes the steps it planned, on the same schedule
        total, n_epochs = _fit_schedule(sched, method, planned, schedule), math.ceil(planned / steps_per_epoch)
    elif cfg.train.time_budget:
        budget = TimeBudget(parse_duration(cfg.train.time_budget), timebudget.now() if add_time else t_start,
                            steps_per_epoch, max_steps=cfg.train.max_steps)
        n_epochs = 10**9  # until the planned step; the first steps run inside the warm-up, whatever the total

    pairing = neighbor_pairing(cfg) if cfg.method.positives == "neighbors" else None
    stream = BatchStream(scans, cfg, device, global_batch, steps_per_epoch, partner, pairing=pairing, pairs=pair_arrays,
                         local_crops=n_local, local_size=local_size)
    writer = tb.open_writer(out / "tb") if main else None
    loss_log = None
    if main:  # one line per step; on resume, steps after the checkpoint (lost with the killed process) are dropped
        lp = out / "loss.csv"
        kept = []
        if resume and lp.is_file():
            kept = [ln for ln in lp.read_text().splitlines()[1:] if ln and int(ln.split(",")[0]) <= global_step]
        lp.write_text("step,epoch,loss\n" + "".join(ln + "\n" for ln in kept))
        loss_log = open(lp, "a")
    probe = None
    if probe_labels is not None and cache_dims == cfg.data.dims:
        probe = probe_labels.probe_set(scans)
    extra = {"data": Preprocessing.of(cfg.data).to_dict(), "method": cfg.method.name, "trained_on": now_on}
    if main:
        (out / "checkpoints").mkdir(exist_ok=True)
        log(f"pretraining {cfg.method.name} / {cfg.encoder.name} ({cfg.data.dims}D, {cfg.data.size}px) on {device}: "
            f"{len(scans)} scans, batch {global_batch}, {steps_per_epoch} steps x "
            + (f"the epochs that fit in {cfg.train.time_budget}" if budget is not None else f"{n_epochs} epochs")
            + f", views={stream.backend}")
        log(f"method settings: {method.describe()}" + (f", {n_local} local crops of {local_size} px" if n_local else ""))
        log("views, and the engine each transform runs in:\n" + "\n".join(f"  {line}" for line in stream.report))
        tb.log_text(writer, "views/engines", "\n".join(f"- {line}" for line in stream.report))
    collapse_warned = False
    last_loss = float("nan")
    pending: list = []  # (global step, epoch, step, loss copy, its copy event): losses not yet read on the host

    def settle(keep_last=False):
        """Reads queued losses (a host sync), appends them to loss.csv and stops on a non-finite one. A NaN step is
        caught here, at most one step late, and always before the next checkpoint is written."""
        nonlocal last_loss
        while len(pending) > (1 if keep_last else 0):
            g, ep, st, t, copied = pending.pop(0)
            if copied is not None:
                copied.synchronize()  # waits for that step only, not for the steps queued after it
            value = t.item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} at epoch {ep + 1}, step {st}: stopped; the last good checkpoint is kept in "
                    f"{out / 'checkpoints' / 'last.pt'}. Lower optim.lr or raise method.temperature, then --resume.")
            last_loss = value
            if loss_log is not None:
                loss_log.write(f"{g},{ep + 1},{value:.8g}\n")
                loss_log.flush()
        return last_loss
    run_start, run_steps, timed_from = time.perf_counter(), 0, None  # for the time estimate and each epoch's ETA
    # the estimate comes within the first ~5% of the steps (at least steps 2-3 timed, at most 2-10)
    estimate_after = min(total - global_step, int(np.clip(round(0.05 * (total - global_step)), 3, 10)))

    def planned_steps_done() -> bool:
        """A time-budget run (or its resumption) stops at its planned step, not at an epoch count."""
        applied = budget is not None and n_epochs < 10**9 or planned  # the plan in force, the same on every rank
        return bool(applied) and global_step >= total

    def replan():
        """Apply the time budget's (new) step count: the schedule, the epochs, the saved config."""
        nonlocal total, n_epochs
        total = _fit_schedule(sched, method, budget.total, schedule)
        n_epochs = cfg.train.epochs = budget.epochs
        if main:
            save_config(cfg, saved, trained_on=now_on)

    try:
        for epoch in range(start_epoch, n_epochs):
            if planned_steps_done():
                break
            model.train()
            # bar on a terminal; elsewhere the epoch line below is the progress report
            bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{n_epochs if n_epochs < 10**9 else '?'}",
                           progress if main else False,
                           initial=start_step if epoch == start_epoch else 0, line_every=None)
            t_last, n_last = time.perf_counter(), 0
            first = start_step if epoch == start_epoch else 0
            for step, v1, v2, idx, local in stream.epoch(epoch, first):
                if speed["channels_last"]:
                    v1 = v1.contiguous(memory_format=torch.channels_last)
                    v2 = v2.contiguous(memory_format=torch.channels_last)
                    local = tuple(v.contiguous(memory_format=torch.channels_last) for v in local)
                y = None
                if lab is not None:  # pinned, so the upload does not wait for the device
                    y = lab[torch.as_tensor(idx)]
                    y = y.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else y
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    res = model(v1, v2, y, local)
                opt.zero_grad(set_to_none=True)
                res["loss"].backward()
                opt.step()
                sched.step()
                global_step += 1
                extra_scalars = method.step_end(global_step / max(1, total))
                n_last += len(v1) * world
                # the previous step's loss is read now, with this step already queued: reading this one at once would
                # make the host wait for the device every step and leave a GPU idle while the next step is launched
                # the logged loss is the mean over ranks: a NaN on any rank reaches all, so all stop at the same step
                # (a rank stopping alone would leave the others waiting in the next collective)
                pending.append((global_step, epoch, step) + _to_host_async(dist.mean_over_ranks(res["loss"].detach())))
                last_loss = settle(keep_last=True)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{n_last / max(time.perf_counter() - t_last, 1e-9):.0f}")
                bar.update()
                run_steps += 1
                if budget is not None and _budget_changed(budget, global_step, total if n_epochs < 10**9 else None,
                                                          device):
                    first_plan = n_epochs == 10**9
                    replan()
                    if main and (first_plan or budget.fixed):
                        log(budget.plan_text() + (" (fixed from here)" if budget.fixed else ""))
                if run_steps == 1:
                    timed_from = time.perf_counter()  # the first step pays for warm-up: time the ones after it
                elif run_steps == estimate_after and main and budget is None:
                    per_step = (time.perf_counter() - timed_from) / (run_steps - 1)
                    log(f"estimated time: about {duration(per_step * (total - global_step + run_steps))} in all, "
                        f"{duration(per_step * steps_per_epoch)} per epoch (timed over steps 2-{run_steps})")
                log_now = global_step % cfg.train.log_every == 0 or step == steps_per_epoch - 1
                save_now = bool(cfg.train.checkpoint_every) and global_step % cfg.train.checkpoint_every == 0
                if log_now or save_now:  # on every rank at the same steps, so ranks stop together on a NaN
                    last_loss = settle()  # and no checkpoint holds weights that a non-finite loss has touched
                if main and log_now:
                    dt = time.perf_counter() - t_last
                    scalars = {"loss": last_loss, "lr": opt.param_groups[0]["lr"], "images_per_s": n_last / max(dt, 1e-9)}
                    scalars.update(extra_scalars)
                    if device.type == "cuda":
                        scalars["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    tb.log_scalars(writer, scalars, global_step, "pretrain/")
                    t_last, n_last = time.perf_counter(), 0
                if main and (global_step % cfg.train.monitor_every == 0 or global_step == 1):
                    z2 = res.get("z2")
                    m = collapse_metrics(res["z"].detach(), None if z2 is None else z2.detach())
                    tb.log_scalars(writer, m, global_step, "monitor/")
                    reason = is_collapsed(m, res["z"].shape[1])
                    if reason and global_step > steps_per_epoch and not collapse_warned:
                        collapse_warned = True
                        msg = f"WARNING: representation collapse suspected at step {global_step}: {reason}."
                        log(msg)
                        tb.log_text(writer, "monitor/warning", msg, global_step)
                if main and global_step == 1 or (main and step == 0 and epoch == cfg.train.epochs - 1):
                    tb.log_view_pairs(writer, v1, v2, global_step)
                if main and save_now:
                    atomic_save(_checkpoint_state(method, opt, sched, epoch, step + 1, global_step, cfg,
                                                  planned_total=_planned(budget, planned, total)),
                                out / "checkpoints" / "last.pt")
                if cfg.train.max_steps and global_step >= cfg.train.max_steps:
                    break
                if planned_steps_done():
                    break
                if budget is not None and budget.over_time():
                    log(f"note: the time budget ran out at step {global_step} of {total} planned (the machine "
                        f"slowed down?): stopping here")
                    break
            bar.close()
            end_from = timebudget.now()
            last_loss = settle()
            if main:
                atomic_save(_checkpoint_state(method, opt, sched, epoch, steps_per_epoch, global_step, cfg,
                                              epoch_complete=True, planned_total=_planned(budget, planned, total)),
                            out / "checkpoints" / "last.pt")
                export_encoder(method.encoder if not speed["compile"] else method.encoder._orig_mod, out / "encoder.pt", extra)
                if probe is not None:
                    feats = encode(method.encoder, probe[0], device, amp=use_amp)
                    k = knn_probe(feats, probe[1], seed=cfg.train.seed)
                    tb.log_scalars(writer, k, global_step, "monitor/")
                    if k:
                        log(f"epoch {epoch + 1}: online kNN on {len(probe[1])} probe scans: " +
                            ", ".join(f"{a}={b:.3f}" for a, b in k.items()))
                log(f"epoch {epoch + 1}/{n_epochs if n_epochs < 10**9 else '?'}: loss {last_loss:.4f}, "
                    f"{eta_text(run_steps, total - global_step + run_steps, time.perf_counter() - run_start)}")
                writer.flush()
            if budget is not None:
                budget.epoch_end(timebudget.now() - end_from)
            if cfg.train.max_steps and global_step >= cfg.train.max_steps:
                break
    finally:
        if writer is not None:
            writer.close()
        if loss_log is not None:
            loss_log.close()
    dist.barrier()
    if main:
        log(f"wrote {out / 'encoder.pt'}, {out / 'checkpoints' / 'last.pt'}, {out / 'config.yaml'}, TensorBoard events in {out / 'tb'}")
        log(f"inspect: tensorboard --logdir {out}")
    dist.cleanup()
    return out


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


def neighbor_pairing(cfg):
    """Positional positives (Zeng et al. 2021) from cached volumes (B, C, S, S, S).

    2D encoder: each item gives a random slice along the last axis and a second slice at most
    `method.neighbor_distance` slices away. 3D encoder: the item and a copy shifted along the last axis by up to
    that distance (zero-filled), i.e. two overlapping sub-volumes of one scan.
    """
    d = max(1, cfg.method.neighbor_distance)
    dims = cfg.data.dims

    def pair(x, g):
        b, s = x.shape[0], x.shape[-1]
        dev = x.device
        off = torch.randint(1, d + 1, (b,), generator=g, device=dev) * torch.where(
            torch.rand((b,), generator=g, device=dev) < 0.5, -1, 1)
        if dims == 3:
            shift = int(off[0].item())  # one shift per batch keeps it a single roll
            x2 = torch.roll(x, shifts=shift, dims=-1)
            if shift > 0:
                x2[..., :shift] = 0
            else:
                x2[..., shift:] = 0
            return x, x2
        # slices away from the (zero-padded) ends, so both lie inside the scan
        lo, hi = d, s - d
        k1 = torch.randint(lo, max(lo + 1, hi), (b,), generator=g, device=dev)
        k2 = (k1 + off).clamp(0, s - 1)
        ar = torch.arange(b, device=dev)
        xs = x.movedim(-1, 1)  # (B, S, C, H, W)
        return xs[ar, k1], xs[ar, k2]

    return pair
