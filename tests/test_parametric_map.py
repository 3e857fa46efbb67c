"""``medclf explain --dicom DIR``: the maps as DICOM Parametric Maps, checked against their sources and the NIfTI.

One explain run (tiny model, CPU) over a generated oblique series with a frame of reference, one
series of the sample data (no FrameOfReferenceUID, as RSNA ships), pydicom's real CT file, the
pydicom-data package's enhanced multi-frame CT and a PNG (refused for DICOM, its NIfTI/PNG written).
Every object is read back with pydicom and highdicom, compared with its source's UIDs and geometry
and with the NIfTI values, and validated with dciodvfy.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from _dicom_validate import assert_valid
from conftest import SAMPLE, run_cli, stored_uids, write_ct

PM = "1.2.840.10008.5.1.4.1.1.30"
ROW, COL = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.8, -0.6])  # an oblique plane
NORMAL = np.cross(ROW, COL)


def _generated_series(folder: Path, n: int = 4) -> list[Path]:
    """``n`` oblique slices (rows 20, cols 24, spacing 0.7 x 0.9 mm) 2.5 mm apart along the normal,
    with a FrameOfReferenceUID; file names run against the anatomical order."""
    rng = np.random.default_rng(3)
    uid, for_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = []
    for k in range(n):
        ipp = np.array([-12.5, 30.0, 41.0]) + 2.5 * k * NORMAL
        f = write_ct(folder / f"img{n - k:02d}.dcm", rng.integers(900, 1200, (20, 24)), ipp=tuple(ipp),
                     iop=(*ROW, *COL), spacing=(0.7, 0.9), instance=k + 1, series_uid=uid)
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = for_uid
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    return files


def _sample_series(folder: Path) -> list[Path]:
    """One whole series of sample_data/rsna (RSNA-style headers: no FrameOfReferenceUID), copied."""
    by_series, bad = defaultdict(list), set()
    for f in sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm")):
        try:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
        except Exception:
            continue
        by_series[uid].append(f)
        try:
            pydicom.dcmread(f).pixel_array  # noqa: B018
        except Exception:  # the sample has a truncated file on purpose: skip its series
            bad.add(uid)
    uid = next(u for u in sorted(by_series) if u not in bad and len(by_series[u]) >= 3)
    folder.mkdir(parents=True)
    return [Path(shutil.copy(f, folder / f.name)) for f in by_series[uid]]


def _frame_geometry(ds, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of a source frame (0-based), from the
    top-level elements or the enhanced functional groups."""
    def fg(name: str):
        per = ds.get("PerFrameFunctionalGroupsSequence")
        if per and name in per[frame]:
            return per[frame][name][0]
        return ds.SharedFunctionalGroupsSequence[0][name][0]

    ipp = ds.get("ImagePositionPatient") or fg("PlanePositionSequence").ImagePositionPatient
    iop = ds.get("ImageOrientationPatient") or fg("PlaneOrientationSequence").ImageOrientationPatient
    sp = ds.get("PixelSpacing") or fg("PixelMeasuresSequence").PixelSpacing
    return np.array(ipp, float), np.array(iop, float), np.array(sp, float)


@pytest.fixture(scope="module")
def explained(tiny_run, tmp_path_factory):
    """The inputs, explain's --out and --dicom folders and its process."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    tmp = tmp_path_factory.mktemp("pm")
    inputs = {
        "oblique": _generated_series(tmp / "in" / "oblique"),
        "rsna_series": _sample_series(tmp / "in" / "rsna_series"),
        "CT_small": [Path(shutil.copy(get_testdata_file("CT_small.dcm"), tmp / "in" / "CT_small.dcm"))],
        # pydicom-data's Enhanced CT: one multi-frame file, a position per frame
        "eCT_Supplemental": [Path(shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), tmp / "in" / "eCT_Supplemental.dcm"))],
    }
    png = tmp / "in" / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20)).astype(np.uint8)).save(png)
    args = [tmp / "in" / "oblique", tmp / "in" / "rsna_series", inputs["CT_small"][0], png, inputs["eCT_Supplemental"][0]]
    p = run_cli("explain", *args, "--model", tiny_run, "--out", tmp / "out", "--dicom", tmp / "dcm",
                "--budget", "2", "--device", "cpu")
    return {"inputs": inputs, "png": png, "out": tmp / "out", "dcm": tmp / "dcm", "proc": p, "tmp": tmp}


def _objects(explained, name: str) -> dict[str, Path]:
    """The map kind -> Parametric Map file of one input, checked to be exactly the NIfTI maps' kinds."""
    summary = json.loads((explained["out"] / name / "summary.json").read_text())
    kinds = [k for k, fn in summary["files"].items() if fn.endswith(".nii.gz")]
    assert {"evidence", "uncertainty"} <= set(kinds) and any(k.startswith("error_") for k in kinds)
    got = {f.name for f in explained["dcm"].glob(f"{name}_*.dcm")}
    want = {f"{name}_{k}.dcm" for k in kinds}  # named by the sub-folder + map kind, never by a UID
    assert got == want, (got, want)
    return {k: explained["dcm"] / f"{name}_{k}.dcm" for k in kinds}


def test_png_input_is_refused_in_one_line_and_the_rest_goes_on(explained):
    p = explained["proc"]
    assert p.returncode == 3, p.stderr[-3000:]
    png = str(explained["png"])
    lines = [ln for ln in p.stderr.splitlines() if png in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not DICOM" in lines[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    # its NIfTI / PNG outputs are written as without --dicom, and no DICOM object for it
    assert {"evidence.nii.gz", "overlay.png", "summary.json"} <= {f.name for f in (explained["out"] / "picture").iterdir()}
    assert not list(explained["dcm"].glob("picture*"))
    # every DICOM input was explained and written: 4 kinds x 4 inputs
    assert len(list(explained["dcm"].glob("*.dcm"))) == 4 * len(explained["inputs"])
    # the sample series has no FrameOfReferenceUID: said once, naming a file, no UID
    notes = [ln for ln in p.stderr.splitlines() if "FrameOfReferenceUID" in ln]
    assert len(notes) == 1 and "rsna_series" in notes[0], p.stderr[-3000:]


def test_no_identifier_in_output_or_names(explained):
    p = explained["proc"]
    # UIDs and patient fields of every source; short ones ('0010') would match digits of any number
    ids = {s for s in stored_uids(explained["tmp"] / "in") if len(s) >= 8}
    assert len(ids) > 10
    for s in ids:
        assert s not in p.stdout and s not in p.stderr, "an identifier reached the console"
        assert not any(s in f.name for f in explained["dcm"].iterdir())
        for f in (explained["out"]).rglob("*.json"):
            assert s not in f.read_text()


@pytest.mark.parametrize("name", ["oblique", "rsna_series", "CT_small", "eCT_Supplemental"])
def test_parametric_maps_match_sources_and_nifti(explained, name):
    import highdicom as hd

    assert explained["proc"].returncode == 3, explained["proc"].stderr[-3000:]
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in explained["inputs"][name])}
    first = next(iter(sources.values()))
    n_frames = sum(int(ds.get("NumberOfFrames") or 1) for ds in sources.values())
    objs = _objects(explained, name)
    series_uids, sop_uids, fors = set(), set(), set()
    for kind, f in objs.items():
        warnings = assert_valid(f)  # dciodvfy: errors fail, warnings are reported
        assert not any("WindowWidth" in w for w in warnings)
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == PM and ds.file_meta.MediaStorageSOPClassUID == PM
        # the source's study and patient; a new series and instance
        assert ds.StudyInstanceUID == first.StudyInstanceUID
        assert ds.PatientID == first.get("PatientID", "") and str(ds.PatientName) == str(first.get("PatientName", ""))
        assert ds.SeriesInstanceUID != first.SeriesInstanceUID and ds.SOPInstanceUID not in sources
        series_uids.add(ds.SeriesInstanceUID)
        sop_uids.add(ds.SOPInstanceUID)
        fors.add(ds.FrameOfReferenceUID)
        if "FrameOfReferenceUID" in first:
            assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
        else:  # derived, not any of the source's UIDs
            assert ds.FrameOfReferenceUID not in {first.StudyInstanceUID, first.SeriesInstanceUID, *sources}
        ref = ds.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == first.SeriesInstanceUID
        assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(sources)
        # float pixels, one frame per source slice, an identity unitless real-world value mapping
        assert "FloatPixelData" in ds and int(ds.NumberOfFrames) == n_frames
        shared = ds.SharedFunctionalGroupsSequence[0]
        rwv = shared.RealWorldValueMappingSequence[0]
        unit = rwv.MeasurementUnitsCodeSequence[0]
        assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", "1")
        assert rwv.LUTLabel and rwv.LUTExplanation
        assert (kind.split("_", 1)[0]) in rwv.LUTLabel
        stored = ds.pixel_array.reshape(n_frames, ds.Rows, ds.Columns).astype(np.float64)
        real = stored * float(rwv.RealWorldValueSlope) + float(rwv.RealWorldValueIntercept)
        assert rwv.DoubleFloatRealWorldValueFirstValueMapped <= real.min() and real.max() <= rwv.DoubleFloatRealWorldValueLastValueMapped
        nii = nib.load(str(explained["out"] / name / f"{kind}.nii.gz"))
        vol, aff = np.asarray(nii.dataobj, dtype=np.float64), nii.affine
        assert vol.shape[:2] == (ds.Rows, ds.Columns) == (first.Rows, first.Columns)
        seen = set()
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            src_ref = item.DerivationImageSequence[0].SourceImageSequence[0]
            src = sources[src_ref.ReferencedSOPInstanceUID]
            frame = int(src_ref.get("ReferencedFrameNumber", 1)) - 1
            seen.add((src_ref.ReferencedSOPInstanceUID, frame))
            ipp, iop, sp = _frame_geometry(src, frame)
            assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient, ipp, atol=1e-4)
            assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient, iop, atol=1e-6)
            assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, sp, atol=1e-6)
            # the NIfTI slice at that position (LPS -> RAS): the same values, after the real-world mapping
            ras = np.array([-ipp[0], -ipp[1], ipp[2]])
            k = float(np.linalg.lstsq(aff[:3, 2:3], ras - aff[:3, 3], rcond=None)[0][0])
            assert abs(k - round(k)) < 1e-3 and np.allclose(aff[:3, 2] * round(k) + aff[:3, 3], ras, atol=1e-3)
            want = vol[:, :, int(round(k))]
            assert np.allclose(real[i], want, atol=1e-6), (kind, i)
        assert len(seen) == n_frames  # every source slice exactly once
        # highdicom reads it as a volume: its real-world values, voxel by voxel at the same patient
        # position (highdicom's LPS affine vs the NIfTI's RAS one), are the NIfTI's. (Not get_frame:
        # highdicom 0.28 cannot decode single float frames, it asks for a PixelRepresentation.)
        hv = hd.pm.sop.pmread(f).get_volume(apply_real_world_transform=True)
        idx = np.indices(hv.array.shape).reshape(3, -1)
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ hv.affine @ np.vstack([idx, np.ones(idx.shape[1])])
        ijk = (np.linalg.inv(aff) @ ras)[:3]
        r = np.round(ijk).astype(int)
        assert np.abs(ijk - r).max() < 1e-3 and (r >= 0).all() and sorted(hv.array.shape) == sorted(vol.shape)
        assert np.allclose(hv.array.reshape(-1), vol[r[0], r[1], r[2]], atol=1e-6), kind
    assert len(series_uids) == len(sop_uids) == len(objs) and len(fors) == 1  # one frame of reference for all maps


def test_series_without_one_slice_per_file_or_non_dicom_is_refused(tmp_path):
    from medclf.errors import MedclfError
    from medclf.export.parametric_map import parametric_map_sources

    files = _generated_series(tmp_path / "s", n=2)
    assert parametric_map_sources("s", "series-1-CT-x", [str(f) for f in files], 2) == files
    with pytest.raises(MedclfError, match="one positioned slice per file") as e:
        parametric_map_sources(str(tmp_path / "s"), "series-1-CT-x", None, 2)
    assert e.value.path == str(tmp_path / "s")
    nii = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(nii))
    with pytest.raises(MedclfError, match="not DICOM"):
        parametric_map_sources(str(nii), None, None, 2)


def test_send_options_are_checked_before_anything_runs(tmp_path):
    png = tmp_path / "x.png"
    for args, hint in ((["--send", "localhost:11112", "--aet", "PACS"], "--dicom DIR"),
                       (["--dicom", tmp_path / "d", "--send", "localhost:11112"], "--aet"),
                       (["--dicom", tmp_path / "d", "--aet", "PACS"], "--send"),
                       (["--dicom", tmp_path / "d", "--send", "localhost", "--aet", "PACS"], "HOST:PORT")):
        p = run_cli("explain", png, "--out", tmp_path / "o", "--model", tmp_path / "norun", *args)
        assert p.returncode == 1 and hint in p.stderr and "norun" not in p.stderr, (args, p.stderr[-1500:])
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_send_stores_every_written_map_and_an_absent_peer_fails_in_one_line(tiny_run, tmp_path):
    import socket

    from pydicom.data import get_testdata_file
    from pynetdicom import AE, evt

    src = Path(shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm"))
    got: list[tuple[str, str]] = []

    def on_store(event):
        got.append((event.assoc.requestor.ae_title, str(event.dataset.SOPInstanceUID)))
        return 0x0000

    scp = AE(ae_title="PACS")
    scp.add_supported_context(PM)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.server_address[1]
        p = run_cli("explain", src, "--model", tiny_run, "--out", tmp_path / "o", "--dicom", tmp_path / "d",
                    "--budget", "2", "--device", "cpu", "--send", f"127.0.0.1:{port}", "--aet", "PACS")
    finally:
        server.shutdown()
    assert p.returncode == 0, p.stderr[-2000:]
    written = sorted((tmp_path / "d").glob("*.dcm"))
    assert len(written) == 4 and f"sent {len(written)} Parametric Map(s)" in p.stderr
    assert sorted(uid for _, uid in got) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in written)
    assert {aet for aet, _ in got} == {"MEDCLF"}

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    p = run_cli("explain", src, "--model", tiny_run, "--out", tmp_path / "o2", "--dicom", tmp_path / "d2",
                "--budget", "2", "--device", "cpu", "--send", f"127.0.0.1:{closed}", "--aet", "PACS")
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "no DICOM peer" in lines[0] and str(tmp_path / "d2") in lines[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert len(list((tmp_path / "d2").glob("*.dcm"))) == 4  # the maps stay written
