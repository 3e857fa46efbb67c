"""``medclf ingest`` from the command line: start-up imports, version, JSON and table output, exit
codes (0 / 1 / 2 / 3), one-line errors without tracebacks unless --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BAD_DICOM_REASONS, REPO, SAMPLE, run_cli, write_bad_dicom
from PIL import Image

import medclf
from medclf.cli import app
from medclf.cli._common import run_app
from medclf.data import open_cache
from medclf.errors import ExitCode

NO_HEAVY_IMPORTS = """
import sys
from medclf.cli import app, main
sys.argv = ["medclf", *{argv!r}]
try:
    main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "monai") if m in sys.modules)
assert not heavy, f"imported at start-up: {{heavy}}"
print("EXIT", code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["ingest", "--help"], ["--version"]])
def test_help_and_version_do_not_import_torch_or_monai(argv):
    p = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS.format(argv=argv)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "EXIT 0" in p.stdout
    if argv == ["ingest", "--help"]:
        for opt in ("--out", "--dataset", "--size", "--window", "--workers", "--resume", "--overwrite", "--json", "--uncertain"):
            assert opt in p.stdout, opt
    if argv == ["--help"]:
        assert "ingest" in p.stdout


def test_python_dash_m_version():
    p = run_cli("--version", check_rc=0)
    assert p.stdout.strip() == f"medclf {medclf.__version__}"
    script = Path(sys.executable).parent / "medclf"  # the console script, too
    if script.exists():
        q = subprocess.run([str(script), "--version"], capture_output=True, text=True)
        assert q.returncode == 0 and q.stdout.strip() == p.stdout.strip()


def test_json_summary_parses(rsna32):
    d = rsna32.summary  # json.loads of the whole of stdout: nothing else is printed there
    assert d["up_to_date"] is False and d["dataset"] == "rsna-ich"
    assert d["n_units"] == 321 and d["n_items"] == 320 and d["n_failed"] == 1
    assert d["errors"] == [{"path": str(SAMPLE / "rsna" / "stage_2_train" / "ID_6431af929.dcm"), "reason": "truncated pixel data"}]
    assert sum(sum(c.values()) for c in d["counts"].values()) == 320 and set(d["counts"]) == {"train", "val", "test"}
    assert d["cache"] == str(rsna32.cache) and d["fingerprint"] == open_cache(rsna32.cache).fingerprint
    assert d["size_bytes"] > 0 and d["seconds"] > 0 and d["files_per_s"] > 0
    assert any("duplicate" in n for n in d["notes"])
    # progress goes to stderr, never into the JSON on stdout
    assert "ingest:" in rsna32.json_run.stderr and "ingest:" not in rsna32.json_run.stdout


def test_table_summary_and_failed_files_on_stderr(rsna32):
    out, err = rsna32.table_run.stdout, rsna32.table_run.stderr
    assert out.splitlines()[0] == f"cache {rsna32.cache}  (up to date, nothing to do)"  # the path unbroken
    assert "haemorrhage" in out and "normal" in out and "321 inputs -> 320 items" in out
    assert "checked in" in out and "files/s" not in out  # nothing was processed: no throughput to report
    assert f"failed: {SAMPLE / 'rsna' / 'stage_2_train' / 'ID_6431af929.dcm'}: truncated pixel data" in err
    assert "1 input(s) failed" in err and "errors.jsonl" in err
    assert "Traceback" not in err


def test_partial_failure_exit_code_3_and_good_files_cached(tmp_path, ct_writer):
    src = tmp_path / "in"
    for what in ("text", "truncated", "nopixels", "mpeg2", "private_ts"):
        write_bad_dicom(src / f"{what}.dcm", what)
    for k in range(3):
        ct_writer(src / f"good{k}.dcm", np.full((20, 20), 1064), patient=k)
    Image.fromarray(np.full((20, 20), 7, np.uint8)).save(src / "good.png")
    p = run_cli("ingest", src, "--out", tmp_path / "c", "--size", "16", "--workers", "2", "--json")
    assert p.returncode == ExitCode.PARTIAL == 3, p.stderr
    d = json.loads(p.stdout)
    assert d["n_failed"] == 5 and d["n_items"] == 4
    info = open_cache(tmp_path / "c")
    assert sorted(it["source"] for it in info.items) == ["good.png", "good0.dcm", "good1.dcm", "good2.dcm"]
    logged = {Path(e["path"]).name: e["reason"] for e in map(json.loads, (tmp_path / "c" / "errors.jsonl").read_text().splitlines())}
    assert set(logged) == {f"{w}.dcm" for w in ("text", "truncated", "nopixels", "mpeg2", "private_ts")}
    for name, reason in logged.items():
        assert reason.startswith(BAD_DICOM_REASONS[name[:-4]])
    assert {e["reason"] for e in d["errors"]} == set(logged.values())
    # the table form says the same on stderr, one line per failure (first five)
    q = run_cli("ingest", src, "--out", tmp_path / "c", "--size", "16")
    assert q.returncode == 3 and "up to date" in q.stdout
    failed = [line for line in q.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 5 and "5 input(s) failed" in q.stderr
    assert all(line.split(": ", 2)[2] == logged[Path(line.split(": ", 2)[1]).name] for line in failed)


def test_all_good_is_exit_0(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20), 50 * i, np.uint8)).save(tmp_path / "in" / f"{i}.png")
    assert run_app(app, ["ingest", str(tmp_path / "in"), "--out", str(tmp_path / "c"), "--size", "16", "--workers", "1"]) == 0
    assert open_cache(tmp_path / "c").manifest["n_items"] == 3


def test_missing_source_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "no such folder"
    p = run_cli("ingest", missing, "--out", tmp_path / "c")
    assert p.returncode == ExitCode.ERROR == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert str(missing) in lines[0] and "source not found" in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert not (tmp_path / "c").exists()  # nothing was done


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    argv = ["ingest", tmp_path / "nope", "--out", tmp_path / "c"]
    if how == "flag":
        p = run_cli("--debug", *argv)
    else:
        p = run_cli(*argv, env={**os.environ, "MEDCLF_DEBUG": "1"})
    assert p.returncode == 1
    assert "Traceback (most recent call last)" in p.stderr and "source not found" in p.stderr


def test_other_arguments_into_the_same_out_is_exit_1(tmp_path, capsys):
    base = ["ingest", str(SAMPLE / "isic"), "--out", str(tmp_path / "c"), "--workers", "1"]
    assert run_app(app, [*base, "--size", "16"]) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")}
    capsys.readouterr()
    assert run_app(app, [*base, "--size", "24"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err and str(tmp_path / "c") in err
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*")}
    assert run_app(app, [*base, "--size", "24", "--overwrite"]) == 0
    assert open_cache(tmp_path / "c").shape == (3, 24, 24)
    capsys.readouterr()
    assert run_app(app, [*base, "--size", "24"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"cache {tmp_path / 'c'}  (up to date, nothing to do)"


@pytest.mark.parametrize("args,code,words", [
    (["--window", "brain,nonsense"], 1, "unknown window 'nonsense'"),
    (["--dataset", "imagenet"], 1, "unknown --dataset 'imagenet'"),
    (["--intensity", "loud"], 1, "unknown --intensity 'loud'"),
    (["--dataset", "chexpert"], 1, "no train.csv or valid.csv"),
    (["--size", "4"], 2, "--size"),
    (["--bogus"], 2, "--bogus"),
])
def test_bad_arguments(tmp_path, capsys, args, code, words):
    rc = run_app(app, ["ingest", str(SAMPLE / "isic"), "--out", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert rc == code and words in err, err
    assert "Traceback" not in err and not (tmp_path / "c").exists()


def test_ctrl_c_then_resume(tmp_path, capsys, monkeypatch):
    import medclf.data.ingest as ing

    argv = ["ingest", str(SAMPLE / "isic"), "--size", "16", "--workers", "1"]
    assert run_app(app, [*argv, "--out", str(tmp_path / "ref")]) == 0
    real = ing.process_shard

    def ctrl_c_on_second_shard(o, idx, units, pre):
        if idx == 1:
            raise KeyboardInterrupt
        return real(o, idx, units, pre)

    monkeypatch.setattr(ing, "process_shard", ctrl_c_on_second_shard)
    out = tmp_path / "c"
    assert run_app(app, [*argv, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err  # a hint, not a traceback
    monkeypatch.setattr(ing, "process_shard", real)
    assert run_app(app, ["ingest", str(SAMPLE / "isic"), "--out", str(out), "--size", "24", "--resume"]) == 1
    assert "other inputs/preprocessing" in capsys.readouterr().err  # resuming with other arguments
    assert run_app(app, [*argv, "--out", str(out), "--resume"]) == 0
    ref = open_cache(tmp_path / "ref")
    assert open_cache(out).items == ref.items and open_cache(out).manifest == ref.manifest
    for shard in ref.manifest["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "ref" / shard["file"]).read_bytes()
