"""Shared fixtures.

Foundation (readers, adapters, ingest, cache): writers for DICOM slices and for look-alike trees of
the public datasets laid out exactly as ``shared/DATASETS.md`` describes them, and one ingest of
``sample_data/rsna`` through the CLI, shared by the session. Model fixtures come from
``_model_fixtures``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from _model_fixtures import ct32_cache, rsna_cache, tiny_cache, tiny_run, trained_run  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


# ------------------------------------------------------------------------------------------ DICOM
def write_ct(path: Path, stored: np.ndarray, *, signed: bool = True, bits: int = 16, intercept: float | None = -1024.0,
             slope: float | None = 1.0, modality: str = "CT", photometric: str = "MONOCHROME2",
             ipp: tuple | None = (0.0, 0.0, 0.0), iop: tuple | None = (1, 0, 0, 0, 1, 0), spacing=(0.5, 0.5),
             instance: int | None = 1, series_uid: str | None = None, study_uid: str = "1.2.826.0.1.3680043.8.498.1",
             patient: int = 7, pixel_data: bool = True) -> Path:
    """A valid single-frame greyscale DICOM slice storing ``stored`` exactly as given.

    ``signed``/``bits`` set PixelRepresentation and BitsStored (BitsAllocated is always 16);
    ``intercept``/``slope`` of None leave the element out. Patient fields use the sample data's
    phantom style (``PHANTOM^NAMEnn``, ``PHIDnnnn``, birth date ``1950MMDD``) so privacy tests can
    look for them.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    stored = np.asarray(stored)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"PHANTOM^NAME{patient:02d}", f"PHID{patient:04d}", "19500307"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = "20200101", "120000", "1", 1
    if instance is not None:
        ds.InstanceNumber = instance
    if ipp is not None:
        ds.ImagePositionPatient = [float(v) for v in ipp]
    if iop is not None:
        ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 5.0
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if slope is not None:
        ds.RescaleSlope = slope
    if pixel_data:
        ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def ct_writer() -> Callable[..., Path]:
    """``write_ct(path, stored, signed=, bits=, intercept=, slope=, ...)``: see ``write_ct``."""
    return write_ct


def stored_uids(folder: Path) -> set[str]:
    """Every identifying value in the headers of the DICOM files under ``folder``."""
    import pydicom

    out: set[str] = set()
    for f in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "PatientName", "PatientBirthDate"):
            if kw in ds and str(ds.get(kw)):
                out.add(str(ds.get(kw)))
        if hasattr(ds, "file_meta") and "MediaStorageSOPInstanceUID" in ds.file_meta:
            out.add(str(ds.file_meta.MediaStorageSOPInstanceUID))
    return out


def write_bad_dicom(p: Path, what: str) -> Path:
    """A broken ``.dcm`` of kind ``what`` (a key of ``BAD_DICOM_REASONS``), each in its own series."""
    import pydicom
    from pydicom.uid import RLELossless

    p.parent.mkdir(parents=True, exist_ok=True)
    if what == "text":
        p.write_text("this is a text file with a .dcm name\n")
        return p
    if what == "empty":
        p.write_bytes(b"")
        return p
    write_ct(p, np.random.default_rng(1).integers(0, 2000, (32, 32)), signed=False)
    ds = pydicom.dcmread(p)
    if what == "truncated":
        p.write_bytes(p.read_bytes()[:-700])  # a download cut short inside PixelData
    elif what == "truncated_header":
        p.write_bytes(p.read_bytes()[:250])  # cut inside the file meta information
    elif what == "truncated_rle":
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(p, enforce_file_format=True)
        p.write_bytes(p.read_bytes()[:-300])
    elif what == "nopixels":
        del ds.PixelData
        ds.save_as(p, enforce_file_format=True)
    elif what == "mpeg2":  # a video transfer syntax: no decoder installed
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds.save_as(p, enforce_file_format=True)
    elif what == "private_ts":  # a made-up private transfer syntax over uncompressed-looking data
        ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
        ds.save_as(p, enforce_file_format=True)
    elif what == "corrupt_jpegls":  # a decodable syntax (JPEG-LS via libjpeg) whose stream is garbage
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8" + bytes(range(256)) * 2])
        ds.save_as(p, enforce_file_format=True)
    return p


BAD_DICOM_REASONS = {
    "text": "not a DICOM file (no DICM preamble)",
    "empty": "not a DICOM file (no DICM preamble)",
    "truncated": "truncated pixel data",
    "truncated_rle": "truncated pixel data",
    "truncated_header": "truncated file",
    "nopixels": "no pixel data",
    "mpeg2": "unsupported transfer syntax 1.2.840.10008.1.2.4.100 (no decoder installed)",
    "private_ts": "unsupported transfer syntax 1.2.826.0.1.3680043.9.9999.1 (no decoder installed)",
    "corrupt_jpegls": "pixel data cannot be decoded",
}


# ------------------------------------------------------------------------------ dataset trees
CHEXPERT_OBS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]  # spelled out here (not imported) so a typo in the adapter's list fails the tests
CHEXPERT_RAW = ("1.0", "0.0", "-1.0", "")


def _grey_jpeg(path: Path, seed: int, shape=(24, 20)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def make_chexpert(root: Path, n_train: int = 10, n_valid: int = 4, missing: str | None = None) -> dict:
    """``root/CheXpert-v1.0-small/{train.csv, valid.csv, train/..., valid/...}`` as shipped.

    Train: patients 1..n_train, study1 (frontal + lateral) and study2 (frontal); observation values
    cycle through 1.0 / 0.0 / -1.0 / blank by (row + column). Valid: patients 64541.., one frontal
    view each, 0/1 only. ``missing``: a train ``Path`` listed in the CSV but not written.
    Returns {"root", "base", "train": [(Path, raw values)], "valid": [...]}.
    """
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBS]
    assert len(header) == 19
    train, valid = [], []
    r = 0
    for p in range(1, n_train + 1):
        for study, view, fl, ap in ((1, "view1_frontal", "Frontal", "AP"), (1, "view2_lateral", "Lateral", ""),
                                    (2, "view1_frontal", "Frontal", "PA")):
            rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study{study}/{view}.jpg"
            vals = [CHEXPERT_RAW[(r + c) % 4] for c in range(len(CHEXPERT_OBS))]
            train.append((rel, ["Female" if p % 2 else "Male", str(40 + p), fl, ap, *vals]))
            if rel != missing:
                _grey_jpeg(root / rel, r)
            r += 1
    for k in range(n_valid):
        rel = f"CheXpert-v1.0-small/valid/patient{64541 + k:05d}/study1/view1_frontal.jpg"
        vals = ["1.0" if (k + c) % 3 == 0 else "0.0" for c in range(len(CHEXPERT_OBS))]
        valid.append((rel, ["Male", "70", "Frontal", "AP", *vals]))
        _grey_jpeg(root / rel, 1000 + k)
    for name, rows in (("train.csv", train), ("valid.csv", valid)):
        with open(base / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([rel, *rest] for rel, rest in rows)
    return {"root": root, "base": base, "train": [(rel, rest[4:]) for rel, rest in train],
            "valid": [(rel, rest[4:]) for rel, rest in valid]}


HAM_DX = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def make_ham(root: Path, n: int = 21) -> dict:
    """HAM10000: ``HAM10000_metadata.csv`` (lesion_id, image_id, dx, dx_type, age, sex, localization)
    with two duplicated rows; images split over ``HAM10000_images_part_1/`` and the lowercase
    ``ham10000_images_part_2/``, plus lowercase copies of three part-1 images in
    ``ham10000_images_part_1/`` (as the common zip carries them). Two or three images per lesion.
    Returns {"root", "rows": [[lesion, image, dx, ...]]}."""
    from PIL import Image

    rng = np.random.default_rng(5)
    rows = []
    for i in range(n):
        image = f"ISIC_{24306 + i:07d}"
        lesion = f"HAM_{(i // 3) * 7 + 11:07d}" if i % 4 else f"HAM_{i + 500:07d}"
        dx = HAM_DX[(i // 3) % 7] if i % 4 else HAM_DX[i % 7]
        rows.append([lesion, image, dx, "histo", str(30 + i), "male" if i % 2 else "female", "back"])
        folder = root / ("HAM10000_images_part_1" if i % 2 == 0 else "ham10000_images_part_2")
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{image}.jpg", quality=95)
        if i in (0, 2, 4):
            (root / "ham10000_images_part_1").mkdir(exist_ok=True)
            Image.fromarray(arr).save(root / "ham10000_images_part_1" / f"{image}.jpg", quality=95)
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        w.writerows(rows[:5] + [rows[1]] + rows[5:] + [rows[min(7, n - 1)]])
    return {"root": root, "rows": rows}


def make_medmnist(path: Path, kind: str = "grey", counts=(("train", 10), ("val", 4), ("test", 6)), seed: int = 3) -> dict:
    """A MedMNIST ``.npz``: ``{split}_images`` (N, 28, 28) uint8 (``grey``), (N, 28, 28, 3) (``rgb``) or
    grey with (N, 5) 0/1 multi-labels (``multilabel``); multi-class labels (N, 1) in 0..3, all present.
    Returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in counts:
        shape = (n, 28, 28, 3) if kind == "rgb" else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape).astype(np.uint8)
        if kind == "multilabel":
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 5)).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(n) % 4).reshape(n, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@pytest.fixture
def trees():
    """The tree writers, for tests: ``trees.chexpert(root)``, ``trees.ham(root)``, ``trees.medmnist(path, kind)``."""

    class _Trees:
        chexpert = staticmethod(make_chexpert)
        ham = staticmethod(make_ham)
        medmnist = staticmethod(make_medmnist)
        grey_jpeg = staticmethod(_grey_jpeg)

    return _Trees


# ------------------------------------------------------------------------ the sample RSNA cache
@dataclass
class CliIngest:
    cache: Path
    argv: list[str]
    json_run: subprocess.CompletedProcess  # the first, real ingest (--json)
    table_run: subprocess.CompletedProcess  # the same command again without --json: an up-to-date no-op

    @property
    def summary(self) -> dict:
        return json.loads(self.json_run.stdout)


def run_cli(*args: str, check_rc: int | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "medclf", *map(str, args)], capture_output=True, text=True, cwd=REPO, **kw)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p


RSNA_ARGS = ("--size", "32", "--workers", "2")  #: the shared sample cache's arguments (default windows, seed 0)


@pytest.fixture(scope="session")
def rsna32(tmp_path_factory) -> CliIngest:
    """``medclf ingest sample_data/rsna --size 32 --workers 2`` run once through the CLI (a process
    pool, as users run it), then once more (a no-op). Do not modify it: tests that must change a
    cache copy it."""
    cache = tmp_path_factory.mktemp("rsna32") / "cache"
    argv = ["ingest", str(SAMPLE / "rsna"), "--out", str(cache), *RSNA_ARGS]
    first = run_cli(*argv, "--json", check_rc=3)  # the sample's truncated file: partial success
    again = run_cli(*argv, check_rc=3)
    return CliIngest(cache=cache, argv=argv, json_run=first, table_run=again)


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst
