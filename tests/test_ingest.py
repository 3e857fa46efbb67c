"""The ingest pipeline: bad inputs, lossless copies, HU/windows through the cache, privacy, resume,
no-op re-runs and conflicts, multi-frame/DICOMDIR/series sources, and CacheDataset."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import BAD_DICOM_REASONS, SAMPLE, stored_uids, write_bad_dicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from medclf.cli import app
from medclf.cli._common import run_app
from medclf.data import CacheDataset, open_cache, to_unit_float
from medclf.data.cache import SCALE
from medclf.data.ingest import IngestConfig, ingest
from medclf.errors import MedclfError
from medclf.io import read_image
from medclf.preprocessing import PreprocessConfig, preprocess

RSNA_DIR = SAMPLE / "rsna" / "stage_2_train"
PRE_FIELDS = {f.name for f in fields(PreprocessConfig)}


def run_ingest(src, out, **kw):
    """Ingest with size 32 and the data's own channels; preprocessing keywords (size, windows, channels,
    ...) go into the config's PreprocessConfig, the rest into IngestConfig."""
    pre = {"size": 32, "channels": None} | {k: kw.pop(k) for k in list(kw) if k in PRE_FIELDS}
    kw.setdefault("workers", 1)
    kw["preprocess"] = PreprocessConfig(**pre)
    srcs = src if isinstance(src, list) else [src]
    return ingest(IngestConfig(sources=[Path(s) for s in srcs], out=Path(out), **kw))


def tensors(cache) -> dict[str, np.ndarray]:
    ds = CacheDataset(cache)
    return {ds[i]["id"]: ds[i]["image"].numpy() for i in range(len(ds))}


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_are_listed_and_good_ones_cached(tmp_path, ct_writer):
    src = tmp_path / "mixed"
    for what in BAD_DICOM_REASONS:
        write_bad_dicom(src / f"{what}.dcm", what)
    shutil.copy(RSNA_DIR / "ID_6431af929.dcm", src / "ID_6431af929.dcm")  # the real dataset's truncated file
    good = [ct_writer(src / f"good{k}.dcm", np.full((24, 24), 1064 + k), patient=k) for k in range(2)]
    uid = "1.2.826.0.1.3680043.8.498.77"
    for k in range(3):  # a series, plus a file of another shape in it (a localiser): read as its own image
        ct_writer(src / "series" / f"s{k}.dcm", np.full((20, 20), 1024), ipp=(0, 0, 5.0 * k), series_uid=uid)
    ct_writer(src / "series" / "odd.dcm", np.full((12, 12), 1024), ipp=(0, 0, 15.0), series_uid=uid)
    write_bad_dicom(src / "series" / "s3.dcm", "truncated")  # a broken member of the series: listed, series kept
    bad = pydicom.dcmread(src / "series" / "s3.dcm", stop_before_pixels=True)
    bad.SeriesInstanceUID, bad.Rows, bad.Columns = uid, 20, 20
    bad.save_as(src / "series" / "s3.dcm")
    with open(src / "series" / "s3.dcm", "ab") as f:
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (800).to_bytes(4, "little") + b"\x00" * 100)  # PixelData cut short
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(src / "ok.png")
    Image.fromarray(np.zeros((4, 40), np.uint8)).save(src / "tiny.png")
    Image.fromarray(np.full((16, 16), np.nan, np.float32)).save(src / "nan.tif")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    from medclf.datasets import AdapterOptions, get_adapter

    plan = get_adapter("folder", [src]).plan([src], AdapterOptions(), lambda fn, xs: [fn(x) for x in xs])
    assert [len(u.paths) for u in plan.units if u.source == "series"] == [4]  # s3.dcm is read as part of the series
    res = run_ingest(src, tmp_path / "c", workers=2)
    info = open_cache(res.cache)
    lines = (res.cache / "errors.jsonl").read_text().splitlines()
    errors = [json.loads(line) for line in lines]
    assert all(set(e) == {"path", "reason"} and "\n" not in e["reason"] for e in errors)
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    for what, reason in BAD_DICOM_REASONS.items():
        assert reasons[f"{what}.dcm"].startswith(reason), (what, reasons[f"{what}.dcm"])
    assert reasons["ID_6431af929.dcm"] == "truncated pixel data"
    assert reasons["s3.dcm"] == "truncated pixel data"
    assert reasons["tiny.png"] == "image too small (4x40 pixels)"
    assert reasons["nan.tif"] == "image contains NaN or infinite values"
    assert reasons["broken.jpg"].startswith("not a readable image")
    assert len(errors) == len(reasons) == len(BAD_DICOM_REASONS) + 5 == res.n_failed == info.manifest["n_failed"]
    # the good inputs are all there, readable
    sources = sorted(it["source"] for it in info.items)
    assert sources == sorted([g.name for g in good] + ["ok.png", "series/odd.dcm", "series", "series", "series"])
    assert res.n_items == len(info.items) == 7
    assert all(v.shape == (3, 32, 32) for v in tensors(res.cache).values())


# ------------------------------------------------------------------- lossless copies, same tensors
def _mini_rsna(root: Path, patients: list[str], transform=None) -> Path:
    """An RSNA tree of the sample's slices of ``patients``, each file optionally re-encoded."""
    (root / "stage_2_train").mkdir(parents=True)
    keep = set()
    for f in sorted(RSNA_DIR.glob("ID_*.dcm")):
        ds = pydicom.dcmread(f)
        if str(ds.PatientID) in patients:
            keep.add(f.stem)
            if transform is None:
                shutil.copy(f, root / "stage_2_train" / f.name)
            else:
                transform(ds)
                ds.save_as(root / "stage_2_train" / f.name, enforce_file_format=True)
    rows = [l for l in (SAMPLE / "rsna" / "stage_2_train.csv").read_text().splitlines()[1:] if l.rsplit("_", 1)[0] in keep]
    (root / "stage_2_train.csv").write_text("ID,Label\n" + "\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_lossless_compressed_copies_ingest_to_identical_tensors(tmp_path, syntax):
    patients = ["PHID0000", "PHID0001", "PHID0002", "PHID0003"]  # signed/unsigned, 16/12 bits, two intercepts
    plain = _mini_rsna(tmp_path / "plain", patients)
    packed = _mini_rsna(tmp_path / "packed", patients, lambda ds: ds.compress(syntax, generate_instance_uid=False))
    f = next((packed / "stage_2_train").glob("*.dcm"))
    assert pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    a = run_ingest(plain, tmp_path / "a")
    b = run_ingest(packed, tmp_path / "b")
    assert a.n_items == b.n_items == 32 and a.n_failed == b.n_failed == 0
    ia, ib = open_cache(a.cache), open_cache(b.cache)
    assert ia.items == ib.items  # ids, labels, groups, splits, shapes: all equal
    ta, tb = tensors(a.cache), tensors(b.cache)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert len({v.tobytes() for v in ta.values()}) == 32  # and they are not all the same image


def test_pydicom_lossless_files_ingest_to_identical_tensors(tmp_path):
    outs = []
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        d = tmp_path / name.replace(".dcm", "")
        d.mkdir()
        shutil.copy(get_testdata_file(name), d / "image.dcm")
        outs.append(tensors(run_ingest(d, tmp_path / f"c_{name}").cache))
    assert all(len(o) == 1 for o in outs)
    ref = next(iter(outs[0].values()))
    assert ref.max() > ref.min()
    for o in outs[1:]:
        assert np.array_equal(next(iter(o.values())), ref)


# ------------------------------------------------------------------ HU and windows through the cache
def test_hu_and_windows_end_to_end(tmp_path, ct_writer):
    hu = np.array([-1000, -24, 0, 20, 40, 60, 80, 180], float)
    # RSNA's 12-bit unsigned quirk (intercept 0: HU stored modulo 4096) and plain signed storage
    quirk = np.tile(np.repeat(hu % 4096, 4), (32, 1))
    signed = np.tile(np.repeat(hu + 1024, 4), (32, 1))
    ct_writer(tmp_path / "src" / "quirk.dcm", quirk, signed=False, bits=12, intercept=0.0, patient=1)
    ct_writer(tmp_path / "src" / "signed.dcm", signed, signed=True, bits=16, intercept=-1024.0, patient=2)
    info = open_cache(run_ingest(tmp_path / "src", tmp_path / "c", windows=["brain", "subdural", "soft"]).cache)
    assert info.manifest["preprocessing"]["window_values"] == {"brain": [40, 80], "subdural": [80, 200], "soft": [40, 380]}
    want = np.stack([np.clip((hu - (c - w / 2)) / w, 0, 1) for c, w in ((40, 80), (80, 200), (40, 380))])
    # by hand: brain HU 0 -> 0, 40 -> 0.5, 80 -> 1; subdural HU 80 -> 0.5, 180 -> 1; soft HU 40 -> 0.5
    assert want[0, [2, 4, 6]].tolist() == [0.0, 0.5, 1.0] and want[1, [6, 7]].tolist() == [0.5, 1.0]
    assert want[2, 4] == 0.5
    for item_id, img in tensors(info).items():
        x = img.astype(np.float64) / SCALE
        assert np.abs(x[:, 5, ::4] - want).max() <= 1 / SCALE, item_id  # every 4th column: one HU each
        assert np.abs(x - np.repeat(want, 4, axis=1)[:, None, :]).max() <= 1 / SCALE
    ds = CacheDataset(info, dtype=torch.float32)
    assert ds[0]["image"][0, 0, 16].item() == pytest.approx(0.5, abs=1e-4)  # HU 40, brain window
    assert torch.allclose(to_unit_float(CacheDataset(info)[0]["image"]), ds[0]["image"])


# ----------------------------------------------------------------------------- other sources
def test_multiframe_dicomdir_and_series_sources(tmp_path, ct_writer):
    from pydicom.fileset import FileSet

    mf = tmp_path / "mf"
    mf.mkdir()
    shutil.copy(get_testdata_file("emri_small.dcm"), mf / "emri.dcm")
    info = open_cache(run_ingest(mf, tmp_path / "c_mf").cache)
    assert [it["id"].rsplit("/", 1)[1] for it in info.items] == [f"s{k:04d}" for k in range(10)]
    assert [it["slice"] for it in info.items] == list(range(10)) and len({it["unit"] for it in info.items}) == 1
    # exactly what the reader + preprocessing give, frame by frame, in stored order
    x, _ = preprocess(read_image(mf / "emri.dcm"), PreprocessConfig.from_dict(info.manifest["preprocessing"]))
    t = tensors(info)
    assert np.array_equal(np.stack([t[it["id"]] for it in info.items]), (x * SCALE + 0.5).astype(np.int16))
    # a DICOMDIR file-set: the DICOMDIR itself, or its folder, give the same ordered series
    uid = "1.2.826.0.1.3680043.8.498.55"
    fs = FileSet()
    for k, z in enumerate([10.0, 0.0, 5.0]):
        fs.add(pydicom.dcmread(ct_writer(tmp_path / "in" / f"{k}.dcm", np.full((16, 16), 1024 + 40 * k), ipp=(0, 0, z),
                                         series_uid=uid)))
    fs.write(tmp_path / "fs")
    by_file = open_cache(run_ingest(tmp_path / "fs" / "DICOMDIR", tmp_path / "c_dd", windows=["brain"]).cache)
    by_dir = open_cache(run_ingest(tmp_path / "fs", tmp_path / "c_dd2", windows=["brain"]).cache)
    assert len(by_file.items) == len(by_dir.items) == 3
    for info in (by_file, by_dir):
        vals = [round(float(v[0].mean()) / SCALE, 3) for v in tensors(info).values()]
        assert vals == [0.5, 1.0, 0.0]  # z order 0, 5, 10 -> HU 40, 80, 0 -> brain 0.5, 1, 0
        assert {it["orientation"] for it in info.items} == {"PLS"} and all("affine" in it for it in info.items)
        # an export's folders are patients/studies, not classes
        assert info.classes == [] and all(it["label"] is None for it in info.items)
    # the same when an export's folder is named after the patient (it must not become a class name)
    shutil.copytree(tmp_path / "fs", tmp_path / "cd" / "DOE^JOHN")
    shutil.move(tmp_path / "cd" / "DOE^JOHN" / "DICOMDIR", tmp_path / "cd" / "DICOMDIR")
    cd = run_ingest(tmp_path / "cd", tmp_path / "c_cd", windows=["brain"])
    assert "JOHN" not in (Path(cd.cache) / "manifest.json").read_text() and open_cache(cd.cache).classes == []


def test_nifti_lps_and_ras_copies_ingest_alike(tmp_path):
    import nibabel as nib

    src = nib.load(SAMPLE / "nifti" / "vol_003.nii.gz")
    data = np.asarray(src.dataobj)
    flip = np.array([[-1, 0, 0, data.shape[0] - 1], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(SAMPLE / "nifti" / "vol_003.nii.gz", tmp_path / "a" / "vol.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1]), src.affine @ flip), tmp_path / "b" / "vol.nii.gz")
    ta = tensors(run_ingest(tmp_path / "a", tmp_path / "ca").cache)
    tb = tensors(run_ingest(tmp_path / "b", tmp_path / "cb").cache)
    assert len(ta) == data.shape[2] and ta.keys() == tb.keys()
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)


# --------------------------------------------------------------------------------------- privacy
def test_no_phi_in_the_cache_or_the_console(rsna32):
    needles = {"PHANTOM", "PHID", "PHANTOM^NAME"} | stored_uids(RSNA_DIR)
    assert any(n.startswith("1950") and len(n) == 8 for n in needles)  # birth dates are among them
    assert len(needles) > 3 * 40  # study, series and SOP UIDs of every file
    files = [p for p in rsna32.cache.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"manifest.json", "items.jsonl", "errors.jsonl"} and any(p.suffix == ".bin" for p in files)
    console = [rsna32.json_run.stdout, rsna32.json_run.stderr, rsna32.table_run.stdout, rsna32.table_run.stderr]
    assert "ID_6431af929" in rsna32.table_run.stderr  # the console does report the failed file
    blobs = {str(p): p.read_bytes() for p in files} | {f"console{i}": text.encode() for i, text in enumerate(console)}
    for name, blob in blobs.items():  # every byte: names, IDs, full birth dates, raw UIDs
        for needle in sorted(needles):
            assert needle.encode() not in blob, (name, needle)
    # the bare year as well, in every text file and console line, once hashes (pseudonyms, fingerprints),
    # decimals (timings, spacings) and byte counts, which can spell "1950" by chance, are blanked out
    # (and the folders' own paths, e.g. /tmp/pytest-of-user/pytest-1950/)
    noise = re.compile(rb"\b[0-9a-f]{16}\b|[0-9]*\.[0-9]+(?:[eE][+-]?[0-9]+)?|\"size_bytes\": [0-9]+")
    for name, blob in blobs.items():
        if not name.endswith(".bin"):
            for path in (rsna32.cache.parent, SAMPLE):
                blob = blob.replace(str(path).encode(), b"#")
            assert b"1950" not in noise.sub(b"#", blob), name


# --------------------------------------------------------------------- resume, no-op, conflicts
def test_interrupted_ingest_resumes_to_the_uninterrupted_cache(tmp_path, monkeypatch, capsys, rsna32):
    import medclf.data.ingest as ing

    real, calls = ing.process_shard, []

    def crash_after_two(out, idx, units, pre):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(idx)
        return real(out, idx, units, pre)

    out = tmp_path / "cache"
    monkeypatch.setattr(ing, "process_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ingest(SAMPLE / "rsna", out, size=32, workers=1)
    assert calls == [0, 1]
    # never reads as complete
    assert not (out / "manifest.json").exists() and (out / ".ingest" / "plan.json").exists()
    with pytest.raises(MedclfError, match="--resume"):
        open_cache(out)
    with pytest.raises(MedclfError, match="manifest.json is missing"):
        CacheDataset(out)
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.bin")}
    assert sorted(done) == ["00000.bin", "00001.bin"]
    (out / "shards" / "00002.bin.tmp").write_bytes(b"half a shard")  # the crash left a partial shard behind

    def record(out_, idx, units, pre):
        calls.append(idx)
        return real(out_, idx, units, pre)

    calls.clear()
    monkeypatch.setattr(ing, "process_shard", record)
    rc = run_app(app, ["ingest", str(SAMPLE / "rsna"), "--out", str(out), "--size", "32", "--workers", "1", "--resume"])
    assert rc == 3, capsys.readouterr().err  # the sample's truncated file
    n_shards = len(json.loads((rsna32.cache / "manifest.json").read_text())["shards"])
    assert calls == list(range(2, n_shards)) and n_shards > 3  # finished shards are not redone ...
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.bin") if p.name in done} == done  # ... or rewritten
    assert not list(out.rglob("*.tmp")) and not (out / ".ingest").exists()
    # equal to the uninterrupted ingest (which ran with 2 worker processes)
    ref, got = open_cache(rsna32.cache), open_cache(out)
    assert got.manifest == ref.manifest
    assert got.items == ref.items
    assert (out / "errors.jsonl").read_text() == (rsna32.cache / "errors.jsonl").read_text()
    for shard in ref.manifest["shards"]:
        assert (out / shard["file"]).read_bytes() == (rsna32.cache / shard["file"]).read_bytes()


def test_interrupted_ingest_without_resume_starts_over(tmp_path, monkeypatch):
    import medclf.data.ingest as ing

    real = ing.process_shard

    def crash_on_second(out, idx, units, pre):
        if idx == 1:
            raise KeyboardInterrupt
        return real(out, idx, units, pre)

    src = SAMPLE / "isic"  # 80 images: two shards
    monkeypatch.setattr(ing, "process_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(src, tmp_path / "c")
    monkeypatch.setattr(ing, "process_shard", real)
    with pytest.raises(MedclfError, match="other inputs/preprocessing"):
        run_ingest(src, tmp_path / "c", size=24, resume=True)  # resuming with other arguments is refused
    res = run_ingest(src, tmp_path / "c")  # without --resume: from scratch
    ref = run_ingest(src, tmp_path / "ref")
    assert open_cache(res.cache).items == open_cache(ref.cache).items
    assert tensors(res.cache).keys() == tensors(ref.cache).keys()


def test_same_arguments_again_is_a_noop(rsna32):
    before = snapshot(rsna32.cache)
    res = run_ingest(SAMPLE / "rsna", rsna32.cache, size=32, workers=2)
    assert res.up_to_date and res.n_items == 320 and res.n_failed == 1
    assert snapshot(rsna32.cache) == before  # not a byte or an mtime changed
    res = run_ingest(SAMPLE / "rsna", rsna32.cache, size=32, workers=1, resume=True)  # --resume on a complete cache
    assert res.up_to_date and snapshot(rsna32.cache) == before
    assert "up to date" in rsna32.table_run.stdout  # the CLI's second run said so
    assert res.files_per_s is None and res.to_dict()["files_per_s"] is None


def test_uncertain_policy_is_checked_and_noted_where_it_does_nothing(tmp_path):
    with pytest.raises(MedclfError, match="unknown --uncertain policy 'sometimes'"):
        run_ingest(SAMPLE / "isic", tmp_path / "c0", size=16, uncertain="sometimes")
    res = run_ingest(SAMPLE / "isic", tmp_path / "c1", size=16, uncertain="ones")
    assert any("--uncertain ones has no effect on isic" in n for n in res.notes)


def test_other_arguments_into_the_same_out(tmp_path):
    src = SAMPLE / "isic"
    first = run_ingest(src, tmp_path / "c", size=32)
    before = snapshot(first.cache)
    for kw in ({"size": 24}, {"seed": 1}, {"windows": ["brain"], "intensity": "hu"}):
        with pytest.raises(MedclfError, match="different inputs/preprocessing.*--overwrite"):
            run_ingest(src, tmp_path / "c", **kw)
    assert snapshot(first.cache) == before
    # changing an input file changes the fingerprint too
    (tmp_path / "src").mkdir()
    shutil.copytree(src, tmp_path / "src" / "isic")
    run_ingest(tmp_path / "src" / "isic", tmp_path / "c2")
    img = next((tmp_path / "src" / "isic" / "ISIC_2019_Training_Input").glob("*.jpg"))
    img.write_bytes(img.read_bytes() + b"\x00")
    with pytest.raises(MedclfError, match="different inputs"):
        run_ingest(tmp_path / "src" / "isic", tmp_path / "c2")
    res = run_ingest(src, tmp_path / "c", size=24, overwrite=True)
    assert not res.up_to_date and open_cache(res.cache).shape == (3, 24, 24)
    assert len(list((res.cache / "shards").glob("*.bin"))) == len(open_cache(res.cache).manifest["shards"])


def test_refuses_a_folder_that_is_not_a_cache(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(MedclfError, match="not a medclf cache"):
        run_ingest(SAMPLE / "isic", mine)
    with pytest.raises(MedclfError, match="not a medclf cache"):
        run_ingest(SAMPLE / "isic", mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedclfError, match="not a folder"):
        run_ingest(SAMPLE / "isic", tmp_path / "file")
    with pytest.raises(MedclfError, match="source not found"):
        run_ingest(tmp_path / "nope", tmp_path / "c")


def test_cache_format_versions_are_checked(tmp_path):
    res = run_ingest(SAMPLE / "isic", tmp_path / "c", size=16)
    mf = res.cache / "manifest.json"
    m = json.loads(mf.read_text())
    for fmt, words in ((m["format"] - 1, "older"), (m["format"] + 1, "newer")):
        mf.write_text(json.dumps({**m, "format": fmt}))
        with pytest.raises(MedclfError, match=words):
            open_cache(res.cache)
    with pytest.raises(MedclfError, match="cache not found"):
        open_cache(tmp_path / "nope")


# ------------------------------------------------------------ eval: raw data with the run's preprocessing
def test_eval_reingests_a_raw_folder_with_the_runs_whole_preprocessing(tmp_path, monkeypatch):
    """``cache_for`` (``eval`` on a raw dataset) ingests with all of the run's preprocessing, the
    percentiles, keep_aspect and reducing_gap too (once dropped: other tensors than in training)."""
    from medclf.evaluation.evaluate import cache_for

    rng = np.random.default_rng(5)
    raw = tmp_path / "raw"
    for k in range(6):  # grey, non-square, 40 -> 16 px (2.5x): each setting changes the pixels
        (raw / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 28)).astype(np.uint8)).save(raw / "ab"[k % 2] / f"{k}.png")
    trained = run_ingest(raw, tmp_path / "train", dataset="folder", size=16, percentiles=(2.0, 98.0),
                         keep_aspect=False, reducing_gap=None)
    tm = open_cache(trained.cache).manifest
    assert (tm["preprocessing"]["percentiles"], tm["preprocessing"]["keep_aspect"],
            tm["preprocessing"]["reducing_gap"]) == ([2.0, 98.0], False, None)
    want, plain = tensors(trained.cache), tensors(run_ingest(raw, tmp_path / "plain", dataset="folder", size=16).cache)
    assert plain.keys() == want.keys() and all(not np.array_equal(plain[k], want[k]) for k in want)  # settings matter

    monkeypatch.setenv("MEDCLF_CACHE", str(tmp_path / "caches"))
    run_config = {"preprocessing": tm["preprocessing"], "shape": tm["shape"], "split_seed": 0}  # as finetune records it
    info = cache_for(run_config, "folder", raw, workers=1)
    assert info.path.parent == tmp_path / "caches"
    assert info.manifest["preprocessing"] == tm["preprocessing"]
    assert info.manifest["preprocessing_fingerprint"] == tm["preprocessing_fingerprint"]
    assert info.manifest["fingerprint"] == tm["fingerprint"]
    assert {k: v.tolist() for k, v in tensors(info).items()} == {k: v.tolist() for k, v in want.items()}


# ---------------------------------------------------------------------------------- CacheDataset
def test_cache_dataset(rsna32):
    info = open_cache(rsna32.cache)
    counts = info.manifest["counts"]
    total = 0
    for split in ("train", "val", "test"):
        ds = CacheDataset(rsna32.cache, split=split)
        want = [it for it in info.items if it["split"] == split]
        assert len(ds) == len(want) == sum(counts[split].values()) > 0
        assert [ds[i]["id"] for i in range(len(ds))] == [it["id"] for it in want]
        assert ds.targets.tolist() == [it["label"] for it in want]
        total += len(ds)
    assert total == len(CacheDataset(rsna32.cache)) == 320
    ds = CacheDataset(rsna32.cache, split="train")
    item = ds[3]
    assert set(item) == {"image", "label", "labels", "index", "id"} and item["index"] == 3
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.int16
    assert 0 <= int(item["image"].min()) and int(item["image"].max()) <= SCALE and item["image"].max() > item["image"].min()
    assert item["label"] == ds.items[3]["label"] and item["labels"].dtype == torch.float32
    assert item["labels"].tolist() == ds.items[3]["labels"] and item["labels"][5].item() == item["label"]
    f = CacheDataset(rsna32.cache, split="train", dtype=torch.float32)[3]["image"]
    assert f.dtype == torch.float32 and 0.0 <= f.min() and f.max() <= 1.0
    assert torch.allclose(f, item["image"].float() / SCALE)
    assert torch.equal(to_unit_float(item["image"]), f)
    # picklable after use (a memmap must not travel to workers), and a DataLoader with 2 workers sees every item once
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3]["image"], item["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, shuffle=False)
    ids, labels = [], []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype == torch.int16
        assert batch["labels"].shape[1] == 6
        ids += batch["id"]
        labels += batch["label"].tolist()
    assert ids == [it["id"] for it in ds.items] and labels == ds.targets.tolist()
    assert len(CacheDataset(rsna32.cache, transform=lambda x: x[:1])[0]["image"]) == 1


def test_cache_dataset_unlabeled_and_multilabel_nan(tmp_path, trees):
    (tmp_path / "flat").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    ds = CacheDataset(run_ingest(tmp_path / "flat", tmp_path / "c_flat").cache)
    assert [ds[i]["label"] for i in range(3)] == [-1, -1, -1] and torch.isnan(ds[0]["labels"]).all()
    assert len(CacheDataset(ds.info, labelled_only=True)) == 0
    t = trees.chexpert(tmp_path / "cx", n_train=3, n_valid=1)
    mixed = CacheDataset(run_ingest(t["root"], tmp_path / "c_mixed", uncertain="mixed").cache)
    ignore = CacheDataset(run_ingest(t["root"], tmp_path / "c_ignore", uncertain="ignore").cache)
    assert not torch.isnan(torch.stack([mixed[i]["labels"] for i in range(len(mixed))])).any()
    nan = torch.isnan(torch.stack([ignore[i]["labels"] for i in range(len(ignore))]))
    raw = dict(t["train"] + t["valid"])
    assert nan.tolist() == [[v == "-1.0" for v in raw[it["source"]]] for it in ignore.items] and nan.any()


def test_batched_reads_equal_item_reads(rsna_cache):
    """``__getitems__`` + ``collate`` (one copy per image) give exactly what indexing + default collate give."""
    import torch
    from torch.utils.data import DataLoader

    from medclf.data import CacheDataset, collate

    ds = CacheDataset(rsna_cache)
    order = [17, 3, 250, 4, 99, 0, 31, 8, 200, 12]
    fast = list(DataLoader(ds, batch_size=4, sampler=order, collate_fn=collate))
    ref = list(DataLoader(ds, batch_size=4, sampler=order))
    assert len(fast) == len(ref) == 3
    for a, b in zip(fast, ref):
        assert a["image"].dtype == torch.int16 and torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"]) and a["id"] == b["id"]
        assert torch.equal(torch.nan_to_num(a["labels"], -7.0), torch.nan_to_num(b["labels"], -7.0))
    assert torch.equal(fast[0]["image"][1], ds[3]["image"])
    floats = CacheDataset(rsna_cache, dtype=torch.float32)  # transforms/dtypes fall back to per-item reads
    want = torch.stack([ds[3]["image"], ds[4]["image"]]).float() / 32767
    assert torch.allclose(collate(floats.__getitems__([3, 4]))["image"], want)
