import atexit
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDCL_SHARED_DATA", ROOT.parent / "shared" / "data"))

# the scan cache of every command under test lives in a folder of this session, never in the user's ~/.cache
os.environ["MEDCL_CACHE"] = tempfile.mkdtemp(prefix="medcl_test_cache_")
atexit.register(shutil.rmtree, os.environ["MEDCL_CACHE"], ignore_errors=True)  # one per session, not left behind

warnings.filterwarnings("ignore", module="monai")
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def shared(*parts) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (tests read public datasets from ../shared/data)")
    return p


@pytest.fixture(scope="session")
def phantoms2d(tmp_path_factory):
    from medcl.data.synthetic import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("ph2"), n=48, dims=2, size=32, seed=1)


@pytest.fixture(scope="session")
def phantoms3d(tmp_path_factory):
    from medcl.data.synthetic import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("ph3"), n=24, dims=3, size=24, seed=2)
