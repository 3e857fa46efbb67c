"""NIfTI-1/2 volumes, read with nibabel and reoriented to medclf's canonical orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medclf.errors import ReadError
from medclf.io.image import ImageData

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Canonical voxel order: rows run anterior->posterior, columns right->left, slices inferior->superior.
#: Each axial slice is then in radiological display convention, exactly like an axial DICOM series,
#: so a model trained on DICOM slices sees NIfTI slices the same way.
CANONICAL_AXCODES = ("P", "L", "S")


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(path: Path) -> ImageData:
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except FileNotFoundError:
        raise ReadError("file not found", path) from None
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise ReadError(f"unreadable NIfTI ({type(e).__name__}: {' '.join(str(e).split())[:120]})", path) from None
    if not hasattr(img, "affine") or img.affine is None:  # CIFTI-2 (.dconn/.dtseries.nii): grayordinates, no voxel grid
        raise ReadError(f"{type(img).__name__} holds surface/grayordinate data, not an image on a voxel grid: "
                        "not supported", path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ReadError(f"unsupported NIfTI shape {data.shape} (expected a 2-D or 3-D image)", path)
    # Resampled volumes carry NaN outside the field of view (nibabel's resampled_anat_moved.nii): those
    # voxels become background, the lowest finite value, and the item's record counts them.
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        if n_bad == data.size:
            raise ReadError("NIfTI has no finite voxel (all NaN or infinite)", path)
        data = np.where(bad, np.float32(data[~bad].min()), data)
    original_shape = list(data.shape)
    affine = img.affine
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL_AXCODES))
    data = apply_orientation(data, transform)
    affine = affine @ inv_ornt_aff(transform, original_shape)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    # (rows, cols, slices) -> (S, H, W, 1)
    vol = np.ascontiguousarray(data.transpose(2, 0, 1))[..., None]
    meta = {
        "modality": "unknown",
        "format": "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1",
        "orientation": "".join(nib.aff2axcodes(affine)),
        "source_orientation": "".join(nib.aff2axcodes(img.affine)),
        "spacing": [float(np.linalg.norm(affine[:3, i])) for i in range(3)] if zooms else None,
        "original_shape": original_shape,
        "nonfinite_voxels": n_bad,
    }
    return ImageData(vol, guess_intensity(vol), meta, affine=np.asarray(affine, dtype=np.float64))


def guess_intensity(vol: np.ndarray) -> str:
    """'hu' when values look like CT Hounsfield units (air near -1000), else 'mono'."""
    lo, hi = np.percentile(vol[:: max(1, vol.shape[0] // 8)], [1, 99])
    return "hu" if lo <= -500 and hi >= 0 and hi < 4000 else "mono"
