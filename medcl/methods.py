"""Self-supervised methods: heads, momentum encoders and which loss to call. They know nothing of files.

Each method maps two batches of views (and optionally labels) to {'loss', 'z'} where z are the embeddings the
collapse monitors watch. `gather`/`rank` are set by the training loop for multi-process runs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import torch
from torch import nn

from . import losses
from .errors import MedclError


def mlp(in_dim: int, hidden: int, out: int, last_bn: bool = False, layers: int = 2, bn: bool = True,
        last_affine: bool = False) -> nn.Sequential:
    """`layers` Linear layers, each hidden one followed by BatchNorm (unless bn=False) and ReLU; `last_bn` adds a
    BatchNorm on the output (affine only if `last_affine`), as MoCo v3's and SimSiam's projectors have."""
    mods, d = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out))
    if last_bn:
        mods.append(nn.BatchNorm1d(out, affine=last_affine))
    return nn.Sequential(*mods)


# Each method's heads as its paper built them, with widths sized for CPU-scale encoders (the papers' 2048-8192 are for
# ResNet-50 on ImageNet). `method.proj_hidden/proj_dim/pred_hidden` replace the widths when set (non-zero).
#   proj: (layers, hidden, out, BatchNorm in hidden layers, BatchNorm on the output); pred: (hidden, out = proj out)
HEADS = {
    "simclr": dict(proj=(2, 512, 128, True, False)),  # Chen et al. 2020 (v2's BN in the hidden layer)
    "supcon": dict(proj=(2, 512, 128, True, False)),
    "pair": dict(proj=(2, 512, 128, True, False)),
    "triplet": dict(proj=(2, 512, 128, True, False)),
    "moco_v2": dict(proj=(2, 512, 128, False, False)),  # He et al. 2020: Linear-ReLU-Linear, no BN
    "moco_v3": dict(proj=(2, 1024, 256, True, True), pred=(1024,)),  # Chen, Xie & He 2021, ResNet: 4096-256
    "byol": dict(proj=(2, 1024, 256, True, False), pred=(1024,)),  # Grill et al. 2020: 4096-256
    "simsiam": dict(proj=(3, 2048, 2048, True, True), pred=(512,)),  # Chen & He 2021: BN output, 512 bottleneck
    "barlow": dict(proj=(3, 2048, 2048, True, False)),  # Zbontar et al. 2021: 8192 x 3
    "vicreg": dict(proj=(3, 2048, 2048, True, False)),  # Bardes et al. 2022: 8192 x 3
    "monai_ssl": dict(proj=(2, 512, 128, True, False)),
    "dino": dict(proj=(3, 1024, 256, False, False)),  # Caron et al. 2021: 2048 hidden, 256 bottleneck, GELU
    "mae": dict(),
}
# temperature when method.temperature is 0; MoCo v3 uses 1.0 with ResNets and 0.2 with ViTs (its paper, appendix)
TEMPERATURES = {"simclr": 0.2, "supcon": 0.1, "moco_v2": 0.2, "moco_v3": (1.0, 0.2), "monai_ssl": 0.05}
LOCAL_CROPS = {"dino": 6}  # multi-crop default when method.local_crops is -1


def local_view_size(cfg, size: int, encoder_spec: dict) -> int:
    """Side of the multi-crop local views: method.local_size, else 3/7 of the global size (DINO's 96 of 224),
    rounded to whole patches for a ViT."""
    side = cfg.local_size or max(8, round(size * 3 / 7))
    if encoder_spec["name"] == "vit":
        p = encoder_spec["patch_size"]
        side = p * max(1, round(side / p))
    return side


def resolve(name: str, cfg, encoder_name: str = "resnet18"):
    """A copy of the method config with its 'method default' settings (0 or -1) filled in for `name`."""
    from .networks import TRANSFORMERS

    head = HEADS[name]
    layers, hidden, out, bn, last_bn = head.get("proj", (2, 512, 128, True, False))
    t = TEMPERATURES.get(name, 0.2)
    if isinstance(t, tuple):
        t = t[encoder_name in TRANSFORMERS]
    return dataclasses.replace(
        cfg, temperature=cfg.temperature or t, proj_hidden=cfg.proj_hidden or hidden, proj_dim=cfg.proj_dim or out,
        pred_hidden=cfg.pred_hidden or head.get("pred", (hidden,))[0],
        local_crops=LOCAL_CROPS.get(name, 0) if cfg.local_crops < 0 else cfg.local_crops)


class SSLMethod(nn.Module):
    """Base: encoder + projection head. Subclasses define `loss_fn`, or `forward` for other shapes of loss.

    Multi-crop (Caron et al. 2020): with `local` views (small crops of the first view's scan), methods that use this
    forward average their loss over (global, global) and every (global, local) pair."""

    needs_labels = False
    uses_momentum = False
    has_predictor = False  # BYOL, SimSiam, MoCo v3: an MLP on top of the projection
    multi_crop = True  # takes local views
    uses_temperature = False  # its loss is a softmax with method.temperature

    def __init__(self, encoder: nn.Module, cfg, name: str = "", image_size: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.image_size = image_size  # side of the (global) views in pixels
        self.build_heads(encoder.feat_dim, cfg, name)
        self.gather = None
        self.rank = 0

    def build_heads(self, feat_dim, cfg, name):
        layers, _, _, bn, last_bn = HEADS.get(name, {}).get("proj", (2, 0, 0, True, False))
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim, last_bn=last_bn, layers=layers, bn=bn)
        if self.has_predictor:
            self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)

    def embed(self, x):
        return self.projector(self.encoder(x))

    def describe(self) -> str:
        """The resolved head and temperature, for the log: what `0: the method's default` became."""
        def widths(seq):
            return "-".join(str(m.out_features) for m in seq.modules() if isinstance(m, nn.Linear))

        parts = []
        if isinstance(getattr(self, "projector", None), nn.Sequential):
            bn_out = isinstance(self.projector[-1], nn.BatchNorm1d)
            parts.append(f"projector {self.encoder.feat_dim}-{widths(self.projector)}" + (" + BN" if bn_out else ""))
        if isinstance(getattr(self, "predictor", None), nn.Sequential):
            parts.append(f"predictor {widths(self.predictor)}")
        if self.uses_temperature:
            parts.append(f"temperature {self.cfg.temperature:g}")
        return ", ".join(parts) or "-"

    def forward(self, v1, v2, labels=None, local=()):
        z1, z2 = self.embed(v1), self.embed(v2)
        loss = self.loss_fn(z1, z2, labels)
        if len(local):
            zs = [self.embed(v) for v in local]
            extra = sum(self.loss_fn(z1, zl, labels) + self.loss_fn(z2, zl, labels) for zl in zs) / 2
            loss = (loss + extra) / (1 + len(zs))
        return {"loss": loss, "z": z1, "z2": z2}

    def loss_fn(self, z1, z2, labels):
        raise NotImplementedError

    @torch.no_grad()
    def step_end(self, progress: float) -> dict:
        """Called after each optimizer step with training progress in [0, 1]; returns scalars to log."""
        return {}


class SimCLR(SSLMethod):
    uses_temperature = True
    def loss_fn(self, z1, z2, labels):
        return losses.nt_xent(z1, z2, self.cfg.temperature, gather=self.gather, rank=self.rank)


class SupCon(SSLMethod):
    uses_temperature = True
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
    multi_crop = False  # the predictor's bottleneck (pred_hidden, a quarter of proj_dim) is the paper's

    def forward(self, v1, v2, labels=None, local=()):
        z1, z2 = self.embed(v1), self.embed(v2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        sg = self.cfg.stop_gradient
        # -cos(p, sg(z)) averaged over both directions, written via 2 - 2cos: halve and shift to [-1, 1]
        loss = 0.5 * (losses.cosine_regression(p1, z2, sg) + losses.cosine_regression(p2, z1, sg)) / 2 - 1
        return {"loss": loss, "z": z1, "z2": z2}


class _Momentum(SSLMethod):
    """Online encoder+projector, and an EMA copy (the momentum/target network) that gets no gradients."""

    uses_momentum = True
    multi_crop = False
    auto_momentum = True  # method.momentum=0 follows the run's length (MoCo v2 keeps 0.99: see base_momentum)

    def __init__(self, encoder, cfg, name="", image_size=0):
        super().__init__(encoder, cfg, name, image_size)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters()):
            p.requires_grad_(False)
        self.total_steps = 0  # set by the training loop: the automatic base momentum depends on the run's length
        self.current_momentum = self.base_momentum()

    def base_momentum(self) -> float:
        """method.momentum, or (0: automatic) one that lets the target follow within the run: the papers' 0.99-0.996
        are for 10^4-10^6 steps, and with a 0.99 base a run of a few hundred steps barely moves its target away from
        the random initialisation. 1 - m = 10 / steps, kept within [0.004, 0.1] (0.996 for long runs, 0.9 for the
        shortest). Whether it helps short runs is not settled: docs/methods.md has the measurements."""
        if self.cfg.momentum > 0:
            return self.cfg.momentum
        if not self.total_steps or not self.auto_momentum:
            return 0.99
        return 1 - min(0.1, max(0.004, 10 / self.total_steps))

    @torch.no_grad()
    def target(self, x):
        return self.momentum_projector(self.momentum_encoder(x))

    @torch.no_grad()
    def step_end(self, progress):
        # cosine increase of the EMA momentum from its base value to 1 (BYOL; MoCo v3)
        m = 1 - (1 - self.base_momentum()) * (math.cos(math.pi * progress) + 1) / 2
        self.current_momentum = m
        for online, target in ((self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            # one fused update for all tensors (a per-parameter loop is hundreds of tiny kernel launches on a GPU)
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)
            if len(list(online.buffers())):
                torch._foreach_copy_(list(target.buffers()), list(online.buffers()))
        return {"momentum": m}


class BYOL(_Momentum):
    has_predictor = True

    def forward(self, v1, v2, labels=None, local=()):
        z1, z2 = self.embed(v1), self.embed(v2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.cfg.stop_gradient:
            t1, t2 = self.target(v1), self.target(v2)
        else:  # ablation: targets from the online network with gradients (collapses)
            t1, t2 = z1, z2
        stop = self.cfg.stop_gradient
        loss = losses.cosine_regression(p1, t2, stop) + losses.cosine_regression(p2, t1, stop)
        return {"loss": loss / 2, "z": z1, "z2": z2}


class MoCoV3(_Momentum):
    uses_temperature = True
    has_predictor = True

    def forward(self, v1, v2, labels=None, local=()):
        q1, q2 = self.predictor(self.embed(v1)), self.predictor(self.embed(v2))
        k1, k2 = self.target(v1), self.target(v2)
        t = self.cfg.temperature
        loss = (losses.infonce_batch(q1, k2, t, self.gather, self.rank)
                + losses.infonce_batch(q2, k1, t, self.gather, self.rank))
        return {"loss": loss / 2, "z": q1, "z2": q2}


class MoCoV2(_Momentum):
    uses_temperature = True
    # its queue holds keys from many past steps, which must stay consistent: a fast-moving key encoder breaks that
    # (the MoCo paper's ablation; here 0.9 instead of 0.99 took the probe AUC from 0.940 to 0.897 on PneumoniaMNIST)
    auto_momentum = False

    def __init__(self, encoder, cfg, name="", image_size=0):
        super().__init__(encoder, cfg, name, image_size)
        # fixed-size ring buffer (so checkpoints always have the same shapes), full from the start: random unit
        # vectors, as in the MoCo reference implementation
        self.register_buffer("queue", nn.functional.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, v1, v2, labels=None, local=()):
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


class DINO(_Momentum):
    """Self-distillation with no labels (Caron et al. 2021): a student matches the centred, sharpened softmax of an
    EMA teacher over `dino_out_dim` prototypes; the teacher sees the two global views, the student every view."""

    def build_heads(self, feat_dim, cfg, name):
        self.projector = DINOHead(feat_dim, cfg.proj_hidden, cfg.proj_dim, cfg.dino_out_dim)
        self.register_buffer("center", torch.zeros(1, cfg.dino_out_dim))
        self.register_buffer("progress", torch.zeros(()))  # for the teacher temperature warm-up, kept on resume

    multi_crop = True

    def teacher_temp(self, progress=None):
        lo, hi = self.cfg.teacher_temp
        if progress is None:  # a tensor on the device: no host sync in the step
            return lo + (hi - lo) * (self.progress / 0.3).clamp(max=1.0)  # linear warm-up over 30% of training
        return lo + (hi - lo) * min(1.0, progress / 0.3)

    def forward(self, v1, v2, labels=None, local=()):
        z1, logits1 = self.projector(self.encoder(v1))
        z2, logits2 = self.projector(self.encoder(v2))
        student = [logits1, logits2] + [self.projector(self.encoder(v))[1] for v in local]
        with torch.no_grad():
            teacher = [self.momentum_projector(self.momentum_encoder(v))[1] for v in (v1, v2)]
        loss = losses.dino(student, teacher, self.center, self.cfg.student_temp, self.teacher_temp())
        if self.training:
            self.center.copy_(losses.dino_center(self.center, teacher, self.cfg.center_momentum, self.gather))
        return {"loss": loss, "z": z1, "z2": z2}

    def embed(self, x):
        return self.projector(self.encoder(x))[0]

    def describe(self):
        c = self.cfg
        return (f"head {self.encoder.feat_dim}-{c.proj_hidden}-{c.proj_hidden}-{c.proj_dim} (BN, GELU), "
                f"{c.dino_out_dim} prototypes, teacher temperature {c.teacher_temp[0]:g}->{c.teacher_temp[1]:g}, "
                f"student {c.student_temp:g}, centre momentum {c.center_momentum:g}")

    @torch.no_grad()
    def step_end(self, progress):
        self.progress.fill_(progress)
        return {**super().step_end(progress), "teacher_temp": self.teacher_temp(progress)}


class DINOHead(nn.Module):
    """DINO's head: a 3-layer GELU MLP to a bottleneck, L2-normalised, then prototypes whose weight rows are unit
    vectors (weight normalisation with the gain fixed at 1, the paper's norm_last_layer)."""

    def __init__(self, in_dim, hidden, bottleneck, out_dim, bn: bool = True):
        super().__init__()

        def norm():
            return nn.BatchNorm1d(hidden) if bn else nn.Identity()

        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), norm(), nn.GELU(), nn.Linear(hidden, hidden), norm(),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, bottleneck), std=0.02))

    def forward(self, x):
        z = nn.functional.normalize(self.mlp(x), dim=-1)
        return z, nn.functional.linear(z, nn.functional.normalize(self.prototypes, dim=1))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, *S) -> (B, N, p^d * C): patches in the token order of MONAI's conv patch embedding (row-major grid)."""
    b, c, *sp = x.shape
    d = len(sp)
    g = [s // p for s in sp]
    shape = [b, c] + [v for gi in g for v in (gi, p)]
    x = x.reshape(shape)
    # (B, C, g1, p, g2, p[, g3, p]) -> (B, g1, g2[, g3], p, p[, p], C)
    perm = [0] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)] + [1]
    return x.permute(perm).reshape(b, math.prod(g), p ** d * c)


def random_masking(noise: torch.Tensor, ratio: float):
    """MAE's per-sample random masking (He et al. 2022): keep the tokens with the smallest noise.
    noise: (B, N) uniform -> (ids_keep (B, K), mask (B, N) with 1 = masked, ids_restore (B, N))."""
    b, n = noise.shape
    keep = max(1, int(n * (1 - ratio)))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(b, n, device=noise.device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


class MAE(SSLMethod):
    """Masked autoencoder (He et al. 2022) on the `vit` encoder: the encoder sees only the visible patches
    (1 - mask_ratio of them); a light transformer decoder (MONAI TransformerBlocks) predicts the masked patches'
    pixels, normalised per patch. Both views are reconstructed."""

    multi_crop = False

    def build_heads(self, feat_dim, cfg, name):
        enc = self.encoder
        if enc.spec["name"] != "vit":
            raise MedclError(f"method mae needs encoder.name=vit (got {enc.spec['name']}): it masks patch tokens.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from monai.networks.blocks import TransformerBlock
            from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
        d, p = enc.spec["spatial_dims"], enc.spec["patch_size"]
        w = cfg.decoder_width
        self.decoder_embed = nn.Linear(feat_dim, w)
        self.mask_token = nn.Parameter(nn.init.normal_(torch.zeros(1, 1, w), std=0.02))
        self.decoder_pos = build_sincos_position_embedding([enc.grid] * d, w, d)  # fixed, as in the paper
        self.decoder_blocks = nn.ModuleList(TransformerBlock(w, 4 * w, max(1, w // 32), qkv_bias=True)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(w)
        self.decoder_pred = nn.Linear(w, p ** d * enc.spec["in_channels"])

    def describe(self):
        c = self.cfg
        return (f"mask ratio {c.mask_ratio:g}, decoder {c.decoder_depth} blocks x {c.decoder_width}, "
                f"norm_pix {c.norm_pix_loss}")

    def embed(self, x):
        # standardised over the batch, as the MAE paper's probe does (a BatchNorm without affine before it): the
        # pooled tokens share a large common part (the positions), which would read as collapse in the monitors
        f = self.encoder(x)
        return (f - f.mean(0)) / (f.std(0) + 1e-6)

    def reconstruct(self, x, noise):
        """(prediction (B, N, p^d C), mask (B, N), pooled features of the visible tokens)."""
        t = self.encoder.embed_tokens(x)
        keep, mask, restore = random_masking(noise, self.cfg.mask_ratio)
        vis = self.encoder.encode_tokens(torch.gather(t, 1, keep[..., None].expand(-1, -1, t.shape[2])))
        y = self.decoder_embed(vis)
        y = torch.cat([y, self.mask_token.expand(len(y), restore.shape[1] - y.shape[1], -1)], 1)
        y = torch.gather(y, 1, restore[..., None].expand(-1, -1, y.shape[2])) + self.decoder_pos
        for blk in self.decoder_blocks:
            y = blk(y)
        return self.decoder_pred(self.decoder_norm(y)), mask, vis.mean(1)

    def forward(self, v1, v2, labels=None, local=()):
        out, zs = 0.0, []
        p = self.encoder.spec["patch_size"]
        for v in (v1, v2):
            n = math.prod(s // p for s in v.shape[2:])
            pred, mask, z = self.reconstruct(v, torch.rand(len(v), n, device=v.device))
            out = out + losses.mae(pred, patchify(v, p), mask, self.cfg.norm_pix_loss) / 2
            zs.append(z)
        zs = [(z - z.mean(0)) / (z.std(0) + 1e-6) for z in zs]  # standardised, as in embed
        return {"loss": out, "z": zs[0].detach(), "z2": zs[1].detach()}


class MonaiSSL(SSLMethod):
    uses_temperature = True
    """MONAI's self-supervised recipe (Tang et al. 2022; MONAI's self-supervised tutorial): each view is corrupted by
    in-painting or out-painting holes (RandCoarseDropout) and shuffled patches (RandCoarseShuffle); a decoder
    (MONAI's Generator, from the pooled features) restores the clean view (L1) while the two corrupted views'
    embeddings are pulled together (NT-Xent at t=0.05). Meant for 3D; works in 2D."""

    multi_crop = False

    def build_heads(self, feat_dim, cfg, name):
        super().build_heads(feat_dim, cfg, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from monai.networks.nets import Generator
        spec = self.encoder.spec
        if self.image_size <= 0:
            raise MedclError("method monai_ssl needs the image size (build_method(..., image_size=data.size)).")
        self.size, d, c = self.image_size, spec["spatial_dims"], spec["in_channels"]
        start = -(-self.size // 4)
        self.decoder = Generator(latent_shape=(feat_dim,), start_shape=(64,) + (start,) * d, channels=(32, 16, c),
                                 strides=(2, 2, 1), num_res_units=0)
        self._corrupt = None

    def corruption(self, dims):
        """The tutorial's transforms at 96 px, with hole sizes scaled to this size."""
        if self._corrupt is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import monai.transforms as T
            s = self.size

            def px(f):
                return max(1, round(s * f / 96))

            self._corrupt = T.Compose([
                T.OneOf([T.RandCoarseDropout(prob=1.0, holes=6, spatial_size=px(5), dropout_holes=True,
                                             max_spatial_size=px(32)),
                         T.RandCoarseDropout(prob=1.0, holes=6, spatial_size=px(20), dropout_holes=False,
                                             max_spatial_size=px(64))]),
                T.RandCoarseShuffle(prob=0.8, holes=10, spatial_size=px(8))])
        return self._corrupt

    def corrupt(self, v):
        t = self.corruption(v.ndim - 2)
        # seeded from torch's generator, whose state the checkpoints keep, so a resumed run corrupts the same way
        t.set_random_state(seed=int(torch.randint(2**31 - 1, (1,)).item()))
        with torch.no_grad():
            return torch.stack([torch.as_tensor(t(x.detach().float().cpu())) for x in v]).to(v.device, v.dtype)

    def forward(self, v1, v2, labels=None, local=()):
        rec, zs = 0.0, []
        for v in (v1, v2):
            h = self.encoder(self.corrupt(v))
            r = self.decoder(h)[(...,) + (slice(0, self.size),) * (v.ndim - 2)]
            rec = rec + losses.l1(r, v) / 2  # the clean view is the target
            zs.append(self.projector(h))
        loss = rec + losses.nt_xent(zs[0], zs[1], self.cfg.temperature, gather=self.gather, rank=self.rank)
        return {"loss": loss, "z": zs[0], "z2": zs[1]}


METHODS = {"simclr": SimCLR, "supcon": SupCon, "pair": PairMargin, "triplet": Triplet, "moco_v2": MoCoV2,
           "moco_v3": MoCoV3, "byol": BYOL, "simsiam": SimSiam, "barlow": BarlowTwins, "vicreg": VICReg,
           "dino": DINO, "mae": MAE, "monai_ssl": MonaiSSL}


def build_method(name: str, encoder, cfg, image_size: int = 0) -> SSLMethod:
    """`cfg` is the method section; its method defaults (0/-1) are resolved here for `name` and `encoder`."""
    cfg = resolve(name, cfg, encoder.spec["name"])
    cls = METHODS[name]
    if cfg.local_crops and not cls.multi_crop:
        raise MedclError(f"method.local_crops={cfg.local_crops}: {name} takes two views only; multi-crop works with "
                         f"{', '.join(n for n, c in METHODS.items() if c.multi_crop)}.")
    if cfg.local_crops and encoder.spec["name"] == "efficientnet-b0":
        raise MedclError("multi-crop (method.local_crops) needs an encoder that takes any input size; "
                         "efficientnet-b0's padding is fixed for data.size. Use another encoder or local_crops=0.")
    return cls(encoder, cfg, name, image_size or encoder.spec.get("img_size", 0))
