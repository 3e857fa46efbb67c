"""Look-alike dataset trees, laid out exactly as the public datasets ship (shared/DATASETS.md)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from medclf.datasets.public import CHEXPERT_OBSERVATIONS as OBS


def make_chexpert_tree(root: Path, n_patients: int = 24) -> Path:
    """CheXpert-v1.0-small as shipped (train.csv + valid.csv + JPEGs), with phantom images whose
    'effusion' is a bright blob: first-study frontal views plus lateral and second-study distractors."""
    from medclf.synthetic import head_phantom_slice

    rng = np.random.default_rng(0)
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBS]
    rows = []
    for i in range(n_patients):
        effusion = i % 2 == 0
        for study, view in ((1, "frontal"), (1, "lateral"), (2, "frontal")):
            rel = f"CheXpert-v1.0-small/train/patient{i + 1:05d}/study{study}/view1_{view}.jpg"
            hu = head_phantom_slice(rng, size=64, bleed="intraparenchymal" if effusion else None)
            img = (np.clip((hu + 40) / 160, 0, 1) * 255).astype(np.uint8)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel, quality=95)
            vals = {o: "" for o in OBS}
            vals["Pleural Effusion" if effusion else "No Finding"] = "1.0"
            if i % 5 == 1:
                vals["Edema"] = "-1.0"
            rows.append([rel, "Female", "60", "Frontal" if view == "frontal" else "Lateral", "PA" if view == "frontal" else "",
                         *vals.values()])
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    with open(base / "valid.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows[:3]])
    return root


def make_ham_tree(root: Path, n: int = 20) -> Path:
    """HAM10000: metadata CSV (with a duplicated row) and both part folders, one in lowercase spelling."""
    rng = np.random.default_rng(1)
    dx = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    rows = []
    for i in range(n):
        part = root / ("HAM10000_images_part_1" if i % 2 else "ham10000_images_part_2")
        part.mkdir(parents=True, exist_ok=True)
        image = f"ISIC_{24000 + i:07d}"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3)).astype(np.uint8)).save(part / f"{image}.jpg")
        rows.append([f"HAM_{i // 2:07d}", image, dx[i % 7], "histo", "50", "male", "back"])
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], *rows, rows[0]])
    return root


def make_medmnist(path: Path, rgb: bool = False, multilabel: bool = False) -> Path:
    rng = np.random.default_rng(2)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 255, shape).astype(np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 3)) if multilabel else rng.integers(0, 4, (n, 1))
    np.savez(path, **arrays)
    return path


ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def make_isic2019_digits_tree(root: Path, n_classes: int = 8, size: int = 64, shuffle_labels: bool = False) -> Path:
    """scikit-learn's handwritten digits (real scans of real handwriting, 8x8 grey) as an ISIC 2019
    archive: JPEGs upscaled to ``size`` in ISIC_2019_Training_Input, the one-hot ground-truth CSV with
    its UNK column, the metadata CSV (lesion ids, some empty) and some ``_downsampled`` names, digit k
    standing for the k-th diagnosis. ~180 images per class: the multi-class set of issue #17.
    ``shuffle_labels``: a seeded permutation of the labels, so that they carry no signal."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < n_classes
    images, target = d.images[keep], d.target[keep]
    if shuffle_labels:
        target = np.random.default_rng(0).permutation(target)
    img_dir = root / "ISIC_2019_Training_Input"
    img_dir.mkdir(parents=True, exist_ok=True)
    gt, meta = [], []
    for i, (x, c) in enumerate(zip(images, target)):
        name = f"ISIC_{i:07d}" + ("_downsampled" if i % 7 == 0 else "")
        im = Image.fromarray((x / 16 * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        im.save(img_dir / f"{name}.jpg", quality=95)
        gt.append([name] + ["1.0" if k == c else "0.0" for k in range(len(ISIC2019_CLASSES))])
        meta.append([name, "50", "back", f"IL_{i:07d}" if i % 3 else "", "male"])
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", *ISIC2019_CLASSES], *gt])
    with open(root / "ISIC_2019_Training_Metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], *meta])
    return root
