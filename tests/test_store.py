"""The persistent scan cache: hit, miss and invalidation; two processes on one cache; a decode killed with SIGKILL
and rerun; two gloo ranks decoding each scan exactly once; identical outputs with and without a warm cache."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from medcl.data import store as store_mod
from medcl.data.cache import build_cache
from medcl.data.discover import open_source
from medcl.data.synthetic import make_phantoms
from medcl.errors import MedclError

ROOT = Path(__file__).resolve().parents[1]


def counting_source(folder, dims=2):
    """A source whose reads are counted (the number of scans actually decoded)."""
    src = open_source(folder, dims)
    src.n_reads = 0
    read = src.read

    def counted(rec):
        src.n_reads += 1
        return read(rec)

    src.read = counted
    return src


def decode(folder, cache_root, dims=2, size=24, **kw):
    src = counting_source(folder, dims)
    st = store_mod.open_store(src.root, {"dims": dims, "size": size, "test": 1}, root=cache_root) if cache_root else None
    scans = build_cache(src, dims, size, store=st, progress=False, **kw)
    return scans, src.n_reads


@pytest.fixture()
def folder(tmp_path):
    return make_phantoms(tmp_path / "scans", n=30, dims=2, size=32, seed=3)


def test_hit_miss_and_invalidation_on_change(tmp_path, folder):
    cache = tmp_path / "cache"
    cold, n1 = decode(folder, cache)
    assert n1 == 30 and cold.decoded == 30
    warm, n2 = decode(folder, cache)
    assert n2 == 0 and warm.decoded == 0  # every scan from the cache
    np.testing.assert_array_equal(cold.batch(np.arange(30)), warm.batch(np.arange(30)))
    # a changed file (new content and modification time) is decoded again; a new one too; a deleted one is ignored
    changed = folder / cold.records[0].key
    arr = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(changed))
    __import__("PIL.Image", fromlist=["Image"]).fromarray(255 - arr).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (folder / cold.records[1].key).unlink()
    again, n3 = decode(folder, cache)
    assert n3 == 1 and len(again) == 29
    assert not np.array_equal(again.batch([0]), cold.batch([0]))
    # without a cache every command decodes everything, to the same arrays
    nocache, n4 = decode(folder, None)
    assert n4 == 29
    np.testing.assert_array_equal(nocache.batch(np.arange(29)), again.batch(np.arange(29)))


def test_unusable_scans_are_remembered_and_reported_by_path(tmp_path, folder):
    (folder / "broken.png").write_bytes(b"not a png")
    cache = tmp_path / "cache"
    first, _ = decode(folder, cache)
    second, n = decode(folder, cache)
    assert n == 0
    assert [p for p, _ in first.skipped] == [p for p, _ in second.skipped]
    assert any(str(p).endswith("broken.png") for p, _ in second.skipped)


def test_entries_read_fast_equal_numpy_and_damaged_ones_are_decoded_again(tmp_path, folder):
    cache = tmp_path / "cache"
    cold, _ = decode(folder, cache)
    st = store_mod.open_store(folder, {"dims": 2, "size": 24, "test": 1}, root=cache)
    keys = [st.key(r) for r in cold.records]
    for k in keys[:5]:  # the direct read gives numpy's array, writable
        fast = store_mod.read_entry(st.entry(k), cold.item_shape)
        np.testing.assert_array_equal(fast, np.load(st.entry(k)))
        assert fast.flags.writeable and fast.dtype == np.float32
    # another layout (float64) falls back to numpy; a truncated entry and a foreign file are decoded again
    np.save(st.entry(keys[0]), np.load(st.entry(keys[0])).astype(np.float64))
    assert store_mod.read_entry(st.entry(keys[0]), cold.item_shape).dtype == np.float64
    st.entry(keys[1]).write_bytes(st.entry(keys[1]).read_bytes()[:-7])
    st.entry(keys[2]).write_bytes(b"garbage")
    assert st.get(keys[1], cold.item_shape) is None and st.get(keys[2], cold.item_shape) is None
    again, n = decode(folder, cache)
    assert n == 2  # the two damaged entries
    np.testing.assert_array_equal(again.batch(np.arange(len(again))), cold.batch(np.arange(len(cold))))


def test_key_is_the_resolved_path_and_follows_linked_files(tmp_path, folder):
    st = store_mod.open_store(folder, {"dims": 2, "test": 1}, root=tmp_path / "cache")
    rec = open_source(folder, 2).records[0]
    linked = tmp_path / "linked"
    linked.symlink_to(folder, target_is_directory=True)
    lrec = open_source(linked, 2).records[0]
    assert st.key(lrec) == st.key(rec)  # the same file reached through a linked folder: one entry
    single = tmp_path / "one.png"
    single.symlink_to(rec.path)
    srec = open_source(single, 2).records[0]
    assert st.key(srec) == st.key(rec)  # a linked file: its target
    import hashlib

    p = Path(rec.path).resolve()
    stt = p.stat()  # the key's definition (unchanged since format v1, so older caches still hit)
    assert st.key(rec) == hashlib.sha256(f"{p}|{stt.st_size}|{stt.st_mtime_ns}\n".encode()).hexdigest()[:32]


def test_problems_are_reported_in_scan_order_whether_cached_or_new(tmp_path, folder):
    (folder / "a_broken.png").write_bytes(b"not a png")
    cache = tmp_path / "cache"
    first, _ = decode(folder, cache)
    (folder / "z_broken.png").write_bytes(b"nor this")  # new: decoded in the second pass, listed after a_broken
    (folder / "0_broken.png").write_bytes(b"nor this")  # new, listed first
    second, n = decode(folder, cache)
    assert n == 2
    none, _ = decode(folder, None)
    assert [p for p, _ in second.skipped] == [p for p, _ in none.skipped]
    assert [Path(p).name for p, _ in second.skipped] == ["0_broken.png", "a_broken.png", "z_broken.png"]


def test_cache_inside_data_is_refused(folder):
    with pytest.raises(MedclError, match="inside DATA"):
        store_mod.open_store(folder, {"dims": 2}, root=folder / ".cache")


def test_large_folders_are_read_per_batch_from_the_cache(tmp_path, folder):
    """Past data.cache_max_gb nothing is held in memory: batches are read from the cache's files."""
    cache = tmp_path / "cache"
    small, _ = decode(folder, cache)
    big, _ = decode(folder, cache, cache_max_gb=1e-9)
    assert big.images is None and len(big.files) == 30
    np.testing.assert_array_equal(big.batch([5, 2, 9]), small.batch([5, 2, 9]))


def _decode_worker(folder, cache, q):
    scans, n = decode(Path(folder), Path(cache))
    q.put((n, scans.batch(np.arange(len(scans)))))


def test_two_processes_on_one_cache(tmp_path, folder):
    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_decode_worker, args=(str(folder), str(cache), q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    clean, _ = decode(folder, None)
    for _, arrays in results:
        np.testing.assert_array_equal(arrays, clean.batch(np.arange(len(clean))))
    warm, n = decode(folder, cache)
    assert n == 0
    assert not list(cache.rglob("*.tmp"))  # no partial write left behind


KILL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from medcl.data import store
from medcl.data.cache import build_cache
from medcl.data.discover import open_source
src = open_source(Path({folder!r}), 3)
read = src.read
def slow(rec):
    time.sleep(0.05)  # slow enough to be killed half way
    return read(rec)
src.read = slow
st = store.open_store(src.root, {{"dims": 3, "size": 24, "test": 1}}, root=Path({cache!r}))
build_cache(src, 3, 24, store=st, progress=False, num_workers=2)
"""


def test_sigkill_during_decode_then_rerun_gives_the_clean_arrays(tmp_path):
    folder = make_phantoms(tmp_path / "vols", n=60, dims=3, size=24, seed=4)
    cache = tmp_path / "cache"
    script = KILL_SCRIPT.format(root=str(ROOT), folder=str(folder), cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.rglob("*.npy"))) < 10:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cache.rglob("*.npy")))
    assert 0 < done < 60, f"the kill came too late or too early ({done} entries)"
    rerun, n = decode(folder, cache, dims=3)
    assert n == 60 - done  # only what was missing is decoded again
    clean, _ = decode(folder, None, dims=3)
    np.testing.assert_array_equal(rerun.batch(np.arange(60)), clean.batch(np.arange(60)))


def _rank_worker(rank, world, port, folder, cache, q):
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    scans, n = decode(Path(folder), Path(cache))
    q.put((rank, n, scans.batch(np.arange(len(scans)))))
    tdist.barrier()
    tdist.destroy_process_group()


def test_two_gloo_ranks_decode_each_scan_exactly_once(tmp_path, folder):
    from test_dist import _free_port

    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, str(folder), str(cache), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    counts = [n for _, n, _ in results]
    assert sum(counts) == 30 and min(counts) == 15, counts  # each scan once, half each
    np.testing.assert_array_equal(results[0][2], results[1][2])


@pytest.mark.slow
def test_commands_give_identical_outputs_with_and_without_a_warm_cache(tmp_path, phantoms2d):
    """embed and finetune with a cold cache, a warm one, and none: the same embeddings and predictions, bit for bit."""
    from medcl.cli import main

    run = tmp_path / "run"
    env = os.environ.copy()
    assert main(["pretrain", str(phantoms2d), "--out", str(run), "--epochs", "1", "--set", "encoder.widen_factor=0.125",
                 "--set", "data.size=16", "--batch-size", "16", "--quiet", "--cache-dir", str(tmp_path / "c")]) == 0
    outs, preds = [], []
    for name, cache in (("cold", tmp_path / "c2"), ("warm", tmp_path / "c2"), ("none", "off")):
        assert main(["embed", "--checkpoint", str(run), "--data", str(phantoms2d), "--out", str(tmp_path / name),
                     "--quiet", "--cache-dir", str(cache)]) == 0
        outs.append(np.load(tmp_path / name / "embeddings.npz")["features"])
        assert main(["finetune", "--checkpoint", str(run), "--data", str(phantoms2d), "--labels",
                     str(phantoms2d / "labels.csv"), "--out", str(tmp_path / f"ft_{name}"), "--label-fraction", "0.5",
                     "--quiet", "--cache-dir", str(cache)]) == 0
        preds.append((tmp_path / f"ft_{name}" / "predictions.csv").read_text())
    os.environ.clear()
    os.environ.update(env)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])
    assert preds[1] == preds[0] and preds[2] == preds[0]


def test_cache_info_and_clear(tmp_path, folder, capsys):
    from medcl.cli import main

    cache = tmp_path / "cache"
    decode(folder, cache)
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "30 scans" in out
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "MiB freed" in capsys.readouterr().out
    assert not (cache / "v1").exists()
