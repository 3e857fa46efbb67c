"""The shell batch scripts, in --quick mode, on look-alike trees made from the sample data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from _trees import make_chexpert_tree

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def _env() -> dict:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "MEDCLF": str(Path(bindir) / "medclf"),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["chexpert-effusion", "isic-melanoma"])
def test_reproduce_quick(task, tmp_path):
    data = make_chexpert_tree(tmp_path / "chexpert") if task == "chexpert-effusion" else SAMPLE / "isic"
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), task, "--quick", "--out", str(out), "--data",
                        str(data), "--device", "cpu"], capture_output=True, text=True, env=_env(), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "report" / "metrics.json").read_text())
    assert 0 <= m["accuracy"] <= 1
    # Favero et al.'s protocol ran too (vote over the full budget: 8 trials x 2 classes in --quick), and
    # the side-by-side table was printed
    fav = json.loads((out / "report-favero" / "metrics.json").read_text())
    assert fav["nfe_per_image"] == 16 and m["nfe_per_image"] <= 16
    assert "Favero et al. (vote, full budget)" in p.stdout and "medclf default (posterior, adaptive)" in p.stdout
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    n_test = sum(manifest["counts"]["test"].values())
    assert len(list((out / "explain").glob("*/summary.json"))) == min(4, n_test) > 0
    counts = manifest["counts"]["train"]
    assert len(counts) == 2 and len(set(counts.values())) == 1  # balanced binary task


def test_reproduce_stops_at_the_first_failing_step(tmp_path):
    p = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), "isic-melanoma", "--quick", "--out",
                        str(tmp_path / "o"), "--data", str(tmp_path / "missing")], capture_output=True, text=True, env=_env())
    assert p.returncode == 1
    assert "step failed with exit code 1" in p.stderr and not (tmp_path / "o" / "run").exists()


def test_classify_archive_to_jsonl_and_csv(tiny_run, tmp_path):
    files = sorted((SAMPLE / "rsna" / "stage_2_train").glob("ID_*.dcm"))[:3]
    arc = tmp_path / "scans.tar.gz"
    with tarfile.open(arc, "w:gz") as t:
        for f in files:
            t.add(f, arcname=f"scans/{f.name}")
        t.add(SAMPLE / "rsna" / "stage_2_train" / "ID_6431af929.dcm", arcname="scans/ID_6431af929.dcm")  # truncated
    env = _env()
    out = tmp_path / "res.jsonl"
    p = subprocess.run(["bash", str(REPO / "scripts" / "classify_archive.sh"), str(arc), str(out), "--model", str(tiny_run),
                        "--budget", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 3, p.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum("error" in r for r in lines) == 1 and sum("prediction" in r for r in lines) == 3
    folder = tmp_path / "folder"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    out_csv = tmp_path / "res.csv"
    p = subprocess.run(["bash", str(REPO / "scripts" / "classify_archive.sh"), str(folder), str(out_csv), "--model",
                        str(tiny_run), "--budget", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(out_csv.read_text().splitlines()) == 4 and not Path(str(out_csv) + ".partial").exists()
