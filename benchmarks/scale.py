"""The scan cache at scale: first decode, a second command's start-up, peak memory, and sharded decoding under torchrun.

Generates (once, in --work) a folder of 2D PNGs (256 px X-ray-like phantoms) and one of 3D NIfTI volumes (96^3),
then, each in a fresh process so times and peak RSS belong to that command alone:
  1. first run: discover + decode into an empty scan cache (1 process, data.num_workers=2 threads);
  2. second run: the same folder again (everything read from the cache): the target is >= 20x faster than (1);
  3. peak RSS of (2) with the scans held in memory, and with data.cache_max_gb=0 (read per batch from the cache):
     the second stays flat as the folder grows (only the index grows);
  4. decode under `torchrun --nproc_per_node 2` (gloo, CPU) into an empty cache vs 1 process: target <= 0.6x;
  5. the same with one decode thread per process (a rank's share of the cores, as on a node with more cores than one
     process's pool uses).
Not a test. Prints a markdown table.

Usage:  python benchmarks/scale.py [--n2d 20000] [--n3d 2000] [--work /tmp/medcl_scale]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_folder(folder: Path, n: int, dims: int) -> None:
    """Phantoms as real files: PNG (uint8, 256 px) in 2D, NIfTI (.nii.gz, 96^3) in 3D; made once."""
    done = folder / ".complete"
    if done.is_file() and int(done.read_text()) == n:
        return
    import nibabel as nib
    import numpy as np
    from PIL import Image

    from medcl.data.synthetic import add_lesions, make_anatomy, render

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    size = 256 if dims == 2 else 96
    t0 = time.perf_counter()
    for i in range(n):
        a = make_anatomy(rng, dims, size)
        if i % 2:
            a = add_lesions(rng, a, dims, size)
        img = render(a, dims, size, rng)
        sub = folder / f"p{i // 1000:03d}"  # 1000 files per folder, as exports from a PACS often are
        sub.mkdir(exist_ok=True)
        if dims == 2:
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(sub / f"scan{i:06d}.png")
        else:
            nib.save(nib.Nifti1Image((img * 1000).astype(np.int16), np.diag([1.0, 1.0, 1.5, 1.0])),
                     str(sub / f"vol{i:05d}.nii.gz"))
        if i and i % 2000 == 0:
            print(f"    made {i}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    done.write_text(str(n))


def measure(folder: str, dims: int, size: int, cache: str, max_gb: float, threads: int = 2) -> dict:
    """One command's scan loading, in this process: discovery + scan cache. Under torchrun, every rank runs it."""
    import resource

    import torch.distributed as tdist

    from medcl import dist
    from medcl.data.cache import build_cache
    from medcl.data.discover import open_source

    os.environ["MEDCL_CACHE"] = cache
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_from_env("cpu")
    t0 = time.perf_counter()
    src = open_source(folder, dims)
    t_list = time.perf_counter() - t0
    scans = build_cache(src, dims, size, cache_max_gb=max_gb, num_workers=threads, progress=False, log=lambda *a: None)
    t = time.perf_counter() - t0
    x = scans.batch(list(range(0, len(scans), max(1, len(scans) // 256))))  # a batch, as training's first step reads
    out = {"n": len(scans), "seconds": t, "list_seconds": t_list, "decoded": scans.decoded, "rank": dist.rank(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batch_mean": float(x.mean())}
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    print("RESULT " + json.dumps(out), flush=True)
    return out


def run_measure(folder, dims, size, cache, max_gb=4.0, nproc=1, threads=2) -> list[dict]:
    args = ["_measure", str(folder), str(dims), str(size), str(cache), str(max_gb), str(threads)]
    if nproc == 1:
        cmd = [sys.executable, __file__] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               "29533", __file__] + args
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    # ranks share stdout, so their lines can interleave: pick each flat JSON object after its marker
    rows = [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", res.stdout)]
    for r in rows:
        r["process_wall"] = wall
    return rows


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        f, d, s, c, g, t = sys.argv[2:8]
        measure(f, int(d), int(s), c, float(g), int(t))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n2d", type=int, default=20000)
    ap.add_argument("--n3d", type=int, default=2000)
    ap.add_argument("--work", default="/tmp/medcl_scale")
    a = ap.parse_args()
    work = Path(a.work)
    rows = []
    for dims, n, size in ((2, a.n2d, 64), (3, a.n3d, 64)):
        if n <= 0:
            continue
        folder = work / f"folder{dims}d_{n}"
        print(f"{dims}D: {n} scans in {folder}", flush=True)
        make_folder(folder, n, dims)
        cache = work / f"cache{dims}d"
        shutil.rmtree(cache, ignore_errors=True)
        first = run_measure(folder, dims, size, cache)[0]
        print(f"  first run: {first['seconds']:.1f} s", flush=True)
        second = run_measure(folder, dims, size, cache)[0]
        lazy = run_measure(folder, dims, size, cache, max_gb=0.0)[0]
        print(f"  second run: {second['seconds']:.2f} s; per-batch reads: RSS {lazy['peak_rss_mb']:.0f} MB", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        two = run_measure(folder, dims, size, cache, nproc=2)
        t_two = max(r["seconds"] for r in two)
        decoded = sum(r["decoded"] for r in two)
        shutil.rmtree(cache, ignore_errors=True)
        # before the shared cache: every rank decoded the whole folder itself
        before = run_measure(folder, dims, size, "off", nproc=2)
        t_before = max(r["seconds"] for r in before)
        # the same with one decode thread per process: a rank's share of a node's cores, as on a node with more
        # cores than one process's pool uses (on 2 cores, 1 process x 2 threads already uses every core)
        one1 = run_measure(folder, dims, size, cache, threads=1)[0]
        shutil.rmtree(cache, ignore_errors=True)
        two1 = max(r["seconds"] for r in run_measure(folder, dims, size, cache, nproc=2, threads=1))
        shutil.rmtree(cache, ignore_errors=True)
        print(f"  1 thread per process: 1 process {one1['seconds']:.1f} s, 2 ranks {two1:.1f} s", flush=True)
        rows.append((dims, n, size, first, second, lazy, t_two, decoded, t_before, one1["seconds"], two1))
    cores = os.cpu_count()
    print(f"\nscan cache at scale, {cores} CPU cores; times are discovery + loading the scans (the command's start-up), "
          "each in a fresh process")
    print("| folder | first run: decode (s) | second run (s) | speed-up | peak RSS, in memory (MB) | peak RSS, "
          "per-batch reads (MB) | 2 ranks: decode (s) | 2 ranks / 1 | decoded by the 2 ranks | 2 ranks without "
          "the cache, each decoding all (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dims, n, size, first, second, lazy, t_two, decoded, t_before, _, _ in rows:
        kind = f"{n} PNG 256 px -> {size} px" if dims == 2 else f"{n} NIfTI 96^3 -> {size}^3"
        print(f"| {kind} | {first['seconds']:.1f} | {second['seconds']:.2f} | {first['seconds'] / second['seconds']:.0f}x "
              f"| {second['peak_rss_mb']:.0f} | {lazy['peak_rss_mb']:.0f} | {t_two:.1f} | "
              f"{t_two / first['seconds']:.2f} | {decoded} of {n} | {t_before:.1f} |")
    print("\nsharded decoding with one decode thread per process (into an empty cache)")
    print("| folder | 1 process x 1 thread (s) | 2 ranks x 1 thread (s) | 2 ranks / 1 |")
    print("|---|---|---|---|")
    for dims, n, size, *_, one1, two1 in rows:
        kind = f"{n} PNG 256 px -> {size} px" if dims == 2 else f"{n} NIfTI 96^3 -> {size}^3"
        print(f"| {kind} | {one1:.1f} | {two1:.1f} | {two1 / one1:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
