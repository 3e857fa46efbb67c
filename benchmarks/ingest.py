"""Ingest and cache-read throughput against straightforward baselines measured in the same run.

    python benchmarks/ingest.py [--files 480] [--workers N] [--size 256] [--repeat 3] [--check] [--profile]

Data: an RSNA-ICH-shaped tree of 512 x 512 CT slices (the real dataset's size, uncompressed unless
``--compress``) written by ``medclf.synthetic.make_rsna_tree`` into a temporary folder.

Ingest (same files, same number of worker processes, fork start, pool start-up timed for both;
with --workers 1 both run in the benchmark's own process):
  baseline  MONAI ``LoadImage(image_only=True, reader="PydicomReader")`` (one loader per worker, the
            reader MONAI picks for .dcm anyway without ITK) + one ``torch.save`` per file, mapped over
            the files by a ``ProcessPoolExecutor``; torch limited to one thread per worker.
  medclf    ``medclf.data.ingest.ingest(IngestConfig(..., workers=N))`` into a new, empty folder:
            plan from the CSV, read, HU -> 3 windows, resize to ``--size``, int16 fixed-point shards, manifest.
The baseline does strictly less work (no windowing, no resize, no labels/splits/manifest); the
source files are read once before every timed run so both run with a warm page cache.

Cache read (the cache medclf just wrote, page cache warm for all rows):
  raw       every shard file opened and read() whole, and np.fromfile (the faster is the reference)
  dataset   ``CacheDataset``: ``ds[i]`` for every item; and a ``DataLoader(batch_size=64, num_workers=0)``
            with ``medclf.data.collate`` (what training uses); torch's default collate for reference
MB/s counts the shard bytes on disk (int16 fixed point; float16 before format 2) for every row.

Goals (the issue): medclf ingest >= 2x the baseline's files/s with the same workers; cache read
through CacheDataset (indexing and DataLoader) >= 50% of raw read MB/s. Exit status 0 (a report)
unless ``--check``: then 1 when a goal is missed. ``--profile`` adds a cProfile of a workers=1
ingest and a per-stage time split of both pipelines.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SLICES_PER_SERIES = 12
INGEST_GOAL = 2.0
READ_GOAL = 0.5


def _quiet() -> None:
    # MONAI's DICOM readers announce a missing optional GPU codec once per process.
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


# --------------------------------------------------------------------------------- baseline
_LOADER = None


def _baseline_init() -> None:
    global _LOADER
    import torch
    from monai.transforms import LoadImage

    _quiet()
    torch.set_num_threads(1)
    _LOADER = LoadImage(image_only=True, reader="PydicomReader")


def _baseline_one(job: tuple[str, str]) -> int:
    import torch

    src, dst = job
    img = _LOADER(src)
    torch.save(img, dst)
    return 1


def run_baseline(files: list[Path], out: Path, workers: int) -> float:
    out.mkdir(parents=True)
    jobs = [(str(f), str(out / (f.stem + ".pt"))) for f in files]
    t0 = time.perf_counter()
    if workers == 1:  # in-process, as medclf runs with workers=1
        import torch

        threads = torch.get_num_threads()
        _baseline_init()
        n = sum(_baseline_one(j) for j in jobs)
        torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_baseline_init) as pool:
            n = sum(pool.map(_baseline_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    dt = time.perf_counter() - t0
    if n != len(files) or len(list(out.glob("*.pt"))) != len(files):
        raise SystemExit(f"baseline wrote {n} of {len(files)} files")
    return dt


def monai_default_reader(path: Path) -> str:
    """The reader ``LoadImage()`` without ``reader=`` would use for this file (last registered first)."""
    from monai.transforms import LoadImage

    for r in LoadImage(image_only=True).readers[::-1]:
        if r.verify_suffix(str(path)):
            return type(r).__name__
    return "?"


# --------------------------------------------------------------------------------- medclf
def run_medclf(root: Path, out: Path, size: int, workers: int):
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig

    assert not out.exists(), "medclf must ingest into a new folder"
    t0 = time.perf_counter()
    res = ingest(IngestConfig(sources=[root], out=out, preprocess=PreprocessConfig(size=size, channels=None), workers=workers))
    dt = time.perf_counter() - t0
    return dt, res


def library_state() -> str:
    """medclf's version and, in a git checkout, its commit and whether medclf/ has local changes."""
    import subprocess

    import medclf

    here = Path(medclf.__file__).resolve().parent
    state = f"medclf {medclf.__version__}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        if head:
            state += f" at {head}" + (" + local changes in medclf/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (Linux /proc/stat), to flag a shared machine."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            fh.read()


def best_of(fn, min_seconds: float = 0.3, max_runs: int = 20) -> float:
    """Best wall time of ``fn()`` over repeated runs (at least 3, until ``min_seconds`` have passed)."""
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# --------------------------------------------------------------------------------- profile
def profile(root: Path, files: list[Path], tmp: Path, size: int) -> None:
    import cProfile
    import pstats

    import pydicom
    import torch
    from monai.transforms import LoadImage

    from medclf.data import cache as cache_format
    from medclf.io import read_image
    from medclf.preprocessing import PreprocessConfig, preprocess

    scale = getattr(cache_format, "SCALE", None)  # int16 fixed point, or float16 in older caches

    def encode(x: np.ndarray) -> bytes:
        return ((x * scale + 0.5) if scale else x).astype(cache_format.DTYPE).tobytes()

    print("\n--- profile: medclf ingest, workers=1 (cProfile, top 22 by internal time) ---")
    prof = cProfile.Profile()
    prof.enable()
    _, res = run_medclf(root, tmp / "cache-profile", size, 1)
    prof.disable()
    print(f"{res.n_units} files in {res.seconds:.2f} s ({res.n_units / res.seconds:.1f} files/s, one process)")
    pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(22)

    n = min(len(files), 60)
    sample = files[:n]
    pre = PreprocessConfig(size=size, channels=3)
    names = ("pydicom.dcmread (header + bytes)", "read_image() (dcmread+decode+HU)", "preprocess() (windows + resize)",
             f"encode to the cache's {cache_format.DTYPE} + bytes")
    stages = {k: 0.0 for k in names}
    loader = LoadImage(image_only=True, reader="PydicomReader")
    for f in sample[:3]:  # first calls import and set up lazily: keep them out of the split
        preprocess(read_image(f), pre)
        loader(str(f))
    for f in sample:
        t0 = time.perf_counter(); pydicom.dcmread(f); t1 = time.perf_counter()
        img = read_image(f); t2 = time.perf_counter()
        x, _ = preprocess(img, pre); t3 = time.perf_counter()
        encode(x); t4 = time.perf_counter()
        for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[k] += dt
    torch.set_num_threads(1)
    b_load = b_save = 0.0
    for i, f in enumerate(sample):
        t0 = time.perf_counter(); img = loader(str(f)); t1 = time.perf_counter()
        torch.save(img, tmp / f"profile-{i}.pt"); t2 = time.perf_counter()
        b_load += t1 - t0; b_save += t2 - t1
    print(f"--- per-file stage times, one process, mean of {n} files (ms) ---")
    print("medclf (dcmread is part of read_image):")
    for k, v in stages.items():
        print(f"  {k:<36}{1000 * v / n:>8.2f}")
    total = sum(v for k, v in stages.items() if not k.startswith("pydicom"))
    print(f"  {'sum (read + preprocess + bytes)':<36}{1000 * total / n:>8.2f}")
    print("baseline:")
    print(f"  {'LoadImage (PydicomReader)':<36}{1000 * b_load / n:>8.2f}")
    print(f"  {'torch.save (MetaTensor, float32)':<36}{1000 * b_save / n:>8.2f}")
    print(f"  {'sum':<36}{1000 * (b_load + b_save) / n:>8.2f}")


# --------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=480,
                    help=f"source DICOM files (rounded up to whole series of {SLICES_PER_SERIES}); default 480")
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                    help="worker processes for both ingest runs (default: cores, at most 8, as medclf)")
    ap.add_argument("--size", type=int, default=256, help="cache image side (default 256)")
    ap.add_argument("--px", type=int, default=512, help="source slice side (default 512, RSNA's)")
    ap.add_argument("--compress", type=float, default=0.0, help="fraction of series stored RLE Lossless (default 0)")
    ap.add_argument("--repeat", type=int, default=3, help="timed ingest runs per pipeline; the best counts (default 3)")
    ap.add_argument("--data", type=Path, default=None, help="keep the generated source tree here (reused if present)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    ap.add_argument("--profile", action="store_true", help="also profile a workers=1 medclf ingest")
    args = ap.parse_args()
    _quiet()

    import torch
    from monai.transforms import LoadImage  # noqa: F401  (imported before forking, as medclf is)

    from medclf.data import CacheDataset, collate, open_cache
    from medclf.data.ingest import IngestConfig, ingest  # noqa: F401
    from medclf.synthetic import make_rsna_tree

    busy0 = cpu_busy()
    n_patients = max(1, math.ceil(args.files / SLICES_PER_SERIES))
    tmp = Path(tempfile.mkdtemp(prefix="medclf-bench-ingest-"))
    try:
        root = args.data or tmp / "rsna"
        files = sorted((root / "stage_2_train").glob("*.dcm")) if (root / "stage_2_train.csv").exists() else []
        if len(files) != n_patients * SLICES_PER_SERIES:
            t0 = time.perf_counter()
            if root.exists():
                shutil.rmtree(root)
            make_rsna_tree(root, n_patients=n_patients, slices_per_series=SLICES_PER_SERIES, size=args.px, seed=0,
                           corrupt=False, compress_fraction=args.compress)
            files = sorted((root / "stage_2_train").glob("*.dcm"))
            print(f"generated {len(files)} DICOM files in {time.perf_counter() - t0:.1f} s", flush=True)
        n = len(files)
        src_mb = sum(f.stat().st_size for f in files) / 1e6

        # ---- ingest: alternate the two pipelines, warm page cache before every timed run
        t_base, t_med, res = [], [], None
        for r in range(args.repeat):
            warm(files)
            t_base.append(run_baseline(files, tmp / f"baseline-{r}", args.workers))
            base_mb = sum(p.stat().st_size for p in (tmp / f"baseline-{r}").iterdir()) / 1e6
            shutil.rmtree(tmp / f"baseline-{r}")
            warm(files)
            dt, res = run_medclf(root, tmp / f"cache-{r}", args.size, args.workers)
            if res.up_to_date or res.n_units != n or res.n_items != n or res.n_failed:
                raise SystemExit(f"medclf ingest was not a clean fresh run: {res.n_units} units, {res.n_items} items, "
                                 f"{res.n_failed} failed, up_to_date={res.up_to_date}")
            t_med.append(dt)
            print(f"run {r + 1}/{args.repeat}: baseline {t_base[-1]:.2f} s, medclf {t_med[-1]:.2f} s", flush=True)
            if r < args.repeat - 1:
                shutil.rmtree(tmp / f"cache-{r}")
        tb, tm = min(t_base), min(t_med)
        speedup = tb / tm

        # ---- cache read
        info = open_cache(res.cache)
        shards = [info.path / s["file"] for s in info.manifest["shards"]]
        cache_mb = sum(p.stat().st_size for p in shards) / 1e6
        n_items = len(info.items)
        warm(shards)

        def raw_read():
            for p in shards:
                with open(p, "rb") as fh:
                    fh.read()

        def raw_fromfile():
            for p in shards:
                np.fromfile(p, dtype=np.uint8)

        def ds_index():
            ds = CacheDataset(info)
            for i in range(len(ds)):
                ds[i]

        def ds_loader():
            for _ in torch.utils.data.DataLoader(CacheDataset(info), batch_size=64, num_workers=0, collate_fn=collate):
                pass

        def ds_loader_default():
            for _ in torch.utils.data.DataLoader(CacheDataset(info), batch_size=64, num_workers=0):
                pass

        probe = CacheDataset(info)[0]["image"]
        reads = {"raw: open + read() per shard": best_of(raw_read), "raw: np.fromfile per shard": best_of(raw_fromfile),
                 "CacheDataset: ds[i] for every item": best_of(ds_index),
                 "CacheDataset: DataLoader(batch 64, 0 workers)": best_of(ds_loader),
                 "  same, torch's default_collate (reference)": best_of(ds_loader_default)}
        t_raw = min(reads["raw: open + read() per shard"], reads["raw: np.fromfile per shard"])
        ratio_idx = t_raw / reads["CacheDataset: ds[i] for every item"]
        ratio_dl = t_raw / reads["CacheDataset: DataLoader(batch 64, 0 workers)"]

        # ---- report
        print()
        print(f"medclf ingest benchmark: {n} RSNA-style DICOM slices {args.px}x{args.px} "
              f"({src_mb:.1f} MB, {args.compress:.0%} RLE), {args.workers} worker process(es) for both, "
              f"cache side {args.size}; best of {args.repeat} run(s); {library_state()}")
        print("page cache: every source file was read once before each timed ingest run (both warm)")
        print(f"MONAI LoadImage() picks {monai_default_reader(files[0])} for .dcm here; baseline passes "
              f'reader="PydicomReader" explicitly; baseline output {base_mb:.0f} MB of .pt, medclf cache '
              f"{res.size_bytes / 1e6:.0f} MB")
        w = 46
        print()
        print(f"{'ingest':<{w}}{'files':>7}{'seconds':>9}{'files/s':>10}{'MB/s':>9}{'speed-up':>10}")
        print("-" * (w + 45))
        for name, t in (("baseline: MONAI LoadImage + torch.save", tb), ("medclf ingest", tm)):
            print(f"{name:<{w}}{n:>7}{t:>9.2f}{n / t:>10.1f}{src_mb / t:>9.1f}{tb / t:>9.2f}x")
        print("(MB/s: source DICOM MB read per second)")
        print()
        title = f"cache read ({n_items} items, {cache_mb:.1f} MB, {str(probe.dtype).replace('torch.', '')} out)"
        print(f"{title:<{w}}{'seconds':>9}{'MB/s':>9}{'items/s':>10}{'vs raw':>9}")
        print("-" * (w + 37))
        for name, t in reads.items():
            print(f"{name:<{w}}{t:>9.4f}{cache_mb / t:>9.0f}{n_items / t:>10.0f}{t_raw / t:>8.0%}")
        print("(best of >= 3 passes each; 'vs raw' is against the faster raw read; MB = shard bytes on disk)")
        print()
        ok_ingest = speedup >= INGEST_GOAL
        ok_idx, ok_dl = ratio_idx >= READ_GOAL, ratio_dl >= READ_GOAL
        ok_read = ok_idx and ok_dl
        print(f"{'PASS' if ok_ingest else 'FAIL'}  ingest >= {INGEST_GOAL:g}x baseline files/s with {args.workers} "
              f"workers: {speedup:.2f}x ({n / tm:.1f} vs {n / tb:.1f} files/s)")
        print(f"{'PASS' if ok_idx else 'FAIL'}  cache read >= {READ_GOAL:.0%} of raw read MB/s, CacheDataset indexing: "
              f"{ratio_idx:.0%}")
        print(f"{'PASS' if ok_dl else 'FAIL'}  cache read >= {READ_GOAL:.0%} of raw read MB/s, CacheDataset via "
              f"DataLoader: {ratio_dl:.0%}")
        if busy0 is not None and busy0 > 0.15:
            print(f"note: the CPUs were {busy0:.0%} busy with other processes just before the run: timings are noisy")
        if not ok_ingest and not args.profile:
            print("(run with --profile for a cProfile of a workers=1 ingest and a per-stage time split)")
        if args.profile:
            profile(root, files, tmp, args.size)
        return 1 if args.check and not (ok_ingest and ok_read) else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
