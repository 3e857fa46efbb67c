"""``classify --dicom-sr DIR`` (one TID 1500 SR per DICOM series or image) and ``--send HOST:PORT`` (C-STORE).

Every SR written is read back with pydicom and highdicom and checked against the sources' own headers
(study, series and SOP instance UIDs) and against ``classify --json`` for the same run (class,
probabilities, uncertainty); every SR must pass dciodvfy without errors. Inputs: a series written
by ``conftest.write_ct`` and pydicom's real CT files (CT_small.dcm, a 5-slice series of its DICOMDIR
tests, 693_UNCI.dcm of pydicom-data), plus a NIfTI that gets its rows but no SR.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from _dicom_validate import assert_valid, dciodvfy
from conftest import SAMPLE, run_cli, write_ct

CT3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"  #: Comprehensive 3D SR Storage
NAME_RE = re.compile(r"^series(-\d+)?-CT-[0-9a-f]{8}(-[0-9a-f]{8})?(-\d+)?\.SR\.dcm$")


@dataclass
class SRRun:
    proc: object  #: the CompletedProcess of classify --json --dicom-sr
    out: Path  #: the --dicom-sr folder
    inputs: dict[str, list[Path]]  #: input as given -> its DICOM files
    nifti: str  #: the non-DICOM input
    rows: dict[str, list[dict]]  #: input -> its --json rows
    errors: list[dict]  #: --json error lines


def _header(p: Path) -> pydicom.Dataset:
    return pydicom.dcmread(p, stop_before_pixels=True)


def _identifiers(paths: list[Path]) -> set[str]:
    """Every UID and patient identifier of the sources: none may leave medclf except inside an SR."""
    out: set[str] = set()
    for p in paths:
        ds = _header(p)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "PatientName"):
            v = str(ds.get(kw) or "").strip()
            if len(v) >= 4:
                out.add(v)
    return out


def _write_series(folder: Path, n: int = 4) -> list[Path]:
    """A generated CT series: n 32x32 slices, 5 mm apart, one series UID, patient PHANTOM^NAME42."""
    from pydicom.uid import generate_uid

    uid, rng = generate_uid(), np.random.default_rng(14)
    return [write_ct(folder / f"slice{k:02d}.dcm", rng.integers(-200, 1200, (32, 32)), series_uid=uid, patient=42,
                     ipp=(0.0, 0.0, 5.0 * k), instance=k + 1) for k in range(n)]


@pytest.fixture(scope="module")
def sr_run(tiny_run, tmp_path_factory) -> SRRun:
    """One ``classify --json --dicom-sr`` over all inputs (one model load for the module)."""
    d = tmp_path_factory.mktemp("sr_inputs")
    gen = _write_series(d / "generated")
    ct5n = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
    shutil.copytree(ct5n, d / "ct5n")
    small = Path(shutil.copy(get_testdata_file("CT_small.dcm"), d / "CT_small.dcm"))
    unci = Path(shutil.copy(get_testdata_file("693_UNCI.dcm"), d / "693_UNCI.dcm"))  # pydicom-data
    nifti = str(SAMPLE / "nifti" / "vol_000.nii.gz")
    inputs = {str(d / "generated"): gen, str(small): [small], str(d / "ct5n"): sorted((d / "ct5n").iterdir()),
              str(unci): [unci]}
    out = tmp_path_factory.mktemp("sr_out") / "sr"
    proc = run_cli("classify", *inputs, nifti, "--model", tiny_run, "--device", "cpu", "--json", "--dicom-sr", out)
    rows: dict[str, list[dict]] = {}
    errors = []
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        if "error" in rec:
            errors.append(rec)
        else:
            rows.setdefault(rec["input"], []).append(rec)
    return SRRun(proc=proc, out=out, inputs=inputs, nifti=nifti, rows=rows, errors=errors)


def _srs(run: SRRun) -> dict[str, Path]:
    """Input -> its SR file, matched by the series the SR references (read from the sources' headers)."""
    import highdicom as hd

    by_series = {str(_header(files[0]).SeriesInstanceUID): src for src, files in run.inputs.items()}
    out = {}
    for f in sorted(run.out.iterdir()):
        sr = hd.sr.srread(f)
        series = {s for _, s in sr.get_evidence_series()}
        assert len(series) == 1, f"{f.name} references {len(series)} series"
        src = by_series[series.pop()]
        assert src not in out, f"two SRs for {src}"
        out[src] = f
    return out


def _overall(rows: list[dict], classes: list[str]) -> tuple[str, dict[str, float], int]:
    """The series rule, restated from the README ("any slice positive"): (class, probabilities, driving slice)."""
    probs = np.array([[r["probabilities"][c] for c in classes] for r in rows])
    pred = np.array([classes.index(r["prediction"]) for r in rows])
    p = {c: float(probs[:, j].min() if j == 0 else probs[:, j].max()) for j, c in enumerate(classes)}
    pos = np.flatnonzero(pred != 0)
    if len(rows) == 1:
        return classes[int(pred[0])], p, 0
    if not len(pos):
        return classes[0], p, int(np.argmax(probs[:, 0]))
    k = int(pos[np.argmax(probs[pos, pred[pos]])])
    return classes[int(pred[k])], p, k


def _group_content(group) -> tuple[str, dict[str, float], set[str]]:
    """(predicted class, measurements by code meaning, referenced SOP instance UIDs) of a measurement group."""
    qual = group.get_qualitative_evaluations()
    assert [q.name.meaning for q in qual] == ["Predicted class"]
    meas = {m.name.meaning: float(m.value) for m in group.get_measurements()}
    assert all(m.unit.value == "1" and m.unit.scheme_designator == "UCUM" for m in group.get_measurements())
    return qual[0].value.meaning, meas, {s.referenced_sop_instance_uid for s in group.source_images}


def _texts(ds: pydicom.Dataset, meaning: str) -> list[str]:
    """Every TEXT content item named ``meaning`` anywhere in the SR's content tree."""
    found = []

    def walk(seq):
        for it in seq:
            if it.get("ValueType") == "TEXT" and it.ConceptNameCodeSequence[0].CodeMeaning == meaning:
                found.append(str(it.TextValue))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return found


def test_one_sr_per_dicom_input_and_none_for_nifti(sr_run):
    p = sr_run.proc
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])  # the NIfTI's SR is refused: partial
    srs = _srs(sr_run)
    assert set(srs) == set(sr_run.inputs)
    # the NIfTI: rows printed, then one error line naming it (JSON and stderr), and no SR
    assert len(sr_run.rows[sr_run.nifti]) > 1
    assert [e["input"] for e in sr_run.errors] == [sr_run.nifti]
    assert "not DICOM" in sr_run.errors[0]["error"]
    err_lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and sr_run.nifti in err_lines[0] and "not DICOM" in err_lines[0]
    assert "Traceback" not in p.stderr


def test_sr_references_its_sources_and_copies_patient_and_study(sr_run):
    import highdicom as hd

    for src, f in _srs(sr_run).items():
        heads = [_header(x) for x in sr_run.inputs[src]]
        ds = pydicom.dcmread(f)
        sr = hd.sr.srread(f)
        assert isinstance(sr, hd.sr.Comprehensive3DSR) and ds.SOPClassUID == CT3D_SR
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.VerificationFlag, ds.CompletionFlag, ds.Modality) == ("UNVERIFIED", "COMPLETE", "SR")
        # same study, new series and instance: a derived object
        assert ds.StudyInstanceUID == heads[0].StudyInstanceUID
        src_uids = {str(h.SOPInstanceUID) for h in heads}
        assert ds.SeriesInstanceUID not in {str(h.SeriesInstanceUID) for h in heads}
        assert ds.SOPInstanceUID not in src_uids
        for kw in ("PatientName", "PatientID", "StudyID", "AccessionNumber"):
            assert str(ds.get(kw) or "") == str(heads[0].get(kw) or ""), kw
        evidence = sr.get_evidence()
        assert {e[2] for e in evidence} == src_uids
        assert {(e[0], e[1]) for e in evidence} == {(str(h.StudyInstanceUID), str(h.SeriesInstanceUID)) for h in heads}
        assert {e[3] for e in evidence} == {str(h.SOPClassUID) for h in heads}
        groups = sr.content.get_image_measurement_groups()
        assert _group_content(groups[0])[2] == src_uids  # the series' call cites all its images


def test_sr_content_matches_classify_json(sr_run, tiny_run):
    import highdicom as hd

    from medclf import __version__

    config = json.loads((Path(tiny_run) / "config.json").read_text())
    classes = config["classes"]
    for src, f in _srs(sr_run).items():
        rows = sr_run.rows[src]
        groups = hd.sr.srread(f).content.get_image_measurement_groups()
        want, want_p, k = _overall(rows, classes)
        got, meas, _ = _group_content(groups[0])
        assert got == want, (src, got, want)
        for c in classes:
            assert meas[f"Probability of {c}"] == pytest.approx(want_p[c], abs=2e-6)
        unc = {m: v for m, v in meas.items() if not m.startswith("Probability of") and m != "Network function evaluations"}
        assert len(unc) == len(rows[k]["uncertainty"]) >= 1  # each field the row has (entropy, vote entropy, ...)
        assert sorted(unc.values()) == pytest.approx(sorted(rows[k]["uncertainty"].values()), abs=2e-6)
        assert meas["Network function evaluations"] == sum(r["nfe"] for r in rows)
        # a series stored one slice per file: one more group per slice, citing that slice's own image
        files = [Path(x) for x in sr_run.inputs[src]]
        if len(rows) > 1:
            assert len(groups) == 1 + len(rows)
            for r, g in zip(rows, groups[1:]):
                got, meas, refs = _group_content(g)
                assert got == r["prediction"] and g.tracking_identifier.endswith(f"slice {r['slice']}")
                assert refs == {str(_header(Path(r["file"])).SOPInstanceUID)}
                for c in classes:
                    assert meas[f"Probability of {c}"] == pytest.approx(r["probabilities"][c], abs=2e-6)
        else:
            assert len(groups) == 1 and len(files) == 1
        # the algorithm and how it decided
        ds = pydicom.dcmread(f)
        assert set(_texts(ds, "Algorithm Name")) == {"medclf"}
        assert set(_texts(ds, "Algorithm Version")) == {__version__}
        params = set(_texts(ds, "Algorithm Parameters"))
        for want_param in (f"method={config['method']}", f"run={Path(tiny_run).name}",
                           f"cache_fingerprint={config['cache_fingerprint']}", "decision=posterior",
                           f"budget_trials={config['method_config']['trials']}", "adaptive=true"):
            assert want_param in params, (want_param, params)


def test_no_identifier_outside_the_sr(sr_run):
    ids = _identifiers([p for files in sr_run.inputs.values() for p in files])
    assert any(v.startswith("PHANTOM^") for v in ids) and any(v.startswith("1.") or v.startswith("2.") for v in ids)
    text = sr_run.proc.stdout + sr_run.proc.stderr
    names = [f.name for f in sr_run.out.iterdir()]
    assert names and all(NAME_RE.match(n) for n in names), names
    for v in ids:
        assert v not in text, "an identifier reached stdout/stderr"
        assert all(v not in n for n in names), "an identifier reached a file name"
    assert not [n for n in names if n.startswith(".")], "a temp file was left behind"


def test_every_sr_passes_dciodvfy(sr_run):
    warnings = {}
    for src, f in _srs(sr_run).items():
        warnings[Path(src).name] = assert_valid(f)
    # the only warnings: medclf's private coding scheme, and attributes the source itself lacks or doubts
    for name, ws in warnings.items():
        other = [w for w in ws if "99MEDCLF" not in w]
        assert all(any(k in w for k in ("StudyDate", "StudyTime", "StudyID", "PatientName", "PatientWeight"))
                   for w in other), (name, other)


def test_dciodvfy_catches_a_broken_sr(sr_run, tmp_path):
    """The validation can fail: an SR without its Verification Flag is an error."""
    f = next(iter(sr_run.out.iterdir()))
    ds = pydicom.dcmread(f)
    del ds.VerificationFlag
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    errors, _ = dciodvfy(bad)
    assert any("VerificationFlag" in e for e in errors), errors


# ----------------------------------------------------------------------------------------------- send
class _SCP:
    """A pynetdicom storage SCP on 127.0.0.1 (its own threads), recording what it receives."""

    def __init__(self, ae_title: str = "TESTSCP", status: int = 0x0000, require_called: bool = False):
        from pynetdicom import AE, StoragePresentationContexts, evt

        self.received: list[pydicom.Dataset] = []
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = StoragePresentationContexts
        ae.require_called_aet = require_called

        def on_store(event):
            self.received.append(event.dataset)
            return status

        self.port = _free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def close(self) -> None:
        self.server.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scp():
    server = _SCP()
    yield server
    server.close()


def test_send_stores_every_sr_written(tiny_run, tmp_path, scp):
    _write_series(tmp_path / "series", n=3)
    out = tmp_path / "sr"
    p = run_cli("classify", tmp_path / "series", "--model", tiny_run, "--device", "cpu", "--json", "--dicom-sr", out,
                "--send", f"127.0.0.1:{scp.port}", "--aet", "TESTSCP")
    assert p.returncode == 0, p.stderr[-2000:]
    written = {str(pydicom.dcmread(f).SOPInstanceUID) for f in out.iterdir()}
    assert len(written) == 1
    assert {str(ds.SOPInstanceUID) for ds in scp.received} == written
    assert {str(ds.SOPClassUID) for ds in scp.received} == {CT3D_SR}
    assert f"sent 1 DICOM SR(s) to 127.0.0.1:{scp.port}" in p.stderr


def test_send_to_an_absent_peer_fails_in_one_line_and_keeps_the_files(tiny_run, tmp_path):
    _write_series(tmp_path / "series", n=2)
    out, port = tmp_path / "sr", _free_port()  # nobody listens there
    p = run_cli("classify", tmp_path / "series", "--model", tiny_run, "--device", "cpu", "--dicom-sr", out,
                "--send", f"127.0.0.1:{port}", "--aet", "TESTSCP")
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"no DICOM peer at 127.0.0.1:{port}" in lines[0] and str(out) in lines[0], p.stderr
    assert len([f for f in out.iterdir() if NAME_RE.match(f.name)]) == 1


def test_send_refusals_from_a_peer_are_errors(sr_run):
    from medclf.errors import MedclfError
    from medclf.export.send import send_files

    files = sorted(sr_run.out.iterdir())
    picky = _SCP(ae_title="PACS", require_called=True)  # rejects any other called AE title
    try:
        with pytest.raises(MedclfError, match="rejected the association"):
            send_files(files, "127.0.0.1", picky.port, "NOTPACS")
        assert picky.received == []
    finally:
        picky.close()
    full = _SCP(status=0xA700)  # "out of resources" for every store
    try:
        with pytest.raises(MedclfError, match=r"C-STORE status 0xA700.*0 of 4 sent") as e:
            send_files(files, "127.0.0.1", full.port, "TESTSCP")
        assert "\n" not in str(e.value) and e.value.path == str(files[0])
    finally:
        full.close()
    assert all(f.exists() for f in files)
    ok = _SCP()
    try:
        assert send_files(files, "127.0.0.1", ok.port, "TESTSCP") == len(files)
        assert sorted(str(d.SOPInstanceUID) for d in ok.received) == sorted(str(pydicom.dcmread(f).SOPInstanceUID)
                                                                              for f in files)
    finally:
        ok.close()


def test_parse_address():
    from medclf.errors import MedclfError
    from medclf.export.send import parse_address

    assert parse_address("pacs.example.org:11112") == ("pacs.example.org", 11112)
    assert parse_address("[::1]:104") == ("::1", 104)
    for bad in ("pacs", "pacs:", ":104", "pacs:port", "pacs:0", "pacs:70000"):
        with pytest.raises(MedclfError, match="--send"):
            parse_address(bad)


@pytest.mark.parametrize("args, message", [
    (["--send", "127.0.0.1:11112", "--aet", "X"], "pass --dicom-sr DIR too"),
    (["--dicom-sr", "SR", "--send", "127.0.0.1"], "expected HOST:PORT"),
    (["--dicom-sr", "SR", "--send", "127.0.0.1:11112"], "--send needs --aet"),
    (["--dicom-sr", "SR", "--aet", "X"], "pass --send HOST:PORT too"),
])
def test_send_options_are_checked_before_any_work(tmp_path, args, message):
    f = write_ct(tmp_path / "a.dcm", np.zeros((32, 32)))
    args = [str(tmp_path / a) if a == "SR" else a for a in args]
    p = run_cli("classify", f, "--model", tmp_path / "no-such-run", *args)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "SR").exists()
