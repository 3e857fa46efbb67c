"""``CacheDataset``: the torch Dataset every training, classification and evaluation step reads."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from medclf.data.cache import CacheInfo, open_cache, to_unit_float


class CacheDataset(Dataset):
    """Items of one cache (optionally one split), as ``{"image", "label", "labels", "index", "id"}``.

    ``image`` is (C, H, W) int16 as stored (0..32767 for [0, 1]; reading is a copy, not a
    conversion), like torchvision's uint8 images: scale on the device with
    ``medclf.data.to_unit_float``, as the training loop does; ``dtype=torch.float32`` returns [0, 1]
    floats instead (slower). ``label`` is the primary class index or -1 when the
    item has none; ``labels`` is the multi-label vector with NaN where a target is missing/ignored.
    ``labelled_only`` keeps items with a primary label, or with ``multilabel`` items with at least one
    known target. Shards are memory-mapped lazily in each process (a memmap must not be pickled into workers).
    """

    def __init__(self, cache: str | Path | CacheInfo, split: str | None = None, transform: Callable | None = None,
                 labelled_only: bool = False, dtype: torch.dtype = torch.int16, multilabel: bool = False):
        self.info = cache if isinstance(cache, CacheInfo) else open_cache(cache)
        items = self.info.items
        if split is not None:
            items = [it for it in items if it.get("split") == split]
        if labelled_only and multilabel:  # at least one known target in the label vector
            items = [it for it in items if any(v is not None for v in it.get("labels") or [])]
        elif labelled_only:
            items = [it for it in items if it.get("label") is not None]
        self.items = items
        self.transform = transform
        self.dtype = dtype
        self._maps: dict[int, np.memmap] = {}
        # plain tuples for the hot path: no dict look-ups per item
        self._index = [(it["shard"], it["offset"], -1 if it.get("label") is None else int(it["label"]), it["id"])
                       for it in items]
        n_labels = len(self.info.label_names)
        self._labels = np.full((len(items), max(n_labels, 1)), np.nan, dtype=np.float32)
        for i, it in enumerate(items):
            for j, v in enumerate(it.get("labels") or []):
                if v is not None:
                    self._labels[i, j] = v

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def targets(self) -> np.ndarray:
        """Primary labels (-1 where missing), e.g. for samplers and metrics."""
        return np.array([-1 if it.get("label") is None else it["label"] for it in self.items], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def _shard(self, k: int) -> np.memmap:
        m = self._maps.get(k)
        if m is None:
            m = self._maps[k] = self.info.shard_array(k)
        return m

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A DataLoader batch read straight into one array: one copy per image instead of two."""
        if self.transform is not None or self.dtype != torch.int16 or not indices:
            return [self[i] for i in indices]
        first = self._index[indices[0]]
        shape = self._shard(first[0]).shape[1:]
        batch = np.empty((len(indices), *shape), dtype=np.int16)
        for j, i in enumerate(indices):
            shard, offset, _, _ = self._index[i]
            m = self._maps.get(shard)
            batch[j] = (m if m is not None else self._shard(shard))[offset]
        images = torch.from_numpy(batch)
        out = _Batch({"image": images[j], "label": self._index[i][2], "labels": torch.from_numpy(self._labels[i]),
                      "index": i, "id": self._index[i][3]} for j, i in enumerate(indices))
        out.images = images
        return out

    def __getitem__(self, i: int) -> dict:
        shard, offset, label, item_id = self._index[i]
        m = self._maps.get(shard)
        if m is None:
            m = self._shard(shard)
        image = torch.from_numpy(np.array(m[offset]))
        if self.dtype != torch.int16:
            image = to_unit_float(image).to(self.dtype)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": label, "labels": torch.from_numpy(self._labels[i]), "index": i, "id": item_id}


class _Batch(list):
    """``__getitems__``'s result: the per-item dicts (views into one batch array, so torch's default
    collate still works) plus that array, which ``collate`` hands on without copying again."""

    images: torch.Tensor


def collate(items: list[dict]) -> dict:
    """Batch ``CacheDataset`` items (the ``collate_fn`` for a DataLoader over the cache).

    Stacks with numpy, a single-threaded copy: ``torch.stack`` (what the default collate calls)
    splits even a 25 MB int16 copy over OpenMP threads, which spin when another process holds a
    core; on the 2-core machines here that made a batch of 64 256-px images take 0.5-0.8 s instead
    of ~10 ms (measured with other jobs running).
    """
    image = items.images if isinstance(items, _Batch) else torch.from_numpy(np.stack([it["image"].numpy() for it in items]))
    return {
        "image": image,
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "labels": torch.from_numpy(np.stack([it["labels"].numpy() for it in items])),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "id": [it["id"] for it in items],
    }
