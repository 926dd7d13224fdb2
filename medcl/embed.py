"""Encode a folder: embeddings.npz for other tools, the TensorBoard projector with thumbnails, and a static map."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import tensorboard as tb
from .data.cache import build_for_encoder, write_skipped
from .data.discover import open_source
from .data.labels import labels_from_records, read_labels_csv
from .data.preprocessing import Preprocessing
from .runs import prepare_out_dir
from .progress import Phases
from .runtime import encode, pick_device
from .weights import open_checkpoint


def embedding_map(features: np.ndarray, seed: int = 0):
    """2D map for reports: UMAP if installed, else t-SNE (up to 5000 points) or PCA (more)."""
    from sklearn.decomposition import PCA

    x = features - features.mean(0)
    if len(x) < 3:
        return np.zeros((len(x), 2)), "none"
    try:
        import umap  # optional

        return umap.UMAP(random_state=seed).fit_transform(x), "UMAP"
    except ImportError:
        pass
    if len(x) <= 5000 and len(x) > 10:
        from sklearn.manifold import TSNE

        pre = PCA(n_components=min(50, x.shape[1], len(x))).fit_transform(x)
        tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, (len(x) - 1) / 3))
        return tsne.fit_transform(pre), "t-SNE"
    return PCA(n_components=2).fit_transform(x), "PCA"


def save_map_png(xy, labels, method, path: Path):
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    labels = np.asarray(labels, dtype=object)
    for lab in sorted(set(labels), key=str):
        m = labels == lab
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, label=str(lab))
    if len(set(labels)) <= 12:
        ax.legend(markerscale=3, fontsize=8)
    ax.set(title=f"Embeddings ({method})", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def embed(checkpoint, data, out, labels=None, classifier=None, max_points: int = 10000, positive=None,
          overwrite=False, device="auto", progress=True, log=print, select=None) -> Path:
    """Encode every scan of `data`. With `classifier` (a finetune folder), the projector also shows its predicted
    probability, and which scans it trained on, validated on or was tested on (from its splits.csv)."""
    out = prepare_out_dir(out, data, overwrite=overwrite, marker="embeddings.npz")
    t0 = time.perf_counter()
    dev = pick_device(device)
    roles = {}
    if classifier is not None:
        from .finetune import read_classifier_file, read_splits

        p = Path(classifier)
        model, meta = read_classifier_file(p / "classifier.pt" if p.is_dir() else p)
        encoder, prep = model.encoder, Preprocessing.of(meta["extra"].get("data", {}))
        ft_dir = p if p.is_dir() else p.parent
        if (ft_dir / "splits.csv").is_file():
            roles = read_splits(ft_dir / "splits.csv")
        else:
            log(f"note: {ft_dir} has no splits.csv: the projector cannot mark which scans the classifier trained on")
    else:
        model = None
        encoder, extra = open_checkpoint(checkpoint, data, select, log)
        prep = Preprocessing.of(extra.get("data", {}))
    dims = prep.dims
    phases = Phases()
    source = open_source(data, dims, "all", select)
    scans = build_for_encoder(source, prep, checkpoint or classifier, cache_dir=out / "cache", progress=progress,
                              log=log)
    write_skipped(scans.skipped, out / "skipped.csv")
    keys = [r.key for r in scans.records]
    table = None
    if labels:
        # labels are metadata here: any number of classes is fine unless a diseased class is named
        table = read_labels_csv(labels, source.root, positive, multiclass=positive is None)
    elif any(r.label is not None for r in scans.records):
        table = labels_from_records(scans.records, positive, multiclass=positive is None)
    phases.done("read scans")
    encoder = encoder.to(dev)
    feats = encode(encoder, scans, dev, progress=progress)
    phases.done("encode")
    label_col = [table.labels[table.row_of(k)] if table is not None and table.row_of(k) is not None else ""
                 for k in keys]
    patient_col = [(table.patient_of(k) or "") if table is not None else "" for k in keys]
    split_col = [(table.splits[table.row_of(k)] or "") if table is not None and table.row_of(k) is not None
                 else (r.split or "") for k, r in zip(keys, scans.records)]
    if roles:  # the classifier's own split rules: its probability on a scan it trained on is not a test result
        split_col = [roles[k][0] if k in roles else s for k, s in zip(keys, split_col)]
    role_col = [roles[k][1] if k in roles else "" for k in keys]
    prob_col = None
    if model is not None:
        model = model.to(dev).eval()
        with torch.no_grad():
            logits = model.head(torch.as_tensor(feats, device=dev))
            prob_col = torch.softmax(logits, 1)[:, -1].cpu().numpy()
    header = ["path", "label", "patient", "split"] + (["probability", "classifier_role"] if prob_col is not None
                                                      else [])
    meta = [[keys[i], label_col[i] or "-", patient_col[i] or "-", split_col[i] or "-"] +
            ([f"{prob_col[i]:.3f}", role_col[i] or "-"] if prob_col is not None else []) for i in range(len(keys))]
    np.savez_compressed(out / "embeddings.npz", features=feats, paths=np.array(keys), labels=np.array(label_col),
                        patients=np.array(patient_col), splits=np.array(split_col), roles=np.array(role_col),
                        **({"probability": prob_col} if prob_col is not None else {}))
    phases.done("save embeddings.npz")
    writer = tb.open_writer(out / "tb")
    try:
        show = tb.write_projector(writer, feats, scans, dims, header, meta, max_points, log=log)
        if len(show) < len(keys):
            log(f"embeddings.npz holds all {len(keys)}")
    finally:
        writer.close()
    phases.done("projector (thumbnails, sprite)")
    if len(show) > 1000:
        log(f"computing the 2D map of {len(show)} points for map.png ...")
    xy, how = embedding_map(feats[show])
    save_map_png(xy, [label_col[i] or "unlabeled" for i in show], how, out / "map.png")
    phases.done(f"2D map ({how})")
    log(f"embedded {len(keys)} scans ({feats.shape[1]}-d) in {time.perf_counter() - t0:.0f}s: {phases}")
    log(f"wrote {out / 'embeddings.npz'}, {out / 'map.png'} ({how}), projector in {out / 'tb'}")
    log(f"inspect: tensorboard --logdir {out}  (PROJECTOR tab)")
    return out
