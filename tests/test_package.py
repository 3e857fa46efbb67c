"""Model packages: ``medclf export RUN --out MODEL.zip`` loads as the run it holds, bit for bit,
and a package is read by name with safetensors and JSON only (issue "portable model packages")."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from conftest import SAMPLE, run_cli


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLF_CACHE", str(tmp_path / "medclf-cache"))


@pytest.fixture
def package(tiny_run, tmp_path) -> Path:
    out = tmp_path / "pkg" / "tiny.zip"
    r = run_cli("export", tiny_run, "--out", out, check_rc=0)
    assert r.stdout.strip() == str(out)
    return out


def test_package_holds_weights_config_and_card(package, tiny_run):
    with zipfile.ZipFile(package) as zf:
        names = zf.namelist()
        assert {"config.json", "model.safetensors", "README.md"} <= set(names)
        assert all("/" not in n for n in names) and not any(n.endswith((".pt", ".pth", ".pkl")) for n in names)
        assert zf.read("config.json") == (tiny_run / "config.json").read_bytes()
        assert zf.read("model.safetensors") == (tiny_run / "model.safetensors").read_bytes()
        card = zf.read("README.md").decode()
    config = json.loads((tiny_run / "config.json").read_text())
    assert "**Not for diagnostic use.**" in card and "not for diagnostic use" in card.lower()
    assert config["cache_fingerprint"] in card and f"n_train): {config['n_train']}" in card
    assert all(c in card for c in config["classes"]) and "unspecified unless set" in card and "medclf 0." in card


def test_export_is_deterministic(package, tiny_run, tmp_path):
    again = run_cli("export", tiny_run, "--out", tmp_path / "again.zip", check_rc=0)
    assert (tmp_path / "again.zip").read_bytes() == package.read_bytes(), again.stderr


def test_classify_and_eval_from_package_equal_the_run(package, tiny_run, tiny_cache, tmp_path):
    dcm = sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[0]
    args = ("classify", dcm, "--json", "--budget", "2")
    a = run_cli(*args, "--model", tiny_run, check_rc=0).stdout
    b = run_cli(*args, "--model", package, check_rc=0).stdout
    assert a == b and a.strip()
    ev = ("eval", "--data", tiny_cache, "--json", "--bootstrap", "0", "--budget", "2")
    ma = json.loads(run_cli(*ev, "--model", tiny_run, check_rc=0).stdout)
    mb = json.loads(run_cli(*ev, "--model", package, check_rc=0).stdout)
    assert mb["model"] == str(package)
    for m in (ma, mb):
        m.pop("model"), m.pop("seconds"), m.pop("images_per_s", None)  # where it came from, timings
    assert ma == mb
    # unpacked once, into one content-addressed folder
    assert len(list((tmp_path / "medclf-cache" / "models").iterdir())) == 1


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("bad", ["model.pt", "../x", "/abs.json", "sub/model.safetensors"])
def test_refuses_unsafe_members(tiny_run, tmp_path, bad):
    members = {"config.json": (tiny_run / "config.json").read_bytes(),
               "model.safetensors": (tiny_run / "model.safetensors").read_bytes(), bad: b"\x80\x04K\x01."}
    pkg = _zip(tmp_path / "bad.zip", members)
    dcm = sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[0]
    r = run_cli("classify", dcm, "--model", pkg, "--json", check_rc=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(pkg) in lines[0] and "refused" in lines[0], r.stderr
    assert not (tmp_path / "medclf-cache" / "models").exists() or not any((tmp_path / "medclf-cache" / "models").iterdir())


def test_non_zip_model_is_one_line(tmp_path):
    fake = tmp_path / "model.zip"
    fake.write_text("not a zip\n")
    dcm = sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[0]
    r = run_cli("classify", dcm, "--model", fake, check_rc=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(fake) in lines[0] and "not a zip" in lines[0], r.stderr


def test_export_refuses_a_folder_as_out(tiny_run, tmp_path):
    r = run_cli("export", tiny_run, "--out", tmp_path, check_rc=1)
    assert len(r.stderr.strip().splitlines()) == 1


def test_explain_from_package_equals_the_run(package, tiny_run, tmp_path):
    dcm = sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[0]
    outs = {}
    for name, model in (("run", tiny_run), ("pkg", package)):
        d = tmp_path / f"explain-{name}"
        r = run_cli("explain", dcm, "--model", model, "--out", d, "--json", "--budget", "2", check_rc=0)
        outs[name] = (d, r.stdout.replace(str(d), "OUT"))
    (da, ja), (db, jb) = outs["run"], outs["pkg"]
    assert ja == jb and ja.strip()
    files = sorted(p.relative_to(da) for p in da.rglob("*.nii.gz"))
    assert files and all((da / f).read_bytes() == (db / f).read_bytes() for f in files)
