"""Readers: every supported file kind -> ``ImageData`` (float32 (S, H, W, C) + non-identifying meta)."""

from __future__ import annotations

from pathlib import Path

from medclf.errors import ReadError
from medclf.io.dicom import is_dicom, read_dicom, read_dicom_series
from medclf.io.image import ImageData
from medclf.io.nifti import is_nifti, read_nifti
from medclf.io.raster import is_raster, read_raster

__all__ = ["ImageData", "read_image", "read_dicom_series", "is_image_file", "is_dicom", "is_nifti", "is_raster"]


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
