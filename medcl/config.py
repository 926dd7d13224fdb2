"""Typed configuration: dataclass defaults <- YAML recipe <- `--set key=value` overrides.

Unknown keys and values of the wrong type are errors that name the key and suggest the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .networks import encoder_names


def knob(default=dataclasses.MISSING, help: str = "", factory=dataclasses.MISSING):
    """A config key with its meaning, which `medcl config show` prints beside it."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dims: int = knob(2, "spatial dims of the encoder: 2 (images, slices) or 3 (volumes)")
    size: int = knob(64, "every scan is resampled once (aspect kept, zero-padded) to size^dims")
    channels: int = knob(1, "1: grayscale (colour averaged); 3: keep RGB")
    intensity: str = knob("percentile", "per-scan normalisation to [0,1]: percentile (0.5-99.5) | minmax | none")
    npz_split: str = knob("train", "MedMNIST .npz: which split to pretrain on (train | val | test | all)")
    max_bad_fraction: float = knob(0.2, "stop if more than this share of scans cannot be used")
    strict: bool = knob(False, "stop at the first unreadable scan instead of skipping it")
    cache_max_gb: float = knob(4.0, "decoded scans above this size go to a memory-mapped file in the run folder")
    num_workers: int = knob(2, "threads decoding scans")
    skip_label_maps: bool = knob(True, "skip integer images with few values (masks, tumour labels) with a reason")
    include: str = knob("", "comma list of glob patterns on the path relative to DATA; only matching scans are used")
    exclude: str = knob("", "comma list of glob patterns; matching scans are left out (e.g. *mask*,*seg*)")
    files: str = knob("", "a text file listing the scans to use, one path relative to DATA per line")


@dataclass
class ViewsConfig:
    backend: str = knob("auto", "monai (per sample, CPU) | batched (whole batch, on the training device) | auto")
    crop_scale: tuple = knob((0.4, 1.0), "random resized crop: share of the image area (volume) kept")
    flip_prob: float = knob(0.5, "per spatial axis")
    rotate_deg: float = knob(15.0, "max rotation per axis")
    gamma: tuple = knob((0.7, 1.5), "contrast/gamma range")
    gamma_prob: float = knob(0.8, "probability of the gamma change per view")
    intensity_scale: float = knob(0.1, "multiply by U(1-s, 1+s)")
    intensity_shift: float = knob(0.1, "add U(-s, s)")
    intensity_prob: float = knob(0.8, "probability of the scale/shift per view")
    noise_std: float = knob(0.05, "gaussian noise std (image range is [0,1])")
    noise_prob: float = knob(0.5, "probability of noise per view")
    blur_sigma: tuple = knob((0.5, 1.0), "gaussian blur sigma in pixels")
    blur_prob: float = knob(0.3, "probability of blur per view")
    transforms: list = knob(factory=list, help="MONAI transforms in bundle syntax ({_target_: RandBiasField, prob: "
                                               "0.3}); empty: the knobs above (docs/views.md)")


@dataclass
class EncoderConfig:
    name: str = knob("resnet18", "resnet10|18|34|50 | densenet121 | efficientnet-b0 | vit | swin (all MONAI; "
                                 "docs/encoders.md)")
    stem: str = knob("auto", "resnet/densenet: small (3x3 stride 1, no max-pool) | standard (7x7/2 + max-pool) | auto "
                             "(small if size<=32)")
    widen_factor: float = knob(1.0, "resnet channel multiplier; 0.25-0.5 makes fast CPU models")
    patch_size: int = knob(4, "vit/swin: patch side in pixels (voxels); data.size must be a multiple for vit")
    depth: int = knob(6, "vit: transformer blocks")
    width: int = knob(192, "vit: token width (heads of 64 channels)")
    swin_feature_size: int = knob(24, "swin: channels of the first stage (x16 at the last, the feature size)")
    shortcut: str = knob("B", "resnet: downsampling shortcut, B (1x1 conv) | A (pooled, zero-padded: MedicalNet 18/34)")
    bias_downsample: bool = knob(True, "resnet: bias in the 1x1 shortcut conv (MONAI's default; torchvision has none)")
    init: str = knob("", "pretrain --init: weights to start from (file, run folder or name; docs/weights.md)")


@dataclass
class MethodConfig:
    name: str = knob("simclr", "simclr | supcon | pair | triplet | moco_v2 | moco_v3 | byol | simsiam | barlow | vicreg"
                               " | dino | mae | monai_ssl")
    positives: str = knob("views", "views | patient | neighbors")
    neighbor_distance: int = knob(2, "neighbors: max slice (or sub-volume shift, in voxels of the cache) distance")
    temperature: float = knob(0.0, "NT-Xent/InfoNCE/SupCon/MoCo softmax temperature; 0: the method's (docs/methods.md)")
    proj_hidden: int = knob(0, "projection head hidden width; 0: the method's own head (docs/methods.md)")
    proj_dim: int = knob(0, "projection output (DINO: bottleneck) width; 0: the method's")
    pred_hidden: int = knob(0, "BYOL/SimSiam/MoCo v3 predictor hidden width; 0: the method's")
    margin: float = knob(1.0, "pair/triplet margin (on L2-normalised embeddings)")
    mining: str = knob("batch_hard", "triplet: batch_hard | semi_hard")
    momentum: float = knob(0.0, "MoCo/BYOL/DINO EMA base, cosine-increased to 1; 0: automatic, 1 - 10/steps in [0.9, "
                                "0.996] (MoCo v2: 0.99)")
    queue_size: int = knob(4096, "MoCo v2 negative queue")
    barlow_lambda: float = knob(0.005, "Barlow Twins off-diagonal weight")
    vicreg_weights: tuple = knob((25.0, 25.0, 1.0), "invariance, variance, covariance")
    stop_gradient: bool = knob(True, "SimSiam/BYOL; False makes them collapse (useful to test the monitors)")
    local_crops: int = knob(-1, "multi-crop: small extra views per scan; -1: the method's (dino 6, others 0)")
    local_crop_scale: tuple = knob((0.05, 0.4), "share of the area (volume) a local crop keeps")
    local_size: int = knob(0, "side of the local crops; 0: 3/7 of data.size (DINO's 96 of 224)")
    dino_out_dim: int = knob(4096, "DINO prototypes (65536 in the paper, for ImageNet)")
    teacher_temp: tuple = knob((0.04, 0.07), "DINO teacher temperature, warmed up linearly over 30% of training")
    student_temp: float = knob(0.1, "DINO student temperature")
    center_momentum: float = knob(0.9, "DINO centre EMA")
    mask_ratio: float = knob(0.75, "MAE: share of patches hidden from the encoder")
    decoder_width: int = knob(96, "MAE decoder token width (a multiple of 12)")
    decoder_depth: int = knob(2, "MAE decoder transformer blocks")
    norm_pix_loss: bool = knob(True, "MAE: reconstruct per-patch normalised pixels")


@dataclass
class OptimConfig:
    name: str = knob("adamw", "adamw | lars")
    lr: float = knob(1e-3, "peak learning rate (after warm-up)")
    weight_decay: float = knob(1e-4, "not applied to biases and norm layers")
    warmup_epochs: float = knob(1.0, "linear warm-up, then cosine decay")
    min_lr_ratio: float = knob(0.01, "cosine ends at lr * min_lr_ratio")


@dataclass
class TrainConfig:
    epochs: int = knob(20, "passes over the scans (--epochs)")
    batch_size: int = knob(128, "global batch (--batch-size); lowered, with a note, if a step would not fit in memory")
    seed: int = knob(0, "seeds views, order and weights: a run is repeatable (--seed)")
    device: str = knob("auto", "auto | cpu | cuda")
    amp: str = knob("auto", "auto (bf16 autocast on a GPU, and in 2D on a CPU with native bf16) | bf16 | off")
    # speed switches (see medcl.train.speed_settings for what each resolves to on a device)
    channels_last: bool = knob(True, "2D on GPU")
    compile: bool = knob(False, "torch.compile the encoder (minutes of compilation; pays off on long GPU runs)")
    cudnn_benchmark: bool = knob(True, "GPU: autotune convolution algorithms once for the fixed input shape")
    fused_optimizer: str = knob("auto", "auto (fused AdamW on GPU) | on | off; LARS is never fused")
    num_workers: int = knob(0, "DataLoader workers for the monai view backend")
    checkpoint_every: int = knob(0, "steps between mid-epoch checkpoints (0: end of each epoch only)")
    log_every: int = knob(10, "steps between scalar logs")
    monitor_every: int = knob(50, "steps between collapse monitors")
    max_steps: int = knob(0, "stop after this many steps (0: run all epochs); for smoke tests")
    time_budget: str = knob("", "e.g. 20m, 1h30m (--time): as many steps as fit, replacing epochs; empty: train.epochs")
    memory_gb: float = knob(0.0, "memory one step may use (0: 80% of what is free at the start); the batch is lowered "
                                 "to fit")


@dataclass
class MedclConfig:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        def conv(v):
            return list(v) if isinstance(v, tuple) else v

        return {s.name: {k: conv(v) for k, v in dataclasses.asdict(getattr(self, s.name)).items()}
                for s in dataclasses.fields(self)}


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)  # 0.5 offered 'compile' for 'nope'
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."


def _coerce(key: str, value, default):
    """Return `value` converted to the type of `default`, or raise ConfigError naming the key."""
    kind = type(default)
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(default, str):
            if isinstance(value, bool):  # YAML 1.1 reads a bare off/on (train.amp=off) as a boolean
                return "on" if value else "off"
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return str(value)
        if isinstance(default, list):
            check_transform_items(value)
            return list(value)
        if isinstance(default, tuple):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * len(default)
            if not isinstance(value, (list, tuple)) or len(value) != len(default):
                raise TypeError
            return tuple(_coerce(key, v, d) for v, d in zip(value, default))
    except (TypeError, ValueError):
        pass
    else:
        return value
    expect = f"a list of {len(default)} numbers" if isinstance(default, tuple) else kind.__name__
    raise ConfigError(f"config key '{key}': expected {expect}, got {value!r}.")


def check_transform_items(items) -> None:
    """views.transforms: a list of bundle-style items (checked here, before MONAI is imported, so a typo fails in a
    second; MONAI's ConfigParser resolves them when views are built)."""
    if not isinstance(items, (list, tuple)):
        raise ConfigError("views.transforms: expected a list of {_target_: MonaiTransform, ...} items.")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("_target_"), str):
            raise ConfigError(f"views.transforms[{i}]: expected a mapping with a `_target_` (a MONAI transform name, "
                              f"e.g. {{_target_: RandBiasField, prob: 0.3}}), got {it!r}.")


def apply_overrides(cfg: MedclConfig, overrides: dict, source: str = "config") -> MedclConfig:
    """Apply a nested dict {section: {key: value}} onto cfg, checking keys and types."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(cfg.to_dict())}).")
    sections = {f.name for f in dataclasses.fields(cfg)}
    for sec, values in overrides.items():
        if sec not in sections:
            raise ConfigError(f"{source}: unknown section '{sec}'." + _suggest(str(sec), sections))
        sub = getattr(cfg, sec)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{sec}' must be a mapping of keys to values.")
        names = {f.name for f in dataclasses.fields(sub)}
        for k, v in values.items():
            if k not in names:
                home = [o for o in sorted(sections) if k in {f.name for f in dataclasses.fields(getattr(cfg, o))}]
                hint = f" '{k}' is in section '{home[0]}': use {home[0]}.{k}." if home else _suggest(str(k), names)
                raise ConfigError(f"{source}: unknown key '{sec}.{k}'." + hint)
            setattr(sub, k, _coerce(f"{sec}.{k}", v, getattr(sub, k)))
    validate(cfg)
    return cfg


def parse_set(items: typing.Iterable[str]) -> dict:
    """['method.name=byol', 'views.crop_scale=[0.3,1]'] -> {'method': {'name': 'byol'}, ...}."""
    out: dict = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set expects section.key=value (e.g. method.name=byol), got '{item}'.")
        key, raw = item.split("=", 1)
        sec, name = key.strip().split(".", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out.setdefault(sec, {})[name] = value
    return out


RECIPES = Path(__file__).parent / "recipes"  # shipped in the wheel; configs/pretrain links here
TRAINED_ON = "trained_on"  # written by medcl into a run's config.yaml: what the run was trained on, not a setting


def recipe_names() -> list:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """A YAML file, or the name of a recipe that ships with medcl (`simclr_2d`, `simclr_2d.yaml`)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = RECIPES / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if len(p.parts) == 1 and shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {p}. Give a YAML file, or a recipe that ships with medcl: "
                      f"{', '.join(recipe_names())}.")


def _read_yaml(p: Path) -> dict:
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}).") from None
    if isinstance(data, dict):
        data.pop(TRAINED_ON, None)
    return data


def _paths(path) -> list:
    return [] if not path else [path] if isinstance(path, (str, Path)) else list(path)


def views_only(path) -> bool:
    """True when every recipe given sets nothing but `views` (e.g. views_mri): the folder's own defaults
    (medcl.auto) then still decide everything else."""
    return bool(_paths(path)) and all(set(_read_yaml(resolve_recipe(p))) <= {"views"} for p in _paths(path))


def load_config(path=None, overrides: dict | None = None, base: dict | None = None) -> MedclConfig:
    """defaults <- base (a saved run, or the folder's auto settings) <- recipes (a path or a list, later ones win)
    <- overrides (--set)."""
    cfg = MedclConfig()
    if base:
        apply_overrides(cfg, base, "saved run config")
    for path_ in _paths(path):
        p = resolve_recipe(path_)
        apply_overrides(cfg, _read_yaml(p), str(p))
    if overrides:
        apply_overrides(cfg, overrides, "--set")
    validate(cfg)
    return cfg


_CHOICES = {
    ("data", "dims"): (2, 3),
    ("data", "channels"): (1, 3),
    ("data", "intensity"): ("percentile", "minmax", "none"),
    ("data", "npz_split"): ("train", "val", "test", "all"),
    ("views", "backend"): ("auto", "monai", "batched"),
    ("encoder", "shortcut"): ("A", "B"),
    ("encoder", "stem"): ("auto", "small", "standard"),
    ("method", "positives"): ("views", "patient", "neighbors"),
    ("method", "mining"): ("batch_hard", "semi_hard"),
    ("optim", "name"): ("adamw", "lars"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "amp"): ("auto", "bf16", "off"),
    ("train", "fused_optimizer"): ("auto", "on", "off"),
}


# the names medcl.methods.METHODS defines (a test keeps the two equal); listed here so that checking a config needs
# no torch import, and a mistyped key fails in a second, not after half a minute of imports
METHOD_NAMES = ("simclr", "supcon", "pair", "triplet", "moco_v2", "moco_v3", "byol", "simsiam", "barlow", "vicreg",
                "dino", "mae", "monai_ssl")


def validate(cfg: MedclConfig) -> None:
    for (sec, key), allowed in _CHOICES.items():
        v = getattr(getattr(cfg, sec), key)
        if v not in allowed:
            close = difflib.get_close_matches(str(v), [str(a) for a in allowed], n=1, cutoff=0.5)
            raise ConfigError(f"{sec}.{key}={v!r} is not one of {', '.join(map(str, allowed))}."
                              + (f" Did you mean '{close[0]}'?" if close else ""))
    if cfg.encoder.name not in encoder_names():  # the registry, so an encoder registered later is valid too
        raise ConfigError(f"encoder.name={cfg.encoder.name!r} is not one of {', '.join(encoder_names())}."
                          + _suggest(cfg.encoder.name, encoder_names()).replace("Valid keys", "Valid values"))
    if cfg.method.name not in METHOD_NAMES:
        raise ConfigError(f"method.name={cfg.method.name!r} is not a known method."
                          + _suggest(cfg.method.name, METHOD_NAMES)
                          .replace("Valid keys", "Known methods"))
    lo, hi = cfg.views.crop_scale
    if not (0 < lo <= hi <= 1):
        raise ConfigError(f"views.crop_scale={cfg.views.crop_scale}: need 0 < min <= max <= 1.")
    if cfg.train.time_budget:
        from .timebudget import parse_duration

        try:
            parse_duration(cfg.train.time_budget)
        except ValueError as err:
            raise ConfigError(f"train.time_budget (--time): {err}") from None
    e = cfg.encoder
    if e.name == "vit":
        if cfg.data.size % e.patch_size:
            raise ConfigError(f"encoder vit: data.size={cfg.data.size} must be a multiple of "
                              f"encoder.patch_size={e.patch_size}.")
        step = 4 if cfg.data.dims == 2 else 6  # MONAI's sin-cos positions split the width over axes and sin/cos
        heads = max(1, e.width // 64)
        if e.width % step or e.width % heads:
            raise ConfigError(f"encoder vit: encoder.width={e.width} must be a multiple of {step} in {cfg.data.dims}D "
                              f"and of its {heads} heads (e.g. 96, 192, 384).")
    m = cfg.method
    if m.name == "mae" and e.name != "vit":
        raise ConfigError(f"method mae needs encoder.name=vit (got {e.name}): it masks patch tokens.")
    if not 0 < m.mask_ratio < 1:
        raise ConfigError(f"method.mask_ratio={m.mask_ratio}: need 0 < ratio < 1.")
    if m.decoder_width % 12:
        raise ConfigError(f"method.decoder_width={m.decoder_width} must be a multiple of 12 (sin-cos positions in "
                          f"2D/3D).")
    lo, hi = m.local_crop_scale
    if not (0 < lo <= hi <= 1):
        raise ConfigError(f"method.local_crop_scale={m.local_crop_scale}: need 0 < min <= max <= 1.")
    if e.name == "swin" and e.swin_feature_size % 3:
        raise ConfigError(f"encoder swin: encoder.swin_feature_size={e.swin_feature_size} must be a multiple of 3 "
                          "(its stages have 3, 6, 12 and 24 heads), e.g. 12, 24, 48.")
    if cfg.data.size < 8:
        raise ConfigError(f"data.size={cfg.data.size} is too small; use at least 8.")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be at least 2: contrastive losses need other samples in the batch.")
    if cfg.train.epochs < 1:
        raise ConfigError("train.epochs must be at least 1.")


def save_config(cfg: MedclConfig, path: Path, trained_on: dict | None = None) -> None:
    d = cfg.to_dict()
    if trained_on:
        d[TRAINED_ON] = trained_on
    path.write_text(yaml.safe_dump(d, sort_keys=False))


def saved_run(path: Path) -> tuple[dict, dict]:
    """(config sections, trained_on) of a run's config.yaml."""
    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}).") from None
    return {k: v for k, v in d.items() if k != TRAINED_ON}, d.get(TRAINED_ON) or {}


# keys a resumed run may change: how it runs and logs, not what it learns
RESUME_MAY_CHANGE = {"train.epochs", "train.device", "train.num_workers", "train.log_every", "train.monitor_every",
                     "train.checkpoint_every", "train.max_steps", "train.time_budget", "data.num_workers",
                     "data.cache_max_gb"}


def resume_differences(saved: MedclConfig, asked: MedclConfig) -> list:
    """[(key, saved value, asked value)] for the settings a resume may not change."""
    a, b = saved.to_dict(), asked.to_dict()
    return [(f"{sec}.{k}", a[sec][k], b[sec][k]) for sec in a for k in a[sec]
            if a[sec][k] != b[sec][k] and f"{sec}.{k}" not in RESUME_MAY_CHANGE]


def describe(cfg: MedclConfig) -> str:
    """The resolved config as YAML with each key's meaning (its `help` in the dataclasses above), so that every
    `--set section.key=value` is discoverable without reading the source."""
    lines, values = [], cfg.to_dict()
    for section in dataclasses.fields(cfg):
        lines.append(f"{section.name}:")
        meaning = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(getattr(cfg, section.name))}
        for k, v in values[section.name].items():
            text = yaml.safe_dump({k: v}, default_flow_style=True, width=1000).strip().strip("{}")
            lines.append(f"  {text:<38} # {meaning.get(k, '')}".rstrip())
    return "\n".join(lines) + "\n"
