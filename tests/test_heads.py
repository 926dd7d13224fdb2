"""Few-label heads on frozen features (medcl.heads), called directly: no network, no scans."""
import numpy as np

from medcl.feature_heads import HEAD_TYPES, fit_feature_head
from medcl.metrics import score


def _clusters(n=400, dim=32, shift=0.0, seed=0):
    """Two classes a little apart along one direction, on a large shared offset (as frozen features often sit)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    f = rng.normal(size=(n, dim)) + 8.0 + shift
    f[:, 0] += 2.5 * y
    return f, y


def test_every_feature_head_learns_from_twenty_labels():
    f, y = _clusters()
    lab = np.concatenate([np.flatnonzero(y == 1)[:10], np.flatnonzero(y == 0)[:10]])
    pool = np.setdiff1d(np.arange(300), lab)
    test = np.arange(300, 400)
    for head in HEAD_TYPES:
        fit = fit_feature_head(head, f, y, lab, pool, None, 2, seed=0)
        auc = score(y[test], fit.predict(f[test]))["auc"]
        assert auc > 0.6, (head, auc)  # chance is 0.5; linear and mlp are the weakest here (0.62-0.84)
        assert fit.oof.shape == (20, 2)


def test_proto_centres_on_the_pool_so_a_shared_offset_does_not_matter():
    """Without centring, every feature vector points along the shared offset and cosine similarity cannot tell the
    classes apart; centring on the labeled + unlabeled mean (CL2N) removes it."""
    f, y = _clusters()
    lab = np.concatenate([np.flatnonzero(y == 1)[:2], np.flatnonzero(y == 0)[:2]])
    pool = np.setdiff1d(np.arange(300), lab)
    test = np.arange(300, 400)
    assert HEAD_TYPES["proto"].uses_pool
    p = fit_feature_head("proto", f, y, lab, pool, None, 2).predict(f[test])
    shifted = fit_feature_head("proto", f + 50.0, y, lab, pool, None, 2).predict(f[test] + 50.0)
    np.testing.assert_allclose(p, shifted, atol=1e-6)
    assert score(y[test], p)["auc"] > 0.8
    np.testing.assert_allclose(p.sum(1), 1.0)


def test_proto_with_one_class_labeled_predicts_that_class():
    f, y = _clusters()
    lab = np.flatnonzero(y == 0)[:3]
    fit = fit_feature_head("proto", f, y, lab, np.arange(300, 400), None, 2)
    np.testing.assert_allclose(fit.predict(f[:5])[:, 0], 1.0)


def test_the_linear_head_is_one_linear_layer_on_raw_features():
    """classifier.pt, saliency and predict use the probe as nn.Linear over the encoder: it must give what it gave."""
    import torch

    f, y = _clusters()
    fit = fit_feature_head("linear", f, y, np.arange(40), np.arange(40, 300), None, 2)
    layer = fit.head.to_module()
    with torch.no_grad():
        p = torch.softmax(layer(torch.tensor(f[300:], dtype=torch.float32)), 1).numpy()
    np.testing.assert_allclose(p, fit.predict(f[300:]), atol=1e-4)
    assert HEAD_TYPES["knn"](5, 2).to_module() is None


def test_finetune_head_starts_from_the_linear_probe():
    """LP-FT: before any fine-tuning step the pretrained network predicts what a linear probe on its frozen features
    predicts, so the first gradients do not come from a random head."""
    import torch

    from medcl.config import MedclConfig, apply_overrides
    from medcl.data.cache import ScanSet
    from medcl.encoders import build_encoder
    from medcl.feature_heads import LinearHead
    from medcl.heads import PROBE_C, predict_rows, probe_head, train_network
    from medcl.runtime import encode

    rng = np.random.default_rng(0)
    images = rng.random((40, 1, 32, 32)).astype(np.float32)
    y = (np.arange(40) % 2).astype(int)
    images[y == 1, :, 10:16, 10:16] += 1.0  # a bright patch marks class 1
    scans = ScanSet(images, [None] * 40)
    torch.manual_seed(0)
    cfg = apply_overrides(MedclConfig(), {"data": {"dims": 2, "size": 32},
                                          "encoder": {"name": "resnet10", "widen_factor": 0.125}}, "test")
    encoder = build_encoder(cfg)
    rows = np.arange(0, 40, 2)[:10].tolist() + np.arange(1, 40, 2)[:10].tolist()
    feats = encode(encoder, images[rows], torch.device("cpu"))
    start = probe_head(feats, y[rows], 2, seed=0)
    model, _ = train_network(encoder, scans, y, np.array(rows), torch.device("cpu"), 2, epochs=0, head_start=start)
    expected = LinearHead(PROBE_C, 2, 0).fit(feats, y[rows]).predict_proba(feats)
    got = predict_rows(model, scans, np.array(rows), torch.device("cpu"))
    np.testing.assert_allclose(got, expected, atol=1e-4)
