"""Dataset adapters on look-alike trees laid out as the public datasets ship (shared/DATASETS.md),
auto-detection, and the labels, groups and splits they put in the cache."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import CHEXPERT_OBS, HAM_DX, SAMPLE, copy_tree
from PIL import Image

from medclf.data import CacheDataset, open_cache
from medclf.data.ingest import IngestConfig, ingest
from medclf.datasets import AdapterOptions, detect_dataset, get_adapter
from medclf.errors import MedclfError
from medclf.preprocessing import PreprocessConfig
from medclf.privacy import pseudonym

PRE_FIELDS = {f.name for f in fields(PreprocessConfig)}
SUBTYPES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]


def serial(fn, xs):
    return [fn(x) for x in xs]


def plan(name: str, src: Path, **opts):
    return get_adapter(name, [src]).plan([src], AdapterOptions(**opts), serial)


def run_ingest(src, out, **kw):
    """Ingest with size 32 and the data's own channels; preprocessing keywords (size, windows, channels,
    ...) go into the config's PreprocessConfig, the rest into IngestConfig."""
    pre = {"size": 32, "channels": None} | {k: kw.pop(k) for k in list(kw) if k in PRE_FIELDS}
    kw.setdefault("workers", 1)
    kw["preprocess"] = PreprocessConfig(**pre)
    return ingest(IngestConfig(sources=[Path(src)], out=Path(out), **kw))


def assert_grouped(items: list[dict], key_of) -> None:
    """The cache's groups are exactly the expected ones (same partition of items), at least one group
    holds several items, and no group straddles two splits."""
    got, want, splits = defaultdict(set), defaultdict(set), defaultdict(set)
    for it in items:
        got[it["group"]].add(it["id"])
        want[key_of(it)].add(it["id"])
        splits[it["group"]].add(it["split"])
    assert sorted(map(sorted, got.values())) == sorted(map(sorted, want.values()))
    assert max(len(v) for v in got.values()) >= 2, "the tree should have groups of several items"
    assert all(len(s) == 1 for s in splits.values()), "a group straddles splits"


def rsna_csv_labels(path: Path) -> dict[str, list[float]]:
    out: dict[str, list] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            image, _, subtype = row["ID"].rpartition("_")
            out.setdefault(image, [None] * 6)[SUBTYPES.index(subtype)] = float(row["Label"])
    return out


# ------------------------------------------------------------------------------- auto-detection
def test_auto_detection_picks_each_adapter(tmp_path, trees):
    from medclf.synthetic import make_isic_tree

    cx = trees.chexpert(tmp_path / "cx", n_train=2, n_valid=1)
    k20 = make_isic_tree(tmp_path / "isic2020", n=6, size=32, year=2020)
    archive = tmp_path / "isic2020_archive"
    (archive / "train").mkdir(parents=True)
    (archive / "ISIC_2020_Training_GroundTruth.csv").write_text("image_name,patient_id,target\n")
    trees.medmnist(tmp_path / "mm" / "pathmnist.npz")
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "flat").mkdir()
    for d in (tmp_path / "cls" / "a", tmp_path / "flat"):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "x.png")
    (tmp_path / "list.csv").write_text("path,label\nflat/x.png,a\n")
    cases = {
        SAMPLE / "rsna": "rsna-ich",
        cx["root"]: "chexpert",  # the dataset's parent folder
        cx["base"]: "chexpert",  # or CheXpert-v1.0-small itself
        SAMPLE / "isic": "isic",
        k20: "isic",
        archive: "isic",
        trees.ham(tmp_path / "ham", n=4)["root"]: "ham10000",
        tmp_path / "mm" / "pathmnist.npz": "medmnist",
        tmp_path / "mm": "medmnist",
        tmp_path / "list.csv": "csv",
        SAMPLE / "nifti" / "labels.csv": "csv",
        tmp_path / "cls": "folder",
        tmp_path / "flat": "folder",
        SAMPLE / "nifti": "folder",
    }
    for src, name in cases.items():
        assert detect_dataset([src]) == name, src
        assert get_adapter("auto", [src]).name == name
    assert detect_dataset([tmp_path / "flat", tmp_path / "cls"]) == "folder"  # several sources: generic
    with pytest.raises(MedclfError, match="unknown dataset"):
        get_adapter("imagenet", [tmp_path])


# ------------------------------------------------------------------------------------------ RSNA
def test_rsna_plan_labels_and_duplicates():
    p = plan("rsna-ich", SAMPLE / "rsna")
    want = rsna_csv_labels(SAMPLE / "rsna" / "stage_2_train.csv")
    n_rows = sum(1 for _ in open(SAMPLE / "rsna" / "stage_2_train.csv")) - 1
    assert n_rows == 6 * (len(want) + 1)  # one image's six rows appear twice
    assert p.classes == ["normal", "haemorrhage"] and p.label_names == SUBTYPES
    assert len(p.units) == len(want) == 321 and len({u.key for u in p.units}) == 321  # de-duplicated by ID
    assert any("6 duplicate row(s) de-duplicated" in n for n in p.notes), p.notes
    for u in p.units:
        assert u.labels == want[u.key] and u.label == int(want[u.key][5])  # primary label: "any"
        assert u.source == f"stage_2_train/{u.key}.dcm" and u.split is None  # no official split
    assert p.errors == []


def test_rsna_missing_file_and_missing_rows(tmp_path):
    root = copy_tree(SAMPLE / "rsna", tmp_path / "rsna")
    victim = sorted((root / "stage_2_train").glob("ID_*.dcm"))[5]
    victim.unlink()
    lines = (root / "stage_2_train.csv").read_text().splitlines()
    other = sorted((root / "stage_2_train").glob("ID_*.dcm"))[9].stem
    (root / "stage_2_train.csv").write_text("\n".join(l for l in lines if l != f"{other}_epidural,0" and
                                                      l != f"{other}_epidural,1") + "\n")
    p = plan("rsna-ich", root)
    assert len(p.units) == 320
    assert p.errors == [(str(root / "stage_2_train" / victim.name), "listed in stage_2_train.csv but the file is missing")]
    unit = next(u for u in p.units if u.key == other)
    assert unit.labels[0] is None and None not in unit.labels[1:]  # no row: unknown, not negative


def test_rsna_nested_twice_and_renamed_image_folder(tmp_path):
    deep = tmp_path / "dl" / "rsna-intracranial-hemorrhage-detection" / "rsna-intracranial-hemorrhage-detection"
    (deep / "stage_2_train_images").mkdir(parents=True)
    files = sorted((SAMPLE / "rsna" / "stage_2_train").glob("ID_*.dcm"))[:12]
    keep = {f.stem for f in files}
    for f in files:
        shutil.copy(f, deep / "stage_2_train_images" / f.name)
    rows = [l for l in (SAMPLE / "rsna" / "stage_2_train.csv").read_text().splitlines()[1:] if l.rsplit("_", 1)[0] in keep]
    (deep / "stage_2_train.csv").write_text("ID,Label\n" + "\n".join(rows) + "\n")
    assert detect_dataset([tmp_path / "dl"]) == "rsna-ich"
    p = plan("rsna-ich", tmp_path / "dl")
    assert sorted(u.key for u in p.units) == sorted(keep) and not p.errors


def test_rsna_cache_labels_groups_and_splits(rsna32):
    info = open_cache(rsna32.cache)
    want = rsna_csv_labels(SAMPLE / "rsna" / "stage_2_train.csv")
    assert info.manifest["dataset"] == "rsna-ich" and info.classes == ["normal", "haemorrhage"]
    assert info.label_names == SUBTYPES and info.manifest["task"] == "multiclass"
    assert len(info.items) == 320 and {it["id"] for it in info.items} == set(want) - {"ID_6431af929"}
    for it in info.items:
        assert it["labels"] == want[it["id"]] and it["label"] == int(want[it["id"]][5])
    # split by patient (from the headers), never by slice
    patient = {f.stem: str(pydicom.dcmread(f, stop_before_pixels=True).PatientID)
               for f in (SAMPLE / "rsna" / "stage_2_train").glob("ID_*.dcm")}
    assert_grouped(info.items, lambda it: patient[it["id"]])
    assert {it["split"] for it in info.items} == {"train", "val", "test"}
    for split in ("train", "val", "test"):  # stratified: every split sees both classes
        assert {it["label"] for it in info.items if it["split"] == split} == {0, 1}
    assert any("duplicate" in n for n in info.manifest["notes"])


def test_rsna_non_square_slice_is_padded_and_resized(tmp_path, ct_writer):
    root = tmp_path / "rsna"
    ct_writer(root / "stage_2_train" / "ID_00000000a.dcm", np.full((40, 56), 1064), patient=1)
    ct_writer(root / "stage_2_train" / "ID_00000000b.dcm", np.full((64, 64), 1024), patient=2)
    rows = [f"ID_00000000{k}_{s},{int(k == 'a')}" for k in "ab" for s in SUBTYPES]
    (root / "stage_2_train.csv").write_text("ID,Label\n" + "\n".join(rows) + "\n")
    info = open_cache(run_ingest(root, tmp_path / "c", windows=["brain"]).cache)
    assert info.shape == (1, 32, 32)
    k = [it["id"] for it in info.items].index("ID_00000000a")
    a = CacheDataset(info, dtype=torch.float32)[k]["image"][0]
    assert info.items[k]["original_shape"] == [1, 40, 56]
    # HU 40 in the brain window is 0.5; the padding above and below the 40x56 slice is 0
    assert a[16, 16].item() == pytest.approx(0.5, abs=1e-4)
    assert a[0, 16].item() == 0.0 and a[31, 16].item() == 0.0


# -------------------------------------------------------------------------------------- CheXpert
def expected_chexpert(raw: str, column: str, policy: str):
    if raw == "":
        return 0.0  # blank (unmentioned) counts as negative
    if raw != "-1.0":
        return float(raw)
    return {"ones": 1.0, "zeros": 0.0, "ignore": None,
            "mixed": 1.0 if column in ("Atelectasis", "Edema") else 0.0}[policy]


@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore", "mixed"])
def test_chexpert_uncertain_policies(tmp_path, trees, policy):
    t = trees.chexpert(tmp_path, n_train=4, n_valid=3)
    p = plan("chexpert", t["root"], uncertain=policy)
    assert p.label_names == CHEXPERT_OBS and p.classes == [] and p.options["uncertain"] == policy
    by_source = {u.source: u for u in p.units}
    assert len(by_source) == len(t["train"]) + len(t["valid"]) == 4 * 3 + 3
    n_uncertain = 0
    for rel, raw in t["train"]:
        u = by_source[rel]
        assert u.split is None and u.label is None
        assert u.labels == [expected_chexpert(v, c, policy) for v, c in zip(raw, CHEXPERT_OBS)], rel
        n_uncertain += raw.count("-1.0")
    assert n_uncertain > 0
    for rel, raw in t["valid"]:
        assert by_source[rel].split == "test" and by_source[rel].labels == [float(v) for v in raw]
    u = by_source["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
    assert u.group == pseudonym("group", "patient00002") and Path(u.paths[0]).exists()
    assert u.extra["attrs"] == {"view": "Frontal", "projection": "PA", "study": 2}


def test_chexpert_from_the_small_folder_itself_and_missing_files(tmp_path, trees):
    missing = "CheXpert-v1.0-small/train/patient00003/study1/view2_lateral.jpg"
    t = trees.chexpert(tmp_path, n_train=4, n_valid=2, missing=missing)
    a, b = plan("chexpert", t["root"]), plan("chexpert", t["base"])
    assert [u.source for u in a.units] == [u.source for u in b.units] and len(a.units) == 4 * 3 + 2 - 1
    assert len(a.errors) == 1 and a.errors[0][0].endswith("patient00003/study1/view2_lateral.jpg")
    assert "missing" in a.errors[0][1]
    with pytest.raises(MedclfError, match="uncertain"):
        plan("chexpert", t["root"], uncertain="multiclass")


def test_chexpert_cache_splits_by_patient_and_masks_ignored(tmp_path, trees):
    t = trees.chexpert(tmp_path / "cx", n_train=10, n_valid=4)
    info = open_cache(run_ingest(t["root"], tmp_path / "c", uncertain="ignore").cache)
    assert info.manifest["task"] == "multilabel" and info.shape == (1, 32, 32)  # grey radiographs
    valid = {rel for rel, _ in t["valid"]}
    for it in info.items:  # valid.csv is the test split; train.csv goes to train/val only, never test
        assert it["split"] == "test" if it["source"] in valid else it["split"] in ("train", "val")
    assert {it["split"] for it in info.items} == {"train", "val", "test"}
    assert sum(it["split"] == "test" for it in info.items) == 4
    assert_grouped(info.items, lambda it: it["source"].split("/")[2])  # patientNNNNN
    ds = CacheDataset(info)
    raw = dict(t["train"] + t["valid"])
    for i, it in enumerate(ds.items):
        labels = ds[i]["labels"]
        assert ds[i]["label"] == -1 and labels.shape == (14,)
        for j, v in enumerate(raw[it["source"]]):
            if v == "-1.0":
                assert torch.isnan(labels[j])
            else:
                assert labels[j].item() == (1.0 if v == "1.0" else 0.0)


# ------------------------------------------------------------------------------------------ ISIC
def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_isic_2019_sample(tmp_path):
    gt = _read_csv(SAMPLE / "isic" / "ISIC_2019_Training_GroundTruth.csv")
    meta = {r["image"]: r["lesion_id"] for r in _read_csv(SAMPLE / "isic" / "ISIC_2019_Training_Metadata.csv")}
    info = open_cache(run_ingest(SAMPLE / "isic", tmp_path / "c").cache)
    assert info.classes == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]  # UNK is never positive
    assert info.shape == (3, 32, 32) and info.manifest["n_failed"] == 0
    truth = {r["image"]: next(c for c in info.classes if float(r[c]) == 1.0) for r in gt}
    assert {it["id"] for it in info.items} == set(truth) and len(info.items) == len(gt) == 80
    for it in info.items:
        assert info.classes[it["label"]] == truth[it["id"]]
        assert it["source"] == f"ISIC_2019_Training_Input/{it['id']}.jpg"
    assert sum(it["id"].endswith("_downsampled") for it in info.items) == 2
    assert any(not v for v in meta.values())  # blank lesion_id: grouped by the image itself
    assert_grouped(info.items, lambda it: meta[it["id"]] or it["id"])


def test_isic_2019_missing_image(tmp_path):
    root = copy_tree(SAMPLE / "isic", tmp_path / "isic")
    victim = sorted((root / "ISIC_2019_Training_Input").glob("*.jpg"))[3]
    victim.unlink()
    p = plan("isic", root)
    assert len(p.units) == 79 and p.errors == [(victim.name, "listed in the ground truth but the image is missing")]


def test_isic_2020_kaggle_layout(tmp_path):
    from medclf.synthetic import make_isic_tree

    root = make_isic_tree(tmp_path / "isic", n=24, size=32, year=2020)
    rows = {r["image_name"]: r for r in _read_csv(root / "train.csv")}
    # the Kaggle layout also ships DICOMs under train/: the JPEGs are the ones read
    (root / "train").mkdir()
    first = sorted(rows)[0]
    shutil.copy(SAMPLE / "rsna" / "stage_2_train" / "ID_6431af929.dcm", root / "train" / f"{first}.dcm")
    info = open_cache(run_ingest(root, tmp_path / "c").cache)
    assert info.classes == ["benign", "melanoma"] and info.manifest["options"] == {"version": 2020}
    assert {it["id"] for it in info.items} == set(rows) and info.manifest["n_failed"] == 0
    for it in info.items:
        assert it["label"] == int(rows[it["id"]]["target"]) and it["source"].startswith("jpeg/train/")
    assert_grouped(info.items, lambda it: rows[it["id"]]["patient_id"])


def test_isic_2020_archive_layout_drops_listed_duplicates(tmp_path):
    from medclf.synthetic import make_isic_tree

    root = make_isic_tree(tmp_path / "isic", n=12, size=32, year=2020)
    (root / "jpeg" / "train").rename(root / "train")
    (root / "jpeg").rmdir()
    (root / "train.csv").rename(root / "ISIC_2020_Training_GroundTruth.csv")
    names = sorted(r["image_name"] for r in _read_csv(root / "ISIC_2020_Training_GroundTruth.csv"))
    (root / "ISIC_2020_Training_Duplicates.csv").write_text(
        f"image_name_1,image_name_2\n{names[0]},{names[1]}\n{names[2]},{names[3]}\n")
    p = plan("isic", root)
    assert sorted(u.key for u in p.units) == names[:1] + names[2:3] + names[4:]
    assert any("dropped 2 listed duplicate" in n for n in p.notes) and not p.errors
    assert all(u.source.startswith("train/") for u in p.units)


# -------------------------------------------------------------------------------------- HAM10000
def test_ham10000_variants_duplicates_and_lesions(tmp_path, trees):
    t = trees.ham(tmp_path / "ham", n=21)
    rows = {r[1]: r for r in t["rows"]}
    p = plan("ham10000", t["root"])
    assert p.classes == HAM_DX and len(p.units) == 21 and not p.errors  # one unit per image_id
    assert any("2 duplicate metadata row(s)" in n for n in p.notes), p.notes
    parts = {u.source.split("/")[0] for u in p.units}
    assert parts == {"HAM10000_images_part_1", "ham10000_images_part_2"}  # lowercase copies not doubled
    info = open_cache(run_ingest(t["root"], tmp_path / "c").cache)
    assert len(info.items) == 21 and info.shape == (3, 32, 32)
    for it in info.items:
        assert info.classes[it["label"]] == rows[it["id"]][2]
    assert_grouped(info.items, lambda it: rows[it["id"]][0])  # lesion_id


def test_ham10000_original_archive_spelling(tmp_path, trees):
    t = trees.ham(tmp_path / "ham", n=6)
    for old, new in (("HAM10000_images_part_1", "HAM10000_images_part1"), ("ham10000_images_part_2", "HAM10000_images_part2")):
        (t["root"] / old).rename(t["root"] / new)
    shutil.rmtree(t["root"] / "ham10000_images_part_1")
    p = plan("ham10000", t["root"])
    assert len(p.units) == 6 and not p.errors and {u.source.split("/")[0] for u in p.units} == {
        "HAM10000_images_part1", "HAM10000_images_part2"}


# -------------------------------------------------------------------------------------- MedMNIST
@pytest.mark.parametrize("kind", ["grey", "rgb", "multilabel"])
def test_medmnist_official_splits(tmp_path, trees, kind):
    arrays = trees.medmnist(tmp_path / "dermamnist.npz", kind)
    info = open_cache(run_ingest(tmp_path / "dermamnist.npz", tmp_path / "c", size=28).cache)
    assert info.manifest["dataset"] == "medmnist"
    counts = {s: sum(it["split"] == s for it in info.items) for s in ("train", "val", "test")}
    assert counts == {"train": 10, "val": 4, "test": 6}  # official splits, not re-drawn
    assert info.shape == ((3 if kind == "rgb" else 1), 28, 28)
    if kind == "multilabel":
        assert info.classes == [] and info.label_names == [f"label{i}" for i in range(5)]
    else:
        assert info.classes == ["0", "1", "2", "3"] and info.label_names == []
    for split in ("train", "val", "test"):
        ds = CacheDataset(info, split=split, dtype=torch.float32)
        assert len(ds) == len(arrays[f"{split}_labels"])
        for i in range(len(ds)):
            item = ds[i]
            k = int(item["id"].rsplit("-", 1)[1])
            assert item["id"] == f"dermamnist-{split}-{k:06d}"
            lab = arrays[f"{split}_labels"][k]
            if kind == "multilabel":
                assert item["label"] == -1 and item["labels"].tolist() == lab.astype(float).tolist()
            else:
                assert item["label"] == int(lab[0]) and torch.isnan(item["labels"]).all()
            img = arrays[f"{split}_images"][k].astype(np.float64)
            if kind == "rgb":  # RGB: /255
                want = img.transpose(2, 0, 1) / 255.0
            else:  # grey: 0.5-99.5 percentile scaling
                lo, hi = np.percentile(img, [0.5, 99.5])
                want = np.clip((img - lo) / (hi - lo), 0, 1)[None]
            assert np.allclose(item["image"].numpy(), want, atol=1e-4), item["id"]


def test_medmnist_folder_of_npz_files(tmp_path, trees):
    trees.medmnist(tmp_path / "mm" / "pathmnist.npz", "rgb")
    trees.medmnist(tmp_path / "mm" / "pathmnist_64.npz", "rgb", counts=(("train", 3), ("test", 2)))
    p = plan("medmnist", tmp_path / "mm")
    assert {(u.source, u.split) for u in p.units} == {
        ("pathmnist.npz", "train"), ("pathmnist.npz", "val"), ("pathmnist.npz", "test"),
        ("pathmnist_64.npz", "train"), ("pathmnist_64.npz", "test")}
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(MedclfError, match="no train_labels"):
        plan("medmnist", tmp_path / "bad.npz")


# ------------------------------------------------------------------------------ generic layouts
def _pngs(folder: Path, n: int, seed: int = 0, shape=(20, 24)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(p)
        out.append(p)
    return out


def test_folder_per_class(tmp_path, ct_writer):
    root = tmp_path / "data"
    _pngs(root / "malignant", 3, 1)
    _pngs(root / "benign", 4, 2)
    ct_writer(root / "benign" / "scan.dcm", np.full((20, 20), 1064))
    (root / "README.txt").write_text("not an image")
    (root / "benign" / ".DS_Store").write_bytes(b"\x00")
    info = open_cache(run_ingest(root, tmp_path / "c").cache)
    assert info.manifest["dataset"] == "folder" and info.classes == ["benign", "malignant"]
    assert len(info.items) == 8 and info.manifest["n_failed"] == 0
    for it in info.items:
        assert info.classes[it["label"]] == it["source"].split("/")[0]
    assert any("skipped 1 non-image file" in n for n in info.manifest["notes"])
    numeric = tmp_path / "numeric"
    for c in ("10", "9", "2"):
        _pngs(numeric / c, 1)
    assert plan("folder", numeric).classes == ["2", "9", "10"]  # integer class names sort numerically


def test_unlabeled_folder(tmp_path):
    _pngs(tmp_path / "flat", 5)
    info = open_cache(run_ingest(tmp_path / "flat", tmp_path / "c").cache)
    assert info.manifest["task"] == "unlabeled" and info.classes == [] and len(info.items) == 5
    assert all(it["label"] is None for it in info.items)
    assert [CacheDataset(info)[i]["label"] for i in range(5)] == [-1] * 5
    with pytest.raises(MedclfError, match="no image files"):
        (tmp_path / "empty").mkdir()
        plan("folder", tmp_path / "empty")


def test_folder_with_labels_csv_for_nifti(tmp_path):
    info = open_cache(run_ingest(SAMPLE / "nifti", tmp_path / "c", labels=SAMPLE / "nifti" / "labels.csv").cache)
    want = {r["path"]: r["label"] for r in _read_csv(SAMPLE / "nifti" / "labels.csv")}
    assert info.classes == sorted(set(want.values()))
    vols = {it["unit"] for it in info.items}
    assert len(vols) == 4 and len(info.items) == 4 * 16  # every slice of every volume becomes an item
    for it in info.items:
        assert info.classes[it["label"]] == want[it["source"]] and it["orientation"] == "PLS"
        assert it["id"].endswith(f"/s{it['slice']:04d}")
    assert_grouped(info.items, lambda it: it["source"])  # slices of one volume stay together


def test_csv_layout(tmp_path, ct_writer):
    root = tmp_path / "d"
    imgs = _pngs(root / "imgs", 8)
    series = root / "series1"
    for k in range(3):
        ct_writer(series / f"{k}.dcm", np.full((16, 16), 1024 + k), ipp=(0, 0, 5.0 * k), series_uid="1.2.3.4.99")
    rows = ["path,label,split,group",
            "imgs/img0.png,no,train,",
            "imgs/img1.png,yes,test,",
            "imgs/img2.png,yes,,p1", "imgs/img3.png,no,,p1", "imgs/img4.png,no,,p1",
            "imgs/img5.png,yes,,p2", "imgs/img6.png,no,,p3",
            "imgs/gone.png,no,train,", "imgs/img7.png,no,holdout,", "series1,yes,val,"]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    p = plan("csv", root / "list.csv")
    assert p.classes == ["no", "yes"] and len(p.units) == 8
    reasons = sorted(r for _, r in p.errors)
    assert reasons == ["row 10: unknown split 'holdout' (use train, val or test)", "row 9: file not found"]
    by = {u.source: u for u in p.units}
    assert by["imgs/img0.png"].split == "train" and by["imgs/img1.png"].split == "test"
    assert by["series1"].kind == "series" and len(by["series1"].paths) == 3 and by["series1"].split == "val"
    info = open_cache(run_ingest(root / "list.csv", tmp_path / "c", windows=["brain"], channels=1).cache)
    split = {it["source"]: it["split"] for it in info.items}
    assert split["imgs/img0.png"] == "train" and split["imgs/img1.png"] == "test"
    series_items = [it for it in info.items if it["source"] == "series1"]
    assert len(series_items) == 3 and {it["split"] for it in series_items} == {"val"}
    assert len({split[f"imgs/img{i}.png"] for i in (2, 3, 4)}) == 1  # one group, one split
    assert {info.classes[it["label"]] for it in info.items if it["source"] == "imgs/img1.png"} == {"yes"}
    assert info.manifest["n_failed"] == 2


# ----------------------------------------------------------------------- Favero et al.'s presets
def test_chexpert_effusion_preset(tmp_path, trees):
    t = trees.chexpert(tmp_path / "cx", n_train=17, n_valid=2)
    nf, pe = CHEXPERT_OBS.index("No Finding"), CHEXPERT_OBS.index("Pleural Effusion")
    eligible = {}
    for rel, raw in t["train"]:  # first-study frontal views of train.csv; effusion (1) vs no finding (0)
        if "/study1/view1_frontal" in rel:
            if raw[pe] == "1.0":
                eligible[rel] = 1
            elif raw[nf] == "1.0":
                eligible[rel] = 0
    assert 0 < sum(eligible.values()) < len(eligible) - sum(eligible.values())  # unbalanced before the preset
    assert detect_dataset([t["root"]]) == "chexpert"  # a preset is asked for by name only
    info = open_cache(run_ingest(t["root"], tmp_path / "c", dataset="chexpert-effusion").cache)
    assert info.classes == ["no_finding", "pleural_effusion"] and info.shape == (1, 32, 32)
    assert info.manifest["split_fractions"] == [0.8, 0.1, 0.1] and info.manifest["options"]["preset"] == "favero2025"
    for it in info.items:
        assert it["label"] == eligible[it["source"]]
    labels = [it["label"] for it in info.items]
    assert labels.count(1) == labels.count(0) == sum(eligible.values())  # balanced by dropping no-finding views
    assert {it["split"] for it in info.items} == {"train", "val", "test"}  # split 80/10/10 from train.csv by patient
    assert len({it["group"] for it in info.items}) == len(info.items)  # one view per patient


def test_isic_melanoma_preset(tmp_path):
    gt = _read_csv(SAMPLE / "isic" / "ISIC_2019_Training_GroundTruth.csv")
    truth = {r["image"]: next(c for c in ("MEL", "NV", "BKL", "DF", "VASC", "BCC", "AK", "SCC") if float(r[c]) == 1) for r in gt}
    info = open_cache(run_ingest(SAMPLE / "isic", tmp_path / "c", dataset="isic-melanoma").cache)
    assert info.classes == ["benign", "melanoma"]
    labels = [it["label"] for it in info.items]
    assert labels.count(0) == labels.count(1) > 0
    for it in info.items:
        assert truth[it["id"]] in (("MEL",) if it["label"] == 1 else ("NV", "BKL", "DF", "VASC"))
