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
