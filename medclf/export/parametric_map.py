"""explain's maps as DICOM Parametric Map objects (highdicom), on the source series' grid and frame of reference.

A PACS or viewer files a Parametric Map next to the scan it was derived from and overlays it there,
which it cannot do with a NIfTI file. highdicom builds the object (``highdicom.pm.ParametricMap``:
float pixel data, a Real World Value Mapping, per-frame plane positions and derivation references
taken from the source images); this module only decides what goes in:

- one multi-frame object per map kind (evidence, each class's error map, uncertainty, a method's
  own maps): the Parametric Map IOD is an enhanced multi-frame IOD, highdicom builds one object from
  a list of single-frame sources (one frame per source slice, each frame referencing its slice), and
  viewers load such an object as one volume. One object per kind rather than one object with a
  channel per kind: highdicom writes multi-channel maps, but viewers' Parametric Map support is
  built around one quantity per object, and each kind has its own label, value range and window;
- the values are exactly the NIfTI output's (the same source-grid float32 arrays), stored as float
  with an identity real-world value mapping, unit UCUM '1' (unitless);
- each object is its own new series (new Series and SOP Instance UIDs) in the source's study, on the
  source's frame of reference.

Identifiers. Source UIDs and patient/study attributes are read again from the input files (headers
only) when the objects are built and go only into those objects: never into a log, a printed line,
an error message or a file name (files are named ``<explain sub-folder name>_<map kind>.dcm``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medclf import __version__
from medclf.atomic import atomic_write
from medclf.errors import MedclfError
from medclf.io.dicom import is_dicom, tolerated_warnings

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["PM_SOP_CLASS", "build_parametric_map", "parametric_map_sources", "write_parametric_maps"]

log = logging.getLogger("medclf.export.parametric_map")

#: Parametric Map Storage
PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"

#: Type 2 attributes of the Patient / General Study modules highdicom reads from the first source as
#: attributes (an absent one raises AttributeError): a source without them gets them empty, as Type 2 allows
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")

#: series numbers of the maps' new series: high, so they sort after the scanner's own series
_SERIES_BASE = 900


def parametric_map_sources(source: str | Path, series: str | None, slice_files: list[str] | None,
                           n_slices: int) -> list[Path]:
    """The DICOM files a map's frames derive from, in the map's slice order; MedclfError naming the input if none.

    A series stored one slice per file gives its files in slice order (``Scored.slice_files``); a single
    DICOM file (one slice, or a multi-frame file whose frames are the slices) gives itself. Anything
    else cannot carry a frame per slice: NIfTI/PNG/JPEG, or a series whose files hold several frames or
    lack positions (the slice -> file correspondence is then unknown)."""
    if series is not None:
        if slice_files and len(slice_files) == n_slices:
            return [Path(p) for p in slice_files]
        raise MedclfError("no DICOM Parametric Map: the series is not one positioned slice per file "
                          "(its slice -> file correspondence is unknown)", source)
    p = Path(source)
    if p.is_file() and is_dicom(p):
        return [p]
    raise MedclfError("no DICOM Parametric Map: the input is not DICOM (NIfTI/PNG maps were written)", source)


def _scrub(msg: str) -> str:
    """An error text without UID-like or quoted values (they can be identifiers), one line, short."""
    msg = re.sub(r"\b\d+(\.\d+){3,}\b", "<uid>", " ".join(str(msg).split()))
    return re.sub(r"\"[^\"]*\"|'[^']*'", "'…'", msg)[:160]


class _ToDebug(logging.Handler):
    """highdicom logs values it doubts (e.g. a patient name) at WARNING; Python's last-resort handler
    would print them on stderr. Its records go to medclf's DEBUG log instead, values masked."""

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("highdicom: %s", _scrub(record.getMessage()))


@contextlib.contextmanager
def _quiet_highdicom() -> Iterator[None]:
    hd_log = logging.getLogger("highdicom")
    handler, propagate = _ToDebug(), hd_log.propagate
    hd_log.addHandler(handler)
    hd_log.propagate = False
    try:
        yield
    finally:
        hd_log.removeHandler(handler)
        hd_log.propagate = propagate


def _headers(paths: list[Path], n_slices: int, notes: Callable[[str], None] | None) -> list["Dataset"]:
    """Each source's header (no pixels), checked and completed as highdicom needs it.

    Absent Type 2 patient/study attributes are set empty. A source without a FrameOfReferenceUID
    (de-identified exports such as RSNA's drop it; the CT IOD requires it) gets one derived from its
    study and series UIDs: every map of that series shares it, so the maps overlay one another, and
    the plane positions still place them on the source's patient coordinates."""
    from pydicom.uid import generate_uid

    from medclf.io.dicom import source_headers

    out = source_headers(paths, "Parametric Map")
    frames = sum(max(int(ds.get("NumberOfFrames") or 1), 1) for ds in out)
    if frames != n_slices:
        raise MedclfError(f"no DICOM Parametric Map: the source holds {frames} frame(s) for {n_slices} map slice(s)",
                          paths[0])
    if len({str(ds.StudyInstanceUID) for ds in out}) > 1 or len({str(ds.SeriesInstanceUID) for ds in out}) > 1:
        raise MedclfError("no DICOM Parametric Map: the source files belong to several studies or series", paths[0])
    fors = {str(ds.get("FrameOfReferenceUID") or "") for ds in out}
    if len(fors) > 1:
        raise MedclfError("no DICOM Parametric Map: the series' files have different frames of reference", paths[0])
    if fors == {""}:
        derived = generate_uid(entropy_srcs=["medclf frame of reference", str(out[0].StudyInstanceUID),
                                             str(out[0].SeriesInstanceUID)])
        for ds in out:
            ds.FrameOfReferenceUID = derived
        if notes is not None:
            notes(f"{paths[0]}: the source has no FrameOfReferenceUID: its Parametric Maps get a new one "
                  "(their plane positions are the source's)")
    for kw in _TYPE2:
        if kw not in out[0]:
            setattr(out[0], kw, None)
    return out


def _label(text: str, n: int, upper: bool = False) -> str:
    """A CS (``upper``: A-Z 0-9 _ space) or SH/LO value of at most ``n`` characters."""
    text = text.upper() if upper else text
    text = re.sub(r"[^A-Z0-9_ ]+" if upper else r"[\\\x00-\x1f]+", "_", text)
    return text[:n].strip() or "MAP"


def _describe(key: str, summary: dict) -> tuple[str, str]:
    """(LUT label, explanation) of a map kind: what its values mean, as the NIfTI's readers learn from the README."""
    pred = str(summary.get("prediction", ""))
    if key == "evidence":
        return "evidence", f"evidence for {pred} (+) vs the runner-up (-)"
    if key.startswith("error_"):
        return f"error {key[6:]}", f"denoising error under class {key[6:]} (lower: fits better)"
    if key == "uncertainty":
        return "uncertainty", "uncertainty (0: certain)"
    return key, f"the method's {key} map"


def _window(v: np.ndarray, diverging: bool):
    """A VOI window over the map's range (symmetric about 0 for the signed evidence map).

    LINEAR_EXACT: the window maps [centre - width/2, centre + width/2] exactly, and (unlike the default
    LINEAR) allows widths below 1, which float maps of small values need (dciodvfy rejects them otherwise)."""
    import highdicom as hd

    lo, hi = float(v.min()), float(v.max())
    if diverging:
        lim = max(abs(lo), abs(hi)) or 1.0
        centre, width, what = 0.0, 2.0 * lim, "symmetric about 0"
    else:
        centre, width, what = (lo + hi) / 2.0, (hi - lo if hi > lo else 1.0), "value range"
    return hd.VOILUTTransformation(window_center=centre, window_width=width, window_explanation=what,
                                   voi_lut_function="LINEAR_EXACT")


def build_parametric_map(headers: list["Dataset"], vol: np.ndarray, key: str, summary: dict, series_number: int,
                         source: Path, model: tuple[str, str] = ("model", "unspecified")):
    """One highdicom ParametricMap of a (S, H, W) source-grid map, frame k derived from slice k of ``headers``.

    ``model`` is (method, run name): the equipment that made the map is medclf with that model."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    vol = np.ascontiguousarray(vol, dtype=np.float32)
    if vol.ndim != 3:
        raise MedclfError(f"{key} map {vol.shape} is not (S, H, W)", source)
    _, h, w = vol.shape
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    if (h, w) != (rows, cols):
        raise MedclfError(f"map grid {(h, w)} is not the source's {rows} x {cols} pixels", source)
    if not np.isfinite(vol).all():
        raise MedclfError(f"{key} map contains NaN or infinite values", source)
    lut_label, explanation = _describe(key, summary)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=_label(lut_label, 16), lut_explanation=_label(explanation, 64), unit=codes.UCUM.NoUnits,
        value_range=(float(vol.min()), float(vol.max())), slope=1.0, intercept=0.0)  # stored values are the values
    pm = hd.pm.ParametricMap(
        source_images=headers,
        pixel_array=vol,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medclf",
        manufacturer_model_name=_label(f"medclf {model[0]}", 64),
        software_versions=__version__,
        device_serial_number=_label(model[1], 64),  # Type 1: the run that made the map identifies the "device"
        # maps come from the model's low-resolution input (e.g. 32 px) upsampled to the source grid:
        # no face or other identifying feature can be rendered from them
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[_window(vol, key == "evidence")],
        content_label=_label(key, 16, upper=True),
        content_description=_label(explanation, 64),
        series_description=_label(f"medclf {lut_label} map", 64),
    )
    # General Series Laterality is Type 2C and dciodvfy requires it when no Frame Anatomy gives a
    # laterality; highdicom does not copy it: the source's value, else empty ("unknown", as Type 2C allows)
    pm.Laterality = headers[0].get("Laterality") or None
    return pm


def write_parametric_maps(out_dir: Path, name: str, sources: list[Path], grids: dict[str, np.ndarray],
                          summary: dict, notes: Callable[[str], None] | None = None,
                          model: tuple[str, str] = ("model", "unspecified")) -> list[Path]:
    """One Parametric Map file per map kind of one input: ``out_dir/<name>_<kind>.dcm``; returns their paths.

    ``grids`` are the (S, H, W) source-grid arrays the NIfTI files were written from (``write_explanation``'s
    ``grids``), ``sources`` the DICOM files of ``parametric_map_sources``, ``model`` (method, run name). Each file is written to a
    temp file and renamed. A highdicom refusal becomes one MedclfError line naming the input, values masked."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise MedclfError(f"output name {name!r} must be a single file name", sources[0] if sources else None)
    source = Path(summary.get("source") or sources[0])
    grids = {k: v for k, v in grids.items() if k != "overlay"}
    if not grids:
        raise MedclfError("no map to write as a Parametric Map", source)
    n_slices = {np.asarray(v).shape[0] for v in grids.values()}
    if len(n_slices) != 1:
        raise MedclfError("the maps do not share one slice count", source)
    headers = _headers(list(sources), n_slices.pop(), notes)
    out_dir = Path(out_dir)
    written = []
    with _quiet_highdicom(), tolerated_warnings(source):
        for k, (key, vol) in enumerate(grids.items()):
            fn = out_dir / f"{name}_{re.sub(r'[^A-Za-z0-9._-]+', '_', key).strip('._') or 'map'}.dcm"
            try:
                pm = build_parametric_map(headers, np.asarray(vol), key, summary, _SERIES_BASE + k + 1, source, model)
            except (ValueError, TypeError, AttributeError, KeyError) as e:  # highdicom's checks of the sources
                raise MedclfError(f"no DICOM Parametric Map ({type(e).__name__}: {_scrub(e)})", source) from None
            atomic_write(fn, lambda tmp, pm=pm: pm.save_as(tmp, enforce_file_format=True))
            written.append(fn)
    return written
