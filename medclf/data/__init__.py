"""Data: the tensor cache (format, ingest) and the torch Dataset over it.

``CacheDataset`` is imported lazily so that ``medclf ingest`` never pays for importing torch.
"""

from __future__ import annotations

from medclf.data.cache import CacheInfo, open_cache, to_unit_float

__all__ = ["CacheDataset", "CacheInfo", "open_cache", "to_unit_float", "ingest", "IngestConfig", "IngestResult"]


def __getattr__(name: str):
    if name == "CacheDataset":
        from medclf.data.dataset import CacheDataset

        return CacheDataset
    if name in ("ingest", "IngestConfig", "IngestResult"):
        from medclf.data import ingest as _ingest

        return getattr(_ingest, name)
    raise AttributeError(name)
