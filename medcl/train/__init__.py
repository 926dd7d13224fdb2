"""Pretraining: `pretrain(data, out, cfg)` runs the loop (loop.py); the batches and positives come from stream.py,
the optimiser and schedule from optim.py, the run folder (resume, provenance, --init) from resume.py, and what a step
hands on (loss log, monitors, checkpoints) from hooks.py."""
from ..runtime import encode  # noqa: F401 (also medcl.train.encode, as before)
from .loop import pretrain
from .optim import LARS, build_optimizer, lr_lambda, speed_settings
from .stream import BatchStream, epoch_order, make_partner, neighbor_pairing, patients_of

__all__ = ["pretrain", "LARS", "build_optimizer", "lr_lambda", "speed_settings", "BatchStream", "epoch_order",
           "make_partner", "neighbor_pairing", "patients_of", "encode"]
