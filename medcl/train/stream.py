"""The batch stream of pretraining: each step's two (or more) views, made in a background thread (on a side CUDA
stream on a GPU) while the device runs the step; and where positives other than two views of one scan come from."""
from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import torch

from .. import dist
from ..config import MedclConfig
from ..data.cache import ScanSet
from ..errors import MedclError
from ..views import BatchedViews, TwoViewDataset, _seed, engine_report, monai_transform, resolve_backend


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
                        idx, x1, x2 = self._fetch(order, epoch, s)
                        x1 = x1.to(self.device, non_blocking=True)
                        x2 = None if x2 is None else x2.to(self.device, non_blocking=True)
                        v1, v2, local = self._make_views(epoch, s, x1, x2)
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

    def _rows(self, i):
        """Items of the device-resident cache; the index goes up pinned, so the copy does not sync."""
        return self.on_device[torch.from_numpy(np.asarray(i, dtype=np.int64)).pin_memory().to(self.device,
                                                                                               non_blocking=True)]

    def _fetch(self, order, epoch: int, step: int) -> tuple:
        """(indices, first items, partner items or None) of one step of this rank."""
        idx = self._local(order, step)
        if self.pairs is not None:  # idx are pair indices; the items are the pairs' two scans
            a, b = self.pairs[0][idx], self.pairs[1][idx]
            if self.on_device is not None:
                return idx, self._rows(a), self._rows(b)
            return idx, self._host(a), self._host(b)
        pidx = self.partner(idx, epoch) if self.partner else idx
        if self.on_device is not None:
            return idx, self._rows(idx), (self._rows(pidx) if self.partner else None)
        return idx, self._host(idx), (self._host(pidx) if self.partner else None)

    def _make_views(self, epoch: int, step: int, x1, x2) -> tuple:
        """(view 1, view 2, local crops): they depend only on (seed, epoch, step, rank)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_seed(self.cfg.train.seed, epoch, step, dist.rank()))
        if self.pairing is not None:
            x1, x2 = self.pairing(x1, gen)
        # both views in one batched call: half the kernel launches of two calls
        v1, v2 = self.batched(torch.cat([x1, x1 if x2 is None else x2]), gen).chunk(2)
        if not self.local_crops:
            return v1, v2, ()
        crops = x1.repeat((self.local_crops,) + (1,) * (x1.ndim - 1))  # all local crops in one call too
        return v1, v2, self.local_views(crops, gen).chunk(self.local_crops)

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


def check_patients(patients, log) -> None:
    """positives=patient pulls together scans of one patient; when one 'patient' holds most scans (every scan in one
    folder and no patient column) unrelated scans would be pulled together, so that is an error."""
    ids, counts = np.unique(np.asarray(patients, dtype=str), return_counts=True)
    n, top = int(counts.sum()), int(counts.argmax())
    if n > 4 and counts[top] > n / 2:
        raise MedclError(f"positives=patient: {counts[top]} of {n} scans belong to one patient ('{ids[top]}', a top "
                         "folder when no patient column is given), so unrelated scans would count as positives. Pass "
                         "--labels LABELS.csv with a patient column, or put each patient's scans in a folder of its "
                         "own (DATA/<patient>/...).")
    shared = int(counts[counts > 1].sum())
    log(f"patient positives: {len(ids)} patients; {shared} of {n} scans have another scan of their patient"
        + ("" if shared else " (none: every positive is two views of one scan, as with positives=views)"))


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
