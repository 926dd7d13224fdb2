"""What every stage needs and none owns: the device, seeding, batched encoding. Kept low so that finetune, evaluate,
embed and select never import the pretraining loop."""
from __future__ import annotations

import random

import numpy as np
import torch

from .errors import MedclError


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


@torch.no_grad()
def encode(encoder, images, device, batch_size: int = 256, amp: bool = False, progress=False,
           desc: str = "encode scans") -> np.ndarray:
    """Features of a ScanSet or an array (N, C, *S) with the encoder in eval mode. `progress`: a bar, or a line per
    quarter (medcl.progress), for folders large enough to take a while."""
    from .progress import Progress

    encoder.eval()
    n = len(images)
    feats = []
    bar = Progress(n, desc, progress, unit="scan", line_every=max(1, -(-n // 4)), min_total=batch_size + 1)
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        x = images.batch(idx) if hasattr(images, "batch") else np.asarray(images[s:s + batch_size])
        x = torch.as_tensor(x).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats.append(encoder(x).float().cpu().numpy())
        bar.update(len(idx))
    bar.close()
    return np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)
