"""DICOM: single files, multi-frame files, series and DICOMDIR file-sets, read with pydicom.

pydicom is used directly rather than through MONAI's ``PydicomReader``: ingest needs per-file
failure isolation, the RSNA storage quirks and header-only reads for series grouping, and the
per-call overhead of ``LoadImage`` dominates on 512x512 slices (see ``benchmarks/ingest.py``).
Compressed transfer syntaxes decode through the pylibjpeg plugins pydicom finds on its own.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np

from medclf.errors import MedclfError, ReadError
from medclf.io.image import ImageData
from medclf.privacy import pseudonym

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

#: pydicom's warnings about what it tolerated (invalid VR values, implicit/explicit VR mix-ups) go
#: here at DEBUG, naming the file, instead of raw on stderr: a hospital archive would print hundreds
log = logging.getLogger("medclf.io.dicom")


def is_dicom(path: Path) -> bool:
    """True for DICOM Part 10 files, whatever their name (many archives drop the suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.name.upper() == "DICOMDIR":
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dcmread(path: Path, header_only: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # pydicom only warns when a file ends inside an element of undefined length (compressed
        # PixelData cut short) and drops that element: catch it, or a truncated file reads as "no pixel data".
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        raise ReadError("not a DICOM file (no DICM preamble)", path) from None
    except FileNotFoundError:
        raise ReadError("file not found", path) from None
    except Exception as e:  # pydicom raises many types on broken headers
        raise ReadError(f"unreadable DICOM header ({type(e).__name__}: {_short(e)})", path) from None
    eof = False
    for w in caught:
        if "End of file reached" in str(w.message):
            eof = True
        else:  # what pydicom tolerated: to the log, with the file's name (never its values' owner)
            _log_tolerated(w, path)
    if not header_only and "PixelData" not in ds:
        if eof:
            raise ReadError("truncated pixel data", path)
        if len(ds) == 0:
            raise ReadError("truncated file (no data set after the file meta information)", path)
    return ds


def _log_tolerated(w: warnings.WarningMessage, path: Path) -> None:
    """A pydicom warning to the DEBUG log, its quoted values masked: they can be a patient's name."""
    import re

    log.debug("%s: %s", path, re.sub(r"'[^']*'", "'…'", " ".join(str(w.message).split()))[:300])


@contextlib.contextmanager
def tolerated_warnings(path: Path | str):
    """Route the warnings raised inside (pydicom converts many values lazily, on first access) to the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        _log_tolerated(w, Path(path))


def _short(e: Exception, n: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _floats(v, n: int | None = None) -> list[float] | None:
    if v is None:
        return None
    vals = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
    try:
        out = [float(x) for x in vals]
    except (TypeError, ValueError):
        return None
    return out if n is None or len(out) == n else None


def _first(v) -> float | None:
    """First value of a possibly multi-valued element (RSNA files carry two-valued windows)."""
    f = _floats(v)
    return f[0] if f else None


def _int(v, default: int) -> int:
    """An IS/US value as an int, or ``default`` when absent or malformed (real archives carry IS
    values such as '1A' that pydicom keeps as strings with a warning)."""
    f = _first(v)
    return int(f) if f is not None and np.isfinite(f) else default


def header_summary(path: Path) -> dict:
    """What series grouping needs from a header, with identifiers already pseudonymised.

    Any failure while reading the header costs this file only (a ReadError with the reason): series
    planning runs over every header of a batch before any pixel is read, so one bad value must not
    abort the batch (issue #11).
    """
    ds = _dcmread(path, header_only=True)
    try:
        with tolerated_warnings(path):
            return {
                "series": pseudonym("series", str(ds.get("SeriesInstanceUID") or path)),
                "group": _group_key(ds, path),
                "ipp": _floats(ds.get("ImagePositionPatient"), 3),
                "iop": _floats(ds.get("ImageOrientationPatient"), 6),
                "instance": _int(ds.get("InstanceNumber"), 0),
                "frames": max(_int(ds.get("NumberOfFrames"), 1), 1),
                "shape": [_int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)],
            }
    except Exception as e:  # a value pydicom parses lazily and cannot convert
        raise ReadError(f"unreadable DICOM header ({type(e).__name__}: {_short(e)})", path) from None


def _group_key(ds, path: Path) -> str:
    # Split by patient (then study): slices of one patient are correlated.
    key = ds.get("PatientID") or ds.get("StudyInstanceUID") or ds.get("SeriesInstanceUID") or str(path)
    return pseudonym("group", key)


def _rescale(ds) -> tuple[float, float]:
    """(slope, intercept), from the plain elements or an enhanced file's shared functional groups."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            seq = ds.get(seq_name)
            if seq:
                pvt = seq[0].get("PixelValueTransformationSequence")
                if pvt:
                    slope, intercept = pvt[0].get("RescaleSlope"), pvt[0].get("RescaleIntercept")
                    break
    return float(slope if slope is not None else 1.0), float(intercept if intercept is not None else 0.0)


def _rescale_per_frame(ds, frames: int) -> list[tuple[float, float]] | None:
    """(slope, intercept) of each frame of an enhanced multi-frame file whose rescale is per frame
    (Enhanced MR/PET often scale every frame differently); None when one rescale serves all frames."""
    if frames < 2 or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return None
    seq = ds.get("PerFrameFunctionalGroupsSequence")
    if not seq or len(seq) != frames:
        return None
    out = []
    for item in seq:
        pvt = item.get("PixelValueTransformationSequence")
        if not pvt:
            return None  # in the shared functional groups, read by _rescale
        s, b = pvt[0].get("RescaleSlope"), pvt[0].get("RescaleIntercept")
        out.append((float(s if s is not None else 1.0), float(b if b is not None else 0.0)))
    return out


def stored_to_hu(stored: np.ndarray, slope: float, intercept: float, bits_stored: int, pixel_representation: int) -> np.ndarray:
    """Stored values -> Hounsfield units, with the RSNA-ICH fix for mis-stored 12-bit unsigned files.

    Some RSNA slices are stored unsigned in 12 bits with an intercept near 0, so air wraps around
    at 4096; the accepted fix (top RSNA solutions) adds 1000, wraps values >= 4096 and uses -1000.
    """
    x = stored.astype(np.float32)
    if bits_stored == 12 and pixel_representation == 0 and intercept > -100:
        x += 1000.0
        x[x >= 4096] -= 4096.0
        intercept = -1000.0
    if slope != 1.0:
        x *= np.float32(slope)
    x += np.float32(intercept)
    return x


def _decode(ds, path: Path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ReadError("no pixel data", path)
    ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
    fast = _native_16bit(ds, ts)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            arr = ds.pixel_array
        for w in caught:
            _log_tolerated(w, path)
        return arr
    except NotImplementedError:
        raise ReadError(f"unsupported transfer syntax {ts} (no decoder installed)", path) from None
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError, IndexError, EOFError) as e:
        msg = _short(e)
        if "less than expected" in msg or "truncated" in msg.lower():
            raise ReadError("truncated pixel data", path) from None
        if "missing dependencies" in msg or "no pixel data handler" in msg.lower():
            raise ReadError(f"unsupported transfer syntax {ts} ({msg})", path) from None
        # "Unable to decode as exceptions were raised by all available plugins": a decoder for this
        # transfer syntax is installed and failed on the data, so the data is at fault, not the syntax
        msg = _short(e, 400).split("available plugins:", 1)[-1].strip()
        raise ReadError(f"pixel data cannot be decoded ({_short(ValueError(msg))})", path) from None


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR little endian


def _native_16bit(ds, ts) -> np.ndarray | None:
    """Uncompressed single-frame 16-bit greyscale (most CT): the pixels are the buffer itself.

    pydicom's generic decoding pipeline costs ~1.5 ms per 512x512 slice, a third of ingest's read
    time; this path is a view of the bytes. BitsStored < 16 (12-bit CT) is handled as pydicom does:
    signed values are sign-extended from the stored bit width; unsigned values are taken as they are
    when no unused high bit is set, else pydicom decides. Anything else (compressed, 8/32 bits
    allocated, multi-frame, colour) goes through pydicom.
    """
    if ts not in _NATIVE_LE or "PixelData" not in ds:
        return None
    if ds.get("BitsAllocated") != 16 or ds.get("SamplesPerPixel", 1) != 1:
        return None
    bits = int(ds.get("BitsStored") or 16)
    if not 1 <= bits <= 16 or int(ds.get("NumberOfFrames") or 1) != 1:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    buf = ds.PixelData
    if len(buf) < rows * cols * 2:
        return None  # let pydicom produce its truncation error
    signed = ds.get("PixelRepresentation", 0) == 1
    arr = np.frombuffer(buf, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    if bits == 16:
        return arr
    if signed:  # two's complement in the low ``bits``: shift the sign bit to the top and back
        shift = 16 - bits
        return (arr << shift) >> shift
    return arr if int(arr.max()) < (1 << bits) else None


def _to_image(ds, path: Path) -> tuple[np.ndarray, str, dict]:
    """Decoded pixels as float32 (S, H, W, C) plus intensity kind and non-identifying facts."""
    arr = _decode(ds, path)
    frames = int(ds.get("NumberOfFrames") or 1)
    spp = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    modality = str(ds.get("Modality", "OT"))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr, spp = apply_color_lut(arr, ds), 3
    # Normalise to (S, H, W, C) whatever frames/samples combination pydicom returned.
    if spp == 1:
        arr = arr[None] if frames == 1 else arr
        arr = arr[..., None]
    else:
        arr = arr[None] if frames == 1 else arr
    if arr.ndim != 4:
        raise ReadError(f"unexpected pixel array shape {tuple(arr.shape)}", path)
    slope, intercept = _rescale(ds)
    meta = {
        "modality": modality,
        "photometric": photometric,
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        "bits_stored": int(ds.get("BitsStored") or 0),
        "pixel_representation": int(ds.get("PixelRepresentation") or 0),
        "rescale": [slope, intercept],
        "frames": frames,
    }
    if spp == 3:
        return arr.astype(np.float32), "rgb", meta
    per_frame = _rescale_per_frame(ds, frames)
    if per_frame and len(set(per_frame)) > 1:
        meta["rescale_per_frame"] = True
    else:
        per_frame = None
    bits, pr = meta["bits_stored"], meta["pixel_representation"]
    if modality == "CT":
        if per_frame:
            hu = np.concatenate([stored_to_hu(arr[k : k + 1], s, b, bits, pr) for k, (s, b) in enumerate(per_frame)])
        else:
            hu = stored_to_hu(arr, slope, intercept, bits, pr)
        return hu, "hu", meta
    if per_frame:
        sb = np.array(per_frame, np.float32)  # (frames, 2)
        x = arr.astype(np.float32) * sb[:, 0, None, None, None] + sb[:, 1, None, None, None]
    else:
        x = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if photometric == "MONOCHROME1":  # low values display white: invert so bright means dense everywhere
        x = x.max() + x.min() - x
        meta["inverted"] = True
    return x, "mono", meta


def _spacing(ds) -> list[float] | None:
    sp = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2)
    if sp is None:
        for seq_name in ("SharedFunctionalGroupsSequence",):
            seq = ds.get(seq_name)
            if seq and seq[0].get("PixelMeasuresSequence"):
                sp = _floats(seq[0].PixelMeasuresSequence[0].get("PixelSpacing"), 2)
    return sp


def _functional(ds, name: str, frame: int = 0):
    """The first item of an enhanced file's functional-group macro ``name`` for ``frame``: the
    per-frame group's, else the shared one's; None when neither has it."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per and frame < len(per) and per[frame].get(name):
        return per[frame].get(name)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(name):
        return shared[0].get(name)[0]
    return None


def _plane(ds, frame: int = 0) -> dict:
    """Position header of one frame: ImagePositionPatient / ImageOrientationPatient (top-level
    elements, else the enhanced functional groups), and InstanceNumber; None where absent."""
    ipp = _floats(ds.get("ImagePositionPatient"), 3) if frame == 0 else None
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if ipp is None:
        pos = _functional(ds, "PlanePositionSequence", frame)
        ipp = _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None
    if iop is None:
        ori = _functional(ds, "PlaneOrientationSequence", frame)
        iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
    return {"ipp": ipp, "iop": iop, "instance": _int(ds.get("InstanceNumber"), 0)}


def _positions(ds) -> list[dict]:
    """Position headers of a file's frames in file order (see ``_volume_geometry``).

    One per frame when an enhanced multi-frame file gives every frame its own position and the
    frames are evenly spaced along a line in file order; otherwise one, the first frame's (a
    single-frame file, or a multi-frame file whose other frames are taken to follow along the slice
    normal at ``_slice_step``).
    """
    frames = max(_int(ds.get("NumberOfFrames"), 1), 1)
    first = _plane(ds, 0)
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if frames > 1 and per and len(per) == frames:
        each = []
        for k in range(frames):
            pos = per[k].get("PlanePositionSequence")
            ipp = _floats(pos[0].get("ImagePositionPatient"), 3) if pos else None
            if ipp is None:
                break
            each.append({**first, "ipp": ipp})
        else:
            pts = np.asarray([h["ipp"] for h in each])
            steps = np.diff(pts, axis=0)
            if np.linalg.norm(steps[0]) > 1e-6 and np.allclose(steps, steps[0], atol=1e-2):
                return each
    return [first]


def _slice_step(ds, frames: int) -> float | None:
    """mm between a multi-frame file's frames (SpacingBetweenSlices, else SliceThickness), or a lone
    slice's extent (SliceThickness, else SpacingBetweenSlices); None when neither is known."""
    measures = _functional(ds, "PixelMeasuresSequence")
    names = ("SpacingBetweenSlices", "SliceThickness") if frames > 1 else ("SliceThickness", "SpacingBetweenSlices")
    for name in names:
        v = _first(ds.get(name))
        if v is None and measures is not None:
            v = _first(measures.get(name))
        if v is not None and np.isfinite(v) and v != 0:
            return abs(v)
    return None


def _volume_geometry(meta: dict, headers: list[dict], n_slices: int, spacing: list[float] | None,
                     step: float | None) -> np.ndarray | None:
    """The affine of a volume of ``n_slices`` read from DICOM, shared by ``read_dicom`` and
    ``read_dicom_series`` so a slice read alone or as a one-file series gets the same geometry.

    ``headers`` are position headers in slice order: one per slice, or just the first slice's (the
    others follow along the slice normal ``step`` mm apart; 1 mm when unknown). Sets
    ``meta["spacing"]`` (row, col, slice mm; slice 0.0 when unknown), and ``meta["orientation"]``
    when the affine is known. None without ImagePositionPatient, ImageOrientationPatient or
    PixelSpacing: the map writer then uses its plain ('P','L','S') affine at the origin.
    """
    if len(headers) not in (1, n_slices):
        headers = []  # positions for some slices only (several multi-frame files): geometry unknown
    affine = _series_affine(headers, spacing, step) if headers else None
    if spacing:
        third = float(np.linalg.norm(affine[:3, 2])) if affine is not None else float(step or 0.0)
        meta["spacing"] = [float(spacing[0]), float(spacing[1]), third]
    else:
        meta["spacing"] = None
    if affine is not None:
        import nibabel as nib

        meta["orientation"] = "".join(nib.aff2axcodes(affine))
    return affine


def read_dicom(path: Path) -> ImageData:
    """One DICOM file (single- or multi-frame), with its own patient geometry (see ``_volume_geometry``)."""
    ds = _dcmread(path)
    arr, kind, meta = _to_image(ds, path)
    n = int(arr.shape[0])
    affine = _volume_geometry(meta, _positions(ds), n, _spacing(ds), _slice_step(ds, n))
    meta["window"] = [_first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))]
    meta["original_shape"] = list(arr.shape[:3])
    return ImageData(arr, kind, meta, affine=affine, group=_group_key(ds, path))


def _normal(iop: list[float]) -> np.ndarray:
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    return np.cross(row, col)


def order_series(headers: list[dict]) -> list[int]:
    """Indices of a series' files in anatomical order: by ImagePositionPatient along the slice normal.

    Falls back to InstanceNumber when positions are missing (file names are never used).
    """
    if all(h.get("ipp") and h.get("iop") for h in headers):
        n = _normal(headers[0]["iop"])
        keys = [float(np.dot(n, h["ipp"])) for h in headers]
    else:
        keys = [h.get("instance", 0) for h in headers]
    return sorted(range(len(headers)), key=lambda i: (keys[i], i))


def read_dicom_series(paths: list[Path]) -> tuple[ImageData, list[tuple[str, str]]]:
    """A series as one volume in slice order, plus (path, reason) for every file that failed.

    Raises ReadError only if no file of the series could be used.
    """
    slices, headers, frames, errors = [], [], [], []
    kind = meta = None
    group = spacing = step = None
    for p in paths:
        try:
            ds = _dcmread(p)
            arr, k, m = _to_image(ds, p)
            if slices and arr.shape[1:] != slices[0].shape[1:]:
                raise ReadError(f"slice shape {arr.shape[1:3]} differs from the series' {slices[0].shape[1:3]}", p)
        except ReadError as e:
            errors.append((str(p), e.message))
            continue
        if kind is None:
            kind, meta, group = k, m, _group_key(ds, p)
            spacing, step = _spacing(ds), _slice_step(ds, int(arr.shape[0]))
        slices.append(arr)
        frames.append(_positions(ds))
        headers.append(frames[-1][0])
    if not slices:
        reasons = sorted({r for _, r in errors})
        raise ReadError(f"no readable file in the series of {len(paths)}: " + "; ".join(reasons)[:300],
                        paths[0] if paths else None)
    order = order_series(headers)
    vol = np.concatenate([slices[i] for i in order], axis=0)
    hs = [h for i in order for h in frames[i]]  # per slice (or only the first slice's: one multi-frame file)
    affine = _volume_geometry(meta, hs, int(vol.shape[0]), spacing, step)
    meta["original_shape"] = list(vol.shape[:3])
    return ImageData(vol, kind, meta, affine=affine, group=group), errors


def _series_affine(headers: list[dict], spacing: list[float] | None, step_mm: float | None = None) -> np.ndarray | None:
    """(row, col, slice) index -> RAS+ mm, built from ImagePositionPatient/Orientation (DICOM is LPS).

    The slice axis runs from the first header's position to the last's; with one header, along the
    slice normal, ``step_mm`` (1 mm when None) per slice."""
    h0 = headers[0]
    if not (h0.get("ipp") and h0.get("iop") and spacing):
        return None
    row_cos, col_cos = np.asarray(h0["iop"][:3]), np.asarray(h0["iop"][3:])
    dr, dc = spacing[0], spacing[1]
    if len(headers) > 1 and headers[-1].get("ipp"):
        step = (np.asarray(headers[-1]["ipp"]) - np.asarray(h0["ipp"])) / (len(headers) - 1)
    else:
        step = _normal(h0["iop"]) * (step_mm or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = col_cos * dr  # moving down a row follows the column direction cosine
    lps[:3, 1] = row_cos * dc  # moving along a row follows the row direction cosine
    lps[:3, 2] = step
    lps[:3, 3] = h0["ipp"]
    if abs(np.linalg.det(lps[:3, :3])) < 1e-9:  # slices at one position (copies of one image): no geometry
        return None
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def dicomdir_files(path: Path) -> list[Path]:
    """The image files a DICOMDIR file-set references (paths resolved next to the DICOMDIR)."""
    import pydicom
    from pydicom.fileset import FileSet

    try:
        fs = FileSet(pydicom.dcmread(path))
    except Exception as e:
        raise ReadError(f"unreadable DICOMDIR ({_short(e)})", path) from None
    out = []
    for inst in fs:
        if getattr(inst, "path", None):
            out.append(Path(inst.path))
    return out


def source_headers(paths, what: str) -> list:
    """Headers (no pixels) of the sources a derived object references, read again when it is
    written; a header without its study/series/instance UIDs or SOP class cannot be referenced.
    ``what`` names the object in the one-line errors ("SR", "Parametric Map")."""
    import pydicom

    out = []
    for p in paths:
        try:
            with tolerated_warnings(p):
                ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as e:  # the file changed or vanished since it was scored
            raise MedclfError(f"cannot re-read the DICOM header for the {what} ({type(e).__name__})", p) from None
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not str(ds.get(kw) or "").strip():
                raise MedclfError(f"no DICOM {what}: the header has no {kw}", p)
        out.append(ds)
    return out
