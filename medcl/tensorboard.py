"""The one place that writes to TensorBoard: scalars, view grids, evaluation figures, projector, hparams."""
from __future__ import annotations

import warnings

import numpy as np
import torch

SPRITE_MAX_SIDE = 8192  # TensorBoard's projector refuses sprites larger than 8192 x 8192 pixels


def open_writer(logdir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(logdir))


def log_scalars(writer, values: dict, step: int, prefix: str = "") -> None:
    for k, v in values.items():
        if v is None:
            continue
        writer.add_scalar(f"{prefix}{k}", float(v), step)


def thumbnail(x: np.ndarray, dims: int | None = None) -> np.ndarray:
    """(C, *S) scan in [0,1] -> (C, H, W): the image itself, or the middle axial slice of a volume.
    With `dims`, x may be a batch (N, C, *S) -> (N, C, H, W)."""
    x = np.asarray(x, dtype=np.float32)
    if (dims or x.ndim - 1) == 3:
        x = x[..., x.shape[-1] // 2]
    return np.clip(x, 0, 1)


def orthogonal_slices(x: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) -> (C, X, 3 * X): the three orthogonal middle slices side by side (the cache makes cubes)."""
    c, a, b, d = x.shape
    return np.concatenate([x[:, a // 2, :, :], x[:, :, b // 2, :], x[:, :, :, d // 2]], axis=2)


def _to_picture(x, stretch: bool = True) -> np.ndarray:
    """(C, *S) -> (3, H, W) in [0, 1]; volumes as their three orthogonal middle slices. `stretch`: to the picture's
    own min-max; else clipped to [0, 1], so that intensity changes stay visible."""
    x = np.asarray(x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    pic = orthogonal_slices(x) if x.ndim == 4 else x
    if pic.shape[0] == 1:
        pic = np.repeat(pic, 3, axis=0)
    if not stretch:
        return np.clip(pic, 0, 1)
    lo, hi = pic.min(), pic.max()
    return (pic - lo) / (hi - lo + 1e-8)


def picture_grid(rows: list, stretch: bool = True, gap: int = 2) -> np.ndarray:
    """rows of (C, *S) scans or views -> one (3, H, W) image in [0, 1], white gaps between cells."""
    lines = []
    for row in rows:
        cells = [_to_picture(c, stretch) for c in row]
        sep = np.ones((3, cells[0].shape[1], gap), dtype=np.float32)
        lines.append(np.concatenate([x for c in cells for x in (c, sep)][:-1], axis=2))
    width = max(ln.shape[2] for ln in lines)
    lines = [np.pad(ln, ((0, 0), (0, 0), (0, width - ln.shape[2])), constant_values=1.0) for ln in lines]
    sep = np.ones((3, gap, width), dtype=np.float32)
    return np.concatenate([x for ln in lines for x in (ln, sep)][:-1], axis=1)


def view_pair_grid(v1: torch.Tensor, v2: torch.Tensor, n: int = 8) -> np.ndarray:
    """Rows of (view 1 | view 2) for the first n samples, as a (3, H, W) image in [0,1]."""
    return picture_grid([(v1[i], v2[i]) for i in range(min(n, len(v1)))])


def log_view_pairs(writer, v1, v2, step: int, tag: str = "views/pairs") -> None:
    writer.add_image(tag, view_pair_grid(v1, v2), step, dataformats="CHW")


def log_text(writer, tag: str, text: str, step: int = 0) -> None:
    writer.add_text(tag, text, step)


def log_figure(writer, tag: str, fig, step: int = 0) -> None:
    writer.add_figure(tag, fig, step, close=True)


def log_hparams(writer, hparams: dict, metrics: dict) -> None:
    clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
    writer.add_hparams(clean, {f"hparam/{k}": float(v) for k, v in metrics.items() if v is not None}, run_name=".")


def _sprite_png(thumbs: torch.Tensor, path) -> None:
    """The projector's sprite: a square grid of (N, 3, s, s) thumbnails in [0, 1], as uint8 PNG at low compression
    (torch's writer builds it in float64 and compresses hard: 8 of the 10 s a 6k-scan projector took)."""
    from PIL import Image

    n, _, h, w = thumbs.shape
    per_row = int(np.ceil(np.sqrt(n)))
    cells = np.zeros((per_row * per_row, h, w, 3), dtype=np.uint8)
    cells[:n] = (thumbs.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = cells.reshape(per_row, per_row, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(per_row * h, per_row * w, 3)
    Image.fromarray(grid).save(path, compress_level=1)


def _tsv_cell(v) -> str:
    return str(v).replace("\t", " ").replace("\n", " ")


def log_embedding(writer, features: np.ndarray, metadata: list, header: list, thumbs: np.ndarray | None,
                  tag: str = "embeddings", step: int = 0) -> None:
    """TensorBoard projector: points, metadata columns, and a thumbnail sprite (scaled to fit 8192 px). The files
    are the ones SummaryWriter.add_embedding writes (projector_config.pbtxt, tensors.tsv, metadata.tsv, sprite.png),
    written with numpy instead of per-value Python."""
    from pathlib import Path

    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    logdir = Path(writer.get_logdir())
    subdir = f"{step:05d}/{tag}"
    folder = logdir / subdir
    folder.mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / "tensors.tsv", np.asarray(features, dtype=np.float32), fmt="%.6g", delimiter="\t")
    rows = [row if isinstance(row, (list, tuple)) else [row] for row in metadata]
    rows = ([header] if len(header) > 1 else []) + rows
    (folder / "metadata.tsv").write_text("".join("\t".join(map(_tsv_cell, r)) + "\n" for r in rows))
    config = getattr(writer, "_medcl_projector", None) or ProjectorConfig()
    info = config.embeddings.add()
    info.tensor_name, info.tensor_path = f"{tag}:{step:05d}", f"{subdir}/tensors.tsv"
    info.metadata_path = f"{subdir}/metadata.tsv"
    if thumbs is not None and len(thumbs):
        per_row = int(np.ceil(np.sqrt(len(thumbs))))
        max_side = max(8, SPRITE_MAX_SIDE // per_row)
        t = torch.as_tensor(thumbs, dtype=torch.float32)
        if t.shape[-1] > max_side:
            t = torch.nn.functional.interpolate(t, size=(max_side, max_side), mode="area")
        _sprite_png(t, folder / "sprite.png")
        info.sprite.image_path = f"{subdir}/sprite.png"
        info.sprite.single_image_dim.extend([t.shape[3], t.shape[2]])
    writer._medcl_projector = config
    (logdir / "projector_config.pbtxt").write_text(text_format.MessageToString(config))


def write_projector(writer, feats, scans, dims: int, header: list, meta: list, max_points: int = 10000, keep=None,
                    log=print) -> np.ndarray:
    """The TensorBoard projector: one point per scan with its metadata row and thumbnail. Past `max_points` a seeded
    random subsample is shown (the browser slows down past ~10k points), always including the rows `keep`.
    Returns the rows shown."""
    n = len(meta)
    show = np.arange(n)
    if n > max_points:
        keep = np.asarray([] if keep is None else keep, dtype=int)[:max_points]
        rest = np.setdiff1d(np.arange(n), keep)
        extra = np.random.default_rng(0).choice(rest, max_points - len(keep), replace=False)
        show = np.sort(np.concatenate([keep, extra]))
        log(f"projector shows {max_points} of {n} scans (--max-points)")
    thumbs = np.concatenate([thumbnail(scans.batch(show[s:s + 1024]), dims) for s in range(0, len(show), 1024)])
    if thumbs.shape[1] == 1:
        thumbs = np.repeat(thumbs, 3, axis=1)
    if thumbs.shape[-1] > 64:  # sprite cells of at most 64 px keep the sprite loadable
        thumbs = torch.nn.functional.interpolate(torch.as_tensor(thumbs), size=(64, 64), mode="area").numpy()
    log_embedding(writer, feats[show], [meta[i] for i in show], header, thumbs)
    return show
