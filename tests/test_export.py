"""Export: maps back on the source grid, NIfTI geometry equal to the source's, overlays, summary.json."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medclf.errors import MedclfError
from medclf.export import maps_to_source, overlay_png, write_explanation, write_nifti_map
from medclf.io import read_dicom_series, read_image
from medclf.io.image import ImageData
from medclf.preprocessing import resize_square

REPO = Path(__file__).resolve().parents[1]
NIFTI = REPO / "sample_data" / "nifti"
RSNA = REPO / "sample_data" / "rsna" / "stage_2_train"


def smooth(s: int, h: int, w: int) -> np.ndarray:
    """A smooth (S, H, W) map in [0.1, 0.9] with no symmetry that would hide a flip or shift."""
    r, c = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    return np.stack([0.5 + 0.3 * np.sin(2.1 * r + 1.3 * c + 0.4 * k) + 0.1 * r * c for k in range(s)]).astype(np.float32)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


# ------------------------------------------------------------------------------- maps_to_source
@pytest.mark.parametrize("h,w,size", [(60, 96, 64), (97, 40, 32), (50, 50, 128), (33, 70, 200)])
def test_maps_to_source_inverts_resize_square(h, w, size):
    m = smooth(2, h, w)
    img = ImageData(np.zeros((2, h, w, 1), np.float32), "mono")
    there = resize_square(m[..., None], size)[:, 0]  # (S, size, size)
    back = maps_to_source(there, img)
    assert back.shape == (2, h, w) and back.dtype == np.float32
    # interior (away from the padding seam, which bilinear blends with the zero padding)
    inner = back[:, 3:-3, 3:-3] - m[:, 3:-3, 3:-3]
    assert np.abs(inner).max() < 0.05, np.abs(inner).max()
    assert corr(back[:, 3:-3, 3:-3], m[:, 3:-3, 3:-3]) > 0.99


@pytest.mark.parametrize("h,w", [(60, 96), (97, 40)])
def test_maps_to_source_inverts_stretching(h, w):
    """keep_aspect=False: resize_square stretches instead of padding; the inverse must stretch back."""
    m = smooth(1, h, w)
    img = ImageData(np.zeros((1, h, w, 1), np.float32), "mono")
    back = maps_to_source(resize_square(m[..., None], 48, keep_aspect=False)[:, 0], img, keep_aspect=False)
    assert back.shape == (1, h, w)
    assert np.abs(back[:, 2:-2, 2:-2] - m[:, 2:-2, 2:-2]).max() < 0.05
    # the padded inverse on a stretched map would misplace it
    wrong = maps_to_source(resize_square(m[..., None], 48, keep_aspect=False)[:, 0], img)
    assert np.abs(wrong - m).max() > 0.1


def test_maps_to_source_crops_the_right_side():
    """A map zero everywhere except one half must come back on that half (catches swapped/shifted crops)."""
    h, w = 40, 100
    m = np.zeros((1, h, w), np.float32)
    m[:, :, : w // 2] = 1.0
    back = maps_to_source(resize_square(m[..., None], 50)[:, 0], ImageData(np.zeros((1, h, w, 1), np.float32), "mono"))
    assert back[0, 5:-5, 5 : w // 2 - 5].min() > 0.9 and back[0, 5:-5, w // 2 + 5 : -5].max() < 0.1


def test_maps_to_source_rejects_bad_shapes():
    img = ImageData(np.zeros((2, 10, 12, 1), np.float32), "mono")
    with pytest.raises(MedclfError):
        maps_to_source(np.zeros((3, 8, 8)), img)
    with pytest.raises(MedclfError):
        maps_to_source(np.zeros((2, 8, 9)), img)
    with pytest.raises(MedclfError):
        maps_to_source(np.full((2, 8, 8), np.nan), img)


# ------------------------------------------------------------------------------- NIfTI geometry
def check_nifti_roundtrip(src: Path, out: Path) -> None:
    img = read_image(src)
    ref = nib.load(str(src))
    write_nifti_map(out, img.array[..., 0], img, src)  # a "map" equal to the reader's own data
    got = nib.load(str(out))
    assert got.shape == ref.shape
    assert np.allclose(got.affine, ref.affine, atol=1e-4)
    assert got.get_data_dtype() == np.float32
    a, b = np.asarray(got.dataobj, dtype=np.float64), np.asarray(ref.dataobj, dtype=np.float64)
    assert corr(a, b) > 0.9999  # same voxels: the reader's reorientation was undone, not repeated
    assert np.allclose(a, b)
    # and medclf reads the map back exactly as it read the scan
    assert np.allclose(read_image(out).array, img.array)
    assert no_temp_files(out.parent)


@pytest.mark.parametrize("fname", ["vol_003.nii.gz", "vol_000.nii.gz", "vol_001.nii"])
def test_nifti_map_has_source_geometry(tmp_path, fname):
    img = read_image(NIFTI / fname)
    if fname == "vol_003.nii.gz":
        assert img.meta["source_orientation"] == "LPS"  # the sample really exercises a flip
    check_nifti_roundtrip(NIFTI / fname, tmp_path / "map.nii.gz")


@pytest.mark.parametrize("codes", [("S", "A", "R"), ("A", "I", "L"), ("L", "S", "P")])
def test_nifti_map_undoes_axis_permutations(tmp_path, codes):
    """Permuted and flipped axes (not only flips), a non-cubic shape and anisotropic spacing."""
    from nibabel.orientations import axcodes2ornt

    rng = np.random.default_rng(0)
    shape = (11, 13, 7)
    data = rng.normal(size=shape).astype(np.float32) * 100
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    for i, (ax, flip) in enumerate(axcodes2ornt(codes)):  # voxel axis i runs along world axis `ax`
        aff[int(ax), i] = flip * (0.7, 0.8, 2.5)[i]
    aff[:3, 3] = [-10, 20, 5]
    src = tmp_path / "src.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), src)
    assert nib.aff2axcodes(nib.load(str(src)).affine) == codes
    check_nifti_roundtrip(src, tmp_path / "out" / "map.nii.gz")


def test_nifti_2d_and_4d_sources_keep_their_shape(tmp_path):
    rng = np.random.default_rng(1)
    aff = np.diag([-0.5, 0.6, 1.0, 1.0])
    for shape in [(20, 30), (9, 10, 6, 1)]:
        src = tmp_path / f"src{len(shape)}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), aff), src)
        check_nifti_roundtrip(src, tmp_path / f"map{len(shape)}.nii.gz")


def test_nifti_map_rejects_wrong_grid(tmp_path):
    img = read_image(NIFTI / "vol_000.nii.gz")
    with pytest.raises(MedclfError):
        write_nifti_map(tmp_path / "m.nii.gz", img.array[:-1, ..., 0], img, NIFTI / "vol_000.nii.gz")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- DICOM and 2-D
def rsna_series() -> list[Path]:
    by_series: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(RSNA.glob("*.dcm")):
        by_series[pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID].append(p)
    return max(by_series.values(), key=len)


def test_dicom_series_map_uses_series_affine(tmp_path):
    files = rsna_series()
    img, errors = read_dicom_series(files)
    assert not errors and img.affine is not None and img.n_slices == len(files) > 1
    S, H, W = img.array.shape[:3]
    m = smooth(S, H, W)
    out = tmp_path / "m.nii.gz"
    write_nifti_map(out, m, img, RSNA)  # a series' source is its folder
    got = nib.load(str(out))
    assert got.shape == (H, W, S)
    assert np.allclose(got.affine, img.affine, atol=1e-4)
    assert np.allclose(np.asarray(got.dataobj), m.transpose(1, 2, 0))
    assert no_temp_files(tmp_path)


def test_png_map_is_2d_with_canonical_affine(tmp_path):
    h, w = 30, 50
    src = tmp_path / "x.png"
    Image.fromarray((np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)).save(src)
    img = read_image(src)
    m = smooth(1, h, w)
    out = tmp_path / "m.nii.gz"
    write_nifti_map(out, m, img, src)
    got = nib.load(str(out))
    assert got.shape == (h, w, 1)
    assert nib.aff2axcodes(got.affine) == ("P", "L", "S")
    assert np.allclose(np.abs(got.affine[:3, :3]).sum(0), 1.0)  # unit spacing when unknown
    assert np.allclose(read_image(out).array[..., 0], m)  # medclf reads it back as drawn


def test_single_dicom_uses_its_own_geometry(tmp_path):
    # a single file carries its ImagePositionPatient/Orientation and PixelSpacing, as a one-file series does
    img = read_image(rsna_series()[0])
    assert img.affine is not None and img.meta["spacing"]
    assert np.allclose(img.affine, read_dicom_series(rsna_series()[:1])[0].affine)
    S, H, W = img.array.shape[:3]
    out = tmp_path / "m.nii.gz"
    write_nifti_map(out, smooth(S, H, W), img, rsna_series()[0])
    got = nib.load(str(out))
    assert got.shape == (H, W, 1)
    assert np.allclose(np.linalg.norm(got.affine[:3, :2], axis=0), img.meta["spacing"][:2])
    ipp = np.array(pydicom.dcmread(rsna_series()[0], stop_before_pixels=True).ImagePositionPatient, float)
    assert np.allclose(got.affine @ [0, 0, 0, 1], [*(ipp * [-1, -1, 1]), 1], atol=1e-4)


# ------------------------------------------------------------------------------- PNG overlay
@pytest.mark.parametrize("diverging", [True, False])
def test_overlay_png(tmp_path, diverging):
    scan = smooth(1, 40, 64)[0]
    heat = scan - 0.5 if diverging else scan
    out = tmp_path / "o.png"
    overlay_png(out, scan, heat, "haemorrhage (p = 0.91)", diverging=diverging)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100 and im.width > im.height
    assert no_temp_files(tmp_path)
    with pytest.raises(MedclfError):
        overlay_png(tmp_path / "bad.png", scan, heat[:, :10], "x")
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------- write_explanation
def fake_outputs(S: int, K: int, C: int, size: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    scan = rng.uniform(size=(S, C, size, size)).astype(np.float32)
    logits = rng.normal(size=(S, K))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    maps = {"evidence": rng.normal(size=(S, size, size)).astype(np.float32),
            "error": rng.uniform(size=(S, K, size, size)).astype(np.float32),
            "counterfactual": rng.uniform(size=(S, K, C, size, size)).astype(np.float32)}
    unc = {"entropy": rng.uniform(size=S), "vote_margin": rng.uniform(size=S)}
    return scan, maps, probs, pred, unc


def test_write_explanation_volume(tmp_path):
    src = NIFTI / "vol_003.nii.gz"
    img = read_image(src)
    classes = ["normal", "haemorrhage"]
    scan, maps, probs, pred, unc = fake_outputs(img.n_slices, 2, 3, 32)
    probs[:] = [[0.9, 0.1]] * img.n_slices
    probs[5] = [0.2, 0.8]
    pred = probs.argmax(1)
    summary = write_explanation(tmp_path, "case", src, img, scan, maps, probs, pred, unc, classes)
    d = tmp_path / "case"
    names = {"evidence.nii.gz", "error_normal.nii.gz", "error_haemorrhage.nii.gz", "uncertainty.nii.gz",
             "overlay.png", "counterfactuals.png", "summary.json"}
    assert {p.name for p in d.iterdir()} == names  # nothing else: no temp files left
    on_disk = json.loads((d / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("source", "prediction", "probabilities", "per_slice", "uncertainty", "files", "geometry"):
        assert key in on_disk
    assert on_disk["source"] == str(src)
    assert on_disk["prediction"] == "haemorrhage"  # any slice positive
    assert on_disk["probabilities"]["haemorrhage"] == pytest.approx(0.8)
    assert on_disk["shown_slice"] == 5
    assert len(on_disk["per_slice"]) == img.n_slices and on_disk["per_slice"][5]["prediction"] == "haemorrhage"
    assert on_disk["uncertainty"]["entropy"] == pytest.approx(list(unc["entropy"]))
    ref = nib.load(str(src))
    assert on_disk["geometry"]["shape"] == list(ref.shape)
    assert np.allclose(on_disk["geometry"]["affine"], ref.affine)
    umask = os.umask(0)
    os.umask(umask)
    for f in [*on_disk["files"].values(), "summary.json"]:
        assert (d / f).is_file()
        assert (d / f).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600
    # the constant-per-slice uncertainty map shows which slice is uncertain
    u = read_image(d / "uncertainty.nii.gz").array[..., 0]
    assert np.allclose(u.reshape(img.n_slices, -1).mean(1), unc["entropy"], atol=1e-6)
    ev = nib.load(str(d / "evidence.nii.gz"))
    assert ev.shape == ref.shape and np.allclose(ev.affine, ref.affine)


def test_write_explanation_all_negative_volume_and_uncertainty_map(tmp_path):
    src = NIFTI / "vol_000.nii.gz"
    img = read_image(src)
    S = img.n_slices
    scan, maps, probs, pred, unc = fake_outputs(S, 2, 1, 16)
    del maps["counterfactual"]
    maps["uncertainty_map"] = np.ones((S, 16, 16), np.float32)
    probs[:] = [[0.7, 0.3]] * S
    s = write_explanation(tmp_path, "neg", src, img, scan, maps, probs, np.zeros(S, int), unc, ["normal", "bleed"])
    assert s["prediction"] == "normal" and "counterfactuals" not in s["files"]
    assert np.allclose(nib.load(str(tmp_path / "neg" / "uncertainty.nii.gz")).get_fdata(), 1.0, atol=1e-5)


def test_write_explanation_png_and_bad_input(tmp_path):
    h, w = 45, 70
    src = tmp_path / "lesion.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src)
    img = read_image(src)
    classes = ["nevus", "melanoma", "bcc"]
    scan, maps, probs, pred, unc = fake_outputs(1, 3, 3, 32)
    out = tmp_path / "out"
    s = write_explanation(out, "lesion", src, img, scan, maps, probs, pred, unc, classes)
    assert s["prediction"] == classes[int(pred[0])] and s["geometry"]["shape"] == [h, w, 1]
    assert nib.load(str(out / "lesion" / "error_bcc.nii.gz")).shape == (h, w, 1)
    with Image.open(out / "lesion" / "overlay.png") as im:
        assert im.width > 0 and im.height > 0
    with pytest.raises(MedclfError):
        write_explanation(out, "../escape", src, img, scan, maps, probs, pred, unc, classes)
    with pytest.raises(MedclfError):
        write_explanation(out, "x", src, img, scan, maps, probs[:, :2], pred, unc, classes)
    assert no_temp_files(out)
