"""Readers: DICOM (pydicom's test files, written files, series, DICOMDIR, multi-frame), NIfTI, rasters."""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from medclf.errors import ReadError
from medclf.io import read_dicom_series, read_image
from medclf.io.dicom import dicomdir_files, stored_to_hu
from medclf.preprocessing import PreprocessConfig, preprocess

REPO = Path(__file__).resolve().parents[1]


def write_ct(path: Path, stored: np.ndarray, *, signed: bool = True, bits: int = 16, intercept: float = -1024.0,
             slope: float = 1.0, z: float = 0.0, iop=(1, 0, 0, 0, 1, 0), instance: int = 1, series: str | None = None,
             photometric: str = "MONOCHROME2", modality: str = "CT", name: str = "PHANTOM^TEST") -> Path:
    """A minimal valid CT slice with the given stored values and storage parameters."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate = modality, name, "PID123", "19500101"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series or generate_uid()
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 5.0
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------- HU
def test_stored_to_hu_by_hand():
    s = np.array([[0, 1024, 1064]])
    assert stored_to_hu(s, 1.0, -1024.0, 16, 1).tolist() == [[-1024.0, 0.0, 40.0]]
    assert stored_to_hu(s, 2.0, -1000.0, 16, 0).tolist() == [[-1000.0, 1048.0, 1128.0]]
    # RSNA fix: 12-bit unsigned with intercept > -100: +1000, wrap >= 4096, intercept -1000
    s12 = np.array([[3096, 100, 3200]])  # stored values as those files hold them
    hu = stored_to_hu(s12, 1.0, 0.0, 12, 0)
    assert hu.tolist() == [[(3096 + 1000 - 4096) - 1000.0, 100 + 1000 - 1000.0, (3200 + 1000 - 4096) - 1000.0]]


@pytest.mark.parametrize("signed,bits,intercept", [(True, 16, -1024.0), (False, 16, -1024.0), (False, 12, -1024.0), (True, 16, -1000.0)])
def test_hu_end_to_end_and_window_values(tmp_path, signed, bits, intercept):
    hu = np.array([[-1000, 0, 40], [80, 0, 1000]] * 4, dtype=np.float32)
    hu = np.tile(hu, (1, 4))[:8, :8]
    stored = hu - intercept
    img = read_image(write_ct(tmp_path / "x.dcm", stored, signed=signed, bits=bits, intercept=intercept))
    assert img.kind == "hu"
    assert np.array_equal(img.array[0, :, :, 0], hu)
    x, how = preprocess(img, PreprocessConfig(size=8, windows=["brain"], channels=1))
    assert how == "windows:brain"
    # brain 40/80: HU 0 -> 0.0, 40 -> 0.5, 80 -> 1.0, bone/air clipped
    assert x[0, 0, 0, 1] == pytest.approx(0.0) and x[0, 0, 0, 2] == pytest.approx(0.5)
    assert x[0, 0, 1, 0] == pytest.approx(1.0) and x[0, 0, 0, 0] == 0.0 and x[0, 0, 1, 2] == 1.0


def test_monochrome1_is_inverted(tmp_path):
    stored = np.arange(64, dtype=np.float32).reshape(8, 8)
    img = read_image(write_ct(tmp_path / "m1.dcm", stored, intercept=0.0, photometric="MONOCHROME1", modality="CR"))
    assert img.kind == "mono" and img.meta.get("inverted")
    assert img.array[0, 0, 0, 0] == 63 and img.array[0, -1, -1, 0] == 0


# ------------------------------------------------------------------------ pydicom's test files
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "emri_small.dcm", "SC_rgb.dcm",
                                  "US1_UNCR.dcm", "OBXXXX1A.dcm", "MR2_J2KR.dcm", "mlut_18.dcm", "liver.dcm"])
def test_reads_pydicom_test_files(name):
    img = read_image(Path(get_testdata_file(name)))
    assert img.array.ndim == 4 and img.array.dtype == np.float32 and np.isfinite(img.array).all()
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    assert img.n_slices == int(ds.get("NumberOfFrames") or 1)
    assert img.array.shape[1:3] == (ds.Rows, ds.Columns)
    x, _ = preprocess(img, PreprocessConfig(size=32, channels=3))
    assert x.shape == (img.n_slices, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("a,b", [("MR_small.dcm", "MR_small_RLE.dcm"), ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
                                 ("MR2_UNCR.dcm", "MR2_J2KR.dcm"), ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm")])
def test_lossless_compressed_equals_uncompressed(a, b):
    ia, ib = read_image(Path(get_testdata_file(a))), read_image(Path(get_testdata_file(b)))
    assert ia.meta["transfer_syntax"] != ib.meta["transfer_syntax"]
    assert np.array_equal(ia.array, ib.array)
    cfg = PreprocessConfig(size=32, channels=1)
    assert np.array_equal(preprocess(ia, cfg)[0], preprocess(ib, cfg)[0])


def test_own_rle_copy_gives_identical_tensor(tmp_path):
    stored = np.random.default_rng(0).integers(0, 2000, (16, 16)).astype(np.float32)
    plain = write_ct(tmp_path / "plain.dcm", stored)
    ds = pydicom.dcmread(plain)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    a, b = read_image(plain), read_image(tmp_path / "rle.dcm")
    assert b.meta["transfer_syntax"] == RLELossless and np.array_equal(a.array, b.array)


@pytest.mark.parametrize("content,reason", [(b"hello, not an image", "not a DICOM file"), (None, "truncated pixel data"),
                                            ("nopixels", "no pixel data"), ("badts", "unsupported transfer syntax")])
def test_bad_dicom_gives_one_line_reason(tmp_path, content, reason):
    p = tmp_path / "bad.dcm"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        write_ct(p, np.zeros((32, 32)))
        if content is None:
            p.write_bytes(p.read_bytes()[:-600])
        else:
            ds = pydicom.dcmread(p)
            if content == "nopixels":
                del ds.PixelData
            else:
                ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
                ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
            ds.save_as(p, enforce_file_format=True)
    with pytest.raises(ReadError) as e:
        read_image(p)
    assert reason in e.value.message and "\n" not in str(e.value) and str(p) in str(e.value)


# -------------------------------------------------------------------------------------- series
def test_series_ordered_by_position_not_name(tmp_path):
    uid = generate_uid()
    zs = [-20.0, -15.0, -10.0, -5.0, 0.0, 5.0]
    order = list(range(6))
    random.Random(1).shuffle(order)
    files = []
    for i, k in enumerate(order):
        name = f"{random.Random(k).randrange(10**8):08d}.dcm"  # random names
        files.append(write_ct(tmp_path / name, np.full((8, 8), 1024 + 10 * k), z=zs[k], instance=6 - i, series=uid))
    img, errs = read_dicom_series(sorted(files))
    assert not errs
    assert [int(v) for v in img.array[:, 0, 0, 0]] == [0, 10, 20, 30, 40, 50]
    assert img.affine[2, 2] == pytest.approx(5.0) and img.meta["orientation"] == "PLS"


def test_series_reversed_normal_and_bad_member(tmp_path):
    uid = generate_uid()
    iop = (1, 0, 0, 0, -1, 0)  # normal points to -z: increasing position along the normal = decreasing z
    files = [write_ct(tmp_path / f"s{k}.dcm", np.full((8, 8), 1024 + k), z=z, iop=iop, series=uid)
             for k, z in enumerate([0.0, 5.0, 10.0])]
    (tmp_path / "broken.dcm").write_bytes(b"junk")
    img, errs = read_dicom_series(files + [tmp_path / "broken.dcm"])
    assert [int(v) for v in img.array[:, 0, 0, 0]] == [2, 1, 0]
    assert len(errs) == 1 and errs[0][0].endswith("broken.dcm")


def test_dicomdir_lists_its_files(tmp_path):
    from pydicom.fileset import FileSet

    uid = generate_uid()
    fs = FileSet()
    for k in range(3):
        ds = pydicom.dcmread(write_ct(tmp_path / f"in{k}.dcm", np.full((8, 8), 1024 + k), z=5.0 * k, series=uid))
        ds.PatientID = "PID123"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = "20200101", "000000", "1", 1
        fs.add(ds)
    fs.write(tmp_path / "fs")
    files = dicomdir_files(tmp_path / "fs" / "DICOMDIR")
    assert len(files) == 3 and all(f.exists() for f in files)
    img, _ = read_dicom_series(files)
    assert [int(v) for v in img.array[:, 0, 0, 0]] == [0, 1, 2]


# --------------------------------------------------------------------------------------- NIfTI
def test_nifti_reoriented_to_canonical(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7, 5)).astype(np.float32)
    ras = np.diag([0.9, 0.8, 5.0, 1.0])
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "ras.nii.gz")
    # the same voxels stored with x and y flipped (LPS order), affine adjusted to the same world
    lps_aff = ras.copy()
    lps_aff[0, 0], lps_aff[1, 1] = -0.9, -0.8
    lps_aff[0, 3], lps_aff[1, 3] = 0.9 * 5, 0.8 * 6
    nib.save(nib.Nifti2Image(data[::-1, ::-1].copy(), lps_aff), tmp_path / "lps.nii")
    a, b = read_image(tmp_path / "ras.nii.gz"), read_image(tmp_path / "lps.nii")
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)
    assert a.meta["orientation"] == "PLS" and b.meta["format"] == "nifti2"
    assert a.array.shape == (5, 7, 6, 1)  # (slices, rows=P, cols=L)


def test_sample_nifti_volumes_agree_across_storage_orientations():
    imgs = [read_image(REPO / "sample_data" / "nifti" / n) for n in ("vol_000.nii.gz", "vol_003.nii.gz")]
    assert all(i.meta["orientation"] == "PLS" for i in imgs)
    assert imgs[1].meta["source_orientation"] != imgs[0].meta["source_orientation"]
    assert imgs[0].kind == "hu"


def test_nifti_with_nan_is_refused(tmp_path):
    d = np.zeros((4, 4, 4), np.float32)
    d[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(d, np.eye(4)), tmp_path / "n.nii.gz")
    with pytest.raises(ReadError, match="NaN"):
        read_image(tmp_path / "n.nii.gz")


# --------------------------------------------------------------------------------------- rasters
def test_png_8_and_16_bit_jpeg_tiff(tmp_path):
    g8 = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "a.png")
    Image.fromarray((g8.astype(np.uint16) * 200)).save(tmp_path / "b.png")
    Image.fromarray(np.stack([g8] * 3, -1)).save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(g8).save(tmp_path / "d.tif")
    a, b, c, d = (read_image(tmp_path / n) for n in ("a.png", "b.png", "c.jpg", "d.tif"))
    assert a.kind == "mono" and np.array_equal(a.array[0, :, :, 0], g8)
    assert b.kind == "mono" and b.array.max() == 63 * 4 * 200
    assert c.kind == "rgb" and c.array.shape == (1, 8, 8, 3)
    assert np.array_equal(d.array, a.array)
    with pytest.raises(ReadError, match="not a readable image"):
        (tmp_path / "e.png").write_bytes(b"\x89PNG broken")
        read_image(tmp_path / "e.png")
