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


def medcl(*args, check=True, env=None, in_process=True):
    """Run the `medcl` command line; returns a CompletedProcess (returncode, stdout, stderr).

    In this process by default: the same `main()` that `python -m medcl` calls, with stdout/stderr captured and
    os.environ restored afterwards. That saves the 3-4 s a fresh interpreter spends importing torch and MONAI, which
    was a third of the suite's time. Tests about the process itself (the entry point, SIGKILL, bit-equal resumed
    losses, what is imported) pass in_process=False."""
    import contextlib
    import io
    import subprocess
    import sys
    import traceback

    argv = [str(a) for a in args]
    new_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))  # None: unset
    new_env = {k: v for k, v in new_env.items() if v is not None}
    if not in_process:
        r = subprocess.run([sys.executable, "-m", "medcl", *argv], capture_output=True, text=True, timeout=600,
                           env=new_env)
    else:
        from medcl.cli import main

        out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
        os.environ.clear()
        os.environ.update(new_env)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(argv)
                except SystemExit as e:  # argparse: --help, usage errors
                    rc = e.code if isinstance(e.code, int) else int(e.code is not None)
                except Exception:  # as the interpreter would: a traceback and status 1
                    traceback.print_exc()
                    rc = 1
        finally:
            os.environ.clear()
            os.environ.update(saved)
        r = subprocess.CompletedProcess(["medcl", *argv], rc or 0, out.getvalue(), err.getvalue())
    if check and r.returncode:
        raise AssertionError(f"medcl {argv} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r
