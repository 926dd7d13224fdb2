"""Self-supervised methods: heads, momentum encoders and which loss to call. They know nothing of files.

Each method maps two batches of views (and optionally labels) to {'loss', 'z'} where z are the embeddings the
collapse monitors watch. `gather`/`rank` are set by the training loop for multi-process runs.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import losses


def mlp(in_dim: int, hidden: int, out: int, last_bn: bool = False) -> nn.Sequential:
    layers = [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)]
    if last_bn:
        layers.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*layers)


class SSLMethod(nn.Module):
    """Base: encoder + projection head. Subclasses define `loss_fn`."""

    needs_labels = False
    uses_momentum = False
    has_predictor = False  # BYOL, SimSiam, MoCo v3: an MLP on top of the projection

    def __init__(self, encoder: nn.Module, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.projector = mlp(encoder.feat_dim, cfg.proj_hidden, cfg.proj_dim)
        if self.has_predictor:
            self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        self.gather = None
        self.rank = 0

    def embed(self, x):
        return self.projector(self.encoder(x))

    def forward(self, v1, v2, labels=None):
        z1, z2 = self.embed(v1), self.embed(v2)
        return {"loss": self.loss_fn(z1, z2, labels), "z": z1, "z2": z2}

    def loss_fn(self, z1, z2, labels):
        raise NotImplementedError

    @torch.no_grad()
    def step_end(self, progress: float) -> dict:
        """Called after each optimizer step with training progress in [0, 1]; returns scalars to log."""
        return {}


class SimCLR(SSLMethod):
    def loss_fn(self, z1, z2, labels):
        return losses.nt_xent(z1, z2, self.cfg.temperature, gather=self.gather, rank=self.rank)


class SupCon(SSLMethod):
    needs_labels = True

    def loss_fn(self, z1, z2, labels):
        return losses.supcon(z1, z2, labels, self.cfg.temperature, gather=self.gather, rank=self.rank)


class PairMargin(SSLMethod):
    """Pairs from augmentations (same scan = similar, other scans = dissimilar), or, with a pairs CSV, the listed
    pairs with their similar/dissimilar flags (passed as `labels`)."""

    def loss_fn(self, z1, z2, labels):
        if labels is not None:
            return losses.pair_margin(nn.functional.normalize(z1.float(), dim=1),
                                      nn.functional.normalize(z2.float(), dim=1), labels, self.cfg.margin)
        return losses.pair_margin_views(z1, z2, self.cfg.margin)


class Triplet(SSLMethod):
    def loss_fn(self, z1, z2, labels):
        emb = nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
        ids = torch.cat([torch.arange(len(z1), device=z1.device)] * 2)
        return losses.triplet(emb, ids, self.cfg.margin, self.cfg.mining)


class BarlowTwins(SSLMethod):
    def loss_fn(self, z1, z2, labels):
        return losses.barlow_twins(z1, z2, self.cfg.barlow_lambda)


class VICReg(SSLMethod):
    def loss_fn(self, z1, z2, labels):
        return losses.vicreg(z1, z2, *self.cfg.vicreg_weights)


class SimSiam(SSLMethod):
    """Projector + predictor, stop-gradient on the target branch (Chen & He 2021)."""

    has_predictor = True

    def forward(self, v1, v2, labels=None):
        z1, z2 = self.embed(v1), self.embed(v2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        sg = self.cfg.stop_gradient
        # -cos(p, sg(z)) averaged over both directions, written via 2 - 2cos: halve and shift to [-1, 1]
        loss = 0.5 * (losses.cosine_regression(p1, z2, sg) + losses.cosine_regression(p2, z1, sg)) / 2 - 1
        return {"loss": loss, "z": z1, "z2": z2}


class _Momentum(SSLMethod):
    """Online encoder+projector, and an EMA copy (the momentum/target network) that gets no gradients."""

    uses_momentum = True

    def __init__(self, encoder, cfg):
        super().__init__(encoder, cfg)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters()):
            p.requires_grad_(False)
        self.current_momentum = cfg.momentum

    @torch.no_grad()
    def target(self, x):
        return self.momentum_projector(self.momentum_encoder(x))

    @torch.no_grad()
    def step_end(self, progress):
        # cosine increase of the EMA momentum from its base value to 1 (BYOL; MoCo v3)
        m = 1 - (1 - self.cfg.momentum) * (math.cos(math.pi * progress) + 1) / 2
        self.current_momentum = m
        for online, target in ((self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            # one fused update for all tensors (a per-parameter loop is hundreds of tiny kernel launches on a GPU)
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)
            torch._foreach_copy_(list(target.buffers()), list(online.buffers()))
        return {"momentum": m}


class BYOL(_Momentum):
    has_predictor = True

    def forward(self, v1, v2, labels=None):
        z1, z2 = self.embed(v1), self.embed(v2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.cfg.stop_gradient:
            t1, t2 = self.target(v1), self.target(v2)
        else:  # ablation: targets from the online network with gradients (collapses)
            t1, t2 = z1, z2
        loss = losses.cosine_regression(p1, t2, self.cfg.stop_gradient) + losses.cosine_regression(p2, t1, self.cfg.stop_gradient)
        return {"loss": loss / 2, "z": z1, "z2": z2}


class MoCoV3(_Momentum):
    has_predictor = True

    def forward(self, v1, v2, labels=None):
        q1, q2 = self.predictor(self.embed(v1)), self.predictor(self.embed(v2))
        k1, k2 = self.target(v1), self.target(v2)
        t = self.cfg.temperature
        loss = losses.infonce_batch(q1, k2, t, self.gather, self.rank) + losses.infonce_batch(q2, k1, t, self.gather, self.rank)
        return {"loss": loss / 2, "z": q1, "z2": q2}


class MoCoV2(_Momentum):
    def __init__(self, encoder, cfg):
        super().__init__(encoder, cfg)
        # fixed-size ring buffer (so checkpoints always have the same shapes), full from the start: random unit
        # vectors, as in the MoCo reference implementation
        self.register_buffer("queue", nn.functional.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, v1, v2, labels=None):
        q1, q2 = self.embed(v1), self.embed(v2)
        k1, k2 = self.target(v1), self.target(v2)
        t = self.cfg.temperature
        negatives = self.queue.clone()  # the enqueue below writes in place
        loss = (losses.infonce_queue(q1, k2, negatives, t) + losses.infonce_queue(q2, k1, negatives, t)) / 2
        if self.training:
            self._enqueue(torch.cat([k1, k2]))
        return {"loss": loss, "z": q1, "z2": q2}

    @torch.no_grad()
    def _enqueue(self, keys):
        keys = nn.functional.normalize(keys.float(), dim=1)
        if self.gather is not None:
            keys = self.gather(keys)
        size = self.queue.shape[0]
        keys = keys[:size]
        # the pointer stays on the device: reading it on the host would stall a GPU every step
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)


METHODS = {"simclr": SimCLR, "supcon": SupCon, "pair": PairMargin, "triplet": Triplet, "moco_v2": MoCoV2,
           "moco_v3": MoCoV3, "byol": BYOL, "simsiam": SimSiam, "barlow": BarlowTwins, "vicreg": VICReg}


def build_method(name: str, encoder, cfg) -> SSLMethod:
    return METHODS[name](encoder, cfg)
