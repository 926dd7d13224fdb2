"""Contrastive and self-supervised losses as plain functions of tensors.

They know nothing of models, files or processes. Losses that use negatives from other processes take a
`gather` callable (concatenate a tensor across processes, keeping gradients; identity on one process) and the
caller's `rank`, so multi-GPU training plugs in without touching the loss.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _identity(t):
    return t


def float32(fn):
    """Run a loss in float32 with autocast off. Under bf16 autocast (the GPU default) a `.float()` cast alone does not
    help: autocast re-casts the similarity and cross-correlation matmuls to bf16 (NT-Xent was off by 4e-3, its
    gradient by 5e-3). Tensor arguments are cast to float32; float64 is kept (the reference tests use it)."""

    def cast(a):
        if torch.is_tensor(a) and a.is_floating_point() and a.dtype != torch.float64:
            return a.float()
        if isinstance(a, (list, tuple)):
            return type(a)(cast(b) for b in a)
        return a

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
        device = t.device.type if t is not None else "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*cast(args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper


@float32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2, labels: torch.Tensor | None = None,
            gather=None, rank: int = 0) -> torch.Tensor:
    """NT-Xent / InfoNCE over 2N views (SimCLR, Chen et al. 2020); with `labels`, SupCon (Khosla et al. 2020).

    z1[i] and z2[i] are two views of sample i. Every other view in the (global) batch is a negative, except views
    sharing a label when `labels` is given (label -1 means unlabeled: only its own other view is positive).
    Loss per anchor: -mean over its positives p of log softmax(sim(anchor, .) / t)[p], self excluded.
    Written as log-sum-exp over a (2N x 2N_global) matrix: no 2N x 2N x d intermediate (unlike monai's ContrastiveLoss).
    """
    gather = gather or _identity
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    z = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)
    z_all = gather(z)
    logits = z @ z_all.T / temperature
    m = z_all.shape[0]
    rows = torch.arange(2 * n, device=z.device)
    # global column of each local row: gathered layout is [rank0: z1, z2 | rank1: z1, z2 | ...]
    self_col = rank * 2 * n + rows
    logits = logits.masked_fill(F.one_hot(self_col, m).bool(), float("-inf"))
    # instance ids: view pairs share an id
    cols = torch.arange(m, device=z.device)
    inst_all = cols // (2 * n) * n + cols % n  # global sample id of each column (its rank's block, then z1 | z2)
    pos = (rank * n + rows % n)[:, None] == inst_all[None, :]
    if labels is not None:
        lab = torch.cat([labels, labels]).to(z.device)
        lab_all = gather(lab)
        pos = pos | ((lab[:, None] == lab_all[None, :]) & (lab[:, None] >= 0))
    pos[rows, self_col] = False
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~pos, 0.0)
    n_pos = pos.sum(1)
    per_anchor = -log_prob.sum(1) / n_pos.clamp_min(1)
    return per_anchor[n_pos > 0].mean()


@float32
def supcon(z1, z2, labels, temperature: float = 0.1, gather=None, rank: int = 0):
    """Supervised contrastive loss: NT-Xent with label-defined positives."""
    return nt_xent(z1, z2, temperature, labels=labels, gather=gather, rank=rank)


@float32
def pair_margin(a: torch.Tensor, b: torch.Tensor, similar: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Contrastive loss over labeled pairs (Hadsell, Chopra & LeCun 2006).

    L = similar * 1/2 D^2 + (1 - similar) * 1/2 max(0, margin - D)^2, D = ||a - b||_2, averaged over pairs.
    """
    d = (a.float() - b.float()).pow(2).sum(1).clamp_min(1e-12).sqrt()
    s = similar.float()
    return (s * 0.5 * d.pow(2) + (1 - s) * 0.5 * F.relu(margin - d).pow(2)).mean()


@float32
def pair_margin_views(z1, z2, margin: float = 1.0):
    """Pair loss on a batch of view pairs: (z1[i], z2[i]) similar, (z1[i], z2[j != i]) dissimilar; both kinds
    weighted equally so the N^2 - N negatives do not drown the N positives."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    d = torch.cdist(z1, z2).clamp_min(1e-12)
    eye = torch.eye(len(z1), dtype=torch.bool, device=z1.device)
    pos = 0.5 * d[eye].pow(2).mean()
    neg = 0.5 * F.relu(margin - d[~eye]).pow(2).mean()
    return pos + neg


@float32
def triplet(emb: torch.Tensor, ids: torch.Tensor, margin: float = 0.5, mining: str = "batch_hard") -> torch.Tensor:
    """Triplet loss max(0, d(a,p) - d(a,n) + margin) with in-batch mining on L2 distances.

    batch_hard (Hermans et al. 2017): per anchor, the farthest positive and the nearest negative.
    semi_hard (Schroff et al. 2015): per (anchor, positive) pair, the nearest negative farther than the positive;
    if none exists, the farthest negative.
    """
    d = torch.cdist(emb.float(), emb.float()).clamp_min(0)
    same = ids[:, None] == ids[None, :]
    eye = torch.eye(len(ids), dtype=torch.bool, device=emb.device)
    pos, neg = same & ~eye, ~same
    big = torch.finfo(d.dtype).max
    if mining == "batch_hard":
        dp = d.masked_fill(~pos, -1.0).amax(1)
        dn = d.masked_fill(~neg, big).amin(1)
        ok = pos.any(1) & neg.any(1)
        return F.relu(dp - dn + margin)[ok].mean()
    if mining != "semi_hard":
        raise ValueError(f"unknown mining '{mining}'")
    a_idx, p_idx = pos.nonzero(as_tuple=True)
    dap = d[a_idx, p_idx]
    dan = d[a_idx]  # (P, B)
    negm = neg[a_idx]
    semi = negm & (dan > dap[:, None])
    nearest_semi = dan.masked_fill(~semi, big).amin(1)
    farthest = dan.masked_fill(~negm, -1.0).amax(1)
    dn = torch.where(semi.any(1), nearest_semi, farthest)
    return F.relu(dap - dn + margin).mean()


@float32
def cosine_regression(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
    """BYOL's 2 - 2 cos(p, z) (Grill et al. 2020); SimSiam's -cos is this minus 2, halved (Chen & He 2021).
    The target z gets no gradient unless stop_gradient=False (which lets SimSiam collapse)."""
    if stop_gradient:
        z = z.detach()
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


@float32
def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.005) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021): the cross-correlation of batch-standardised embeddings -> identity."""
    n = z1.shape[0]
    z1 = (z1.float() - z1.float().mean(0)) / (z1.float().std(0) + 1e-5)
    z2 = (z2.float() - z2.float().mean(0)) / (z2.float().std(0) + 1e-5)
    c = z1.T @ z2 / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag_embed(torch.diagonal(c))).pow(2).sum()
    return on + lambd * off


@float32
def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim_w: float = 25.0, var_w: float = 25.0, cov_w: float = 1.0,
           gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al. 2022): invariance (MSE) + variance (hinge on per-dim std) + covariance (off-diagonal^2)."""
    z1, z2 = z1.float(), z2.float()
    n, d = z1.shape
    inv = F.mse_loss(z1, z2)
    var = 0.0
    cov = 0.0
    for z in (z1, z2):
        zc = z - z.mean(0)
        std = torch.sqrt(zc.var(0) + eps)
        var = var + F.relu(gamma - std).mean() / 2
        c = zc.T @ zc / (n - 1)
        cov = cov + (c - torch.diag_embed(torch.diagonal(c))).pow(2).sum() / d
    return sim_w * inv + var_w * var + cov_w * cov


@float32
def infonce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None,
                  temperature: float = 0.2) -> torch.Tensor:
    """MoCo v2 (He et al. 2020; Chen et al. 2020): one positive key per query, negatives from a queue of past keys."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    pos = (q * k).sum(1, keepdim=True)
    logits = pos if queue is None or len(queue) == 0 else torch.cat([pos, q @ queue.T.float()], 1)
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits / temperature, target)


@float32
def infonce_batch(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, gather=None,
                  rank: int = 0) -> torch.Tensor:
    """MoCo v3 (Chen, Xie & He 2021): queries against momentum keys of the (global) batch; scaled by 2t as in the
    paper."""
    gather = gather or _identity
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    k_all = gather(k)
    logits = q @ k_all.T / temperature
    target = torch.arange(len(q), device=q.device) + rank * len(q)
    return F.cross_entropy(logits, target) * 2 * temperature


@float32
def dino(student: list, teacher: list, center: torch.Tensor, student_temp: float = 0.1,
         teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO (Caron et al. 2021): sum over teacher views t and student views s != t of H(P_t, P_s), averaged.

    P_t = softmax((g_t - center) / teacher_temp), detached (centring and sharpening); P_s = softmax(g_s / student_temp).
    student: logits of every view, the global views first in the teacher's order; teacher: logits of the global views.
    """
    targets = [F.softmax((t - center) / teacher_temp, dim=-1).detach() for t in teacher]
    log_p = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, terms = 0.0, 0
    for i, q in enumerate(targets):
        for v, lp in enumerate(log_p):
            if v != i:
                total = total + (-(q * lp).sum(-1)).mean()
                terms += 1
    return total / terms


@float32
@torch.no_grad()
def dino_center(center: torch.Tensor, teacher: list, momentum: float = 0.9, gather=None) -> torch.Tensor:
    """DINO's centre update: c <- m c + (1 - m) mean of the teacher outputs over the (global) batch and its views."""
    t = torch.cat(list(teacher))
    if gather is not None:
        t = gather(t)
    return center * momentum + t.mean(0, keepdim=True) * (1 - momentum)


@float32
def mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MAE (He et al. 2022): mean squared error per patch, averaged over the masked patches only (mask 1 = masked).
    With norm_pix the target is each patch normalised by its own mean and variance (the paper's better setting)."""
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


@float32
def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (the reconstruction loss of MONAI's self-supervised recipe)."""
    return (pred - target).abs().mean()
