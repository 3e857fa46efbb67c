"""Ingest on whole real corpora nobody here wrote (issue #11): every file pydicom-data ships."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def _patient_names(files: list[Path]) -> set[str]:
    import warnings

    import pydicom

    warnings.simplefilter("ignore")  # pytest restores the filters after the test
    names = set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            name = str(ds.get("PatientName") or "").strip()
        except Exception:
            continue
        if len(name) >= 4 and name.lower() not in {"anonymized", "anonymous"}:
            names.add(name)
    return names


def test_whole_pydicom_data_corpus_ingests_without_abort(tmp_path):
    from pydicom.data import get_testdata_files

    raw = tmp_path / "raw"
    raw.mkdir()
    files = []
    for i, f in enumerate(sorted(get_testdata_files())):  # all of it, not a chosen list
        if Path(f).is_file():
            files.append(Path(shutil.copy(f, raw / f"{i:03d}_{Path(f).name}")))
    assert len(files) > 200
    p = run_cli("ingest", raw, "--out", tmp_path / "cache", "--size", "32", "--workers", "2")
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])  # done, some inputs failed
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr, p.stderr[-3000:]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    errors = [json.loads(line) for line in (tmp_path / "cache" / "errors.jsonl").read_text().splitlines()]
    assert manifest["n_items"] > 300 and len(errors) == manifest["n_failed"] > 0
    for e in errors:  # one clear reason per bad file, none of them a bug of ours
        assert Path(e["path"]).parent == raw and e["reason"] and "unexpected" not in e["reason"], e
    sources = {json.loads(line)["source"] for line in (tmp_path / "cache" / "items.jsonl").read_text().splitlines()}
    assert not sources & {Path(e["path"]).name for e in errors}  # a file is cached or failed, never both
    text = "".join(p.read_text(errors="ignore") for p in (tmp_path / "cache").glob("*.json*"))
    leaked = [n for n in _patient_names(files) if n in text]
    assert not leaked, leaked


def test_nibabel_test_files_ingest_with_clear_reasons(tmp_path):
    """Every NIfTI nibabel ships in its tests (NIfTI-1/2, CIFTI-2, resampled with NaN, 4-D)."""
    import nibabel

    data = Path(nibabel.__file__).parent / "tests" / "data"
    raw = tmp_path / "raw"
    raw.mkdir()
    files = [Path(shutil.copy(f, raw / f.name)) for f in sorted(data.iterdir()) if f.is_file()]  # all of it
    assert len([f for f in files if ".nii" in f.name]) >= 8
    p = run_cli("ingest", raw, "--out", tmp_path / "cache", "--size", "32", "--workers", "1")
    assert p.returncode in (0, 3) and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = {Path(json.loads(l)["path"]).name: json.loads(l)["reason"]
              for l in (tmp_path / "cache" / "errors.jsonl").read_text().splitlines()}
    assert not [r for r in errors.values() if "unexpected" in r], errors
    assert "resampled_anat_moved.nii" not in errors  # NaN outside the field of view: background, not refused
    items = [json.loads(l) for l in (tmp_path / "cache" / "items.jsonl").read_text().splitlines()]
    assert any(it["source"] == "resampled_anat_moved.nii" and it.get("nonfinite_voxels") for it in items)
    for name, reason in errors.items():
        if ".dconn." in name or ".dtseries." in name or ".dscalar." in name or ".dlabel." in name:
            assert "grayordinate" in reason, (name, reason)
    # 4-D NIfTI (example4d.nii.gz, example_nifti2.nii.gz, functional.nii): every volume cached, its
    # slices as items with their volume index, the whole file in one split (test_nifti_4d.py)
    four_d = {}
    for f in files:
        if f.name.endswith((".nii", ".nii.gz")):
            try:
                img = nibabel.load(f)
            except Exception:
                continue
            if getattr(img, "affine", None) is not None and len(img.shape) == 4 and img.shape[3] > 1:
                four_d[f.name] = img.shape
    assert len(four_d) >= 3, four_d
    for name, shape in four_d.items():
        assert name not in errors, (name, errors.get(name))
        got = [it for it in items if it["source"] == name]
        k = len(got) // shape[3]  # slices per volume: the volume's extent along its inferior-superior axis
        assert k in shape[:3] and len(got) == k * shape[3], (name, len(got), shape)
        assert sorted((it["volume"], it["slice"]) for it in got) == [(t, s) for t in range(shape[3]) for s in range(k)]
        assert len({it["split"] for it in got}) == 1 and len({it["group"] for it in got}) == 1, name
    assert not [r for r in errors.values() if "unsupported NIfTI shape" in r], errors


def test_fuzzed_real_files_never_break_a_batch(tmp_path):
    """Mutated real files (truncated at random offsets, header bytes flipped, wrong extensions) next to
    the untouched originals: no abort, no traceback, one reason per bad file (none "unexpected"),
    every original cached. Seeded and bounded (~60 cases)."""
    import nibabel
    from pydicom.data import get_testdata_file

    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig

    repo = Path(__file__).resolve().parents[1]
    isic = sorted((repo / "sample_data" / "isic" / "ISIC_2019_Training_Input").glob("*.jpg"))[0]
    originals = [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small_RLE.dcm")),
                 Path(get_testdata_file("JPEG2000.dcm")), Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii",
                 repo / "sample_data" / "nifti" / "vol_000.nii.gz", isic]
    png = tmp_path / "grey.png"
    from PIL import Image

    Image.open(isic).convert("L").save(png)
    originals.append(png)
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    good = []
    for i, src in enumerate(originals):
        data = src.read_bytes()
        ext = "".join(src.suffixes) or ".dcm"
        good.append(shutil.copy(src, raw / f"good_{i}{ext}"))
        for j in range(3):  # truncated at a random offset past the first bytes
            (raw / f"trunc_{i}_{j}{ext}").write_bytes(data[: int(rng.integers(8, max(len(data) - 1, 9)))])
        for j in range(4):  # a few flipped bytes in the first 1 kB (the header)
            b = bytearray(data)
            for k in rng.integers(0, min(len(b), 1024), size=3):
                b[k] ^= 0xFF
            (raw / f"flip_{i}_{j}{ext}").write_bytes(bytes(b))
        wrong = {".dcm": ".png", ".png": ".dcm", ".jpg": ".nii", ".nii": ".jpg", ".nii.gz": ".dcm"}[ext]
        (raw / f"wrongext_{i}{wrong}").write_bytes(data)
    res = ingest(IngestConfig(sources=[raw], out=tmp_path / "cache", preprocess=PreprocessConfig(size=16, channels=None),
                              workers=1))
    reasons = {Path(e["path"]).name: e["reason"] for e in res.errors}
    assert not {n: r for n, r in reasons.items() if "unexpected" in r or not r}, reasons
    assert not {Path(g).name for g in good} & set(reasons), reasons  # every original cached
    sources = {json.loads(line)["source"] for line in (tmp_path / "cache" / "items.jsonl").read_text().splitlines()}
    # non-DICOM originals are items of their own; a DICOM original shares its SeriesInstanceUID with
    # its mutated copies, so it is cached as a slice of that "series" (source: the folder)
    assert {Path(g).name for g in good if not str(g).endswith(".dcm")} <= sources and "." in sources
