"""Adapters for the public datasets, read exactly as they ship (layouts: ``shared/DATASETS.md``)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from medclf.datasets.base import Adapter, AdapterOptions, Mapper, Plan, Unit, find, read_csv, register_dataset, require_columns, single_root
from medclf.errors import MedclfError
from medclf.privacy import pseudonym

IMAGE_GLOBS = ("*.jpg", "*.jpeg", "*.png", "*.dcm")


def index_images(root: Path) -> dict[str, Path]:
    """File stem -> path for every image under root (first found wins; lowercase variants too)."""
    out: dict[str, Path] = {}
    for pattern in IMAGE_GLOBS:
        for p in sorted(root.rglob(pattern)):
            out.setdefault(p.stem, p)
    return out


# --------------------------------------------------------------------------------------------- RSNA
RSNA_SUBTYPES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]


@register_dataset
class RsnaIch(Adapter):
    """RSNA Intracranial Hemorrhage Detection: ``stage_2_train.csv`` (six ``ID_<id>_<subtype>`` rows
    per image) and ``stage_2_train/`` (or ``stage_2_train_images/``) single-slice DICOMs.

    Primary label: ``any`` (normal / haemorrhage); all six subtypes are kept as multi-labels. No
    official labelled test split exists: the split is seeded and grouped by patient (from headers).
    """

    name = "rsna-ich"

    @staticmethod
    def detect(root: Path) -> bool:
        return root.is_dir() and find(root, ["stage_2_train.csv"]) is not None

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        root = single_root(sources, self.name)
        csv_path = find(root, ["stage_2_train.csv"])
        if csv_path is None:
            raise MedclfError("no stage_2_train.csv found (is this the RSNA-ICH root?)", root)
        img_dir = find(csv_path.parent, ["stage_2_train", "stage_2_train_images"], depth=1) or find(root, ["stage_2_train", "stage_2_train_images"])
        if img_dir is None:
            raise MedclfError("no stage_2_train/ (or stage_2_train_images/) folder next to stage_2_train.csv", root)
        labels: dict[str, list[float | None]] = {}
        dupes = 0
        with open(csv_path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["ID", "Label"]:
                raise MedclfError("expected header 'ID,Label'", csv_path)
            for row in reader:
                if len(row) < 2:
                    continue
                image_id, _, subtype = row[0].rpartition("_")
                if subtype not in RSNA_SUBTYPES:
                    raise MedclfError(f"unknown subtype in row {row[0]!r}", csv_path)
                vec = labels.setdefault(image_id, [None] * 6)
                k = RSNA_SUBTYPES.index(subtype)
                if vec[k] is not None:
                    dupes += 1
                vec[k] = float(row[1])
        plan = Plan(dataset=self.name, units=[], classes=["normal", "haemorrhage"], label_names=list(RSNA_SUBTYPES),
                    channels=None, options={}, inputs=[csv_path])
        if dupes:
            plan.notes.append(f"stage_2_train.csv: {dupes} duplicate row(s) de-duplicated by ID")
        present = {p.name: p for p in img_dir.iterdir() if p.suffix == ".dcm"}
        for image_id in sorted(labels):
            vec = labels[image_id]
            p = present.get(image_id + ".dcm")
            if p is None:
                plan.errors.append((str(img_dir / (image_id + ".dcm")), "listed in stage_2_train.csv but the file is missing"))
                continue
            anyl = vec[5]
            plan.units.append(Unit(key=image_id, kind="file", paths=[str(p)], source=p.relative_to(root).as_posix(),
                                   label=None if anyl is None else int(anyl), labels=vec))
            plan.inputs.append(p)
        return plan


# ----------------------------------------------------------------------------------------- CheXpert
CHEXPERT_OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
_U_ONES_IN_MIXED = {"Atelectasis", "Edema"}  # CheXpert paper: U-Ones was best for these two


def chexpert_value(raw: str, column: str, policy: str) -> float | None:
    """1/0/-1/blank -> target. Blank = negative (the usual convention); -1 by the policy."""
    raw = raw.strip()
    if raw == "":
        return 0.0
    v = float(raw)
    if v != -1.0:
        return v
    if policy == "ones" or (policy == "mixed" and column in _U_ONES_IN_MIXED):
        return 1.0
    if policy in ("zeros", "mixed"):
        return 0.0
    return None  # ignore: masked out of the loss and the metrics


@register_dataset
class CheXpert(Adapter):
    """CheXpert v1.0 / v1.0-small: ``train.csv`` (seeded patient-grouped train/val) and ``valid.csv``
    (the radiologist-labelled official validation set, kept whole as ``test``: the real test set is
    hidden). 14 observations as multi-labels, uncertain -1 by ``--uncertain``.
    """

    name = "chexpert"

    @staticmethod
    def detect(root: Path) -> bool:
        p = find(root, ["train.csv", "valid.csv"], depth=1) if root.is_dir() else None
        if p is None:
            return False
        with open(p, newline="", encoding="utf-8-sig") as f:
            head = f.readline()
        return "Path" in head and "No Finding" in head

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        root = single_root(sources, self.name)
        plan = Plan(dataset=self.name, units=[], label_names=list(CHEXPERT_OBSERVATIONS), channels=1,
                    options={"uncertain": opts.uncertain}, split_fractions=(0.85, 0.15, 0.0))
        found_any = False
        for name, split in (("train.csv", None), ("valid.csv", "test")):
            csv_path = find(root, [name], depth=1)
            if csv_path is None:
                continue
            found_any = True
            rows = read_csv(csv_path)
            require_columns(rows, ["Path", *CHEXPERT_OBSERVATIONS], csv_path)
            plan.inputs.append(csv_path)
            for r in rows:
                rel = r["Path"].strip()
                # `Path` is relative to the dataset's parent folder ("CheXpert-v1.0-small/train/...")
                p = csv_path.parent.parent / rel
                if not p.exists():
                    p = csv_path.parent / Path(*Path(rel).parts[1:])
                if not p.exists():
                    plan.errors.append((str(p), f"{name}: listed but the file is missing"))
                    continue
                m = re.search(r"(patient\d+)/study(\d+)", rel)
                vec = [chexpert_value(r[c], c, opts.uncertain) for c in CHEXPERT_OBSERVATIONS]
                plan.units.append(Unit(
                    key=pseudonym("chexpert", rel), kind="file", paths=[str(p)], source=rel, labels=vec, split=split,
                    group=pseudonym("group", m.group(1) if m else rel),
                    extra={"attrs": {"view": r.get("Frontal/Lateral", ""), "projection": r.get("AP/PA", ""),
                                     "study": int(m.group(2)) if m else None}}))
                plan.inputs.append(p)
        if not found_any:
            raise MedclfError("no train.csv or valid.csv found (is this the CheXpert root?)", root)
        return plan


# --------------------------------------------------------------------------------------------- ISIC
ISIC_2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


@register_dataset
class Isic(Adapter):
    """ISIC 2019 (one-hot ground truth, lesion-grouped split) and ISIC 2020 (archive or Kaggle
    layout, ``target``, patient-grouped split, listed duplicates dropped)."""

    name = "isic"

    @staticmethod
    def detect(root: Path) -> bool:
        if not root.is_dir():
            return False
        if find(root, ["ISIC_2019_Training_GroundTruth.csv", "ISIC_2020_Training_GroundTruth.csv",
                       "ISIC_2020_Training_GroundTruth_v2.csv"], depth=1):
            return True
        p = root / "train.csv"
        return p.exists() and "image_name" in p.open(encoding="utf-8-sig").readline()

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        root = single_root(sources, self.name)
        gt19 = find(root, ["ISIC_2019_Training_GroundTruth.csv"], depth=1)
        if gt19 is not None:
            return self._plan_2019(root, gt19)
        gt20 = find(root, ["ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv", "train.csv"], depth=1)
        if gt20 is None:
            raise MedclfError("no ISIC ground-truth CSV found", root)
        return self._plan_2020(root, gt20)

    def _plan_2019(self, root: Path, gt: Path) -> Plan:
        rows = read_csv(gt)
        require_columns(rows, ["image", "MEL", "NV"], gt)
        classes = [c for c in ISIC_2019_CLASSES if c in rows[0] and c != "UNK"]  # UNK is never positive in training
        meta_path = find(root, ["ISIC_2019_Training_Metadata.csv"], depth=1)
        lesion = {r["image"]: (r.get("lesion_id") or "").strip() for r in read_csv(meta_path)} if meta_path else {}
        index = index_images(root)
        plan = Plan(dataset=self.name, units=[], classes=classes, channels=3, options={"version": 2019},
                    inputs=[gt] + ([meta_path] if meta_path else []))
        for r in rows:
            image = r["image"].strip()
            onehot = [float(r[c] or 0) for c in classes]
            p = index.get(image)
            if p is None:
                plan.errors.append((image + ".jpg", "listed in the ground truth but the image is missing"))
                continue
            if max(onehot) != 1.0:
                plan.errors.append((str(p), "no positive diagnosis column"))
                continue
            group = lesion.get(image) or image  # lesion_id is blank for some rows
            plan.units.append(Unit(key=image, kind="file", paths=[str(p)], source=p.relative_to(root).as_posix(),
                                   label=int(np.argmax(onehot)), group=pseudonym("group", group)))
            plan.inputs.append(p)
        return plan

    def _plan_2020(self, root: Path, gt: Path) -> Plan:
        rows = read_csv(gt)
        require_columns(rows, ["image_name", "target"], gt)
        dup_path = find(root, ["ISIC_2020_Training_Duplicates.csv"], depth=1)
        dropped = set()
        if dup_path:
            for r in read_csv(dup_path):
                dropped.add((r.get("image_name_2") or "").strip())
        # The Kaggle layout ships both JPEGs (jpeg/train) and DICOMs (train/*.dcm): prefer the JPEGs.
        jpeg_dir = find(root, ["jpeg"], depth=1)
        index = index_images(jpeg_dir / "train" if jpeg_dir and (jpeg_dir / "train").is_dir() else root)
        plan = Plan(dataset=self.name, units=[], classes=["benign", "melanoma"], channels=3, options={"version": 2020},
                    inputs=[gt] + ([dup_path] if dup_path else []))
        if dropped - {""}:
            plan.notes.append(f"dropped {len(dropped - {''})} listed duplicate image(s)")
        for r in rows:
            image = r["image_name"].strip()
            if image in dropped:
                continue
            p = index.get(image)
            if p is None:
                plan.errors.append((image, "listed in the ground truth but the image is missing"))
                continue
            group = (r.get("patient_id") or "").strip() or image
            plan.units.append(Unit(key=image, kind="file", paths=[str(p)], source=p.relative_to(root).as_posix(),
                                   label=int(float(r["target"])), group=pseudonym("group", group)))
            plan.inputs.append(p)
        return plan


# ----------------------------------------------------------------------------------------- HAM10000
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@register_dataset
class Ham10000(Adapter):
    """HAM10000: ``HAM10000_metadata.csv`` (``dx``), images in the part_1/part_2 folders (any of the
    shipped spellings), de-duplicated by ``image_id``, split grouped by ``lesion_id``."""

    name = "ham10000"

    @staticmethod
    def detect(root: Path) -> bool:
        return root.is_dir() and find(root, ["HAM10000_metadata.csv", "HAM10000_metadata"], depth=1) is not None

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        root = single_root(sources, self.name)
        meta = find(root, ["HAM10000_metadata.csv", "HAM10000_metadata"], depth=1)
        if meta is None:
            raise MedclfError("no HAM10000_metadata.csv found", root)
        rows = read_csv(meta)
        require_columns(rows, ["lesion_id", "image_id", "dx"], meta)
        index = index_images(root)
        plan = Plan(dataset=self.name, units=[], classes=list(HAM_CLASSES), channels=3, inputs=[meta])
        seen = set()
        for r in rows:
            image = r["image_id"].strip()
            if image in seen:
                continue
            seen.add(image)
            dx = r["dx"].strip()
            p = index.get(image)
            if p is None or dx not in HAM_CLASSES:
                plan.errors.append((str(p or image), "image missing" if p is None else f"unknown dx {dx!r}"))
                continue
            plan.units.append(Unit(key=image, kind="file", paths=[str(p)], source=p.relative_to(root).as_posix(),
                                   label=HAM_CLASSES.index(dx), group=pseudonym("group", r["lesion_id"].strip() or image)))
            plan.inputs.append(p)
        if len(seen) < len(rows):
            plan.notes.append(f"{len(rows) - len(seen)} duplicate metadata row(s) de-duplicated by image_id")
        return plan


# ---------------------------------------------------------------------------------------- MedMNIST
MEDMNIST_CHUNK = 512


@register_dataset
class MedMnist(Adapter):
    """MedMNIST ``.npz`` files (``{split}_images``/``{split}_labels``), official splits kept."""

    name = "medmnist"

    @staticmethod
    def detect(root: Path) -> bool:
        return root.suffix == ".npz" or (root.is_dir() and any(root.glob("*.npz")))

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        files = [f for s in sources for f in ([s] if s.is_file() else sorted(s.glob("*.npz")))]
        if not files:
            raise MedclfError("no .npz file given")
        plan = Plan(dataset=self.name, units=[], inputs=list(files))
        multilabel = None
        n_classes = 0
        for f in files:
            try:
                npz = np.load(f)
                keys = set(npz.files)
            except Exception as e:
                raise MedclfError(f"unreadable .npz ({type(e).__name__})", f) from None
            for split in ("train", "val", "test"):
                if f"{split}_images" not in keys:
                    continue
                if f"{split}_labels" not in keys:
                    raise MedclfError(f"has {split}_images but no {split}_labels", f)
                lab = np.asarray(npz[f"{split}_labels"]).reshape(len(npz[f"{split}_labels"]), -1)
                shape = npz[f"{split}_images"].shape
                plan.channels = 3 if len(shape) == 4 and shape[-1] == 3 else 1
                ml = lab.shape[1] > 1
                multilabel = ml if multilabel is None else multilabel
                if ml != multilabel:
                    raise MedclfError("mixes multi-label and single-label files", f)
                n_classes = max(n_classes, lab.shape[1] if ml else int(lab.max()) + 1)
                for start in range(0, len(lab), MEDMNIST_CHUNK):
                    stop = min(start + MEDMNIST_CHUNK, len(lab))
                    plan.units.append(Unit(
                        key=f"{f.stem}-{split}-{start:06d}", kind="npz", paths=[str(f)], source=f.name, split=split,
                        extra={"key": f"{split}_images", "start": start, "stop": stop, "ids_prefix": f"{f.stem}-{split}",
                               "item_labels": lab[start:stop].tolist()}))
        if multilabel:
            plan.label_names = [f"label{i}" for i in range(n_classes)]
        else:
            plan.classes = [str(i) for i in range(n_classes)]
        return plan


# ------------------------------------------------------------------- Favero et al.'s binary tasks
def _balance(units: list[Unit], seed: int) -> list[Unit]:
    """Downsample the larger class (seeded) so both classes have equally many units."""
    import random

    by = {0: [u for u in units if u.label == 0], 1: [u for u in units if u.label == 1]}
    n = min(len(by[0]), len(by[1]))
    rng = random.Random(seed)
    keep = {id(u) for c in (0, 1) for u in rng.sample(by[c], n)}
    return [u for u in units if id(u) in keep]


@register_dataset
class ChexpertEffusion(CheXpert):
    """Favero et al.'s CheXpert task: first-study frontal views, Pleural Effusion (1) vs No Finding
    (1, effusion not positive), balanced, split 80/10/10 by patient from the official train.csv."""

    name = "chexpert-effusion"

    @staticmethod
    def detect(root: Path) -> bool:
        return False  # a preset: asked for by name only

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        base = super().plan(sources, opts, mapper)
        eff, nof = CHEXPERT_OBSERVATIONS.index("Pleural Effusion"), CHEXPERT_OBSERVATIONS.index("No Finding")
        units = []
        for u in base.units:
            a = u.extra.get("attrs", {})
            if u.split == "test" or a.get("view") != "Frontal" or a.get("study") != 1:
                continue
            if u.labels[eff] == 1.0:
                u.label = 1
            elif u.labels[nof] == 1.0:
                u.label = 0
            else:
                continue
            u.labels = None
            units.append(u)
        plan = Plan(dataset=self.name, units=_balance(units, opts.seed), classes=["no_finding", "pleural_effusion"],
                    channels=1, options={"uncertain": opts.uncertain, "preset": "favero2025"}, inputs=base.inputs,
                    errors=base.errors, notes=base.notes + [f"balanced to {len(_balance(units, opts.seed))} of {len(units)} eligible images"],
                    split_fractions=(0.8, 0.1, 0.1))
        return plan


@register_dataset
class IsicMelanoma(Isic):
    """Favero et al.'s ISIC task: melanoma vs benign (2019: MEL vs NV/BKL/DF/VASC; 2020: target),
    balanced, split 80/10/10 by lesion/patient."""

    name = "isic-melanoma"
    BENIGN_2019 = ("NV", "BKL", "DF", "VASC")

    @staticmethod
    def detect(root: Path) -> bool:
        return False

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        base = super().plan(sources, opts, mapper)
        units = []
        for u in base.units:
            name = base.classes[u.label]
            if base.options.get("version") == 2020:
                pass  # already benign (0) / melanoma (1)
            elif name == "MEL":
                u.label = 1
            elif name in self.BENIGN_2019:
                u.label = 0
            else:
                continue
            units.append(u)
        kept = _balance(units, opts.seed)
        return Plan(dataset=self.name, units=kept, classes=["benign", "melanoma"], channels=3,
                    options={**base.options, "preset": "favero2025"}, inputs=base.inputs, errors=base.errors,
                    notes=base.notes + [f"balanced to {len(kept)} of {len(units)} eligible images"],
                    split_fractions=(0.8, 0.1, 0.1))
