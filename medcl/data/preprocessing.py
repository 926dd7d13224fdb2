"""How scans become model inputs for one encoder: one value, saved with every run, read by every later command."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocessing:
    """The data settings an encoder was pretrained with (`data` in encoder.pt and classifier.pt). Every command after
    pretraining reads scans through this value, so they all read them exactly as pretraining did."""
    dims: int = 2
    size: int = 64
    channels: int = 1
    intensity: str = "percentile"
    skip_label_maps: bool = True  # integer label maps beside images are skipped (a folder of only them is the data)

    @classmethod
    def of(cls, value) -> Preprocessing:
        """From a saved settings dict (older files may lack keys: the defaults above), a DataConfig, or itself."""
        if isinstance(value, cls):
            return value
        get = value.get if isinstance(value, dict) else lambda k, d: getattr(value, k, d)
        default = cls()
        return cls(dims=int(get("dims", default.dims)), size=int(get("size", default.size)),
                   channels=int(get("channels", default.channels)),
                   intensity=str(get("intensity", default.intensity)),
                   skip_label_maps=bool(get("skip_label_maps", default.skip_label_maps)))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def input_shape(self) -> tuple:
        """One scan as the model takes it: (channels, *[size] * dims)."""
        return (self.channels,) + (self.size,) * self.dims

