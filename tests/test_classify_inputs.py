"""classify on folders as users have them: series grouped as ingest groups them, every image file
classified, every row naming its input, every unreadable file an error line (exit 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import run_cli, write_bad_dicom, write_ct

STUDY = "1.2.826.0.1.3680043.8.498.5"


def _series(folder: Path, uid: str, patient: int, n: int, prefix: str, study: str = STUDY) -> list[Path]:
    """``n`` 16x16 slices of one series, 1 mm apart, written in reverse position order."""
    out = []
    for k in range(n):
        z = float(n - 1 - k)  # file order != anatomical order: stacking must follow the headers
        out.append(write_ct(folder / f"{prefix}{k}.dcm", np.full((16, 16), 1000 + 30 * k, np.int16), ipp=(0.0, 0.0, z),
                            instance=n - k, series_uid=uid, study_uid=study, patient=patient))
    return out


def _jpeg(path: Path) -> Path:
    from PIL import Image

    Image.fromarray((np.random.default_rng(2).random((20, 24)) * 255).astype(np.uint8)).save(path, quality=95)
    return path


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_folder_of_three_patients_and_a_jpeg(tiny_run, tmp_path):
    d = tmp_path / "mixed"
    files = {}
    for k, n in enumerate((3, 2, 1)):  # three series of three patients (the last a single slice)
        files[k] = _series(d, f"1.2.826.0.1.3680043.8.498.{100 + k}", patient=10 + k, n=n, prefix=f"p{k}_",
                           study=f"1.2.826.0.1.3680043.8.498.{200 + k}")
    jpg = _jpeg(d / "photo.jpg")
    r = run_cli("classify", d, "--model", tiny_run, "--json", "--budget", "2", check_rc=0)
    rows = _json_lines(r.stdout)
    by_input: dict[str, list[dict]] = {}
    for row in rows:
        by_input.setdefault(row["input"], []).append(row)
    assert len(by_input) == 4, sorted(by_input)  # 3 series + the JPEG, none merged, none dropped
    assert len(by_input[str(jpg)]) == 1 and "series" not in by_input[str(jpg)][0]
    # the one-slice series is a file: its row is its path
    assert len(by_input[str(files[2][0])]) == 1
    series_inputs = [k for k in by_input if "#series-" in k]
    assert len(series_inputs) == 2
    for fs in (files[0], files[1]):
        n = len(fs)
        name = next(k for k in series_inputs if by_input[k][0]["file"] in map(str, fs))
        assert name.startswith(f"{d}#series-1-CT-")
        got = by_input[name]
        assert len(got) == n and [g["slice"] for g in got] == list(range(n))  # one row per slice
        assert all(g["series"] == name.split("#", 1)[1] and g["n_files"] == n for g in got)
        # rows name each slice's own file, in anatomical order (files were written top-down)
        assert [g["file"] for g in got] == [str(p) for p in reversed(fs)]
    # privacy: no patient name or ID from the headers in any row
    assert "PHANTOM" not in r.stdout and "PHID" not in r.stdout
    # the table names every input too
    t = run_cli("classify", d, "--model", tiny_run, "--budget", "2", "--csv", check_rc=0)
    lines = t.stdout.strip().splitlines()
    assert lines[0].startswith("input,slice,prediction") and lines[0].endswith(",series,file,volume")
    assert len(lines) == 1 + 3 + 2 + 1 + 1
    assert sum(line.startswith(str(jpg)) for line in lines) == 1


def test_unreadable_files_in_a_folder_are_named_and_exit_3(tiny_run, tmp_path):
    d = tmp_path / "scans"
    fs = _series(d, "1.2.826.0.1.3680043.8.498.300", patient=3, n=3, prefix="s")
    write_ct(d / "s3.dcm", np.full((16, 16), 1000, np.int16), ipp=(0.0, 0.0, 3.0), instance=4,
             series_uid="1.2.826.0.1.3680043.8.498.300", patient=3)
    (d / "s3.dcm").write_bytes((d / "s3.dcm").read_bytes()[:-100])  # same series, pixel data cut short
    bad = write_bad_dicom(d / "zz_cut.dcm", "truncated")  # its own series, pixel data cut short
    jpg = _jpeg(d / "photo.jpg")
    r = run_cli("classify", d, "--model", tiny_run, "--json", "--budget", "2")
    assert r.returncode == 3, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, r.stderr
    for path in (d / "s3.dcm", bad):
        line = next(e for e in errors if str(path) in e)
        assert "truncated pixel data" in line
    rows = _json_lines(r.stdout)
    assert sorted(row["input"] for row in rows if "error" in row) == sorted([str(d / "s3.dcm"), str(bad)])
    ok = [row for row in rows if "error" not in row]
    names = {row["input"] for row in ok}
    assert str(jpg) in names
    series = [row for row in ok if row.get("series")]
    assert len(series) == 3 and all(row["skipped_files"] == 1 for row in series)
    assert all(row["input"] == str(d) for row in series)  # the folder's only series: named by the folder
    assert [row["file"] for row in series] == [str(p) for p in reversed(fs)]


def test_a_series_folder_is_still_one_stacked_series(tiny_run, tmp_path):
    d = tmp_path / "one"
    fs = _series(d, "1.2.826.0.1.3680043.8.498.400", patient=4, n=4, prefix="img")
    r = run_cli("classify", d, "--model", tiny_run, "--json", "--budget", "2", check_rc=0)
    rows = _json_lines(r.stdout)
    assert len(rows) == 4 and [row["slice"] for row in rows] == [0, 1, 2, 3]
    assert all(row["input"] == str(d) for row in rows)  # the folder is the series: named as given
    assert len({row["series"] for row in rows}) == 1 and rows[0]["series"].startswith("series-1-CT-")
    assert [row["file"] for row in rows] == [str(p) for p in reversed(fs)]
    # the same series as given to ingest: one unit of four slices
    from medclf.datasets.base import Plan
    from medclf.datasets.generic import dicom_units

    plan = Plan(dataset="folder", units=[])
    units = dicom_units([(d, p, None) for p in fs], lambda fn, xs: [fn(x) for x in xs], plan)
    assert len(units) == 1 and units[0].kind == "series" and len(units[0].paths) == 4


def test_empty_stdin_says_so(tiny_run):
    r = run_cli("classify", "-", "--model", tiny_run, "--json", input="")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "no inputs: stdin was empty" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.strip() == ""
    r = run_cli("classify", "-", "--model", tiny_run, input="# only a comment\n\n")
    assert r.returncode == 1 and "no inputs: stdin was empty" in r.stderr
