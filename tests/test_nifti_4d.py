"""4-D NIfTI (fMRI, multi-volume series): each volume read as a 3-D image, its slices cached as items
(with their volume index), all volumes of one file in one split; classify rows per (volume, slice);
5-D and up, vector/matrix intents and complex data refused with a reason."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli
from medclf.data import CacheDataset
from medclf.data.ingest import IngestConfig, ingest
from medclf.errors import ReadError
from medclf.io import NiftiVolumes, nifti_volume_count, read_image, read_volumes
from medclf.preprocessing import PreprocessConfig

SHAPE = (16, 16, 4, 3)  #: X, Y, Z, T


def _series(seed: int = 0) -> np.ndarray:
    """(16, 16, 4, 3) grey values (no HU): every volume a different pattern and level."""
    rng = np.random.default_rng(seed)
    data = np.empty(SHAPE, np.float32)
    for t in range(SHAPE[3]):
        data[..., t] = rng.normal(100.0 * (t + 1), 10.0 * (t + 1), size=SHAPE[:3])
        data[2 + 4 * t : 5 + 4 * t, 3:9, :, t] += 300.0  # a bright block that moves from volume to volume
    return data


def _save(path: Path, data: np.ndarray, cls=nib.Nifti1Image, intent: str | None = None) -> Path:
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    img = cls(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    if intent:
        img.header.set_intent(intent)
    nib.save(img, path)
    return path


def _items(cache: Path) -> list[dict]:
    return [json.loads(line) for line in (cache / "items.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ reader
@pytest.mark.parametrize("cls", [nib.Nifti1Image, nib.Nifti2Image])
def test_each_volume_reads_like_the_3d_file_of_it(tmp_path, cls):
    data = _series()
    path = _save(tmp_path / "func.nii.gz", data, cls)
    assert nifti_volume_count(path) == 3
    vols = list(read_volumes(path))
    assert [v.meta["volume"] for v in vols] == [0, 1, 2] and {v.meta["n_volumes"] for v in vols} == {3}
    for t, v in enumerate(vols):
        ref = read_image(_save(tmp_path / f"v{t}.nii.gz", np.ascontiguousarray(data[..., t]), cls))
        assert v.array.shape == (4, 16, 16, 1) and np.array_equal(v.array, ref.array)
        assert np.allclose(v.affine, ref.affine) and v.kind == ref.kind == "mono"
        assert v.meta["original_shape"] == [16, 16, 4] and v.meta["file_shape"] == list(SHAPE)
    assert not np.array_equal(vols[0].array, vols[1].array)
    # a volume on its own, and the whole file refused by the one-image reader (which volume?)
    assert np.array_equal(NiftiVolumes(path).read(2).array, vols[2].array)
    with pytest.raises(ReadError, match="holds 3 volumes"):
        read_image(path)
    # a trailing singleton 5th axis is still a 4-D series; a singleton 4th axis a 3-D volume
    five = _save(tmp_path / "t1.nii", data[..., None])
    assert nifti_volume_count(five) == 3 and np.array_equal(list(read_volumes(five))[1].array, vols[1].array)
    assert read_image(_save(tmp_path / "one.nii", data[..., :1])).array.shape == (4, 16, 16, 1)


def test_volumes_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Only the volume asked for leaves the file (nibabel slices the proxy; no full 4-D array)."""
    from nibabel.arrayproxy import ArrayProxy

    path = _save(tmp_path / "func.nii.gz", _series())
    reads = []
    real = ArrayProxy.__getitem__

    def spy(self, key):
        out = real(self, key)
        reads.append(out.shape)
        return out

    monkeypatch.setattr(ArrayProxy, "__getitem__", spy)
    monkeypatch.setattr(ArrayProxy, "__array__", lambda *a, **k: pytest.fail("the whole 4-D array was read"))
    assert len(list(read_volumes(path))) == 3
    assert reads == [(16, 16, 4)] * 3


def test_5d_vector_and_complex_files_are_refused_with_a_reason(tmp_path):
    data = _series()
    refused = {
        "five_d.nii.gz": (_save(tmp_path / "five_d.nii.gz", np.stack([data, data], axis=-1)), r"unsupported NIfTI shape \(16, 16, 4, 3, 2\) \(5-D"),
        "vector.nii.gz": (_save(tmp_path / "vector.nii.gz", data, intent="vector"), "intent 'vector'"),
        "complex.nii": (_save(tmp_path / "complex.nii", data.astype(np.complex64)), "complex-valued NIfTI"),
    }
    for name, (path, why) in refused.items():
        with pytest.raises(ReadError, match=why):
            nifti_volume_count(path)
        with pytest.raises(ReadError, match=why):
            read_image(path)


# ------------------------------------------------------------------------------------------ ingest
def test_4d_ingests_every_volume_into_one_split(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    data = _series()
    _save(raw / "func.nii.gz", data)
    for t in range(SHAPE[3]):  # each volume also as a 3-D file (other groups, and the pixel reference)
        _save(raw / f"vol{t}.nii.gz", np.ascontiguousarray(data[..., t]))
    for k in range(4):  # more groups, so that the split has something to split
        _save(raw / f"other{k}.nii.gz", _series(seed=10 + k)[..., 0])
    _save(raw / "five_d.nii.gz", np.stack([data, data], axis=-1))
    for seed in range(3):
        out = tmp_path / f"cache{seed}"
        res = ingest(IngestConfig(sources=[raw], out=out, seed=seed, workers=1,
                                  preprocess=PreprocessConfig(size=16, channels=None)))
        assert res.n_units == 9 and res.n_failed == 1
        assert "5-D" in res.errors[0]["reason"] and Path(res.errors[0]["path"]).name == "five_d.nii.gz"
        items = _items(out)
        func = [it for it in items if it["source"] == "func.nii.gz"]
        assert len(func) == 12  # 3 volumes x 4 slices
        assert sorted((it["volume"], it["slice"]) for it in func) == [(t, s) for t in range(3) for s in range(4)]
        assert {it["n_volumes"] for it in func} == {3} and len({it["id"] for it in func}) == 12
        assert len({it["unit"] for it in func}) == 1 and len({it["group"] for it in func}) == 1
        assert len({it["split"] for it in func}) == 1, {it["split"] for it in func}  # never across train/test
        assert len({it["split"] for it in items}) > 1  # ... while the other files were split
        assert all("volume" not in it for it in items if it["source"] != "func.nii.gz")
    # pixels: volume t's slices are exactly the 3-D file of volume t's, and volumes differ
    ds = CacheDataset(out)
    px = {}
    for i, it in enumerate(ds.items):
        if it["source"] == "func.nii.gz":
            px[(it["volume"], it["slice"])] = ds[i]["image"].numpy()
        elif it["source"].startswith("vol"):
            px[(f"ref{it['source'][3]}", it["slice"])] = ds[i]["image"].numpy()
    for t in range(3):
        for s in range(4):
            assert np.array_equal(px[(t, s)], px[(f"ref{t}", s)]), (t, s)
    assert not np.array_equal(px[(0, 0)], px[(1, 0)]) and not np.array_equal(px[(1, 0)], px[(2, 0)])


def test_a_4d_file_that_fails_part_way_leaves_no_items(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    data = _series()
    data[..., 2] = np.nan  # the last volume has no finite voxel: the file fails as a whole
    _save(raw / "bad.nii", data)
    _save(raw / "good.nii", _series(seed=1))
    res = ingest(IngestConfig(sources=[raw], out=tmp_path / "cache", workers=1,
                              preprocess=PreprocessConfig(size=16, channels=None)))
    assert [(Path(e["path"]).name, e["reason"]) for e in res.errors] == [("bad.nii", "NIfTI volume 2 has no finite voxel "
                                                                          "(all NaN or infinite)")]
    items = _items(tmp_path / "cache")
    assert {it["source"] for it in items} == {"good.nii"} and len(items) == 12
    assert sorted(it["offset"] for it in items) == list(range(12))  # nothing of bad.nii left in the shard
    ds = CacheDataset(tmp_path / "cache")
    assert len(ds) == 12 and ds[11]["image"].shape == (1, 16, 16)


# ------------------------------------------------------------------------------------------ classify
def test_classify_a_4d_file_rows_per_volume_and_slice(tiny_run, tmp_path):
    path = _save(tmp_path / "func.nii.gz", _series())
    r = run_cli("classify", path, "--model", tiny_run, "--json", "--budget", "2", check_rc=0)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(row["volume"], row["slice"]) for row in rows] == [(t, s) for t in range(3) for s in range(4)]
    assert {row["input"] for row in rows} == {str(path)} and all("prediction" in row for row in rows)
    # a folder holding it (and a 3-D file) is read alike; the table prints too
    d = tmp_path / "folder"
    d.mkdir()
    _save(d / "func.nii.gz", _series())
    _save(d / "anat.nii.gz", _series(seed=4)[..., 0])
    r = run_cli("classify", d, "--model", tiny_run, "--json", "--budget", "2", check_rc=0)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    by_input = defaultdict(list)
    for row in rows:
        by_input[Path(row["input"]).name].append(row)
    assert len(by_input["func.nii.gz"]) == 12 and {row["volume"] for row in by_input["func.nii.gz"]} == {0, 1, 2}
    assert len(by_input["anat.nii.gz"]) == 4 and all("volume" not in row for row in by_input["anat.nii.gz"])
    table = run_cli("classify", path, "--model", tiny_run, "--budget", "2", check_rc=0, env={**os.environ, "COLUMNS": "250"})
    assert "Traceback" not in table.stderr and "volume" in table.stdout.splitlines()[1]
    import csv

    out = run_cli("classify", path, "--model", tiny_run, "--budget", "2", "--csv", check_rc=0).stdout
    got = list(csv.DictReader(out.splitlines()))
    assert [(int(row["volume"]), int(row["slice"])) for row in got] == [(t, s) for t in range(3) for s in range(4)]


def test_classify_refuses_5d_and_explain_refuses_4d_once_per_file(tiny_run, tmp_path):
    good = _save(tmp_path / "func.nii.gz", _series())
    five = _save(tmp_path / "five_d.nii.gz", np.stack([_series(), _series()], axis=-1))
    r = run_cli("classify", five, good, "--model", tiny_run, "--json", "--budget", "2", check_rc=3)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    errors = [x for x in lines if "error" in x]
    assert [(Path(e["input"]).name, "5-D" in e["error"]) for e in errors] == [("five_d.nii.gz", True)]
    assert len([x for x in lines if "prediction" in x]) == 12
    r = run_cli("explain", good, "--model", tiny_run, "--out", tmp_path / "maps", "--budget", "2", check_rc=3)
    assert r.stderr.count("explain does not support 4-D NIfTI") == 1, r.stderr
