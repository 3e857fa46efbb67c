"""Explanation maps back on the scan's own grid: NIfTI aligned to the source, PNG overlays, summary.json."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from medclf.data.cache import atomic_write_text
from medclf.figures import pyplot, save_figure
from medclf.io.image import ImageData
from medclf.io.nifti import CANONICAL_AXCODES, is_nifti


def maps_to_source(maps: np.ndarray, img: ImageData) -> np.ndarray:
    """(S, size, size) -> (S, H, W): undo ``preprocessing.resize_square`` (resize back, crop the padding)."""
    from PIL import Image

    S, H, W = img.array.shape[:3]
    side = max(H, W)
    top, left = (side - H) // 2, (side - W) // 2
    out = np.empty((S, H, W), dtype=np.float32)
    for s in range(S):
        m = np.asarray(Image.fromarray(np.ascontiguousarray(maps[s], dtype=np.float32), mode="F")
                       .resize((side, side), Image.BILINEAR), dtype=np.float32)
        out[s] = m[top : top + H, left : left + W]
    return out


def _atomic_nifti(path: Path, nimg) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name.split(".")[0], suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(nimg, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def source_geometry(img: ImageData, source: Path, vol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a (S, H, W) map on the source's voxel grid.

    NIfTI source: the reader's reorientation is undone, so shape and affine equal the file's.
    DICOM series: (rows, cols, slices) with the series' affine. 2-D images: (H, W, 1) with the
    pixel spacing on the diagonal (identity when unknown); there is no patient geometry to keep.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    data = vol.transpose(1, 2, 0)  # (rows, cols, slices) in the reader's order
    if is_nifti(source):
        src = nib.load(str(source))
        back = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), io_orientation(src.affine))
        data = apply_orientation(data, back)
        if len(src.shape) == 2:
            data = data[..., 0]
        return data, np.asarray(src.affine)
    if img.affine is not None:
        return data, np.asarray(img.affine)
    sp = img.meta.get("spacing") or [1.0, 1.0, 1.0]
    return data, np.diag([float(sp[0]), float(sp[1]), float(sp[2] or 1.0) if len(sp) > 2 else 1.0, 1.0])


def write_nifti_map(path: Path, vol: np.ndarray, img: ImageData, source: Path) -> tuple[list[int], list]:
    import nibabel as nib

    data, affine = source_geometry(img, Path(source), vol)
    _atomic_nifti(Path(path), nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine))
    return list(data.shape), np.round(affine, 6).tolist()


def overlay_png(path: Path, scan: np.ndarray, heat: np.ndarray, title: str, label: str = "evidence",
                diverging: bool = True) -> None:
    """Scan (its window, grey) beside the scan with the map over it; a colorbar says what the colour means."""
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 4.2))
    for ax in axes:
        ax.imshow(scan, cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    lim = float(np.abs(heat).max()) or 1.0
    im = axes[1].imshow(heat, cmap="RdBu_r" if diverging else "magma", alpha=0.5,
                        vmin=-lim if diverging else 0, vmax=lim)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label=label)
    axes[0].set_title("scan")
    axes[1].set_title(title, fontsize=9)
    save_figure(fig, path)


def _counterfactual_png(path: Path, scan: np.ndarray, cf: np.ndarray, classes: list[str]) -> None:
    fig, axes = pyplot().subplots(1, len(classes) + 1, figsize=(2.6 * (len(classes) + 1), 2.8))
    axes[0].imshow(scan, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input", fontsize=9)
    for k, c in enumerate(classes):
        axes[k + 1].imshow(cf[k, 0], cmap="gray", vmin=0, vmax=1)
        axes[k + 1].set_title(f"denoised as {c}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    save_figure(fig, path)


def write_explanation(out_dir: Path, name: str, source: Path, img: ImageData, scan: np.ndarray, maps: dict,
                      probs: np.ndarray, pred: np.ndarray, uncertainty: dict, classes: list[str]) -> dict:
    """All of one input's explanation files under ``out_dir/name``; returns its summary.

    For a volume the overall prediction is the highest-probability non-first class over slices
    ("any slice positive"), and the PNGs show the slice with the largest evidence.
    """
    d = Path(out_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    ev = maps_to_source(maps["evidence"], img)
    shape, affine = write_nifti_map(d / "evidence.nii.gz", ev, img, source)
    files["evidence"] = "evidence.nii.gz"
    for k, c in enumerate(classes):
        fn = f"error_{c}.nii.gz"
        write_nifti_map(d / fn, maps_to_source(maps["error"][:, k], img), img, source)
        files[f"error_{c}"] = fn
    first_unc = next(iter(uncertainty))
    unc = maps.get("uncertainty_map")
    unc_src = maps_to_source(unc, img) if unc is not None else \
        np.broadcast_to(np.asarray(uncertainty[first_unc], np.float32)[:, None, None], ev.shape).copy()
    write_nifti_map(d / "uncertainty.nii.gz", unc_src, img, source)
    files["uncertainty"] = "uncertainty.nii.gz"
    s = int(np.argmax(np.abs(ev).reshape(len(ev), -1).sum(1)))
    scan_src = maps_to_source(scan[:, 0], img)
    title = f"slice {s}: {classes[int(pred[s])]} (p={float(probs[s, int(pred[s])]):.2f}); red = supports it"
    overlay_png(d / "overlay.png", scan_src[s], ev[s], title)
    files["overlay"] = "overlay.png"
    if "counterfactual" in maps:
        _counterfactual_png(d / "counterfactuals.png", scan[s, 0], maps["counterfactual"][s], classes)
        files["counterfactuals"] = "counterfactuals.png"
    if len(pred) > 1 and len(classes) > 1:
        k = 1 + int(np.argmax(probs[:, 1:].max(0)))
        overall = classes[k] if probs[:, k].max() >= 0.5 else classes[0]
    else:
        overall = classes[int(pred[0])]
    summary = {
        "source": str(source),
        "prediction": overall,
        "per_slice": [{"slice": i, "prediction": classes[int(pred[i])],
                       "probabilities": {c: float(probs[i, j]) for j, c in enumerate(classes)},
                       "uncertainty": {u: float(v[i]) for u, v in uncertainty.items()}} for i in range(len(pred))],
        "shown_slice": s,
        "files": files,
        "geometry": {"shape": shape, "affine": affine, "orientation": img.meta.get("orientation")},
    }
    atomic_write_text(d / "summary.json", json.dumps(summary, indent=1))
    return summary
