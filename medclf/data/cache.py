"""The tensor cache's on-disk format, and reading it back.

    CACHE/
      manifest.json      header: fingerprint, medclf version, preprocessing, classes, counts, shards.
                         Written last and atomically: its presence is what makes a cache complete.
      items.jsonl        one item per line: id, source, label(s), split, shape, spacing, shard, offset
      errors.jsonl       one failed input per line: path, reason
      shards/NNNNN.bin   raw int16 (n, C, H, W) arrays holding [0, 1] as 0..32767: fixed shape, so
                         they memory-map directly
      parts/             only while a sharded ingest (``--num-parts``) waits for ``--merge``: see shards.py

Raw shards rather than .npy/.pt: each worker streams items into its shard without knowing the
count in advance, and readers ``np.memmap`` them without parsing a header. 15-bit fixed point in
int16 rather than float16: finer steps over [0, 1] (1/32767 everywhere, vs float16's 1/2048 near
1), quantising is ~9x cheaper than numpy's float16 conversion (a fifth of ingest's per-file time),
and int16, unlike uint16, supports every torch op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medclf import __version__
from medclf.atomic import atomic_write_text  # noqa: F401  (re-exported: used across the package)
from medclf.errors import MedclfError

FORMAT_VERSION = 3  #: 3: 4-D NIfTI volumes as items, single-file DICOM geometry, NaN as background (re-ingest)
MANIFEST = "manifest.json"
ITEMS = "items.jsonl"
ERRORS = "errors.jsonl"
SHARDS = "shards"
STATE = ".ingest"  # in-progress state (plan, per-shard records); removed when the cache completes
PARTS = "parts"  # a sharded ingest's parts (ingest --num-parts K --part-id I); removed by ingest --merge
DTYPE = "int16"
SCALE = 32767.0  #: stored value / SCALE = intensity in [0, 1]


def to_unit_float(images):
    """Cache images (int16, or already float) -> float32 in [0, 1]; call it on the device."""
    import torch

    if images.dtype == torch.int16:
        return images.float().mul_(1.0 / SCALE)
    return images.float()


def write_jsonl(path: Path, rows: list[dict], fsync: bool = True) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), fsync=fsync)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class CacheInfo:
    """A complete cache's header and items (pixels stay on disk until a Dataset maps them)."""

    path: Path
    manifest: dict
    items: list[dict]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def classes(self) -> list[str]:
        return self.manifest.get("classes", [])

    @property
    def label_names(self) -> list[str]:
        return self.manifest.get("label_names", [])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])

    @property
    def preprocessing(self) -> dict:
        return self.manifest.get("preprocessing") or {}

    def shard_array(self, shard: int) -> np.memmap:
        info = self.manifest["shards"][shard]
        return np.memmap(self.path / info["file"], dtype=DTYPE, mode="r", shape=(info["n"], *self.shape))

    def errors(self) -> list[dict]:
        return read_jsonl(self.path / ERRORS)


def open_cache(path: str | Path) -> CacheInfo:
    """Load a complete cache; a clear error for a missing, partial or newer-format one."""
    path = Path(path)
    if not path.exists():
        raise MedclfError("cache not found", path)
    mf = path / MANIFEST
    if not mf.exists():
        hint = (f" (parts of a sharded ingest: run medclf ingest --merge --out {path})" if (path / PARTS).exists()
                else " (an interrupted ingest: re-run medclf ingest with --resume)" if (path / STATE).exists() else "")
        raise MedclfError("not a complete medclf cache: manifest.json is missing" + hint, path)
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MedclfError(f"unreadable manifest.json ({e})", path) from None
    if manifest.get("format", 0) < FORMAT_VERSION:
        raise MedclfError(f"cache format {manifest.get('format')} (medclf {manifest.get('medclf_version')}) is older "
                          f"than this medclf's ({FORMAT_VERSION}): re-run medclf ingest into a new --out", path)
    if manifest.get("format", 0) > FORMAT_VERSION:
        raise MedclfError(f"cache format {manifest.get('format')} was written by a newer medclf "
                          f"({manifest.get('medclf_version')}); this is {__version__}: upgrade medclf", path)
    return CacheInfo(path=path, manifest=manifest, items=read_jsonl(path / ITEMS))
