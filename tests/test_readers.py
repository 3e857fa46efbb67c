"""Readers: DICOM (pydicom's test files, files written here, series, DICOMDIR, multi-frame), HU and
windows by hand, NIfTI-1/2 reorientation, PNG/JPEG/TIFF."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import BAD_DICOM_REASONS, SAMPLE, write_bad_dicom, write_ct
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from medclf.errors import ReadError
from medclf.io import is_image_file, read_dicom_series, read_image
from medclf.io.dicom import dicomdir_files, order_series, stored_to_hu
from medclf.preprocessing import PreprocessConfig, parse_windows, preprocess


def pydicom_file(name: str) -> Path:
    p = get_testdata_file(name)
    assert p is not None, f"pydicom test file {name} is missing (pydicom-data installed?)"
    return Path(p)


def window01(hu, centre, width):
    """The window mapping written out independently: [c - w/2, c + w/2] -> [0, 1], clipped."""
    return np.clip((np.asarray(hu, dtype=np.float64) - (centre - width / 2)) / width, 0, 1)


# ---------------------------------------------------------------------------- HU, by hand
def test_stored_to_hu_signed_and_unsigned_16_bit():
    s = np.array([[0, 24, 1024, 1064, 1104, 2024]])
    # HU = stored * slope + intercept
    assert stored_to_hu(s, 1.0, -1024.0, 16, 1).tolist() == [[-1024, -1000, 0, 40, 80, 1000]]
    assert stored_to_hu(s, 1.0, -1024.0, 16, 0).tolist() == [[-1024, -1000, 0, 40, 80, 1000]]
    assert stored_to_hu(np.array([[-1000, 0, 40]]), 1.0, 0.0, 16, 1).tolist() == [[-1000, 0, 40]]
    assert stored_to_hu(s, 2.0, -1000.0, 16, 0).tolist() == [[-1000, -952, 1048, 1128, 1208, 3048]]
    assert stored_to_hu(s, 0.5, 10.0, 16, 1).tolist() == [[10, 22, 522, 542, 562, 1022]]
    # 12 bits stored with an intercept <= -100: a plain rescale, no fix
    assert stored_to_hu(np.array([[0, 1024, 4095]]), 1.0, -1024.0, 12, 0).tolist() == [[-1024, 0, 3071]]
    assert stored_to_hu(np.array([[0, 100]]), 1.0, -100.0, 12, 0).tolist() == [[-100, 0]]  # boundary: -100 is not > -100
    assert stored_to_hu(np.array([[-100, 100]]), 1.0, 0.0, 12, 1).tolist() == [[-100, 100]]  # signed: no fix


def test_stored_to_hu_rsna_12_bit_fix():
    # RSNA's mis-stored files hold HU modulo 4096 in 12 unsigned bits with intercept ~0:
    # +1000, subtract 4096 where >= 4096, then intercept -1000.
    hu = np.array([-1000, -999, -24, -1, 0, 40, 80, 1000, 3095])
    stored = hu % 4096  # 3096, 3097, 4072, 4095, 0, 40, 80, 1000, 3095
    assert stored.tolist() == [3096, 3097, 4072, 4095, 0, 40, 80, 1000, 3095]
    for intercept in (0.0, 1.0, -99.0):
        out = stored_to_hu(stored[None], 1.0, intercept, 12, 0)
        assert out.dtype == np.float32
        assert out[0].tolist() == hu.tolist(), intercept  # the file's own intercept is replaced by -1000
    # a slope still applies after the fix
    assert stored_to_hu(np.array([[3096, 1000]]), 2.0, 0.0, 12, 0).tolist() == [[2 * 0 - 1000, 2 * 2000 - 1000]]
    # the input array is not modified in place
    s = stored.copy()
    stored_to_hu(s, 1.0, 0.0, 12, 0)
    assert s.tolist() == stored.tolist()


# (PixelRepresentation signed?, BitsStored, RescaleIntercept, stored values for HU [-1000, -24, 0, 40, 80, 1000, 1500, -500])
HU = [-1000, -24, 0, 40, 80, 1000, 1500, -500]
STORAGE_CASES = [
    (True, 16, -1024.0, [24, 1000, 1024, 1064, 1104, 2024, 2524, 524]),
    (False, 16, -1024.0, [24, 1000, 1024, 1064, 1104, 2024, 2524, 524]),
    (True, 16, -1000.0, [0, 976, 1000, 1040, 1080, 2000, 2500, 500]),
    (True, 16, 0.0, [-1000, -24, 0, 40, 80, 1000, 1500, -500]),
    (True, 12, 0.0, [-1000, -24, 0, 40, 80, 1000, 1500, -500]),  # signed 12-bit: sign bit is bit 11
    (False, 12, -1024.0, [24, 1000, 1024, 1064, 1104, 2024, 2524, 524]),
    (False, 12, 0.0, [3096, 4072, 0, 40, 80, 1000, 1500, 3596]),  # the RSNA quirk, fixed by the reader
    (False, 12, 1.0, [3096, 4072, 0, 40, 80, 1000, 1500, 3596]),  # ... also with the rare intercept 1
]


@pytest.mark.parametrize("signed,bits,intercept,stored", STORAGE_CASES)
def test_hu_end_to_end_on_written_dicom(tmp_path, ct_writer, signed, bits, intercept, stored):
    grid = np.tile(np.array(stored).reshape(1, 8), (8, 1))  # 8x8: column j holds HU[j]
    img = read_image(ct_writer(tmp_path / "ct.dcm", grid, signed=signed, bits=bits, intercept=intercept))
    assert img.kind == "hu" and img.array.shape == (1, 8, 8, 1) and img.array.dtype == np.float32
    assert img.meta["bits_stored"] == bits and img.meta["pixel_representation"] == int(signed)
    assert img.array[0, 0, :, 0].tolist() == HU
    assert np.array_equal(img.array[0, :, :, 0], np.tile(np.array(HU, np.float32), (8, 1)))
    # windows on the same pixels (no resampling at size 8): brain 40/80, subdural 80/200, soft 40/380, bone 600/2800
    x, how = preprocess(img, PreprocessConfig(size=8, windows=["brain", "subdural", "soft", "bone"], channels=4))
    assert how == "windows:brain,subdural,soft,bone" and x.shape == (1, 4, 8, 8)
    for ch, (c, w) in enumerate([(40, 80), (80, 200), (40, 380), (600, 2800)]):
        assert np.allclose(x[0, ch, 0], window01(HU, c, w), atol=1e-6), ch
    # hand-computed brain window: HU 0 -> 0.0, 40 -> 0.5, 80 -> 1.0, air and bone clipped
    assert x[0, 0, 3].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0], abs=1e-6)


def test_unsigned_12_bit_ignores_bits_above_high_bit(tmp_path, ct_writer):
    raw = np.array([[0xF000 | 1064, 1064, 0x1000 | 24, 24]] * 8)  # junk in bits 12..15 (e.g. old overlays)
    img = read_image(ct_writer(tmp_path / "u12.dcm", raw, signed=False, bits=12, intercept=-1024.0))
    assert img.array[0, 0, :, 0].tolist() == [40, 40, -1000, -1000]


def test_slope_and_missing_rescale_elements(tmp_path, ct_writer):
    img = read_image(ct_writer(tmp_path / "s.dcm", np.full((8, 8), 1000), slope=0.5, intercept=-500.0))
    assert np.all(img.array == 0.0) and img.meta["rescale"] == [0.5, -500.0]
    img = read_image(ct_writer(tmp_path / "n.dcm", np.full((8, 8), 40), slope=None, intercept=None))
    assert np.all(img.array == 40.0) and img.meta["rescale"] == [1.0, 0.0]  # defaults: slope 1, intercept 0


def test_window_specs_by_name_and_by_value(tmp_path, ct_writer):
    assert parse_windows("brain, 40/80 ,bone") == ["brain", "40/80", "bone"]
    for bad in ("nope", "40/0", "40", ""):
        with pytest.raises(ValueError):
            parse_windows(bad)
    stored = np.tile(np.array([1024 - 20, 1024, 1024 + 40, 1024 + 60, 1024 + 80, 1024 + 180, 1024 + 1000, 0]), (8, 1))
    img = read_image(ct_writer(tmp_path / "w.dcm", stored))
    a, _ = preprocess(img, PreprocessConfig(size=8, windows=["brain", "subdural"], channels=2))
    b, _ = preprocess(img, PreprocessConfig(size=8, windows=["40/80", "80/200"], channels=2))
    assert np.array_equal(a, b)
    # subdural 80/200: HU -20 -> 0, 80 -> 0.5, 180 -> 1
    assert a[0, 1, 0, [0, 4, 5]].tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)
    assert a[0, 0, 0, [1, 2, 3]].tolist() == pytest.approx([0.0, 0.5, 0.75], abs=1e-6)


def test_ct_matches_pydicoms_modality_lut():
    from pydicom.pixels import apply_modality_lut

    for name in ("CT_small.dcm", "693_UNCR.dcm", "693_J2KR.dcm"):
        ds = pydicom.dcmread(pydicom_file(name))
        img = read_image(pydicom_file(name))
        assert img.kind == "hu", name
        assert np.array_equal(img.array[0, :, :, 0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32)), name


@pytest.mark.parametrize("signed, bits, words", [
    (True, 12, [0x0FFB, 0xFFFB, 0x07FF, 0x0800, 0, 5]),  # 12-bit two's complement, high bits clear or set
    (True, 16, [-1024, 0, 3071, -32768, 32767, 7]),
    (False, 12, [0, 4095, 1024, 2048, 1, 7]),
    (False, 12, [0x1000, 0xF0FF, 5, 0, 1, 2]),  # unused high bits set: pydicom's decoder decides
    (False, 16, [0, 65535, 1024, 1, 2, 3]),
    (True, 10, [0x3FF, 0x200, 0x1FF, 0, 1, 0xFE00]),
])
def test_native_fast_path_equals_pydicom(tmp_path, signed, bits, words, monkeypatch):
    """Uncompressed 16-bit-allocated slices skip pydicom's decoder: the values must be pydicom's own."""
    import medclf.io.dicom as dicom

    stored = np.array(words, dtype=np.int64).reshape(2, 3)
    stored = (stored & 0xFFFF).astype(np.uint16)
    path = write_ct(tmp_path / "s.dcm", stored.view(np.int16) if signed else stored, signed=signed, bits=bits, intercept=0.0)
    ds = pydicom.dcmread(path)
    fast = dicom._native_16bit(ds, ds.file_meta.TransferSyntaxUID)
    ref = ds.pixel_array
    if fast is None:  # fell back: the reader must then give pydicom's values
        assert not signed and int(stored.max()) >= 1 << bits
    else:
        assert fast.dtype == ref.dtype and np.array_equal(fast, ref), (fast, ref)
    monkeypatch.setattr(dicom, "_native_16bit", lambda ds, ts: None)
    slow = read_image(path).array
    monkeypatch.undo()
    assert np.array_equal(read_image(path).array, slow)


# ------------------------------------------------------------------------ pydicom's test files
PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm",
                 "emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm", "SC_rgb.dcm",
                 "SC_rgb_rle.dcm", "SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "US1_UNCR.dcm",
                 "US1_J2KR.dcm", "OBXXXX1A.dcm", "MR2_J2KR.dcm", "MR2_UNCR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
                 "image_dfl.dcm", "eCT_Supplemental.dcm"]


@pytest.mark.parametrize("name", PYDICOM_FILES)
def test_reads_pydicom_test_files(name):
    path = pydicom_file(name)
    ds = pydicom.dcmread(path)
    img = read_image(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    rgb = ds.SamplesPerPixel == 3 or ds.PhotometricInterpretation == "PALETTE COLOR"
    assert img.array.shape == (frames, ds.Rows, ds.Columns, 3 if rgb else 1)
    assert img.array.dtype == np.float32 and np.isfinite(img.array).all()
    assert img.kind == ("rgb" if rgb else "hu" if ds.Modality == "CT" else "mono")
    assert img.meta["transfer_syntax"] == ds.file_meta.TransferSyntaxUID
    if not rgb and ds.PhotometricInterpretation == "MONOCHROME2" and frames == 1:
        from pydicom.pixels import apply_modality_lut  # the decoded values are pydicom's, rescaled

        assert np.allclose(img.array[0, :, :, 0], apply_modality_lut(ds.pixel_array, ds), rtol=1e-6, atol=1e-3)
    x, _ = preprocess(img, PreprocessConfig(size=32, channels=3))
    assert x.shape == (frames, 3, 32, 32) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


@pytest.mark.parametrize("plain,compressed", [
    ("MR_small.dcm", "MR_small_RLE.dcm"), ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"), ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm"), ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
    ("emri_small.dcm", "emri_small_RLE.dcm"), ("SC_rgb.dcm", "SC_rgb_rle.dcm"), ("US1_UNCR.dcm", "US1_J2KR.dcm"),
    ("693_UNCR.dcm", "693_J2KR.dcm"),
])
def test_lossless_copies_give_identical_arrays_and_tensors(plain, compressed):
    a, b = read_image(pydicom_file(plain)), read_image(pydicom_file(compressed))
    assert a.meta["transfer_syntax"] != b.meta["transfer_syntax"]
    assert a.kind == b.kind and a.array.shape == b.array.shape
    assert np.array_equal(a.array, b.array)
    cfg = PreprocessConfig(size=32, channels=3)
    assert np.array_equal(preprocess(a, cfg)[0], preprocess(b, cfg)[0])


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_own_lossless_copy_is_identical(tmp_path, ct_writer, syntax):
    rng = np.random.default_rng(0)
    for signed, bits, stored in ((True, 16, rng.integers(-1024, 3000, (64, 48))), (False, 12, rng.integers(0, 4096, (64, 48)))):
        plain = ct_writer(tmp_path / f"plain{bits}.dcm", stored, signed=signed, bits=bits, intercept=-1024.0)
        ds = pydicom.dcmread(plain)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(tmp_path / f"c{bits}.dcm", enforce_file_format=True)
        a, b = read_image(plain), read_image(tmp_path / f"c{bits}.dcm")
        assert b.meta["transfer_syntax"] == syntax and a.meta["transfer_syntax"] != syntax
        assert np.array_equal(a.array, b.array) and np.array_equal(a.array[0, :, :, 0], stored - 1024.0)


def test_rgb_and_ybr_storage_read_as_the_same_rgb():
    rgb = read_image(pydicom_file("SC_rgb.dcm"))
    ybr = read_image(pydicom_file("SC_ybr_full_uncompressed.dcm"))
    diff = np.abs(rgb.array - ybr.array)
    assert ybr.kind == "rgb" and diff.mean() < 1.0 and diff.max() <= 8  # YCbCr -> RGB rounding only
    pal = read_image(pydicom_file("OBXXXX1A.dcm"))  # PALETTE COLOR through its lookup table
    assert pal.kind == "rgb" and pal.array.shape[-1] == 3 and pal.meta["photometric"] == "PALETTE COLOR"


def test_multiframe_dicom_is_one_slice_per_frame():
    ds = pydicom.dcmread(pydicom_file("emri_small.dcm"))
    img = read_image(pydicom_file("emri_small.dcm"))
    assert ds.NumberOfFrames == 10 and img.n_slices == 10 and img.meta["frames"] == 10
    assert np.array_equal(img.array[..., 0], ds.pixel_array.astype(np.float32))
    assert not np.array_equal(img.array[0], img.array[9])  # frames stay distinct, in stored order
    x, _ = preprocess(img, PreprocessConfig(size=32, channels=1))
    assert x.shape == (10, 1, 32, 32)


def _enhanced(path: Path, modality: str, rescales: list[tuple[float, float]], stored: int, per_frame: bool) -> Path:
    """An enhanced multi-frame file (one frame per rescale) with its rescale in the functional groups."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, modality
    ds.Rows = ds.Columns = 8
    ds.NumberOfFrames = len(rescales)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0

    def pvt(slope, intercept):
        item, group = Dataset(), Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "US" if modality == "MR" else "HU"
        group.PixelValueTransformationSequence = Sequence([item])
        return group

    if per_frame:
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
        ds.PerFrameFunctionalGroupsSequence = Sequence([pvt(*r) for r in rescales])
    else:
        ds.SharedFunctionalGroupsSequence = Sequence([pvt(*rescales[0])])
        ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset() for _ in rescales])
    ds.PixelData = np.full((len(rescales), 8, 8), stored, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multiframe_rescale_per_frame_and_shared(tmp_path):
    mr = read_image(_enhanced(tmp_path / "mr.dcm", "MR", [(1.0, 0.0), (4.0, 0.0), (0.5, 10.0)], 100, per_frame=True))
    assert mr.kind == "mono" and mr.array[:, 0, 0, 0].tolist() == [100.0, 400.0, 60.0]  # each frame its own rescale
    ct = read_image(_enhanced(tmp_path / "ct.dcm", "CT", [(1.0, -1024.0), (2.0, -1000.0)], 1064, per_frame=True))
    assert ct.kind == "hu" and ct.array[:, 0, 0, 0].tolist() == [40.0, 1128.0]
    shared = read_image(_enhanced(tmp_path / "sh.dcm", "CT", [(1.0, -1024.0)] * 3, 1064, per_frame=False))
    assert shared.array[:, 0, 0, 0].tolist() == [40.0, 40.0, 40.0]


def test_monochrome1_is_inverted(tmp_path, ct_writer):
    stored = np.arange(64).reshape(8, 8)
    m1 = read_image(ct_writer(tmp_path / "m1.dcm", stored, intercept=0.0, photometric="MONOCHROME1", modality="MR"))
    m2 = read_image(ct_writer(tmp_path / "m2.dcm", stored, intercept=0.0, photometric="MONOCHROME2", modality="MR"))
    assert m1.kind == m2.kind == "mono" and m1.meta.get("inverted") and not m2.meta.get("inverted")
    assert np.array_equal(m2.array[0, :, :, 0], stored)
    assert np.array_equal(m1.array[0, :, :, 0], 63 - stored)  # low stored values display white: bright = dense
    cfg = PreprocessConfig(size=8, channels=1, percentiles=(0.0, 100.0))
    assert np.allclose(preprocess(m1, cfg)[0], 1.0 - preprocess(m2, cfg)[0], atol=1e-6)


# --------------------------------------------------------------------------- bad DICOM files
@pytest.mark.parametrize("what", list(BAD_DICOM_REASONS))
def test_bad_dicom_gives_a_one_line_reason(tmp_path, what):
    p = write_bad_dicom(tmp_path / f"{what}.dcm", what)
    with pytest.raises(ReadError) as e:
        read_image(p)
    assert e.value.message.startswith(BAD_DICOM_REASONS[what]), e.value.message
    assert e.value.path == str(p) and "\n" not in str(e.value) and len(str(e.value)) < 400
    if what == "corrupt_jpegls":  # a decoder exists: the data is bad, not the transfer syntax
        assert "unsupported transfer syntax" not in e.value.message


def test_other_read_errors(tmp_path):
    with pytest.raises(ReadError, match="file not found"):
        read_image(tmp_path / "nope.dcm")
    with pytest.raises(ReadError, match="is a folder"):
        read_image(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ReadError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")


def test_dicom_recognised_by_magic_without_suffix(tmp_path, ct_writer):
    p = ct_writer(tmp_path / "x.dcm", np.full((8, 8), 1064))
    bare = tmp_path / "IM0001"
    bare.write_bytes(p.read_bytes())
    assert is_image_file(bare) and not is_image_file(tmp_path / "DICOMDIR")
    assert read_image(bare).array[0, 0, 0, 0] == 40.0


# ------------------------------------------------------------------------------------ series
def _series(tmp_path, ct_writer, positions, iop=(1, 0, 0, 0, 1, 0), spacing=(0.5, 0.7), seed=0):
    """One file per position, slice k holding the constant stored value 1024 + 10 k (HU 10 k), written
    under random names with shuffled InstanceNumbers."""
    rng = random.Random(seed)
    uid = generate_uid()
    instances = list(range(1, len(positions) + 1))
    rng.shuffle(instances)
    files = []
    for k, pos in enumerate(positions):
        name = uuid.UUID(int=rng.getrandbits(128)).hex + ".dcm"
        files.append(ct_writer(tmp_path / name, np.full((6, 5), 1024 + 10 * k), ipp=pos, iop=iop, spacing=spacing,
                               instance=instances[k], series_uid=uid))
    rng.shuffle(files)
    return files


def _check_affine(img, files):
    """The affine must map (row, col, slice) to each file's own ImagePositionPatient (LPS -> RAS)."""
    by_value = {}
    for f in files:
        ds = pydicom.dcmread(f)
        by_value[int(ds.pixel_array[0, 0])] = ds
    for k in range(img.n_slices):
        ds = by_value[int(img.array[k, 0, 0, 0]) + 1024]
        row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in ((0, 0), (3, 2), (5, 4)):
            lps = np.array(ds.ImagePositionPatient, float) + r * dr * col + c * dc * row
            ras = lps * [-1, -1, 1]
            assert np.allclose(img.affine @ [r, c, k, 1], [*ras, 1], atol=1e-4), (k, r, c)


def test_series_ordered_by_position_not_by_name_or_instance(tmp_path, ct_writer):
    zs = [-20.0, -15.0, -10.0, -5.0, 0.0, 5.0]
    files = _series(tmp_path, ct_writer, [(-10.0, -12.0, z) for z in zs])
    # neither the file names nor the InstanceNumbers follow the anatomy
    headers = {f: pydicom.dcmread(f) for f in files}
    by_name = [int(headers[f].pixel_array[0, 0]) - 1024 for f in sorted(files, key=lambda f: f.name)]
    by_instance = [int(headers[f].pixel_array[0, 0]) - 1024 for f in sorted(files, key=lambda f: headers[f].InstanceNumber)]
    assert by_name != sorted(by_name) and by_instance != sorted(by_instance)
    img, errs = read_dicom_series(files)
    assert errs == []
    assert img.array.shape == (6, 6, 5, 1) and img.kind == "hu"
    assert img.array[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50]  # z ascending = slice k
    assert img.meta["orientation"] == "PLS" and img.meta["spacing"] == pytest.approx([0.5, 0.7, 5.0])
    _check_affine(img, files)
    # the order does not depend on the order the files are given in
    for seed in range(3):
        shuffled = files[:]
        random.Random(seed).shuffle(shuffled)
        assert read_dicom_series(shuffled)[0].array[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50]


def test_series_with_reversed_normal(tmp_path, ct_writer):
    # row (1,0,0) x column (0,-1,0) = normal (0,0,-1): along the normal means z descending
    files = _series(tmp_path, ct_writer, [(0.0, 0.0, z) for z in (0.0, 5.0, 10.0, 15.0)], iop=(1, 0, 0, 0, -1, 0))
    img, errs = read_dicom_series(files)
    assert errs == [] and img.array[:, 0, 0, 0].tolist() == [30, 20, 10, 0]
    assert img.meta["orientation"] == "ALI"
    _check_affine(img, files)


def test_oblique_series(tmp_path, ct_writer):
    a = np.deg2rad(25)
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(a), np.sin(a)])
    normal = np.cross(row, col)
    origin = np.array([-30.0, 12.0, 40.0])
    # positions along the normal, each also shifted in-plane (which must not affect the order)
    steps = [3.0, -6.0, 0.0, 9.0, -3.0, 6.0]
    positions = [tuple(origin + s * normal + (k % 2) * 2.0 * row - k * col) for k, s in enumerate(steps)]
    files = _series(tmp_path, ct_writer, positions, iop=(*row, *col))
    img, errs = read_dicom_series(files)
    expected = [10 * k for k in sorted(range(6), key=lambda k: steps[k])]
    assert errs == [] and img.array[:, 0, 0, 0].tolist() == expected


def test_series_without_positions_falls_back_to_instance_number(tmp_path, ct_writer):
    uid = generate_uid()
    files = [ct_writer(tmp_path / f"{n}.dcm", np.full((6, 6), 1024 + v), ipp=None, iop=None, instance=inst, series_uid=uid)
             for n, inst, v in (("a", 3, 30), ("b", 1, 10), ("c", 2, 20))]
    img, errs = read_dicom_series(files)
    assert img.array[:, 0, 0, 0].tolist() == [10, 20, 30] and img.affine is None
    assert order_series([{"ipp": None, "instance": 2}, {"ipp": None, "instance": 1}]) == [1, 0]


def test_series_survives_bad_members(tmp_path, ct_writer):
    files = _series(tmp_path, ct_writer, [(0.0, 0.0, z) for z in (0.0, 5.0, 10.0)])
    (tmp_path / "broken.dcm").write_bytes(b"junk")
    odd = ct_writer(tmp_path / "odd.dcm", np.zeros((7, 7)), ipp=(0, 0, 2.5), series_uid=str(pydicom.dcmread(files[0]).SeriesInstanceUID))
    img, errs = read_dicom_series(files + [tmp_path / "broken.dcm", odd])
    assert img.array[:, 0, 0, 0].tolist() == [0, 10, 20]
    reasons = {Path(p).name: r for p, r in errs}
    assert reasons["broken.dcm"].startswith("not a DICOM file")
    assert reasons["odd.dcm"].startswith("slice shape")
    with pytest.raises(ReadError, match="no readable file"):
        read_dicom_series([tmp_path / "broken.dcm"])


def test_dicomdir_file_set(tmp_path, ct_writer):
    from pydicom.fileset import FileSet

    files = _series(tmp_path / "src", ct_writer, [(0.0, 0.0, z) for z in (10.0, 0.0, 5.0, 15.0)])
    fs = FileSet()
    for f in files:
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "fs")
    listed = dicomdir_files(tmp_path / "fs" / "DICOMDIR")
    assert len(listed) == 4 and all(p.exists() and p.is_relative_to(tmp_path / "fs") for p in listed)
    img, errs = read_dicom_series(listed)
    assert errs == [] and img.array[:, 0, 0, 0].tolist() == [10, 20, 0, 30]  # z 0, 5, 10, 15
    (tmp_path / "bad").write_bytes(b"not a dicomdir")
    with pytest.raises(ReadError, match="unreadable DICOMDIR"):
        dicomdir_files(tmp_path / "bad")


# -------------------------------------------------------------------------------------- NIfTI
def _save_nifti(path, data, affine, cls=nib.Nifti1Image):
    img = cls(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def test_nifti_canonical_orientation_by_hand(tmp_path):
    # voxel axes along RAS+: x towards the patient's right, y anterior, z superior
    data = np.zeros((5, 6, 4), np.float32)
    data[4, 5, 0] = 7.0  # most Right, most Anterior, most Inferior voxel
    data[0, 0, 3] = 9.0  # most Left, most Posterior, most Superior
    aff = np.diag([0.9, 0.8, 3.0, 1.0])
    aff[:3, 3] = [-10.0, 20.0, 5.0]
    img = read_image(_save_nifti(tmp_path / "ras.nii.gz", data, aff))
    # canonical: rows anterior->posterior, columns patient right->left, slices inferior->superior
    assert img.array.shape == (4, 6, 5, 1)
    assert img.array[0, 0, 0, 0] == 7.0 and img.array[3, 5, 4, 0] == 9.0
    assert np.array_equal(img.array[..., 0], data[::-1, ::-1, :].transpose(2, 1, 0))
    assert img.meta["orientation"] == "PLS" and img.meta["source_orientation"] == "RAS" and img.meta["format"] == "nifti1"
    assert img.meta["spacing"] == pytest.approx([0.8, 0.9, 3.0]) and img.meta["original_shape"] == [5, 6, 4]
    # the affine maps canonical (row, col, slice) to the same world point as the source voxel
    assert np.allclose(img.affine @ [0, 0, 0, 1], aff @ [4, 5, 0, 1])
    assert np.allclose(img.affine @ [5, 4, 3, 1], aff @ [0, 0, 3, 1])


@pytest.mark.parametrize("layout", ["lps", "permuted", "nifti2"])
def test_nifti_same_anatomy_in_other_storage_orientations(tmp_path, layout):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 4)).astype(np.float32)
    aff = np.diag([0.9, 0.8, 3.0, 1.0])
    aff[:3, 3] = [-10.0, 20.0, 5.0]
    ref = read_image(_save_nifti(tmp_path / "ras.nii.gz", data, aff))
    if layout == "lps":  # x and y flipped, affine adjusted so every voxel keeps its world position
        flip = np.array([[-1, 0, 0, 4], [0, -1, 0, 5], [0, 0, 1, 0], [0, 0, 0, 1]], float)
        other = _save_nifti(tmp_path / "lps.nii", np.ascontiguousarray(data[::-1, ::-1]), aff @ flip)
    elif layout == "permuted":  # stored (z, x, y)
        perm = np.zeros((4, 4))
        perm[:, 3] = aff[:, 3]
        perm[:3, 0], perm[:3, 1], perm[:3, 2] = aff[:3, 2], aff[:3, 0], aff[:3, 1]
        other = _save_nifti(tmp_path / "perm.nii.gz", np.ascontiguousarray(data.transpose(2, 0, 1)), perm)
    else:
        other = _save_nifti(tmp_path / "n2.nii.gz", data, aff, cls=nib.Nifti2Image)
    b = read_image(other)
    assert b.meta["orientation"] == "PLS"
    assert b.meta["format"] == ("nifti2" if layout == "nifti2" else "nifti1")
    assert np.array_equal(ref.array, b.array) and np.allclose(ref.affine, b.affine, atol=1e-5)
    if layout != "nifti2":
        assert b.meta["source_orientation"] != "RAS"


def test_sample_lps_volume_reads_like_its_canonical_copy(tmp_path):
    src = nib.load(SAMPLE / "nifti" / "vol_003.nii.gz")
    assert "".join(nib.aff2axcodes(src.affine)) == "LPS"
    # the same voxels stored RAS: flip x and y back, with the matching affine
    data = np.asarray(src.dataobj)
    flip = np.array([[-1, 0, 0, data.shape[0] - 1], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    ras = _save_nifti(tmp_path / "vol_003_ras.nii.gz", np.ascontiguousarray(data[::-1, ::-1]), src.affine @ flip)
    a, b = read_image(SAMPLE / "nifti" / "vol_003.nii.gz"), read_image(ras)
    assert "".join(nib.aff2axcodes(nib.load(ras).affine)) == "RAS"
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine, atol=1e-4)
    assert a.kind == b.kind == "hu"  # int16 HU volume: air near -1000
    # and like the other sample volumes, the head is upright: slice 0 is the most inferior
    assert a.affine[2, 2] > 0 and a.meta["source_orientation"] == "LPS"
    ref = read_image(SAMPLE / "nifti" / "vol_000.nii.gz")
    assert ref.meta["source_orientation"] == "RAS" and ref.meta["orientation"] == a.meta["orientation"] == "PLS"
    assert ref.array.shape == a.array.shape


def test_nifti_2d_4d_and_bad(tmp_path):
    two_d = read_image(_save_nifti(tmp_path / "2d.nii", np.arange(80, dtype=np.float32).reshape(8, 10), np.eye(4)))
    assert two_d.array.shape == (1, 10, 8, 1)
    four_d = read_image(_save_nifti(tmp_path / "4d.nii", np.ones((8, 8, 3, 1), np.float32), np.eye(4)))
    assert four_d.array.shape == (3, 8, 8, 1)
    _save_nifti(tmp_path / "t.nii", np.ones((8, 8, 3, 2), np.float32), np.eye(4))
    with pytest.raises(ReadError, match="holds 2 volumes: read them one at a time"):  # see test_nifti_4d.py
        read_image(tmp_path / "t.nii")
    _save_nifti(tmp_path / "t5.nii", np.ones((8, 8, 3, 2, 2), np.float32), np.eye(4))
    with pytest.raises(ReadError, match="unsupported NIfTI shape"):
        read_image(tmp_path / "t5.nii")
    d = np.full((4, 4, 4), 5.0, np.float32)
    d[1, 1, 1], d[2, 2, 2], d[0, 0, 0] = np.nan, np.inf, 2.0
    _save_nifti(tmp_path / "nan.nii.gz", d, np.eye(4))
    nan = read_image(tmp_path / "nan.nii.gz")  # NaN outside a resampled field of view: background, counted
    assert np.isfinite(nan.array).all() and nan.array.min() == 2.0 and nan.meta["nonfinite_voxels"] == 2
    _save_nifti(tmp_path / "allnan.nii.gz", np.full((4, 4, 4), np.nan, np.float32), np.eye(4))
    with pytest.raises(ReadError, match="no finite voxel"):
        read_image(tmp_path / "allnan.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ReadError, match="unreadable NIfTI"):
        read_image(tmp_path / "junk.nii.gz")


def test_nifti_intensity_guess():
    hu = read_image(SAMPLE / "nifti" / "vol_001.nii")
    assert hu.kind == "hu" and hu.array.min() <= -1000 + 50


# -------------------------------------------------------------------------------------- rasters
def test_png_8_and_16_bit(tmp_path):
    g8 = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    g16 = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(g8).save(tmp_path / "a.png")
    Image.fromarray(g16).save(tmp_path / "b.png")
    a, b = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert a.kind == b.kind == "mono" and a.array.shape == b.array.shape == (1, 8, 8, 1)
    assert np.array_equal(a.array[0, :, :, 0], g8) and np.array_equal(b.array[0, :, :, 0], g16)  # full 16-bit range kept
    cfg = PreprocessConfig(size=8, channels=1, percentiles=(0.0, 100.0))
    assert np.allclose(preprocess(b, cfg)[0][0, 0], g16 / g16.max(), atol=1e-6)
    rgb = np.random.default_rng(0).integers(0, 256, (10, 13, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([rgb, np.full((10, 13), 255, np.uint8)])).save(tmp_path / "d.png")  # RGBA
    c, d = read_image(tmp_path / "c.png"), read_image(tmp_path / "d.png")
    assert c.kind == d.kind == "rgb" and np.array_equal(c.array[0], rgb) and np.array_equal(d.array[0], rgb)
    x, how = preprocess(c, PreprocessConfig(size=13, channels=3))
    assert how == "rgb/255" and x.shape == (1, 3, 13, 13)
    assert np.allclose(x[0, :, 1:11, :].transpose(1, 2, 0), rgb / 255.0, atol=1e-6)  # padded to 13x13, centred
    assert np.all(x[0, :, 0] == 0) and np.all(x[0, :, 11:] == 0)


@pytest.mark.parametrize("orientation, bright", [(1, "right"), (6, "bottom"), (8, "top"), (3, "left")])
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation, bright):
    """A camera JPEG stored sideways with an EXIF Orientation reads as a viewer shows it."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, 16:] = 255  # right half bright, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "d.jpg", quality=100, exif=exif)
    img = read_image(tmp_path / "d.jpg")
    a = img.array[0, :, :, 0]
    assert a.shape == ((16, 32) if orientation in (1, 3) else (32, 16))
    halves = {"left": a[:, : a.shape[1] // 2], "right": a[:, a.shape[1] // 2 :],
              "top": a[: a.shape[0] // 2], "bottom": a[a.shape[0] // 2 :]}
    assert halves[bright].mean() > 200
    assert img.meta.get("exif_orientation", 1) == orientation


def test_jpeg_and_tiff(tmp_path):
    rng = np.random.default_rng(1)
    grey = np.kron(rng.integers(0, 256, (4, 4)), np.ones((8, 8))).astype(np.uint8)  # blocky: survives JPEG well
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=100)
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "c.jpeg", quality=100)
    Image.fromarray(grey).save(tmp_path / "g.tif")
    Image.fromarray(grey.astype(np.uint16) * 250).save(tmp_path / "g16.tiff")
    Image.fromarray(grey.astype(np.float32) / 7).save(tmp_path / "f.tif")
    g, c = read_image(tmp_path / "g.jpg"), read_image(tmp_path / "c.jpeg")
    assert g.kind == "mono" and g.array.shape == (1, 32, 32, 1) and np.abs(g.array[0, :, :, 0] - grey).max() <= 8
    assert c.kind == "rgb" and c.array.shape == (1, 32, 32, 3) and np.abs(c.array[0, :, :, 1] - grey).max() <= 8
    t, t16, f = read_image(tmp_path / "g.tif"), read_image(tmp_path / "g16.tiff"), read_image(tmp_path / "f.tif")
    assert np.array_equal(t.array[0, :, :, 0], grey) and t.kind == "mono"
    assert np.array_equal(t16.array[0, :, :, 0], grey.astype(np.float32) * 250)
    assert np.allclose(f.array[0, :, :, 0], grey.astype(np.float32) / 7)
    (tmp_path / "e.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "e.jpg").write_bytes(Image.new("L", (8, 8)).tobytes())
    for bad in ("e.png", "e.jpg"):
        with pytest.raises(ReadError, match="not a readable image"):
            read_image(tmp_path / bad)


def test_too_small_and_nonfinite_images_are_refused(tmp_path, ct_writer):
    Image.fromarray(np.zeros((4, 30), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(ReadError, match="image too small"):
        preprocess(read_image(tmp_path / "thin.png"), PreprocessConfig(size=16))
    Image.fromarray(np.array([[np.nan] * 8] * 8, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ReadError, match="NaN"):
        preprocess(read_image(tmp_path / "nan.tif"), PreprocessConfig(size=16))


@pytest.mark.parametrize("f, size", [(2, 32), (3, 16), (4, 8)])
def test_integer_factor_resize_equals_pillow(f, size):
    """The box-mean fast path (ingest's 512 -> 256) gives Pillow's own result with reducing_gap=1.0."""
    from PIL import Image

    from medclf.preprocessing import _resize_planes

    x = np.random.default_rng(f).random((2, 3, size * f, size * f)).astype(np.float32)
    fast = _resize_planes(x, size, True, 0.0, reducing_gap=1.0)
    ref = np.stack([[np.asarray(Image.fromarray(p, mode="F").resize((size, size), Image.BILINEAR, reducing_gap=1.0))
                     for p in planes] for planes in x])
    assert fast.shape == ref.shape == (2, 3, size, size)
    np.testing.assert_allclose(fast, ref, atol=1e-6)
    # without a reducing gap Pillow resamples with a wider filter: the fast path must not be taken
    plain = _resize_planes(x, size, True, 0.0, reducing_gap=None)
    assert np.abs(plain - ref).max() > 1e-3
