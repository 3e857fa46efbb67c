"""Adapters, the ingest pipeline (errors, privacy, resume, no-op re-runs), CacheDataset and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from _trees import make_chexpert_tree, make_ham_tree, make_medmnist
from PIL import Image
from typer.testing import CliRunner

from medclf.cli import app
from medclf.data import CacheDataset, open_cache, to_unit_float
from medclf.data.ingest import IngestConfig, ingest
from medclf.datasets import detect_dataset
from medclf.errors import MedclfError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
runner = CliRunner()


def _ingest(src, out, **kw):
    kw.setdefault("size", 16)
    kw.setdefault("workers", 1)
    return ingest(IngestConfig(sources=[Path(s) for s in (src if isinstance(src, list) else [src])], out=out, **kw))


def _splits_by_group(cache) -> dict[str, set]:
    out: dict[str, set] = {}
    for it in open_cache(cache).items:
        out.setdefault(it["group"], set()).add(it["split"])
    return out


# ------------------------------------------------------------------------------------- adapters
def test_auto_detection(tmp_path):
    assert detect_dataset([SAMPLE / "rsna"]) == "rsna-ich"
    assert detect_dataset([SAMPLE / "isic"]) == "isic"
    assert detect_dataset([make_chexpert_tree(tmp_path / "cx", 4)]) == "chexpert"
    assert detect_dataset([make_ham_tree(tmp_path / "ham", 4)]) == "ham10000"
    assert detect_dataset([make_medmnist(tmp_path / "x.npz")]) == "medmnist"
    assert detect_dataset([SAMPLE / "nifti" / "labels.csv"]) == "csv"
    assert detect_dataset([SAMPLE / "nifti"]) == "folder"


def test_rsna_sample(rsna_cache):
    info = open_cache(rsna_cache)
    m = info.manifest
    assert m["dataset"] == "rsna-ich" and m["classes"] == ["normal", "haemorrhage"] and len(m["label_names"]) == 6
    assert m["n_items"] == 320 and m["n_failed"] == 1
    assert any("duplicate" in n for n in m["notes"])
    assert info.errors()[0]["path"].endswith("ID_6431af929.dcm") and info.errors()[0]["reason"] == "truncated pixel data"
    assert all(len(s) == 1 for s in _splits_by_group(rsna_cache).values())  # no patient straddles splits
    assert {"train", "val", "test"} == {it["split"] for it in info.items}
    for it in info.items:
        assert it["label"] == it["labels"][5]  # primary label = "any"


@pytest.mark.parametrize("policy,edema", [("ones", 1.0), ("zeros", 0.0), ("ignore", None), ("mixed", 1.0)])
def test_chexpert_uncertain_policies(tmp_path, policy, edema):
    root = make_chexpert_tree(tmp_path / "cx", 12)
    res = _ingest(root, tmp_path / "c", uncertain=policy)
    info = open_cache(res.cache)
    edema_idx = info.label_names.index("Edema")
    row = next(it for it in info.items if "patient00002/study1/view1_frontal" in it["source"])  # i % 5 == 1: Edema -1
    assert row["labels"][edema_idx] == edema
    assert info.manifest["options"]["uncertain"] == policy
    assert sum(it["split"] == "test" for it in info.items) == 3  # valid.csv
    train_rows = [it for it in info.items if it["split"] != "test"]
    assert {it["split"] for it in train_rows} == {"train", "val"}  # train.csv: patient-grouped train/val
    for g in {it["group"] for it in train_rows}:
        assert len({it["split"] for it in train_rows if it["group"] == g}) == 1
    if policy == "ignore":
        ds = CacheDataset(res.cache)
        assert torch.isnan(ds[ds.items.index(row)]["labels"][edema_idx])


def test_chexpert_effusion_preset(tmp_path):
    res = _ingest(make_chexpert_tree(tmp_path / "cx", 24), tmp_path / "c", dataset="chexpert-effusion")
    info = open_cache(res.cache)
    assert info.classes == ["no_finding", "pleural_effusion"]
    assert all("study1/view1_frontal" in it["source"] for it in info.items)
    labels = [it["label"] for it in info.items]
    assert labels.count(0) == labels.count(1) == 12


def test_isic_2019_and_2020(tmp_path):
    from medclf.synthetic import make_isic_tree

    a = open_cache(_ingest(SAMPLE / "isic", tmp_path / "a").cache)
    assert a.classes[:2] == ["MEL", "NV"] and "UNK" not in a.classes and a.manifest["n_items"] == 80
    assert any(it["id"].endswith("_downsampled") for it in a.items)
    assert all(len(s) == 1 for s in _splits_by_group(a.path).values())  # lesions kept together
    root = make_isic_tree(tmp_path / "isic2020", n=30, year=2020)
    b = open_cache(_ingest(root, tmp_path / "b").cache)
    assert b.classes == ["benign", "melanoma"] and b.manifest["n_items"] == 30


def test_ham10000(tmp_path):
    info = open_cache(_ingest(make_ham_tree(tmp_path / "ham", 20), tmp_path / "c").cache)
    assert info.manifest["n_items"] == 20 and info.classes[0] == "akiec"
    assert any("de-duplicated" in n for n in info.manifest["notes"])
    assert all(len(s) == 1 for s in _splits_by_group(info.path).values())


@pytest.mark.parametrize("rgb,multilabel", [(False, False), (True, False), (False, True)])
def test_medmnist_keeps_official_splits(tmp_path, rgb, multilabel):
    info = open_cache(_ingest(make_medmnist(tmp_path / "m.npz", rgb, multilabel), tmp_path / "c", size=28).cache)
    counts = {s: sum(it["split"] == s for it in info.items) for s in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 4, "test": 6}
    assert info.shape == ((3 if rgb else 1), 28, 28)
    if multilabel:
        assert len(info.label_names) == 3 and not info.classes
    else:
        assert info.classes == ["0", "1", "2", "3"]
    ds = CacheDataset(info, split="test", dtype=torch.float32)
    raw = np.load(tmp_path / "m.npz")["test_images"][0].astype(np.float32) / (255.0 if rgb else 1.0)
    img = ds[0]["image"].numpy()
    if rgb:
        assert np.allclose(img.transpose(1, 2, 0), raw, atol=2e-3)


def test_folder_per_class_unlabeled_and_csv(tmp_path):
    for cls in ("cat_a", "cat_b"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(tmp_path / "f" / cls / f"{i}.png")
    (tmp_path / "f" / "readme.txt").write_text("ignore me")
    info = open_cache(_ingest(tmp_path / "f", tmp_path / "c1").cache)
    assert info.classes == ["cat_a", "cat_b"] and info.manifest["n_items"] == 6
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(tmp_path / "f" / "cat_a" / "0.png", flat / "x.png")
    assert open_cache(_ingest(flat, tmp_path / "c2").cache).manifest["task"] == "unlabeled"
    csv = tmp_path / "f" / "list.csv"
    csv.write_text("path,label,split,group\ncat_a/0.png,no,train,p1\ncat_a/1.png,yes,test,p2\ncat_b/0.png,yes,train,p1\n")
    info = open_cache(_ingest(csv, tmp_path / "c3").cache)
    assert info.classes == ["no", "yes"] and [it["split"] for it in info.items] == ["train", "test", "train"]


def test_nifti_folder_with_labels_csv(tmp_path):
    info = open_cache(_ingest(SAMPLE / "nifti", tmp_path / "c", labels=SAMPLE / "nifti" / "labels.csv").cache)
    assert info.classes == ["haemorrhage", "normal"]
    assert {it["orientation"] for it in info.items} == {"PLS"} and all("affine" in it for it in info.items)
    assert info.manifest["n_items"] == sum(1 for it in info.items)


def test_dicom_folder_groups_series(tmp_path):
    src = tmp_path / "dcm"
    src.mkdir()
    files = sorted((SAMPLE / "rsna" / "stage_2_train").glob("ID_*.dcm"))[:40]
    for f in files:
        shutil.copy(f, src / f.stem)  # archives often drop the suffix
    info = open_cache(_ingest(src, tmp_path / "c").cache)
    units = {it["unit"] for it in info.items}
    series = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files if f.stem != "ID_6431af929"}
    assert len(units) == len(series)


# ------------------------------------------------------------------------------------ pipeline
def test_bad_files_are_listed_and_good_ones_cached(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    good = sorted((SAMPLE / "rsna" / "stage_2_train").glob("ID_*.dcm"))[:3]
    for f in good:
        shutil.copy(f, src / f.name)
    shutil.copy(SAMPLE / "rsna" / "stage_2_train" / "ID_6431af929.dcm", src / "trunc.dcm")
    (src / "text.dcm").write_text("not dicom")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(src / "tiny.png")
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "c"), "--size", "16", "--workers", "2"])
    assert res.exit_code == 3, res.output
    info = open_cache(tmp_path / "c")
    reasons = {Path(e["path"]).name: e["reason"] for e in info.errors()}
    assert reasons["trunc.dcm"] == "truncated pixel data"
    assert reasons["text.dcm"].startswith("not a DICOM file")
    assert reasons["tiny.png"].startswith("image too small")
    assert info.manifest["n_items"] >= 1 and info.manifest["n_failed"] == 3


def test_no_phi_anywhere(rsna_cache, tmp_path):
    uids = set()
    for f in (SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, str(ds.PatientID), str(ds.PatientName)}
    res = runner.invoke(app, ["ingest", str(SAMPLE / "rsna"), "--out", str(rsna_cache), "--size", "16", "--json"])
    blobs = [res.output.encode()]
    blobs += [p.read_bytes() for p in Path(rsna_cache).rglob("*") if p.is_file()]
    needles = [b"PHANTOM", b"PHID", b"1950"] + [u.encode() for u in uids]
    for blob in blobs:
        for n in needles:
            assert n not in blob, n


def test_rerun_is_a_noop_and_conflicts_are_refused(rsna_cache, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in Path(rsna_cache).rglob("*") if p.is_file()}
    res = _ingest(SAMPLE / "rsna", rsna_cache, workers=2)
    assert res.up_to_date
    assert before == {p: p.stat().st_mtime_ns for p in Path(rsna_cache).rglob("*") if p.is_file()}
    with pytest.raises(MedclfError, match="different"):
        _ingest(SAMPLE / "rsna", rsna_cache, size=24)
    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "mine.txt").write_text("keep")
    with pytest.raises(MedclfError, match="not a medclf cache"):
        _ingest(SAMPLE / "isic", tmp_path / "notacache")


def test_interrupted_ingest_resumes_to_the_same_cache(tmp_path, monkeypatch):
    import medclf.data.ingest as ing

    ref = open_cache(_ingest(SAMPLE / "isic", tmp_path / "ref").cache)
    real, calls = ing.process_shard, []

    def crash_after_1(*a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(ing, "process_shard", crash_after_1)
    with pytest.raises(KeyboardInterrupt):
        _ingest(SAMPLE / "isic", tmp_path / "c")
    with pytest.raises(MedclfError, match="--resume"):
        open_cache(tmp_path / "c")  # never reads as complete
    monkeypatch.setattr(ing, "process_shard", real)
    done = {p.name for p in (tmp_path / "c" / "shards").glob("*.bin")}
    assert len(done) == 1
    res = _ingest(SAMPLE / "isic", tmp_path / "c", resume=True)
    assert not res.up_to_date
    got = open_cache(res.cache)
    assert [it["id"] for it in got.items] == [it["id"] for it in ref.items]
    a, b = CacheDataset(ref), CacheDataset(got)
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"])


def test_cache_dataset_and_dataloader(rsna_cache):
    ds = CacheDataset(rsna_cache, split="train")
    assert len(ds) == sum(it["split"] == "train" for it in open_cache(rsna_cache).items)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.int16  # as stored
    assert CacheDataset(rsna_cache, split="train", dtype=torch.float32)[0]["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 32767 and item["label"] in (0, 1)
    unit = to_unit_float(item["image"])
    assert unit.dtype == torch.float32 and 0 <= unit.min() and unit.max() <= 1
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    n = sum(len(b["image"]) for b in loader)
    assert n == len(ds)


# --------------------------------------------------------------------------------------- CLI
def test_cli_help_does_not_import_torch():
    code = ("import sys; from medclf.cli import app, main; sys.argv=['medclf','ingest','--help']\n"
            "try:\n main()\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'heavy import at start-up'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "--window" in p.stdout


def test_version_and_errors_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "medclf", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("medclf ")
    p = subprocess.run([sys.executable, "-m", "medclf", "ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "c")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "source not found" in p.stderr and str(tmp_path / "nope") in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([sys.executable, "-m", "medclf", "--debug", "ingest", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "c")], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_json_summary(tmp_path):
    res = runner.invoke(app, ["ingest", str(SAMPLE / "isic"), "--out", str(tmp_path / "c"), "--size", "16", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["n_items"] == 80 and d["n_failed"] == 0 and d["files_per_s"] > 0 and d["counts"]["train"]


def test_caches_of_other_formats_are_refused(tmp_path):
    res = _ingest(SAMPLE / "isic", tmp_path / "c")
    mf = Path(res.cache) / "manifest.json"
    m = json.loads(mf.read_text())
    for fmt, words in ((m["format"] - 1, "older"), (m["format"] + 1, "newer")):
        mf.write_text(json.dumps({**m, "format": fmt}))
        with pytest.raises(MedclfError, match=words):
            open_cache(res.cache)
