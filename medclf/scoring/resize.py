"""On-the-fly resize: one cache at the archive's size, models at the sizes a user trains.

A run trained with ``finetune --image-size N`` on a cache of another size records ``resize``; the
training loss, calibration, ``eval``, ``classify`` and ``explain`` all go through ``resize_images``
(batched, on the device, after the cache's int16 -> [0, 1] step), so they see exactly the pixels
training saw. Explanation maps come back at the input's size, so they still land on the scan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medclf.data.cache import to_unit_float
from medclf.scoring.base import Prediction

#: what runs record: bilinear with antialiasing (downsampling without it aliases fine texture)
RESIZE_MODE = "bilinear-antialias"


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) cache images (int16 or [0, 1] floats) -> (B, C, size, size) float32 in [0, 1]."""
    x = to_unit_float(images)
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def _back(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    lead = m.shape[:-2]
    flat = m.reshape(-1, 1, *m.shape[-2:]).float()
    return F.interpolate(flat, size=hw, mode="bilinear", align_corners=False).reshape(*lead, *hw).to(m.dtype)


class ResizedScorer:
    """A scorer of a run trained at ``size`` px, fed images of the cache's size."""

    def __init__(self, inner, size: int):
        self.inner, self.size = inner, size

    def __getattr__(self, name):  # classes, multilabel, ... of the wrapped scorer
        return getattr(self.inner, name)

    def predict(self, images: torch.Tensor, explain: bool = False) -> Prediction:
        p = self.inner.predict(resize_images(images, self.size), explain=explain)
        if p.maps:
            p.maps = {k: _back(v, tuple(images.shape[-2:])) for k, v in p.maps.items()}
        return p
