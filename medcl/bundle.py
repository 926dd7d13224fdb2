"""`medcl export --bundle DIR`: an encoder (pretrain run) or a classifier (finetune run) as a MONAI bundle.

The Model Zoo layout: configs/metadata.json, configs/inference.json (defining `network_def`, the preprocessing, and
for a classifier the softmax), models/model.pt (a plain state dict), docs/README.md. `network_def` is MONAI's own
ResNet, so `monai.bundle.ConfigParser` builds and runs it in a process that never imports medcl. medcl's ResNet
encoders are MONAI ResNets (feed_forward=False gives the pooled features); a classifier's linear head is MONAI's `fc`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .data.preprocessing import Preprocessing
from .errors import MedclError, RunDirError
from .networks import RESNET_DEPTHS


def network_def(spec: dict, n_classes: int = 0) -> dict:
    """MONAI ResNet arguments that rebuild a medcl ResNet encoder (and its linear head, with n_classes)."""
    if spec["name"] not in RESNET_DEPTHS:
        raise MedclError(f"a MONAI bundle holds medcl's ResNet encoders ({', '.join(RESNET_DEPTHS)}); this one is "
                         f"{spec['name']}: export a classifier as .pt2 instead (medcl export --classifier FT "
                         f"--out F.pt2)")
    block, layers = RESNET_DEPTHS[spec["name"]]
    small = spec["stem"] == "small"
    net = {"_target_": "monai.networks.nets.ResNet", "block": block, "layers": layers,
           "block_inplanes": [64, 128, 256, 512], "spatial_dims": spec["spatial_dims"],
           "n_input_channels": spec["in_channels"], "conv1_t_size": 3 if small else 7,
           "conv1_t_stride": 1 if small else 2, "no_max_pool": small, "widen_factor": spec["widen_factor"],
           "shortcut_type": spec.get("shortcut", "B"), "bias_downsample": spec.get("bias_downsample", True)}
    return {**net, "feed_forward": True, "num_classes": n_classes} if n_classes else {**net, "feed_forward": False}


def _preprocessing(prep: Preprocessing) -> list:
    """medcl's reading of a scan (medcl.data.cache) in MONAI transforms: channels, intensity to [0, 1], the longest
    side resized to `size` and the rest zero-padded. It ignores the voxel spacing medcl keeps the aspect with. It reads
    PNG/JPEG/TIFF in 2D (rows first, as medcl does: PIL's reader otherwise puts the width first) and NIfTI in 3D."""
    reader = {"reader": "PILReader", "reverse_indexing": False} if prep.dims == 2 else {"reader": "NibabelReader"}
    # the channel axis from the file's header, inside the loader: it works with MONAI's metadata tracking off too
    t = [{"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True, **reader},
         {"_target_": "Lambdad", "keys": "image",
          "func": "$lambda x: x.mean(0, keepdim=True) if x.shape[0] >= 3 else x" if prep.channels == 1
          else "$lambda x: x[:3] if x.shape[0] >= 3 else x.repeat(3, *[1] * (x.ndim - 1))"}]
    if prep.intensity == "percentile":
        t.append({"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 0.5, "upper": 99.5,
                  "b_min": 0.0, "b_max": 1.0, "clip": True})
    elif prep.intensity == "minmax":
        t.append({"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0})
    t += [{"_target_": "Resized", "keys": "image", "spatial_size": prep.size, "size_mode": "longest", "mode": "area"},
          {"_target_": "SpatialPadd", "keys": "image", "spatial_size": [prep.size] * prep.dims},
          {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"}]
    return t


def _inference(net: dict, prep: Preprocessing, classifier: bool) -> dict:
    cfg = {"imports": ["$import torch"], "bundle_root": ".",
           "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
           "network_def": net, "network": "$@network_def.to(@device)",
           "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(prep)}}
    if classifier:
        cfg["postprocessing"] = {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]}
    return cfg


def _metadata(prep: Preprocessing, classes: list | None, feat_dim: int, source: str) -> dict:
    import monai
    import numpy

    shape = [prep.size] * prep.dims
    out = ({"type": "probabilities", "format": "classes", "num_channels": len(classes), "spatial_shape": [len(classes)],
            "dtype": "float32", "value_range": [0, 1], "is_onehot": False,
            "channel_def": {str(i): c for i, c in enumerate(classes)}} if classes else
           {"type": "embedding", "format": "features", "num_channels": feat_dim, "spatial_shape": [feat_dim],
            "dtype": "float32", "is_onehot": False, "channel_def": {}})
    return {"version": "0.1.0", "changelog": {"0.1.0": f"exported by medcl {__version__} from {source}"},
            "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__, "required_packages_version": {},
            "name": f"medcl {'classifier' if classes else 'encoder'}",
            "task": "classification" if classes else "representation (pooled features)",
            "description": f"A medcl {'classifier' if classes else 'contrastive encoder'}; inputs preprocessed as "
                           f"configs/inference.json#preprocessing states: {prep.dims}D, {prep.channels} channel(s), "
                           f"{prep.size} px per side, intensity '{prep.intensity}' to [0, 1].",
            "authors": "medcl", "copyright": "the medcl user who trained it",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "as trained",
                                     "num_channels": prep.channels, "spatial_shape": shape, "dtype": "float32",
                                     "value_range": [0, 1], "is_patch_data": False,
                                     "channel_def": {str(i): "image" for i in range(prep.channels)}}},
                "outputs": {"pred": out}},
            "medcl": {"preprocessing": prep.to_dict(), "source": source}}


def export_bundle(out, checkpoint=None, classifier=None, overwrite: bool = False, log=print) -> Path:
    """Write the bundle of a pretrain run (`checkpoint`) or a finetune run (`classifier`) to `out`, atomically."""
    from .encoders import load_encoder
    from .predict import load_classifier

    out = Path(out)
    if out.exists() and not overwrite:
        raise RunDirError(f"{out} already exists. Pass --overwrite to replace it, or choose another --bundle.")
    if classifier is not None:
        clf = load_classifier(classifier)
        encoder, prep, classes = clf.model.encoder, clf.preprocessing, list(clf.classes)
        state = {**{k[4:]: v for k, v in encoder.state_dict().items()},
                 **{f"fc.{k}": v for k, v in clf.model.head.state_dict().items()}}
    else:
        encoder, extra = load_encoder(checkpoint)
        prep, classes = Preprocessing.of(extra.get("data", {})), None
        state = {k[4:]: v for k, v in encoder.state_dict().items()}
    net = network_def(encoder.spec, len(classes) if classes else 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / "docs").mkdir()
        torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / "models" / "model.pt")
        source = str(classifier if classifier is not None else checkpoint)
        (tmp / "configs" / "inference.json").write_text(json.dumps(_inference(net, prep, bool(classes)), indent=2))
        (tmp / "configs" / "metadata.json").write_text(
            json.dumps(_metadata(prep, classes, encoder.feat_dim, source), indent=2))
        (tmp / "docs" / "README.md").write_text(_readme(prep, classes))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote the MONAI bundle {out} ({'classifier: probabilities' if classes else 'encoder: pooled features'}). "
        f"Without medcl:\n  from monai.bundle import ConfigParser; p = ConfigParser(); "
        f"p.read_config('{out}/configs/inference.json'); net = p.get_parsed_content('network_def')\n"
        f"  net.load_state_dict(torch.load('{out}/models/model.pt', weights_only=True)); net.eval()")
    return out


def _readme(prep: Preprocessing, classes) -> str:
    what = f"class probabilities over {classes} (softmax of the logits)" if classes else "pooled encoder features"
    return (f"# medcl bundle\n\nThe network maps a preprocessed batch (N, {prep.channels}, "
            f"{', '.join([str(prep.size)] * prep.dims)}), intensities in [0, 1], to {what}.\n\n"
            "```python\nimport torch\nfrom monai.bundle import ConfigParser\n\np = ConfigParser()\n"
            "p.read_config('configs/inference.json')\nnet = p.get_parsed_content('network_def')\n"
            "net.load_state_dict(torch.load('models/model.pt', weights_only=True))\nnet.eval()\n```\n\n"
            "`preprocessing` in configs/inference.json reads a file as medcl did (PNG/JPEG/TIFF in 2D, NIfTI in 3D; "
            "it does not keep the voxel spacing's aspect, which medcl does).\n")
