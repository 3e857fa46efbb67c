"""Ingest and cache-read throughput against straightforward baselines measured in the same run.

    python benchmarks/ingest.py [--patients 40] [--slices 12] [--px 512] [--workers 2] [--size 256]

Data: RSNA-layout CT slices at 512 x 512 (the dataset's size) from ``medclf.synthetic``.
Ingest rows, same worker count:
  baseline  MONAI ``LoadImage(reader="PydicomReader")`` + one ``torch.save`` per file (a process pool)
  medclf    ``medclf.data.ingest`` (RSNA adapter, HU windows, resize to --size, sharded cache)
Read rows (the cache medclf just wrote):
  raw       read the shard files' bytes (np.fromfile)
  dataset   ``CacheDataset`` item by item; ``loader``: through a DataLoader (batch 64)
Both ingest runs read the sources after the same warm-up pass (page cache warm for both).
Targets (issue #2): medclf >= 2x the baseline's files/s; dataset read >= 50% of raw read MB/s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _baseline_one(args: tuple[str, str]) -> int:
    import torch
    from monai.transforms import LoadImage

    src, dst = args
    img = LoadImage(image_only=True, reader="PydicomReader")(src)
    torch.save(img, dst)
    return 1


def _init() -> None:
    import torch

    torch.set_num_threads(1)


def run_baseline(files: list[Path], out: Path, workers: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(f), str(out / (f.stem + ".pt"))) for f in files]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, initializer=_init) as pool:
        n = sum(pool.map(_baseline_one, jobs, chunksize=8))
    dt = time.perf_counter() - t0
    assert n == len(files)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--px", type=int, default=512, help="source slice side")
    ap.add_argument("--size", type=int, default=256, help="cache side")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="exit non-zero when a target is missed")
    args = ap.parse_args()

    from medclf.data import CacheDataset, open_cache
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.synthetic import make_rsna_tree

    tmp = Path(tempfile.mkdtemp(prefix="medclf-bench-ingest-"))
    try:
        root = make_rsna_tree(tmp / "rsna", n_patients=args.patients, slices_per_series=args.slices, size=args.px,
                              seed=0, corrupt=False, compress_fraction=0.0)
        files = sorted((root / "stage_2_train").glob("*.dcm"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        for f in files:  # warm the page cache for both runs
            f.read_bytes()
        t_base = run_baseline(files, tmp / "baseline", args.workers)
        t0 = time.perf_counter()
        res = ingest(IngestConfig(sources=[root], out=tmp / "cache", size=args.size, workers=args.workers))
        t_med = time.perf_counter() - t0
        assert res.n_items == len(files) and res.n_failed == 0

        info = open_cache(res.cache)
        shards = [info.path / s["file"] for s in info.manifest["shards"]]
        cache_mb = sum(p.stat().st_size for p in shards) / 1e6
        for p in shards:
            p.read_bytes()
        t0 = time.perf_counter()
        for p in shards:
            np.fromfile(p, dtype=np.uint8)
        t_raw = time.perf_counter() - t0
        ds = CacheDataset(info)
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        t_ds = time.perf_counter() - t0
        import torch

        t0 = time.perf_counter()
        for _ in torch.utils.data.DataLoader(CacheDataset(info), batch_size=64, num_workers=0):
            pass
        t_dl = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(files)
    print(f"\n{n} DICOM files ({args.px}x{args.px}, {mb:.1f} MB), {args.workers} workers, cache side {args.size}")
    print(f"{'ingest':<44}{'seconds':>9}{'files/s':>10}{'MB/s':>9}{'vs baseline':>13}")
    print(f"{'baseline: MONAI LoadImage + torch.save/file':<44}{t_base:>9.2f}{n / t_base:>10.1f}{mb / t_base:>9.1f}{1.0:>12.2f}x")
    print(f"{'medclf ingest':<44}{t_med:>9.2f}{n / t_med:>10.1f}{mb / t_med:>9.1f}{t_base / t_med:>12.2f}x")
    print(f"\n{'cache read (' + f'{cache_mb:.1f} MB, {len(ds)} items)':<44}{'seconds':>9}{'items/s':>10}{'MB/s':>9}{'vs raw':>13}")
    for name, t in (("raw bytes of the shards (np.fromfile)", t_raw), ("CacheDataset, item by item", t_ds),
                    ("CacheDataset through a DataLoader (64)", t_dl)):
        print(f"{name:<44}{t:>9.3f}{len(ds) / t:>10.0f}{cache_mb / t:>9.0f}{t_raw / t:>12.2f}x")
    ok_ingest = t_base / t_med >= 2.0
    ok_read = t_raw / t_ds >= 0.5
    print(f"\ningest >= 2x baseline files/s: {'PASS' if ok_ingest else 'FAIL'} ({t_base / t_med:.2f}x)")
    print(f"cache read >= 50% of raw: {'PASS' if ok_read else 'FAIL'} ({t_raw / t_ds:.0%})")
    if args.check and not (ok_ingest and ok_read):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
