"""A pretraining run's folder: what a --resume continues from and checks, what a run records about where its scans and
starting weights came from, and the checkpoint's contents (tensors and strings only: it loads with weights_only)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..config import MedclConfig, load_config, resume_differences, save_config, saved_run
from ..data.discover import open_source, selection_of, trained_on
from ..encoders import safe_load
from ..errors import MedclError
from ..runs import prepare_out_dir
from ..weights import apply_architecture, load_into, read_weights


def _quiet(*args):
    pass


@dataclass
class Start:
    """Where a run starts: its config, the checkpoint it resumes (None: step 0), the scans, and `trained_on`
    (provenance, written to config.yaml), with the weights of --init when it starts from them."""
    cfg: MedclConfig
    ckpt: dict | None
    source: object
    now_on: dict
    init: object = None
    complete: bool = False


def trained_all_epochs(ckpt: dict | None, epochs: int) -> bool:
    return bool(ckpt and ckpt.get("epoch_complete") and ckpt["epoch"] + 1 >= epochs)


def finished(out) -> bool:
    """Whether the pretrain run in `out` trained all its epochs (encoder.pt alone is written after every epoch)."""
    out = Path(out)
    if not (out / "encoder.pt").is_file() or not (out / "checkpoints" / "last.pt").is_file():
        return False
    epochs = load_config(base=saved_run(out / "config.yaml")[0]).train.epochs
    return trained_all_epochs(safe_load(out / "checkpoints" / "last.pt", "checkpoint"), epochs)


def check_resume(out: Path, saved_cfg: MedclConfig, cfg: MedclConfig, add_time: bool, log) -> tuple:
    """(checkpoint or None, complete): refuses a resume that would change what the run learns."""
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
    elif trained_all_epochs(ckpt, cfg.train.epochs) and not add_time:
        log(f"{out} is complete: {ckpt['epoch'] + 1} of {cfg.train.epochs} epochs done, nothing to resume; "
            f"its outputs are left as they are. To train longer: --resume --epochs N (N > {ckpt['epoch'] + 1}).")
        return ckpt, True
    return ckpt, False


def provenance(source, data, out: Path, earlier: dict | None, allow_different_data: bool, log) -> dict:
    """`trained_on` of this run: DATA, its scans and their file list; a resume on other scans is refused unless
    allowed, and then the scans it was trained on before are kept under `earlier`."""
    now_on = trained_on(source, data)
    if earlier and earlier.get("file_list_sha256") != now_on["file_list_sha256"]:
        was = (f"{earlier.get('data')} ({earlier.get('n_scans')} scans, file list "
               f"{earlier.get('file_list_sha256')})")
        if not allow_different_data:
            raise MedclError(f"--resume: {out} was trained on {was}, but {data} holds other scans "
                             f"({now_on['n_scans']}, file list {now_on['file_list_sha256']}). Resume with the "
                             f"original DATA (and the same --include/--exclude), or pass --allow-different-data to "
                             f"continue training on these scans.")
        log(f"note: continuing on different data (--allow-different-data): was {was}")
        now_on["earlier"] = list(earlier.get("earlier", [])) + [{k: v for k, v in earlier.items() if k != "earlier"}]
    elif earlier and earlier.get("earlier"):
        now_on["earlier"] = earlier["earlier"]
    return now_on


def read_init(cfg, typed, ckpt, earlier, now_on: dict, log):
    """--init (encoder.init): the weights to start from, which decide the architecture, recorded in trained_on; None
    when there is none, or when a resumed run's checkpoint holds what it learned since."""
    if cfg.encoder.init and ckpt is None:
        init = read_weights(cfg.encoder.init, "--init")
        apply_architecture(cfg, init, typed, log)
        now_on["init"] = init.record()
        return init
    if earlier and earlier.get("init"):
        now_on["init"] = earlier["init"]
    return None


def load_init(encoder, init, now_on: dict, log) -> None:
    now_on["init"].update(load_into(encoder, init))
    ignored = f"; {len(init.ignored)} other tensors of the file left out (its head, momentum copies)"
    log(f"--init {init.source}: {init.layout}; {now_on['init']['loaded']} of {now_on['init']['of']} encoder tensors "
        f"loaded" + "".join(f"; {a}" for a in now_on["init"]["adapted"]) + (ignored if init.ignored else ""))


def start(data, out: Path, cfg: MedclConfig | None, saved_cfg: MedclConfig | None, resume: bool, overwrite: bool,
          add_time: bool, allow_different_data: bool, typed, log) -> Start:
    """Prepare the run folder (rank 0; the other ranks wait), check a resume, open the scans and record where
    they and the starting weights came from in config.yaml."""
    main = dist.is_main()
    saved = out / "config.yaml"
    if main:
        prepare_out_dir(out, data, resume=resume, overwrite=overwrite)
    dist.barrier()
    ckpt, earlier = None, None
    if resume:
        ckpt, complete = check_resume(out, saved_cfg or load_config(base=saved_run(saved)[0]), cfg, add_time, log)
        if complete:
            return Start(cfg, ckpt, None, {}, complete=True)
        earlier = saved_run(saved)[1]
    cache_dims = 3 if cfg.method.positives == "neighbors" else cfg.data.dims  # 2D neighbours are slices of volumes
    source = open_source(data, cache_dims, cfg.data.npz_split, selection_of(cfg.data))
    now_on = provenance(source, data, out, earlier, allow_different_data, log)
    init = read_init(cfg, typed, ckpt, earlier, now_on, log if main else _quiet)
    if main:
        save_config(cfg, saved, trained_on=now_on)
    return Start(cfg, ckpt, source, now_on, init)


def rng_state() -> dict:
    """Global RNG states as tensors/strings only, so the checkpoint loads with weights_only=True.
    (medcl's own randomness is keyed by (seed, epoch, step); these cover user code and libraries.)"""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_rest": json.dumps([int(pos), int(has_gauss), float(gauss)]),
            "python": json.dumps(random.getstate(), default=list)}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    pos, has_gauss, gauss = json.loads(st["numpy_rest"])
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, g = json.loads(st["python"])
    random.setstate((v, tuple(internal), g))


def checkpoint_state(method, opt, sched, epoch, step, global_step, cfg, epoch_complete=False,
                     planned_total=None, amp=False) -> dict:
    return {"format": "medcl-checkpoint-v1", "model": method.state_dict(), "optimizer": opt.state_dict(),
            "planned_total": planned_total, "amp": amp,  # a resume keeps the precision the run learned in
            "scheduler": sched.state_dict(),  # bf16 autocast needs no gradient scaler
            "epoch": epoch, "step": step, "global_step": global_step, "epoch_complete": epoch_complete,
            "rng": rng_state(),
            "config": cfg.to_dict()}
