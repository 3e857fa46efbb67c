"""Generic layouts: a folder (one sub-folder per class, or unlabeled) and a ``path,label`` CSV."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from medclf.datasets.base import Adapter, AdapterOptions, Mapper, Plan, Unit, read_csv, register_dataset, require_columns
from medclf.errors import MedclfError, ReadError
from medclf.io import is_dicom, is_image_file
from medclf.io.dicom import dicomdir_files, header_summary
from medclf.privacy import pseudonym

SPLITS = ("train", "val", "test")


def class_list(values: list[str]) -> list[str]:
    """Sorted class names; numerically when they are all integers (so '10' follows '9')."""
    uniq = set(values)
    try:
        return sorted(uniq, key=lambda v: int(float(v)))
    except ValueError:
        return sorted(uniq)


def _header_or_error(path: str):
    try:
        return header_summary(Path(path))
    except ReadError as e:
        return e


def dicom_units(files: list[tuple[Path, Path, str | None]], mapper: Mapper, plan: Plan) -> list[Unit]:
    """Group DICOM files into series units by (SeriesInstanceUID, image shape).

    ``files`` holds (root, path, label name); headers are read in parallel with ``mapper``.
    """
    headers = mapper(_header_or_error, [str(p) for _, p, _ in files])
    series: dict[tuple, list[tuple[Path, Path, str | None, dict]]] = defaultdict(list)
    for (root, p, lab), h in zip(files, headers):
        if isinstance(h, ReadError):
            plan.errors.append((str(p), h.message))
            continue
        series[(h["series"], tuple(h["shape"]))].append((root, p, lab, h))
    units = []
    for (sid, shape), members in sorted(series.items(), key=lambda kv: str(kv[1][0][1])):
        labs = {m[2] for m in members}
        if len(labs) > 1:
            for _, p, _, _ in members:
                plan.errors.append((str(p), "series files sit under different class folders"))
            continue
        root, p0, lab, h0 = members[0]
        rel = p0.relative_to(root).as_posix() if len(members) == 1 else p0.parent.relative_to(root).as_posix() or "."
        units.append(Unit(key=sid if len(members) > 1 else pseudonym("file", rel, sid), kind="series" if len(members) > 1 else "file",
                          paths=[str(m[1]) for m in members], source=rel, extra={"label_name": lab}, group=h0["group"]))
    return units


def _labels_table(opts: AdapterOptions) -> dict[str, str]:
    if opts.labels is None:
        return {}
    rows = read_csv(opts.labels)
    if not rows:
        raise MedclfError("label CSV is empty", opts.labels)
    keycol = "path" if "path" in rows[0] else "id" if "id" in rows[0] else None
    if keycol is None or "label" not in rows[0]:
        raise MedclfError("label CSV needs columns path,label or id,label", opts.labels)
    return {r[keycol].strip(): r["label"].strip() for r in rows if r.get("label", "").strip() != ""}


def _lookup(table: dict[str, str], rel: str) -> str | None:
    if not table:
        return None
    stem = Path(rel).name.split(".")[0]
    return table.get(rel) or table.get(Path(rel).name) or table.get(stem)


def finish_labels(plan: Plan, units: list[Unit]) -> None:
    """Turn each unit's ``label_name`` into a class index (classes sorted) and fill ``plan.classes``."""
    names = [u.extra.get("label_name") for u in units if u.extra.get("label_name") is not None]
    plan.classes = class_list(names) if names else []
    idx = {c: i for i, c in enumerate(plan.classes)}
    for u in units:
        n = u.extra.pop("label_name", None)
        u.label = idx[n] if n is not None else None


@register_dataset
class FolderDataset(Adapter):
    """Any mix of DICOM (files, series, DICOMDIR), NIfTI and PNG/JPEG/TIFF files.

    A root whose images all sit in sub-folders is read as one sub-folder per class; otherwise the
    items are unlabeled unless ``--labels`` maps them.
    """

    name = "folder"

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        plan = Plan(dataset=self.name, units=[], options={"labels": str(opts.labels) if opts.labels else None})
        table = _labels_table(opts)
        found: list[tuple[Path, Path, str | None]] = []
        skipped = 0
        for src in sources:
            if src.is_file():
                cand = dicomdir_files(src) if src.name.upper() == "DICOMDIR" else [src]
                found += [(src.parent, p, None) for p in cand]
                continue
            files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
            # a DICOMDIR's referenced files are found by the walk itself
            dicomdirs = [p for p in files if p.name.upper() == "DICOMDIR"]
            images = [p for p in files if p.name.upper() != "DICOMDIR" and is_image_file(p)]
            skipped += len(files) - len(images) - len(dicomdirs)
            tops = [p.relative_to(src).parts for p in images]
            # one sub-folder per class: every image in a sub-folder, and at least two of them
            dirs_only = bool(tops) and all(len(t) > 1 for t in tops) and len({t[0] for t in tops}) > 1
            if dirs_only and dicomdirs:
                # A media export (CD/DVD, PACS): its folders are patients/studies, often named after the
                # patient, never classes, and a folder name must not carry a name into the manifest.
                dirs_only = False
                plan.notes.append(f"{src.name}: a DICOMDIR export, read as unlabeled (its folders are not classes)")
            found += [(src, p, t[0] if dirs_only else None) for p, t in zip(images, tops)]
        if skipped:
            plan.notes.append(f"skipped {skipped} non-image file(s)")
        if not found:
            raise MedclfError("no image files found in " + ", ".join(str(s) for s in sources))
        dicoms = [f for f in found if is_dicom(f[1])]
        others = [f for f in found if not is_dicom(f[1])]
        units = dicom_units(dicoms, mapper, plan) if dicoms else []
        for root, p, lab in others:
            rel = p.relative_to(root).as_posix()
            units.append(Unit(key=pseudonym("file", rel), kind="file", paths=[str(p)], source=rel, extra={"label_name": lab}))
        for u in units:
            override = _lookup(table, u.source)
            if override is not None:
                u.extra["label_name"] = override
        finish_labels(plan, units)
        plan.units = units
        plan.inputs = [p for _, p, _ in found] + ([opts.labels] if opts.labels else [])
        return plan


@register_dataset
class CsvDataset(Adapter):
    """A CSV with ``path,label`` (paths relative to the CSV), optional ``split`` and ``group``.

    A ``path`` that is a folder is read as one DICOM series.
    """

    name = "csv"

    @staticmethod
    def detect(root: Path) -> bool:
        return root.is_file() and root.suffix.lower() == ".csv"

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:
        if len(sources) != 1 or not sources[0].is_file():
            raise MedclfError("--dataset csv takes one CSV file")
        path = sources[0]
        rows = read_csv(path)
        if not rows:
            raise MedclfError("CSV has no rows", path)
        require_columns(rows, ["path"], path)
        plan = Plan(dataset=self.name, units=[], options={"csv": path.name}, inputs=[path])
        base = path.parent
        units = []
        for i, r in enumerate(rows):
            rel = (r.get("path") or "").strip()
            p = base / rel
            lab = (r.get("label") or "").strip() or None
            split = (r.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                plan.errors.append((str(p), f"row {i + 2}: unknown split {split!r} (use train, val or test)"))
                continue
            if not rel or not p.exists():
                plan.errors.append((str(p), f"row {i + 2}: file not found"))
                continue
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and is_dicom(f))
                if not files:
                    plan.errors.append((str(p), f"row {i + 2}: folder holds no DICOM files"))
                    continue
                unit = Unit(key=pseudonym("series", rel), kind="series", paths=[str(f) for f in files], source=rel)
                plan.inputs += files
            else:
                unit = Unit(key=pseudonym("file", rel), kind="file", paths=[str(p)], source=rel)
                plan.inputs.append(p)
            unit.split = split
            group = (r.get("group") or "").strip()
            unit.group = pseudonym("group", group) if group else None
            unit.extra["label_name"] = lab
            units.append(unit)
        finish_labels(plan, units)
        plan.units = units
        return plan
