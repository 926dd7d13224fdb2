"""Data: folder or .npz -> scan records -> decoded, resampled arrays -> labels and splits."""
from .discover import ScanRecord, discover, open_source
from .readers import read_scan

__all__ = ["ScanRecord", "discover", "open_source", "read_scan"]
