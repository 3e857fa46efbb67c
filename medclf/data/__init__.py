"""Data: the tensor cache (format, ingest) and the torch Dataset over it.

``CacheDataset`` is imported lazily so that ``medclf ingest`` never pays for importing torch.
"""

from __future__ import annotations

from medclf.data.cache import CacheInfo, open_cache, to_unit_float

__all__ = ["CacheDataset", "collate", "CacheInfo", "open_cache", "to_unit_float", "ingest", "IngestConfig", "IngestResult"]


def __getattr__(name: str):
    if name in ("CacheDataset", "collate"):
        from medclf.data import dataset as _dataset

        return getattr(_dataset, name)
    if name in ("ingest", "IngestConfig", "IngestResult"):
        from medclf.data import ingest as _ingest

        return getattr(_ingest, name)
    raise AttributeError(name)
