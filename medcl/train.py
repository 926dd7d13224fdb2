"""The one pretraining loop: device/AMP, optimizer and schedule, checkpoint/resume, monitors and logging."""
from __future__ import annotations

import json
import math
import queue
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dist
from .config import MedclConfig, save_config, load_config
from .data.cache import ScanSet, build_cache, write_skipped
from .data.discover import open_source
from .encoders import atomic_save, build_encoder, export_encoder, safe_load
from .errors import CheckpointError, MedclError, TrainingDiverged
from .methods import build_method
from .monitors import collapse_metrics, is_collapsed, knn_probe
from .runs import prepare_out_dir
from .views import BatchedViews, TwoViewDataset, monai_transform, resolve_backend, _seed
from . import tensorboard as tb


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise MedclError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def build_optimizer(cfg, model, device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norm layers
    if cfg.name == "lars":
        return LARS([{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars": False}], lr=cfg.lr,
                    weight_decay=cfg.weight_decay)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


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
                 pairing=None, pairs=None):
        self.scans, self.cfg, self.device = scans, cfg, device
        self.global_batch, self.steps = global_batch, steps
        self.local_batch = global_batch // dist.world_size()
        self.backend = resolve_backend(cfg.views, device)
        self.partner = partner
        self.pairing = pairing  # (x, generator) -> (x1, x2): positives made from one item (neighbouring slices)
        self.pairs = pairs  # (index_a, index_b) arrays from a pairs CSV: an epoch runs over pairs, not scans
        self.size = cfg.data.size
        self.on_device = None
        if self.backend == "batched":
            self.batched = BatchedViews(cfg.views, cfg.data.dims, cfg.data.size)
            nbytes = int(np.prod(scans.shape)) * 4
            if device.type == "cuda" and nbytes < 0.25 * torch.cuda.mem_get_info(device)[0]:
                # the whole decoded dataset fits on the GPU: a step is then indexing + augmentation, no host work
                self.on_device = torch.as_tensor(scans.batch(np.arange(len(scans)))).to(device)
        else:
            self.transform = monai_transform(cfg.views, cfg.data.dims, cfg.data.size)

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
            if self.pairing is not None or self.pairs is not None:
                raise MedclError("neighbour positives and pairs CSVs need views.backend=batched (or auto).")
            yield from self._monai_epoch(order, epoch, start_step)
            return
        def fetch(step):
            idx = self._local(order, step)
            if self.pairs is not None:  # idx are pair indices; the items are the pairs' two scans
                a, b = self.pairs[0][idx], self.pairs[1][idx]
                if self.on_device is not None:
                    return idx, self.on_device[torch.as_tensor(a, device=self.device)], \
                        self.on_device[torch.as_tensor(b, device=self.device)]
                return idx, self._host(a), self._host(b)
            pidx = self.partner(idx, epoch) if self.partner else idx
            if self.on_device is not None:
                x1 = self.on_device[torch.as_tensor(idx, device=self.device)]
                x2 = self.on_device[torch.as_tensor(pidx, device=self.device)] if self.partner else None
                return idx, x1, x2
            return idx, self._host(idx), (self._host(pidx) if self.partner else None)

        # a background thread gathers (and pins) the next batches while the device computes; the views are made on
        # the training device itself, batched (on a GPU they cost ~1-2% of a step)

        def make_views(step, x1, x2):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_seed(seed, epoch, step, dist.rank()))  # views depend only on (seed, epoch, step, rank)
            if self.pairing is not None:
                x1, x2 = self.pairing(x1, gen)
            return self.batched(x1, gen), self.batched(x2 if x2 is not None else x1, gen)

        q: queue.Queue = queue.Queue(maxsize=3)
        stop = threading.Event()

        def producer():
            try:
                for s in range(start_step, self.steps):
                    if stop.is_set():
                        return
                    idx, x1, x2 = fetch(s)
                    q.put((s, idx, (x1, x2)))
            except BaseException as e:  # surface the error in the training loop
                q.put(e)
                return
            q.put(None)

        th = threading.Thread(target=producer, daemon=True)
        th.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                step, idx, (a, b) = item
                a = a.to(self.device, non_blocking=True)
                b = None if b is None else b.to(self.device, non_blocking=True)
                v1, v2 = make_views(step, a, b)
                yield step, v1, v2, idx
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
            yield start_step + k, v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True), idx.numpy()

    def partner_single(self):
        if self.partner is None:
            return None
        return lambda i, epoch: int(self.partner(np.array([i]), epoch)[0])


def make_partner(kind: str, patients, seed: int):
    """Positives other than two views of one scan: `patient` pairs scans of the same patient (MICLe)."""
    if kind != "patient":
        return None
    groups: dict = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    members = [np.array(groups[p]) for p in patients]

    def partner(idx, epoch):
        rng = np.random.default_rng([seed, epoch, 11])
        out = np.array(idx, copy=True)
        for k, i in enumerate(idx):
            m = members[i]
            if len(m) > 1:  # another scan of the same patient; a single-scan patient falls back to its own views
                choices = m[m != i]
                out[k] = choices[rng.integers(len(choices))]
        return out

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


def _checkpoint_state(method, opt, sched, scaler, epoch, step, global_step, cfg):
    return {"format": "medcl-checkpoint-v1", "model": method.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "epoch": epoch, "step": step, "global_step": global_step,
            "rng": _rng_state(),
            "config": cfg.to_dict()}


@torch.no_grad()
def encode(encoder, images, device, batch_size: int = 256, amp: bool = False) -> np.ndarray:
    """Features of a ScanSet or an array (N, C, *S) with the encoder in eval mode."""
    encoder.eval()
    n = len(images)
    feats = []
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        x = images.batch(idx) if hasattr(images, "batch") else np.asarray(images[s:s + batch_size])
        x = torch.as_tensor(x).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats.append(encoder(x).float().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)


def pretrain(data, out, cfg: MedclConfig | None = None, resume: bool = False, overwrite: bool = False,
             labels=None, probe_labels=None, epochs: int | None = None, pairs=None, progress: bool = True,
             log=print) -> Path:
    """Pretrain an encoder on the scans in `data` (folder or MedMNIST .npz). Returns the run folder.

    Writes config.yaml, checkpoints/last.pt (every epoch, atomically), encoder.pt, skipped.csv and TensorBoard events.
    `labels`: a LabelsTable used by SupCon and patient positives; `probe_labels`: a LabelsTable for the online kNN monitor.
    With `resume`, the run's saved config is used (`cfg` is ignored); `epochs` may extend it.
    `pairs`: [(key_a, key_b, similar)] from a pairs CSV, for method.name=pair.
    """
    cfg = cfg or MedclConfig()
    if epochs is not None:
        cfg.train.epochs = epochs
    out = Path(out)
    main = dist.is_main()
    if main:
        prepare_out_dir(out, data, resume=resume, overwrite=overwrite)
    dist.barrier()
    ckpt = None
    if resume:
        ckpt = safe_load(out / "checkpoints" / "last.pt", "checkpoint") if (out / "checkpoints" / "last.pt").is_file() else None
        cfg = load_config(out / "config.yaml")
        if epochs is not None:
            cfg.train.epochs = epochs
    if main:
        save_config(cfg, out / "config.yaml")
    device = pick_device(cfg.train.device)
    dist.init_from_env(device.type)
    if device.type == "cuda" and dist.world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    seed_everything(cfg.train.seed)

    cache_dims = 3 if cfg.method.positives == "neighbors" else cfg.data.dims  # 2D neighbours are slices of volumes
    source = open_source(data, cache_dims, cfg.data.npz_split)
    log(f"found {len(source.records)} scans in {data}")
    scans = build_cache(source, cache_dims, cfg.data.size, cfg.data.channels, cfg.data.intensity, cfg.data.strict,
                        cfg.data.max_bad_fraction, out / "cache", cfg.data.cache_max_gb, cfg.data.num_workers,
                        progress and main)
    if main:
        write_skipped(scans.skipped, out / "skipped.csv")
        if scans.skipped:
            log(f"skipped {len(scans.skipped)} unusable scans (listed in {out / 'skipped.csv'})")

    pair_arrays = None
    if pairs is not None:
        if cfg.method.name != "pair":
            raise MedclError("a pairs CSV is for method.name=pair.")
        where = {r.key: i for i, r in enumerate(scans.records)}
        lost = [k for a, b, _ in pairs for k in (a, b) if k not in where]
        if lost:
            raise MedclError(f"{len(lost)} paths of the pairs CSV are not usable scans under {data} "
                             f"(first: {lost[:3]}); see skipped.csv for unreadable ones.")
        pair_arrays = (np.array([where[a] for a, _, _ in pairs]), np.array([where[b] for _, b, _ in pairs]))
    n_items = len(pairs) if pairs is not None else len(scans)
    world = dist.world_size()
    global_batch = min(cfg.train.batch_size, n_items // world * world)
    if global_batch < 2 * world:
        raise MedclError(f"only {n_items} usable items: need at least {2 * world} for a contrastive batch.")
    global_batch -= global_batch % world
    steps_per_epoch = n_items // global_batch
    if global_batch < cfg.train.batch_size and main:
        log(f"note: batch size lowered to {global_batch} (only {len(scans)} scans)")

    encoder = build_encoder(cfg)
    method = build_method(cfg.method.name, encoder, cfg.method).to(device)
    if device.type == "cuda" and cfg.data.dims == 2 and cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
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
    if cfg.train.compile:
        method.encoder = torch.compile(method.encoder)
    opt = build_optimizer(cfg.optim, method, device)
    total = steps_per_epoch * cfg.train.epochs
    warm = max(1, int(cfg.optim.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warm, total, cfg.optim.min_lr_ratio))
    use_amp = device.type == "cuda" and cfg.train.amp in ("auto", "bf16") or cfg.train.amp == "bf16"
    start_epoch, start_step, global_step = 0, 0, 0
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

    pairing = neighbor_pairing(cfg) if cfg.method.positives == "neighbors" else None
    stream = BatchStream(scans, cfg, device, global_batch, steps_per_epoch, partner, pairing=pairing, pairs=pair_arrays)
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
    extra = {"data": {"dims": cfg.data.dims, "size": cfg.data.size, "channels": cfg.data.channels,
                      "intensity": cfg.data.intensity}, "method": cfg.method.name}
    if main:
        (out / "checkpoints").mkdir(exist_ok=True)
        log(f"pretraining {cfg.method.name} / {cfg.encoder.name} ({cfg.data.dims}D, {cfg.data.size}px) on {device}: "
            f"{len(scans)} scans, batch {global_batch}, {steps_per_epoch} steps x {cfg.train.epochs} epochs, "
            f"views={stream.backend}")
    collapse_warned = False
    last_loss = float("nan")
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            model.train()
            bar = tqdm(total=steps_per_epoch, initial=start_step if epoch == start_epoch else 0,
                       desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not (progress and main), leave=False)
            t_last, n_last = time.perf_counter(), 0
            first = start_step if epoch == start_epoch else 0
            for step, v1, v2, idx in stream.epoch(epoch, first):
                if device.type == "cuda" and cfg.data.dims == 2 and cfg.train.channels_last:
                    v1 = v1.contiguous(memory_format=torch.channels_last)
                    v2 = v2.contiguous(memory_format=torch.channels_last)
                y = lab[torch.as_tensor(idx)].to(device) if lab is not None else None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    res = model(v1, v2, y)
                loss = res["loss"]
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step}: stopped; the last good checkpoint "
                        f"is kept in {out / 'checkpoints' / 'last.pt'}. Lower optim.lr or raise method.temperature, then --resume.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                global_step += 1
                extra_scalars = method.step_end(global_step / max(1, total))
                n_last += len(v1) * world
                last_loss = loss.item()
                if loss_log is not None:
                    loss_log.write(f"{global_step},{epoch + 1},{last_loss:.8g}\n")
                    loss_log.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{n_last / max(time.perf_counter() - t_last, 1e-9):.0f}")
                bar.update()
                if main and (global_step % cfg.train.log_every == 0 or step == steps_per_epoch - 1):
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
                if cfg.train.checkpoint_every and global_step % cfg.train.checkpoint_every == 0 and main:
                    atomic_save(_checkpoint_state(method, opt, sched, None, epoch, step + 1, global_step, cfg),
                                out / "checkpoints" / "last.pt")
                if cfg.train.max_steps and global_step >= cfg.train.max_steps:
                    break
            bar.close()
            if main:
                atomic_save(_checkpoint_state(method, opt, sched, None, epoch, steps_per_epoch, global_step, cfg),
                            out / "checkpoints" / "last.pt")
                export_encoder(method.encoder if not cfg.train.compile else method.encoder._orig_mod, out / "encoder.pt", extra)
                if probe is not None:
                    feats = encode(method.encoder, probe[0], device, amp=use_amp)
                    k = knn_probe(feats, probe[1], seed=cfg.train.seed)
                    tb.log_scalars(writer, k, global_step, "monitor/")
                    if k:
                        log(f"epoch {epoch + 1}: online kNN on {len(probe[1])} probe scans: " +
                            ", ".join(f"{a}={b:.3f}" for a, b in k.items()))
                log(f"epoch {epoch + 1}/{cfg.train.epochs}: loss {last_loss:.4f}")
                writer.flush()
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
