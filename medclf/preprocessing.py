"""Intensity and spatial preprocessing, recorded with every cache and run so ``classify`` repeats it.

CT: stored values -> HU (in the reader) -> one channel per window (centre/width), each mapped to
[0, 1]. Other modalities: robust percentile scaling. Then pad to square and resize.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from medclf.errors import ReadError
from medclf.io.image import ImageData

#: Named CT windows (centre, width) in HU. brain/subdural/soft are the RSNA-ICH top solutions' most
#: copied three channels; bone varies in circulation (600/2800 here, 600/2000 as ``bone2000``).
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "soft": (40.0, 380.0),
    "bone": (600.0, 2800.0),
    "bone2000": (600.0, 2000.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
}
DEFAULT_WINDOWS = ("brain", "subdural", "soft")


def parse_windows(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'brain,subdural,bone' or '40/80,80/200' -> validated window names/specs."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for it in (s.strip() for s in items):
        if not it:
            continue
        if it not in WINDOWS:
            try:
                c, w = (float(v) for v in it.split("/"))
                if w <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"unknown window {it!r}: use one of {', '.join(WINDOWS)} or CENTRE/WIDTH") from None
        out.append(it)
    if not out:
        raise ValueError("no window given")
    return out


def window_values(name: str) -> tuple[float, float]:
    if name in WINDOWS:
        return WINDOWS[name]
    c, w = (float(v) for v in name.split("/"))
    return c, w


@dataclass
class PreprocessConfig:
    """How an image becomes a fixed-shape (C, size, size) tensor in [0, 1]."""

    size: int = 256  #: output side in pixels (after padding to square)
    windows: list[str] = field(default_factory=lambda: list(DEFAULT_WINDOWS))  #: CT windows, one channel each
    channels: int = 3  #: channels stored in the cache (grey images are repeated, RGB averaged if 1)
    intensity: str = "auto"  #: auto | hu | percentile: force how non-RGB intensities are scaled
    percentiles: tuple[float, float] = (0.5, 99.5)  #: robust range for non-CT images
    keep_aspect: bool = True  #: pad to square before resizing instead of stretching

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        d["window_values"] = {w: list(window_values(w)) for w in self.windows}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        keys = {"size", "windows", "channels", "intensity", "percentiles", "keep_aspect"}
        kw = {k: v for k, v in d.items() if k in keys}
        if "percentiles" in kw:
            kw["percentiles"] = tuple(kw["percentiles"])
        return cls(**kw)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _scale(x: np.ndarray, kind: str, cfg: PreprocessConfig, axis: int) -> tuple[np.ndarray, str]:
    """Intensities -> [0, 1] with channels on ``axis``: one channel per CT window, or percentile / 255."""
    use_hu = (kind == "hu" and cfg.intensity == "auto") or (cfg.intensity == "hu" and kind != "rgb")
    if use_hu:
        grey = np.take(x, 0, axis=axis)
        chans = []
        for w in cfg.windows:
            c, width = window_values(w)
            chans.append(np.clip((grey - (c - width / 2.0)) * (1.0 / width), 0.0, 1.0))
        return np.stack(chans, axis=axis).astype(np.float32, copy=False), "windows:" + ",".join(cfg.windows)
    if kind == "rgb" and x.max() <= 255.0 and x.min() >= 0.0 and cfg.intensity == "auto":
        return np.clip(x / 255.0, 0.0, 1.0).astype(np.float32, copy=False), "rgb/255"
    lo, hi = np.percentile(x, cfg.percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), f"percentile:{cfg.percentiles[0]}-{cfg.percentiles[1]}"


def scale_intensity(img: ImageData, cfg: PreprocessConfig) -> tuple[np.ndarray, str]:
    """(S, H, W, C) float32 in [0, 1] at the image's own size, and the scaling applied."""
    if not np.isfinite(img.array).all():
        raise ReadError("image contains NaN or infinite values")
    return _scale(img.array, img.kind, cfg, axis=-1)


def match_channels(x: np.ndarray, channels: int, axis: int = -1) -> np.ndarray:
    n = x.shape[axis]
    if n == channels:
        return x
    if n == 1:
        return np.repeat(x, channels, axis=axis)
    if channels == 1:
        return x.mean(axis=axis, keepdims=True)
    raise ReadError(f"cannot map a {n}-channel image to {channels} channels")


def resize_square(x: np.ndarray, size: int, keep_aspect: bool = True, pad_value: float = 0.0) -> np.ndarray:
    """(S, H, W, C) -> (S, C, size, size): pad to a centred square with ``pad_value``, then resize.

    Pillow's resize is used (antialiased when shrinking, no torch import in ingest workers);
    MONAI's ``Resize`` would add MetaTensor overhead per slice.
    """
    from PIL import Image

    s, h, w, c = x.shape
    planes = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)  # (S, C, H, W)
    if keep_aspect and h != w:
        side = max(h, w)
        pad = np.full((s, c, side, side), pad_value, dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        pad[:, :, top : top + h, left : left + w] = planes
        planes, h, w = pad, side, side
    if h == size and w == size:
        return planes
    out = np.empty((s, c, size, size), dtype=np.float32)
    for i in range(s):
        for j in range(c):
            out[i, j] = np.asarray(Image.fromarray(planes[i, j], mode="F").resize((size, size), Image.BILINEAR))
    return out


MIN_SIDE = 8  # smaller images carry nothing a classifier can use


def preprocess(img: ImageData, cfg: PreprocessConfig) -> tuple[np.ndarray, str]:
    """ImageData -> (S, C, size, size) float32 in [0, 1] and the intensity scaling used.

    The image is resized first (padding with its own minimum: air for CT) and windowed after, as a
    viewer applies a display window to the resampled image: one resize per slice instead of one per
    window, and windows computed on size x size pixels rather than the source's.
    """
    _, h, w, _ = img.array.shape
    if min(h, w) < MIN_SIDE:
        raise ReadError(f"image too small ({h}x{w} pixels)")
    if not np.isfinite(img.array).all():
        raise ReadError("image contains NaN or infinite values")
    pad = 0.0 if img.kind == "rgb" else float(img.array.min())
    small = resize_square(img.array, cfg.size, cfg.keep_aspect, pad_value=pad)  # (S, C0, size, size)
    x, how = _scale(small, img.kind, cfg, axis=1)
    return match_channels(x, cfg.channels, axis=1), how
