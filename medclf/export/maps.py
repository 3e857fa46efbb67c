"""Explanation maps back on the scan's own grid: NIfTI aligned to the source, PNG overlays, summary.json.

The model sees padded, resized (S, C, size, size) images; a clinician opens the original scan. Every
map is therefore sent back through the inverse of ``preprocessing.resize_square`` and written with
the source's own voxel grid and affine, so it overlays the scan in any viewer without resampling.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from medclf.errors import MedclfError
from medclf.atomic import atomic_write
from medclf.figures import pyplot, save_figure
from medclf.io.image import ImageData
from medclf.io.nifti import CANONICAL_AXCODES, is_nifti

__all__ = ["maps_to_source", "source_geometry", "write_nifti_map", "overlay_png", "write_explanation"]


# ----------------------------------------------------------------------------- grid


def _unresize(m: np.ndarray, h: int, w: int, keep_aspect: bool = True) -> np.ndarray:
    """One (size, size) map -> (h, w): Pillow bilinear back to the padded square, then crop the padding
    (or, for ``keep_aspect=False``, straight back to (h, w): resize_square stretched it)."""
    from PIL import Image

    m = np.ascontiguousarray(m, dtype=np.float32)
    if not keep_aspect or h == w:
        if m.shape == (h, w):
            return m
        return np.asarray(Image.fromarray(m, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if m.shape != (side, side):
        m = np.asarray(Image.fromarray(m, mode="F").resize((side, side), Image.BILINEAR), dtype=np.float32)
    return m[top : top + h, left : left + w]


def maps_to_source(maps: np.ndarray, img: ImageData, keep_aspect: bool = True) -> np.ndarray:
    """(S, size, size) -> (S, H, W) on the source pixel grid: exact inverse of ``resize_square``'s geometry.

    ``keep_aspect`` must be the ``PreprocessConfig.keep_aspect`` the model's inputs were made with.
    """
    maps = np.asarray(maps)
    s, h, w = img.array.shape[:3]
    if maps.ndim != 3 or maps.shape[0] != s or maps.shape[1] != maps.shape[2]:
        raise MedclfError(f"map shape {tuple(maps.shape)} does not fit an image of {s} slice(s) (expected (S, size, size))")
    if not np.isfinite(maps).all():
        raise MedclfError("map contains NaN or infinite values")
    return np.stack([_unresize(maps[i], h, w, keep_aspect) for i in range(s)]).astype(np.float32, copy=False)


def _plain_affine(img: ImageData) -> np.ndarray:
    """Affine for an image without patient geometry: PNG/JPEG/TIFF, and DICOM lacking ImagePositionPatient,
    ImageOrientationPatient or PixelSpacing (``ImageData.affine`` None; see ``medclf.io.dicom._volume_geometry``).
    Its origin is (0, 0, 0): such a map has no scanner position to land on, only the image's own grid.

    Rows run posterior, columns to the patient's left, slices superior -- medclf's canonical
    ('P','L','S') order, the same as an axial DICOM series. A viewer (radiological convention) then
    shows the map the way the image itself displays, and ``read_image`` reads it back unchanged.
    Pixel spacing (row, col[, thickness]) scales the axes when known, else 1 mm.
    """
    sp = img.meta.get("spacing") or []
    row = float(sp[0]) if len(sp) > 0 and sp[0] else 1.0
    col = float(sp[1]) if len(sp) > 1 and sp[1] else 1.0
    thick = float(sp[2]) if len(sp) > 2 and sp[2] else 1.0
    aff = np.zeros((4, 4))
    aff[1, 0] = -row  # row index -> posterior (-A)
    aff[0, 1] = -col  # column index -> patient's left (-R)
    aff[2, 2] = thick  # slice index -> superior
    aff[3, 3] = 1.0
    return aff


def source_geometry(img: ImageData, source: Path, vol: np.ndarray) -> tuple[np.ndarray, np.ndarray, object]:
    """(data, affine, source header or None) of a (S, H, W) map laid on the source's voxel grid.

    NIfTI source: the reader's reorientation to ('P','L','S') is undone, so shape and affine equal the
    file's. DICOM with patient geometry (a single file or a series, read alike): (rows, cols, slices)
    with the reader's affine, voxel (0, 0, 0) at the first slice's ImagePositionPatient (in RAS).
    Anything else: (H, W, S) with ``_plain_affine``.
    """
    vol = np.asarray(vol, dtype=np.float32)
    s, h, w = img.array.shape[:3]
    if vol.shape != (s, h, w):
        raise MedclfError(f"map shape {tuple(vol.shape)} is not the image's (S, H, W) = {(s, h, w)}", source)
    data = vol.transpose(1, 2, 0)  # (rows, cols, slices): the reader's canonical order
    source = Path(source)
    if is_nifti(source):
        import nibabel as nib
        from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

        try:
            src = nib.load(str(source))
        except Exception as e:  # missing file, bad header: same failure classes as the reader
            raise MedclfError(f"cannot read the source NIfTI header ({type(e).__name__})", source) from None
        src_shape = tuple(int(n) for n in src.shape)
        back = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), io_orientation(src.affine))
        data = apply_orientation(data, back)
        # The reader dropped a trailing singleton 4th axis and padded 2-D to 3-D: restore the file's shape.
        if data.shape != tuple(src_shape[:3]) + (1,) * (3 - len(src_shape[:3])) or int(np.prod(src_shape)) != data.size:
            raise MedclfError(f"map grid {data.shape} does not match the source NIfTI shape {src_shape}", source)
        return data.reshape(src_shape), np.asarray(src.affine, dtype=np.float64), src.header
    if img.affine is not None:
        return data, np.asarray(img.affine, dtype=np.float64), None
    return data, _plain_affine(img), None


# ----------------------------------------------------------------------------- NIfTI


def write_nifti_map(path: Path, maps_src: np.ndarray, img: ImageData, source: Path) -> None:
    """Write a (S, H, W) source-grid map as float32 NIfTI whose voxel grid and affine equal the source's.

    For a NIfTI source the sform/qform codes and units are copied too (the map says "scanner" when the
    scan does); intensity scaling is not (the map is float32 already).
    """
    import nibabel as nib

    data, affine, hdr = source_geometry(img, Path(source), maps_src)
    out = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    if hdr is not None:
        s_code, q_code = int(hdr["sform_code"]), int(hdr["qform_code"])
        out.header.set_sform(affine, code=s_code or 2)
        out.header.set_qform(affine, code=q_code or (0 if s_code else 2))
        try:
            out.header.set_xyzt_units(*hdr.get_xyzt_units())
        except Exception:  # NIfTI-2 / odd unit codes: keep nibabel's default (mm)
            pass
    else:
        out.header.set_sform(affine, code=2)
        out.header.set_qform(affine, code=2)
        out.header.set_xyzt_units("mm")
    atomic_write(Path(path), lambda tmp: nib.save(out, tmp))


# ----------------------------------------------------------------------------- PNG


def overlay_png(path: Path, scan: np.ndarray, heat: np.ndarray, title: str, alpha: float = 0.45,
                diverging: bool = True, label: str | None = None, aspect: float = 1.0) -> None:
    """Plain scan (grey, its window) beside the scan with the map over it, plus a labelled colorbar.

    Diverging maps (evidence) use RdBu_r with limits symmetric about 0, so white means "no evidence";
    sequential maps (uncertainty) use magma from 0. Opacity is ``alpha`` times |value| / limit, so
    regions without evidence leave the anatomy untinted. ``aspect`` is row spacing / column spacing (non-square pixels).
    """
    scan, heat = np.asarray(scan, dtype=np.float32), np.asarray(heat, dtype=np.float32)
    if scan.ndim != 2 or heat.shape != scan.shape:
        raise MedclfError(f"overlay needs two (H, W) arrays of one shape, got {scan.shape} and {heat.shape}", path)
    if not (np.isfinite(scan).all() and np.isfinite(heat).all()):
        raise MedclfError("overlay input contains NaN or infinite values", path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    h, w = scan.shape
    panel = 4.0
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel + 1.2, panel * min(2.0, max(0.5, h * aspect / w)) + 0.8))
    for ax in axes:
        ax.imshow(scan, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        ax.axis("off")
    if diverging:
        lim = float(np.abs(heat).max()) or 1.0
        vmin, vmax, cmap = -lim, lim, "RdBu_r"
        strength = np.abs(heat) / lim
        label = label or "evidence (red: for the prediction, blue: against)"
    else:
        vmin = min(0.0, float(heat.min()))
        vmax = float(heat.max()) if float(heat.max()) > vmin else vmin + 1.0
        cmap = "magma"
        strength = (heat - vmin) / (vmax - vmin)
        label = label or "uncertainty"
    im = axes[1].imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="bilinear",
                        alpha=np.clip(alpha * strength, 0.0, 1.0))
    cb = fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    cb.solids.set_alpha(1.0)  # the bar shows the colour scale, not the per-pixel opacity
    cb.set_label(label)
    axes[0].set_title("scan")
    axes[1].set_title("map over scan")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def _counterfactual_png(path: Path, scan: np.ndarray, cf: np.ndarray, classes: list[str], aspect: float, title: str) -> None:
    """Input beside what the class-conditional denoiser makes of it under each class (first channel),
    and below each the difference counterfactual - input (Favero et al.'s map: what would change)."""
    n = len(classes) + 1
    fig, grid = pyplot().subplots(2, n, figsize=(2.6 * n, 5.6), squeeze=False)
    axes, diffs = grid[0], grid[1]
    axes[0].imshow(scan, cmap="gray", vmin=0, vmax=1, aspect=aspect)
    axes[0].set_title("input", fontsize=9)
    lim = max(float(np.abs(cf - scan[None]).max()), 1e-6)
    for k, c in enumerate(classes):
        axes[k + 1].imshow(cf[k], cmap="gray", vmin=0, vmax=1, aspect=aspect)
        axes[k + 1].set_title(f"reconstructed as {c}", fontsize=9)
        diffs[k + 1].imshow(cf[k] - scan, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect=aspect)
        diffs[k + 1].set_title(f"{c} - input", fontsize=9)
    for ax in [*axes, *diffs]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- one input


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def _num(v) -> float | None:
    """JSON-safe float: NaN/inf become null (json.dumps would write invalid JSON)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _overall(probs: np.ndarray, pred: np.ndarray, classes: list[str]) -> tuple[str, dict[str, float | None]]:
    """Volume-level call, "any slice positive".

    Probabilities: per non-first class the max over slices, for the first (negative) class the min
    over slices. Prediction: the first class unless some slice is predicted otherwise; then the
    non-first class with the highest probability among the slices predicted positive. The slices'
    own decision rule (which may be calibrated, not argmax) is thus kept.
    """
    if len(pred) == 1:
        return classes[int(pred[0])], {c: _num(probs[0, j]) for j, c in enumerate(classes)}
    p = {c: _num(probs[:, j].min() if j == 0 else probs[:, j].max()) for j, c in enumerate(classes)}
    pos = np.flatnonzero(pred != 0)
    if len(pos) == 0:
        return classes[0], p
    best = pos[np.argmax(probs[pos, pred[pos]])]
    return classes[int(pred[best])], p


def _shown_slice(ev: np.ndarray, probs: np.ndarray) -> int:
    """The slice a PNG shows: for a volume, the one with the highest probability of a non-first class
    (the slice that drives the "any slice positive" call); for single-class ties or K == 1, the one
    with the largest total |evidence|."""
    if len(probs) > 1 and probs.shape[1] > 1:
        top = probs[:, 1:].max(1)
        if np.ptp(top) > 0:
            return int(np.argmax(top))
    return int(np.argmax(np.abs(ev).reshape(len(ev), -1).sum(1)))


def _aspect(img: ImageData) -> float:
    sp = img.meta.get("spacing") or []
    return float(sp[0]) / float(sp[1]) if len(sp) > 1 and sp[0] and sp[1] else 1.0


def write_explanation(out_dir: Path, name: str, source: Path, img: ImageData, scan: np.ndarray, maps: dict,
                      probs: np.ndarray, pred: np.ndarray, uncertainty: dict, classes: list[str],
                      keep_aspect: bool = True, grids: dict | None = None) -> dict:
    """All of one input's explanation files under ``out_dir/name``; returns the summary (also summary.json).

    Files: evidence.nii.gz, error_<class>.nii.gz (when given), <map>.nii.gz for other (S, size, size)
    maps, uncertainty.nii.gz (the given map, else a
    constant-per-slice map of the first uncertainty value, so a volume shows which slices are
    uncertain), overlay.png (see ``_shown_slice``), counterfactuals.png when given, summary.json.
    The overall prediction follows ``_overall`` ("any slice positive" for volumes). ``keep_aspect``
    is the preprocessing's (see ``maps_to_source``). ``grids``, when given, receives each NIfTI map's
    (S, H, W) source-grid array under its ``files`` key (the exact values written, for other writers
    such as ``export.parametric_map``).
    """
    source = Path(source)
    if not name or Path(name).name != name or name in (".", ".."):
        raise MedclfError(f"output name {name!r} must be a single folder name", source)
    probs, pred = np.asarray(probs, dtype=np.float64), np.asarray(pred).astype(np.int64)
    S, K = img.n_slices, len(classes)
    if probs.shape != (S, K) or pred.shape != (S,) or not ((pred >= 0) & (pred < K)).all():
        raise MedclfError(f"probabilities {probs.shape} / predictions {pred.shape} do not fit {S} slice(s) x {K} classes", source)
    if "evidence" not in maps:
        raise MedclfError("explanation maps lack 'evidence'", source)
    err = maps.get("error")  # per-class maps: the diffusion classifier's denoising errors; others have none
    if err is not None:
        err = np.asarray(err)
        if err.ndim != 4 or err.shape[:2] != (S, K):
            raise MedclfError(f"error maps {err.shape} are not (S={S}, K={K}, size, size)", source)
    scan = np.asarray(scan)
    if scan.ndim != 4 or scan.shape[0] != S:
        raise MedclfError(f"scan {scan.shape} is not (S={S}, C, size, size)", source)

    d = Path(out_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    def nifti(key: str, fn: str, vol: np.ndarray) -> None:
        write_nifti_map(d / fn, vol, img, source)
        files[key] = fn
        if grids is not None:
            grids[key] = vol

    ev = maps_to_source(maps["evidence"], img, keep_aspect)
    nifti("evidence", "evidence.nii.gz", ev)
    for k, c in enumerate(classes if err is not None else []):
        nifti(f"error_{c}", f"error_{_safe(c)}.nii.gz", maps_to_source(err[:, k], img, keep_aspect))
    for key, m in maps.items():  # a method's own maps (e.g. DiffMIC's ROI saliency): (S, size, size)
        m = np.asarray(m)
        if key not in ("evidence", "error", "uncertainty_map", "counterfactual") and m.ndim == 3 and m.shape[0] == S:
            nifti(key, f"{_safe(key)}.nii.gz", maps_to_source(m, img, keep_aspect))
    unc_map = maps.get("uncertainty_map")
    if unc_map is not None:
        nifti("uncertainty", "uncertainty.nii.gz", maps_to_source(unc_map, img, keep_aspect))
    elif uncertainty:
        first = next(iter(uncertainty))
        per_slice = np.asarray(uncertainty[first], dtype=np.float32).reshape(S)
        nifti("uncertainty", "uncertainty.nii.gz", np.broadcast_to(per_slice[:, None, None], ev.shape).copy())

    s = _shown_slice(ev, probs)
    aspect = _aspect(img)
    scan_src = maps_to_source(scan[:, 0], img, keep_aspect)
    where = f"slice {s + 1}/{S}: " if S > 1 else ""
    ps = int(pred[s])
    overlay_png(d / "overlay.png", scan_src[s], ev[s],
                f"{where}{classes[ps]} (p = {probs[s, ps]:.2f}); red supports it, blue the runner-up", aspect=aspect)
    files["overlay"] = "overlay.png"
    cf = maps.get("counterfactual")
    if cf is not None:
        cf = np.asarray(cf)
        if cf.ndim != 5 or cf.shape[:2] != (S, K):
            raise MedclfError(f"counterfactuals {cf.shape} are not (S={S}, K={K}, C, size, size)", source)
        # Back on the source grid like the overlay, so input and reconstructions compare like for like.
        recon = [maps_to_source(np.clip(cf[:, k, 0], 0.0, 1.0), img, keep_aspect)[s] for k in range(K)]
        _counterfactual_png(d / "counterfactuals.png", scan_src[s], np.stack(recon), classes, aspect,
                            f"{where}what the model reconstructs under each class")
        files["counterfactuals"] = "counterfactuals.png"

    overall, overall_p = _overall(probs, pred, classes)
    data, affine, _ = source_geometry(img, source, ev)
    summary = {
        "source": str(source),
        "classes": list(classes),
        "prediction": overall,
        "probabilities": overall_p,
        "overall_rule": "single image" if S == 1 else "any slice positive (max over slices per non-first class)",
        "per_slice": [{"slice": i, "prediction": classes[int(pred[i])],
                       "probabilities": {c: _num(probs[i, j]) for j, c in enumerate(classes)},
                       "uncertainty": {u: _num(np.asarray(v).reshape(-1)[i]) for u, v in uncertainty.items()}}
                      for i in range(S)],
        "uncertainty": {u: [_num(x) for x in np.asarray(v).reshape(-1)] for u, v in uncertainty.items()},
        "shown_slice": s,
        "files": files,
        "geometry": {"shape": [int(n) for n in data.shape], "affine": np.asarray(affine, dtype=float).tolist(),
                     "orientation": img.meta.get("source_orientation") or img.meta.get("orientation")},
    }
    atomic_write(d / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1), encoding="utf-8"))
    return summary
