"""Readers: every supported file kind -> ``ImageData`` (float32 (S, H, W, C) + non-identifying meta)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from medclf.errors import ReadError
from medclf.io.dicom import is_dicom, read_dicom, read_dicom_series
from medclf.io.image import ImageData
from medclf.io.nifti import NiftiVolumes, is_nifti, nifti_volume_count, read_nifti
from medclf.io.raster import is_raster, read_raster

__all__ = ["ImageData", "read_image", "read_volumes", "read_dicom_series", "is_image_file", "is_dicom", "is_nifti",
           "is_raster", "NiftiVolumes", "nifti_volume_count"]


def is_image_file(path: Path) -> bool:
    """Whether medclf can read this file as an image (by name, or DICOM magic)."""
    return is_nifti(path) or is_raster(path) or is_dicom(path)


def read_image(path: Path) -> ImageData:
    """Read one file of any supported kind; raise ReadError with a one-line reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise ReadError("file not found", path)
    if path.is_dir():
        raise ReadError("is a folder (pass the files, or the folder as a DICOM series)", path)
    if is_nifti(path):
        return read_nifti(path)
    if is_raster(path):
        return read_raster(path)
    if is_dicom(path):
        return read_dicom(path)
    raise ReadError("unsupported file type (expected DICOM, NIfTI, PNG, JPEG or TIFF)", path)


def read_volumes(path: Path) -> Iterable[ImageData]:
    """Every 3-D volume of one file, in order: a 4-D NIfTI's volumes read one at a time (each with
    ``meta["volume"]``, ``meta["n_volumes"]``), else ``read_image``'s one image (read now)."""
    path = Path(path)
    if is_nifti(path) and path.is_file():
        vols = NiftiVolumes(path)
        vols.n_volumes  # noqa: B018 -- header checks now: a refused file fails here, not mid-iteration
        return iter(vols)
    return [read_image(path)]
