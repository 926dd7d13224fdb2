"""Every loss against a slow, literal reference written from the paper's definition, plus known cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from medcl import losses

torch.manual_seed(0)


def ref_nt_xent(z1, z2, t, labels=None):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    n = n2 // 2
    ids = list(range(n)) * 2
    lab = None if labels is None else list(labels.tolist()) * 2
    total, count = 0.0, 0
    for i in range(n2):
        denom = sum(torch.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        pos = [p for p in range(n2) if p != i and (ids[p] == ids[i] or (lab is not None and lab[i] >= 0 and lab[p] == lab[i]))]
        if not pos:
            continue
        total = total + sum(-torch.log(torch.exp(z[i] @ z[p] / t) / denom) for p in pos) / len(pos)
        count += 1
    return total / count


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_reference_values_and_gradients(t):
    z1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    a = losses.nt_xent(z1, z2, t)
    ga = torch.autograd.grad(a, [z1, z2])
    b = ref_nt_xent(z1, z2, t)
    gb = torch.autograd.grad(b, [z1, z2])
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x.double(), y, atol=1e-5)


def test_supcon_matches_reference_with_unlabeled():
    z1, z2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, -1, 2, -1, 0])
    assert losses.supcon(z1, z2, labels, 0.3).item() == pytest.approx(ref_nt_xent(z1, z2, 0.3, labels).item(), rel=1e-5)


def test_nt_xent_known_cases():
    # identical, well separated (orthogonal) pairs -> near the minimum: log(1 + (2N-2) e^{-1/t} / e^{1/t}) small
    z = torch.eye(4, dtype=torch.float64)
    small = losses.nt_xent(z, z.clone(), 0.1).item()
    assert small == pytest.approx(math.log(1 + 6 * math.exp(-10)), rel=1e-3)
    # all embeddings identical -> every candidate equally likely: log(2N - 1)
    same = torch.ones(4, 3)
    assert losses.nt_xent(same, same, 0.5).item() == pytest.approx(math.log(7), rel=1e-5)
    # stable at tiny temperatures (monai's ContrastiveLoss returns NaN at t <= 0.01)
    assert torch.isfinite(losses.nt_xent(torch.randn(8, 16), torch.randn(8, 16), 0.005))


def test_pair_margin_definition_and_boundary():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [0.3, 0.4], [1.2, 1.6]])  # distances 5, 0.5, 2
    sim = torch.tensor([1, 0, 0])
    # similar: 1/2 * 25; dissimilar inside margin 1: 1/2 * (1 - 0.5)^2; beyond margin: 0
    assert losses.pair_margin(a, b, sim, margin=1.0).item() == pytest.approx((12.5 + 0.125 + 0.0) / 3)
    at_margin = losses.pair_margin(a[:1], torch.tensor([[0.6, 0.8]]), torch.tensor([0]), 1.0)
    assert at_margin.item() == pytest.approx(0.0, abs=1e-9)


def ref_triplet(emb, ids, margin, mining):
    d = torch.cdist(emb, emb)
    out = []
    n = len(ids)
    if mining == "batch_hard":
        for a in range(n):
            dp = max(d[a, p] for p in range(n) if p != a and ids[p] == ids[a])
            dn = min(d[a, k] for k in range(n) if ids[k] != ids[a])
            out.append(torch.relu(dp - dn + margin))
    else:
        for a in range(n):
            for p in range(n):
                if p == a or ids[p] != ids[a]:
                    continue
                negs = [d[a, k] for k in range(n) if ids[k] != ids[a]]
                semi = [x for x in negs if x > d[a, p]]
                dn = min(semi) if semi else max(negs)
                out.append(torch.relu(d[a, p] - dn + margin))
    return torch.stack(out).mean()


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_triplet_matches_reference(mining):
    emb = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])
    a = losses.triplet(emb, ids, 0.5, mining)
    b = ref_triplet(emb, ids, 0.5, mining)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    ga, = torch.autograd.grad(a, emb)
    gb, = torch.autograd.grad(b, emb)
    assert torch.allclose(ga.double(), gb, atol=1e-6)


def test_triplet_zero_when_margin_satisfied():
    emb = torch.tensor([[0.0, 0], [0, 0.1], [5, 0], [5, 0.1]])
    assert losses.triplet(emb, torch.tensor([0, 0, 1, 1]), 1.0).item() == 0.0


def test_cosine_regression_and_stop_gradient():
    p, z = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    ref = (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1)).mean()
    out = losses.cosine_regression(p, z)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    out.backward()
    assert z.grad is None  # target branch gets no gradient
    assert losses.cosine_regression(z, z).item() == pytest.approx(0.0, abs=1e-6)


def ref_barlow(z1, z2, lambd):
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / (z1.std(0) + 1e-5)
    b = (z2 - z2.mean(0)) / (z2.std(0) + 1e-5)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total = total + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return total


def test_barlow_matches_reference():
    z1, z2 = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    assert losses.barlow_twins(z1, z2, 0.01).item() == pytest.approx(float(ref_barlow(z1, z2, 0.01)), rel=1e-5)


def ref_vicreg(z1, z2, s, v, c):
    n, d = z1.shape
    inv = sum(((z1[i] - z2[i]) ** 2).sum() for i in range(n)) / (n * d)
    var = 0
    cov = 0
    for z in (z1, z2):
        std = torch.sqrt(z.var(0) + 1e-4)
        var = var + torch.relu(1 - std).mean() / 2
        zc = z - z.mean(0)
        C = zc.T @ zc / (n - 1)
        cov = cov + sum(C[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return s * inv + v * var + c * cov


def test_vicreg_matches_reference():
    z1, z2 = torch.randn(9, 5, dtype=torch.float64) * 0.5, torch.randn(9, 5, dtype=torch.float64)
    assert losses.vicreg(z1, z2, 25, 25, 1).item() == pytest.approx(float(ref_vicreg(z1, z2, 25, 25, 1)), rel=1e-5)


def test_infonce_queue_and_batch():
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    queue = F.normalize(torch.randn(6, 3), dim=1)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    ref = 0
    for i in range(4):
        logits = torch.cat([(qn[i] * kn[i]).sum()[None], queue @ qn[i]]) / 0.2
        ref = ref - torch.log_softmax(logits, 0)[0]
    assert losses.infonce_queue(q, k, queue, 0.2).item() == pytest.approx((ref / 4).item(), rel=1e-5)
    ref_b = F.cross_entropy(qn @ kn.T / 0.2, torch.arange(4)) * 0.4
    assert losses.infonce_batch(q, k, 0.2).item() == pytest.approx(ref_b.item(), rel=1e-5)


# --- DINO and MAE against literal formulas ------------------------------------------------------------------------

def test_dino_loss_matches_literal_cross_entropy_values_and_gradients():
    from medcl.methods import DINO  # noqa: F401  (the method uses exactly this loss)

    k, b = 7, 5
    student = [torch.randn(b, k, dtype=torch.float64, requires_grad=True) for _ in range(4)]  # 2 global + 2 local
    teacher = [torch.randn(b, k, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, k, dtype=torch.float64)
    ts, tt = 0.1, 0.04
    got = losses.dino(student, teacher, center, ts, tt)
    g_got = torch.autograd.grad(got, student)
    # literal: for every (teacher view i, student view v != i) and sample n:
    #   - sum_k P_t[k] log P_s[k],  P_t = exp((t-c)/tt) / sum exp(.),  P_s = exp(s/ts) / sum exp(.)
    total, terms = 0.0, 0
    for i in range(2):
        for v in range(4):
            if v == i:
                continue
            for n in range(b):
                et = torch.exp((teacher[i][n] - center[0]) / tt)
                pt = et / et.sum()
                es = torch.exp(student[v][n] / ts)
                ps = es / es.sum()
                total = total - (pt * torch.log(ps)).sum() / b
            terms += 1
    ref = total / terms
    g_ref = torch.autograd.grad(ref, student)
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    for x, y in zip(g_got, g_ref):
        assert torch.allclose(x, y, atol=1e-10)
    # the teacher gets no gradient (it is an EMA, not trained)
    t = [x.clone().requires_grad_(True) for x in teacher]
    losses.dino(student, t, center, ts, tt).backward()
    assert all(x.grad is None for x in t)


def test_dino_centre_is_the_papers_ema_of_the_teacher_batch_mean():
    c = torch.randn(1, 6, dtype=torch.float64)
    t = [torch.randn(4, 6, dtype=torch.float64) for _ in range(2)]
    m = 0.9
    ref = m * c + (1 - m) * torch.cat(t).sum(0, keepdim=True) / 8
    assert torch.allclose(losses.dino_center(c, t, m), ref)


def test_dino_centring_and_sharpening_as_in_the_paper():
    """A centred, sharpened teacher: subtracting the centre removes what all samples share, and a lower teacher
    temperature gives a more peaked target (lower entropy)."""
    t = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    s = [torch.zeros(2, 3, dtype=torch.float64)] * 3
    c = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)  # the shared first logit
    # with a uniform student the loss is the cross-entropy against uniform: log 3 whatever the target
    assert losses.dino(s, [t, t], c, 0.1, 0.04).item() == pytest.approx(math.log(3))
    q_sharp = torch.softmax((t - c) / 0.04, -1)
    q_soft = torch.softmax((t - c) / 0.07, -1)
    entropy = lambda q: -(q * q.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
    assert (entropy(q_sharp) < entropy(q_soft)).all()
    assert q_sharp[0, 0] < 0.5  # after centring the shared first logit no longer dominates


def ref_mask_literal(noise, ratio):
    """MAE's masking written out: per sample, keep the floor(N(1-r)) tokens with the smallest noise."""
    b, n = noise.shape
    keep = int(n * (1 - ratio))
    kept, mask = [], torch.ones(b, n)
    for i in range(b):
        order = sorted(range(n), key=lambda j: noise[i, j].item())[:keep]
        kept.append(order)
        for j in order:
            mask[i, j] = 0
    return torch.tensor(kept), mask


def test_mae_random_masking_keeps_the_lowest_noise_tokens():
    from medcl.methods import random_masking

    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    keep, mask, restore = random_masking(noise, 0.75)
    ref_keep, ref_mask = ref_mask_literal(noise, 0.75)
    assert torch.equal(keep, ref_keep) and torch.equal(mask, ref_mask)
    assert (mask.sum(1) == 12).all()
    # restoring the shuffled order gives back the original token order
    shuffled = torch.argsort(noise, 1)
    assert torch.equal(torch.gather(shuffled, 1, restore), torch.arange(16).expand(3, 16))


def test_mae_loss_matches_literal_values_and_gradients_and_ignores_visible_patches():
    from medcl.methods import patchify

    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    target = patchify(x, 4)  # 4 patches of 16 pixels, row-major
    # literal patch (i, j) of sample n: x[n, 0, 4i:4i+4, 4j:4j+4] flattened
    for n in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(target[n, 2 * i + j], x[n, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1))
    pred = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    for norm_pix in (False, True):
        got = losses.mae(pred, target, mask, norm_pix)
        g_got, = torch.autograd.grad(got, pred)
        total, count = 0.0, 0
        for n in range(2):
            for k in range(4):
                if mask[n, k] == 1:
                    t = target[n, k]
                    if norm_pix:
                        t = (t - t.mean()) / torch.sqrt(t.var() + 1e-6)
                    total = total + ((pred[n, k] - t) ** 2).mean()
                    count += 1
        ref = total / count
        g_ref, = torch.autograd.grad(ref, pred)
        assert got.item() == pytest.approx(ref.item(), rel=1e-9)
        assert torch.allclose(g_got, g_ref)
        assert (g_got[mask == 0] == 0).all()  # visible patches are not reconstructed


def test_patchify_3d_matches_monai_token_order():
    """Token k of the 3D patch embedding (conv, flatten(2)) is the patch patchify puts at k."""
    from medcl.methods import patchify

    x = torch.arange(2 * 8 * 8 * 8, dtype=torch.float64).reshape(1, 2, 8, 8, 8)
    conv = torch.nn.Conv3d(2, 2 * 64, 4, 4, bias=False).double()
    with torch.no_grad():  # a conv that copies its patch: output channel (c, a, b, d) reads pixel (a, b, d) of channel c
        conv.weight.zero_()
        for ch in range(2):
            for a in range(4):
                for b in range(4):
                    for d in range(4):
                        conv.weight[(a * 16 + b * 4 + d) * 2 + ch, ch, a, b, d] = 1
    tokens = conv(x).flatten(2).transpose(1, 2)  # (1, 8, 128), as MONAI's PatchEmbeddingBlock orders them
    assert torch.equal(patchify(x, 4), tokens)


# --- every loss in float32 under bf16 autocast ----------------------------------------------------------------

def _loss_calls():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    lab = torch.tensor([0, 1, 0, 1, -1, 1, 0, 0])
    sim = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    queue = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    center = torch.randn(1, 16, generator=g)
    mask = (torch.rand(8, 16, generator=g) > 0.5).float()
    ids = torch.arange(16) % 8
    return {
        "nt_xent": (losses.nt_xent, (z1, z2, 0.2)),
        "supcon": (losses.supcon, (z1, z2, lab, 0.1)),
        "pair_margin": (losses.pair_margin, (z1, z2, sim)),
        "pair_margin_views": (losses.pair_margin_views, (z1, z2)),
        "triplet": (losses.triplet, (torch.cat([z1, z2]), ids)),
        "cosine_regression": (losses.cosine_regression, (z1, z2)),
        "barlow_twins": (losses.barlow_twins, (z1, z2)),
        "vicreg": (losses.vicreg, (z1, z2)),
        "infonce_queue": (losses.infonce_queue, (z1, z2, queue)),
        "infonce_batch": (losses.infonce_batch, (z1, z2, 0.2)),
        "dino": (losses.dino, ([z1, z2, z1 * 0.5], [z2, z1], center)),
        "mae": (losses.mae, (z1.view(2, 4, 16), z2.view(2, 4, 16), mask[:2, :4])),
        "l1": (losses.l1, (z1, z2)),
    }


@pytest.mark.parametrize("name", sorted(_loss_calls()))
def test_every_loss_is_float32_and_unchanged_by_bf16_autocast(name):
    fn, args = _loss_calls()[name]

    def run(amp):
        leaves = [a.clone().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        leaves = [[t.clone().requires_grad_(True) for t in a] if isinstance(a, list) else a for a in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fn(*leaves)
        params = [t for a in leaves for t in (a if isinstance(a, list) else [a])
                  if torch.is_tensor(t) and t.requires_grad]
        grads = torch.autograd.grad(out, params, allow_unused=True)
        return out, grads

    ref, g_ref = run(False)
    got, g_got = run(True)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= 1e-5, f"{name}: {got.item()} vs {ref.item()} under autocast"
    for a, b in zip(g_got, g_ref):
        if a is not None:
            assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5)


def test_autocast_would_change_nt_xent_without_the_float32_guard():
    """The guard matters: the same computation without it, under bf16 autocast, is off by far more than 1e-5."""
    z1, z2 = torch.randn(64, 128), torch.randn(64, 128)
    unguarded = losses.nt_xent.__wrapped__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bad = unguarded(z1, z2, 0.2)
    assert abs(bad.float().item() - losses.nt_xent(z1, z2, 0.2).item()) > 1e-4
