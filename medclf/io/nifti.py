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


#: NIfTI intent codes whose 4th (or 5th) axis holds components of one voxel, not a series of volumes
_COMPONENT_INTENTS = {1004: "general matrix", 1005: "symmetric matrix", 1006: "displacement vector", 1007: "vector",
                      1008: "point set", 1009: "triangle", 1010: "quaternion", 2003: "RGB vector", 2004: "RGBA vector",
                      2005: "shape", 2006: "FNIRT displacement field"}


def _load(path: Path, keep_file_open: bool = False):
    """nibabel's image (header only; pixels stay on disk) and its effective shape: trailing singleton
    axes past the 3rd dropped, 2-D padded to (X, Y, 1). Raises ReadError for what medclf refuses."""
    import nibabel as nib

    try:
        img = nib.load(str(path), keep_file_open=keep_file_open)
        dtype = img.get_data_dtype()
    except FileNotFoundError:
        raise ReadError("file not found", path) from None
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise ReadError(f"unreadable NIfTI ({type(e).__name__}: {' '.join(str(e).split())[:120]})", path) from None
    if not hasattr(img, "affine") or img.affine is None:  # CIFTI-2 (.dconn/.dtseries.nii): grayordinates, no voxel grid
        raise ReadError(f"{type(img).__name__} holds surface/grayordinate data, not an image on a voxel grid: "
                        "not supported", path)
    if dtype.kind == "c":
        raise ReadError(f"complex-valued NIfTI ({dtype}) not supported (expected real intensities)", path)
    raw = tuple(int(n) for n in img.shape)
    shape = list(raw)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) == 2:
        shape.append(1)
    try:
        code = int(img.header["intent_code"])
    except Exception:  # not a NIfTI header field of this image class
        code = 0
    if len(shape) >= 4 and code in _COMPONENT_INTENTS:
        raise ReadError(f"{len(shape)}-D NIfTI of shape {raw} with intent '{_COMPONENT_INTENTS[code]}' holds components "
                        "of one voxel on its extra axes, not a series of volumes: not supported", path)
    if len(shape) not in (3, 4):
        raise ReadError(f"unsupported NIfTI shape {raw} ({len(shape)}-D; expected a 2-D or 3-D image, or a 4-D series "
                        "of 3-D volumes)", path)
    return img, raw, tuple(shape)


def nifti_volume_count(path: Path) -> int:
    """How many 3-D volumes a NIfTI holds (its 4th axis; 1 for 2-D/3-D), from the header alone.

    Raises ReadError for files medclf refuses (5-D and up, vector/matrix intents, complex, CIFTI-2)."""
    _, _, shape = _load(Path(path))
    return shape[3] if len(shape) == 4 else 1


class NiftiVolumes:
    """A NIfTI read one 3-D volume at a time (``read(t)``); a 2-D/3-D file is one volume.

    The file is opened at the first read and kept open until ``close()`` (or the last volume is
    read), so reading the volumes of a ``.nii.gz`` in order decompresses it once, not once per volume;
    only one volume's voxels are in memory at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._img = None
        #: set when the file's header or voxel data could not be read (truncated, corrupt): later
        #: reads raise it again at once instead of decompressing the file anew for every volume
        self.broken: ReadError | None = None

    def _open(self):
        if self.broken is not None:
            raise self.broken
        if self._img is None:
            try:
                self._img = _load(self.path, keep_file_open=True)
            except ReadError as e:
                self.broken = e
                raise
        return self._img

    @property
    def n_volumes(self) -> int:
        shape = self._open()[2]
        return shape[3] if len(shape) == 4 else 1

    def read(self, volume: int | None = None) -> ImageData:
        img, raw, shape = self._open()
        n = shape[3] if len(shape) == 4 else 1
        try:
            if volume is None and n > 1:
                raise ReadError(f"4-D NIfTI of shape {raw} holds {n} volumes: read them one at a time "
                                "(ingest and classify read every volume)", self.path)
            t = 0 if volume is None else int(volume)
            if not 0 <= t < n:
                raise ReadError(f"volume {t} out of range (the file holds {n})", self.path)
            out = _to_image(self.path, img, raw, shape, t if len(shape) == 4 else None)
        except BaseException as e:
            self.close()
            if isinstance(e, ReadError) and e.message.startswith("unreadable"):
                self.broken = e
            raise
        if t == n - 1:
            self.close()
        return out

    def __iter__(self):
        try:
            n = self.n_volumes
            for t in range(n):
                yield self.read(t if n > 1 else None)
        finally:
            self.close()

    def close(self) -> None:
        if self._img is not None:
            opener = getattr(self._img[0].dataobj, "_opener", None)  # nibabel keeps the open file here
            if opener is not None:
                opener.close_if_mine()
            self._img = None


def read_nifti(path: Path, volume: int | None = None) -> ImageData:
    """A 2-D/3-D NIfTI, or one volume (``volume``: index on the 4th axis) of a 4-D one.

    A 4-D file with more than one volume and no ``volume`` is refused (read it with ``NiftiVolumes``)."""
    return NiftiVolumes(path).read(volume)


def _to_image(path: Path, img, raw: tuple, shape: tuple, volume: int | None) -> ImageData:
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    try:
        if volume is None:
            data = np.asanyarray(img.dataobj, dtype=np.float32).reshape(shape)
        else:  # only this volume's voxels are read (nibabel slices the file, no full 4-D array)
            data = np.asarray(img.dataobj[(slice(None),) * 3 + (volume,) + (0,) * (len(raw) - 4)], dtype=np.float32)
    except Exception as e:  # truncated data, zlib errors, ...
        raise ReadError(f"unreadable NIfTI ({type(e).__name__}: {' '.join(str(e).split())[:120]})", path) from None
    where = "" if volume is None else f" volume {volume}"
    # Resampled volumes carry NaN outside the field of view (nibabel's resampled_anat_moved.nii): those
    # voxels become background, the lowest finite value, and the item's record counts them.
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        if n_bad == data.size:
            raise ReadError(f"NIfTI{where} has no finite voxel (all NaN or infinite)", path)
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
    if volume is not None:  # one volume of a 4-D file: original_shape is the volume's, file_shape the file's
        meta.update(volume=volume, n_volumes=shape[3], file_shape=list(raw))
    return ImageData(vol, guess_intensity(vol), meta, affine=np.asarray(affine, dtype=np.float64))


def guess_intensity(vol: np.ndarray) -> str:
    """'hu' when values look like CT Hounsfield units (air near -1000), else 'mono'."""
    lo, hi = np.percentile(vol[:: max(1, vol.shape[0] // 8)], [1, 99])
    return "hu" if lo <= -500 and hi >= 0 and hi < 4000 else "mono"
