"""A single DICOM file keeps its patient geometry (maps land on the scan), ``--debug`` anywhere on the
command line, and the README's exit-code table checked case by case through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer

from conftest import REPO, run_cli, write_ct
from medclf.cli._common import hoist_debug, run_app
from medclf.errors import ExitCode
from medclf.io import read_dicom_series, read_image

IPP = (-120.5, 33.0, 17.25)
#: an oblique plane: rows along (0.96, 0.28, 0), columns along -z (a coronal-ish tilt)
IOP = (0.96, 0.28, 0.0, 0.0, 0.0, -1.0)
SPACING = (0.7, 0.8)
RAS_IPP = np.array([-IPP[0], -IPP[1], IPP[2]])  # DICOM is LPS: NIfTI/RAS flips x and y


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("MEDCLF_MODEL", "MEDCLF_DEBUG", "MEDCLF_DATA"):
        monkeypatch.delenv(name, raising=False)


def _slice(path: Path, **kw) -> Path:
    rng = np.random.default_rng(0)
    stored = (1024 + 40 + rng.integers(-30, 30, (24, 20))).astype(np.int16)  # brain-window HU
    return write_ct(path, stored, **{"ipp": IPP, "iop": IOP, "spacing": SPACING, **kw})


# ------------------------------------------------------------------------------------ geometry
def test_single_file_has_the_series_geometry(tmp_path):
    f = _slice(tmp_path / "slice.dcm")
    alone = read_image(f)
    series, errs = read_dicom_series([f])
    assert errs == [] and alone.affine is not None
    assert np.allclose(alone.affine, series.affine)
    assert alone.meta["spacing"] == series.meta["spacing"] == pytest.approx([0.7, 0.8, 5.0])  # + SliceThickness
    assert alone.meta["orientation"] == series.meta["orientation"]
    assert np.allclose(alone.affine @ [0, 0, 0, 1], [*RAS_IPP, 1])
    # (row, col) -> IPP + row * dr * column cosine + col * dc * row cosine, in RAS
    row_cos, col_cos = np.array(IOP[:3]), np.array(IOP[3:])
    for r, c in ((5, 0), (0, 7), (23, 19)):
        lps = np.array(IPP) + r * SPACING[0] * col_cos + c * SPACING[1] * row_cos
        assert np.allclose(alone.affine @ [r, c, 0, 1], [*(lps * [-1, -1, 1]), 1], atol=1e-6)
    # the slice axis is the plane's normal, one slice thickness long
    normal = np.cross(row_cos, col_cos) * [-1, -1, 1]
    assert np.allclose(alone.affine[:3, 2], 5.0 * normal)


def test_dicom_without_positions_keeps_the_plain_affine(tmp_path):
    from medclf.export import write_nifti_map

    f = _slice(tmp_path / "nopos.dcm", ipp=None, iop=None)
    img = read_image(f)
    assert img.affine is None and read_dicom_series([f])[0].affine is None
    assert img.meta["spacing"] == pytest.approx([0.7, 0.8, 5.0])
    out = tmp_path / "m.nii.gz"
    write_nifti_map(out, np.zeros(img.array.shape[:3], np.float32), img, f)
    got = nib.load(str(out))  # documented (export.maps._plain_affine): ('P','L','S') at the origin, pixel spacing
    assert nib.aff2axcodes(got.affine) == ("P", "L", "S")
    assert np.allclose(got.affine @ [0, 0, 0, 1], [0, 0, 0, 1])
    assert np.allclose(np.abs(got.affine[:3, :3]).sum(0), [0.7, 0.8, 5.0])


def _multiframe(path: Path, positions: list[tuple] | None, top_ipp: tuple | None = None) -> Path:
    """A 3-frame enhanced-style CT: geometry in the functional groups (per-frame positions when given)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "PHID0009"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 6, 5, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    shared = Dataset()
    ori, meas = Dataset(), Dataset()
    ori.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    meas.PixelSpacing, meas.SliceThickness, meas.SpacingBetweenSlices = [0.5, 0.6], 2.0, 2.5
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([ori]), Sequence([meas])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if positions:
        frames = []
        for p in positions:
            item, pos = Dataset(), Dataset()
            pos.ImagePositionPatient = [float(v) for v in p]
            item.PlanePositionSequence = Sequence([pos])
            frames.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    if top_ipp:
        ds.ImagePositionPatient = [float(v) for v in top_ipp]
    ds.PixelData = (np.arange(90, dtype="<i2").reshape(3, 6, 5) + 1024).tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).NumberOfFrames == 3
    return path


def test_multiframe_file_geometry(tmp_path):
    # per-frame positions (enhanced CT, no top-level ImagePositionPatient): the frames' own step
    f = _multiframe(tmp_path / "mf.dcm", [(10.0, -20.0, 30.0), (10.0, -20.0, 33.0), (10.0, -20.0, 36.0)])
    img = read_image(f)
    assert img.array.shape[:3] == (3, 6, 5) and img.affine is not None
    assert np.allclose(img.affine, read_dicom_series([f])[0].affine)
    for k in range(3):
        assert np.allclose(img.affine @ [0, 0, k, 1], [-10.0, 20.0, 30.0 + 3 * k, 1])
    assert img.meta["spacing"] == pytest.approx([0.5, 0.6, 3.0])
    # only the first frame's position: the others follow the normal at SpacingBetweenSlices
    g = _multiframe(tmp_path / "legacy.dcm", None, top_ipp=(1.0, 2.0, 3.0))
    img = read_image(g)
    assert np.allclose(img.affine @ [0, 0, 2, 1], [-1.0, -2.0, 3.0 + 2 * 2.5, 1])
    assert np.allclose(img.affine, read_dicom_series([g])[0].affine)
    # frames not evenly spaced in file order: one line of positions cannot describe them, use the first
    h = _multiframe(tmp_path / "uneven.dcm", [(0.0, 0.0, 0.0), (0.0, 0.0, 9.0), (0.0, 0.0, 1.0)])
    assert np.allclose(read_image(h).affine[:3, 2], [0, 0, 2.5])


def test_explain_on_a_single_dicom_lands_on_the_scan(tiny_run, tmp_path):
    f = _slice(tmp_path / "in" / "slice.dcm")
    bare = _slice(tmp_path / "in" / "bare.dcm", ipp=None, iop=None)
    out = tmp_path / "explain"
    p = run_cli("explain", f, bare, "--model", tiny_run, "--out", out, "--budget", "2", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-2000:]
    files = sorted((out / "slice").glob("*.nii.gz"))
    assert {"evidence.nii.gz", "uncertainty.nii.gz"} <= {x.name for x in files}
    ref = read_dicom_series([f])[0].affine
    for m in files:  # every map, not only the evidence
        got = nib.load(str(m))
        assert got.shape == (24, 20, 1)
        assert np.allclose(got.affine @ [0, 0, 0, 1], [*RAS_IPP, 1], atol=1e-4), m.name
        assert np.allclose(got.affine, ref, atol=1e-4), m.name
    summary = json.loads((out / "slice" / "summary.json").read_text())
    assert np.allclose(summary["geometry"]["affine"], ref, atol=1e-4)
    # without ImagePositionPatient/Orientation: the plain affine, at the origin with the pixel spacing
    got = nib.load(str(out / "bare" / "evidence.nii.gz"))
    assert nib.aff2axcodes(got.affine) == ("P", "L", "S") and np.allclose(got.affine[:3, 3], 0)


# ------------------------------------------------------------------------------------ --debug
def test_hoist_debug():
    assert hoist_debug(["classify", "x", "--debug"]) == ["--debug", "classify", "x"]
    assert hoist_debug(["--debug", "classify", "x"]) == ["--debug", "classify", "x"]
    assert hoist_debug(["classify", "--debug", "x", "--debug"]) == ["--debug", "classify", "x"]
    assert hoist_debug(["classify", "--", "--debug"]) == ["classify", "--", "--debug"]  # a file named --debug
    assert hoist_debug(["classify", "x"]) == ["classify", "x"]


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def _root(debug: bool = typer.Option(False, "--debug")) -> None:
        pass

    @app.command()
    def boom(arg: str = typer.Argument("x")) -> None:
        raise ZeroDivisionError(f"boom {arg}")

    @app.command()
    def other() -> None:
        pass

    return app


@pytest.mark.parametrize("argv", [["--debug", "boom"], ["boom", "--debug"], ["boom", "y", "--debug"]])
def test_unexpected_error_with_debug_anywhere_raises(argv):
    with pytest.raises(ZeroDivisionError):
        run_app(_app(), argv)


def test_unexpected_error_without_debug_is_one_line(capsys):
    assert run_app(_app(), ["boom"]) == ExitCode.ERROR
    assert run_app(_app(), ["boom", "--", "--debug"]) == ExitCode.ERROR  # after --: an argument, not the flag
    err = capsys.readouterr().err
    assert "unexpected ZeroDivisionError: boom x" in err and "boom --debug" in err
    assert "--debug for the traceback" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        run_app(_app(), ["boom"], debug_env="1")


@pytest.mark.parametrize("where", ["before", "after", "none"])
def test_debug_through_the_cli(where, tmp_path):
    args = ["classify", str(tmp_path / "x.png")]  # no model given: a MedclfError, re-raised under --debug
    argv = {"before": ["--debug", *args], "after": [*args, "--debug"], "none": args}[where]
    p = run_cli(*argv)
    assert p.returncode == 1
    assert "no model given" in p.stderr
    assert ("Traceback" in p.stderr) == (where != "none"), p.stderr[-1500:]


# ------------------------------------------------------------------------------------ exit codes
def _readme_codes() -> dict[int, str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (.+) \|$", section, re.M)}


def test_readme_exit_table_lists_every_code():
    codes = _readme_codes()
    assert set(codes) == {*(int(c) for c in ExitCode), 130}
    assert "nothing was done" in codes[ExitCode.ERROR]
    assert "classify" in codes[ExitCode.PARTIAL] and "explain" in codes[ExitCode.PARTIAL]  # missing inputs: 3, not 1


def _cases(tmp: Path, run: Path, png: Path) -> list[tuple[int, list]]:
    """(documented code, argv): the cheap cases of README "Exit codes", command by command."""
    missing = tmp / "missing.png"
    junk = tmp / "junk"
    junk.mkdir(exist_ok=True)
    (junk / "a.dcm").write_bytes(b"not a dicom file")
    (tmp / "empty").mkdir(exist_ok=True)
    empty_list = tmp / "inputs.txt"
    empty_list.write_text("# no paths\n")
    return [
        # 0: success, help, version
        (0, ["--version"]),
        (0, ["classify", "--help"]),
        # 1: nothing was done
        (1, ["ingest", tmp / "nowhere", "--out", tmp / "c1"]),  # missing source
        (1, ["ingest", tmp / "empty", "--out", tmp / "c2"]),  # no image files
        (1, ["ingest", png, "--out", tmp / "c3", "--dataset", "nope"]),  # checked by the command
        (1, ["ingest", png, "--out", tmp / "c4", "--window", "nope"]),
        (1, ["classify", png]),  # no model given
        (1, ["classify", png, "--model", tmp / "norun"]),  # model not found
        (1, ["explain", png, "--out", tmp / "e1", "--model", tmp / "norun"]),
        (1, ["classify", empty_list, "--model", run]),  # no inputs at all: nothing to do
        (1, ["explain", empty_list, "--out", tmp / "e3", "--model", run]),
        (1, ["eval", "--model", tmp / "norun"]),
        (1, ["eval", "--model", run, "--data", tmp / "nocache"]),  # missing data
        (1, ["finetune", tmp / "nocache", "--out", tmp / "r1"]),  # missing cache
        (1, ["pretrain", tmp / "nocache", "--out", tmp / "r2"]),
        (1, ["sample", "--like", png]),  # no model given
        (1, ["sample", "--like", missing, "--model", tmp / "norun"]),
        # 2: the command line itself is wrong
        (2, []),  # no command: the help, as a usage error
        (2, ["bogus"]),
        (2, ["classify"]),  # no arguments: the command's help
        (2, ["classify", png, "--bogus"]),
        (2, ["ingest", png, "--out", tmp / "c5", "--size", "2"]),  # outside the option's range
        (2, ["eval", "--dataset", "nope"]),  # not one of the option's choices
        (2, ["finetune", tmp / "nocache", "--out", tmp / "r3", "--method", "nope"]),
        (2, ["pretrain", tmp / "nocache", "--out", tmp / "r4", "--batch-size", "1"]),
        (2, ["explain", png, "--model", run]),  # missing required --out
        # 3: done, some inputs failed (the batch goes on; 3 even when every input failed)
        (3, ["ingest", junk, "--out", tmp / "c6", "--size", "16"]),
        (3, ["classify", missing, "--model", run, "--device", "cpu"]),
        (3, ["explain", missing, "--out", tmp / "e2", "--model", run, "--device", "cpu"]),
    ]


def test_documented_exit_codes(tiny_run, tmp_path):
    from PIL import Image

    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    bad = []
    for code, argv in _cases(tmp_path, tiny_run, png):
        p = run_cli(*argv)
        if p.returncode != code:
            bad.append((code, p.returncode, [str(a) for a in argv], p.stderr[-300:]))
        if code in (1, 3):
            assert "Traceback" not in p.stderr, argv
    assert not bad, bad
