"""PNG, JPEG and TIFF images (ISIC and CheXpert ship JPEGs), read with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medclf.errors import ReadError
from medclf.io.image import ImageData

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def is_raster(path: Path) -> bool:
    return path.suffix.lower() in RASTER_SUFFIXES


def read_raster(path: Path) -> ImageData:
    from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            # Cameras (dermoscopes too) store pixels as the sensor saw them and say how to turn them in
            # EXIF Orientation; viewers apply it, so must we, or a model sees some images sideways.
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
                arr = np.asarray(im.convert("RGB"), dtype=np.float32)
                kind = "rgb"
            else:  # L, I, I;16, F, 1
                arr = np.asarray(im, dtype=np.float32)[..., None]
                kind = "mono"
    except FileNotFoundError:
        raise ReadError("file not found", path) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ReadError(f"not a readable image ({' '.join(str(e).split())[:120]})", path) from None
    # 8-bit greyscale photographs/radiographs already display as stored; keep the full range.
    meta = {"modality": "XC" if kind == "rgb" else "unknown", "mode": mode, "original_shape": [1, *arr.shape[:2]]}
    if orientation != 1:
        meta["exif_orientation"] = int(orientation)
    return ImageData(arr[None], kind, meta)
