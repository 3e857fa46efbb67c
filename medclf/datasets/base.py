"""What a dataset adapter produces: a plan of work units with labels, read by the ingest pipeline.

An adapter knows one public dataset's layout exactly as it ships (``shared/DATASETS.md``); it reads
only CSVs and directory listings, never pixels, so planning is cheap and the heavy reading happens
in parallel workers.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from medclf.errors import MedclfError


@dataclass
class Unit:
    """One unit of ingest work: a file, a DICOM series or a slice range of an array file."""

    key: str  #: stable pseudonymous id; item ids derive from it
    kind: str  #: "file" | "series" | "npz"
    paths: list[str]  #: absolute paths to read
    source: str  #: path relative to the dataset root, recorded in the manifest
    label: int | None = None  #: primary class index
    labels: list[float | None] | None = None  #: multi-label targets (None = ignore)
    split: str | None = None  #: official split, if the dataset has one
    group: str | None = None  #: pseudonymous patient/lesion group; None -> from the header or key
    extra: dict = field(default_factory=dict)


@dataclass
class Plan:
    dataset: str
    units: list[Unit]
    classes: list[str] = field(default_factory=list)  #: primary label names
    label_names: list[str] = field(default_factory=list)  #: multi-label names
    channels: int | None = None  #: channels this dataset's images have (None: decide from data)
    options: dict = field(default_factory=dict)  #: adapter options, recorded and fingerprinted
    inputs: list[Path] = field(default_factory=list)  #: files whose size/mtime identify the input
    errors: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason) found while planning
    notes: list[str] = field(default_factory=list)  #: facts worth telling the user (duplicates dropped...)
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  #: train/val/test for seeded splits


UNCERTAIN_POLICIES = ("mixed", "ones", "zeros", "ignore")


@dataclass
class AdapterOptions:
    labels: Path | None = None  #: extra label CSV (path,label or id,label)
    uncertain: str = "mixed"  #: CheXpert -1 policy: ones | zeros | ignore | mixed
    seed: int = 0

    def __post_init__(self) -> None:
        # checked for every dataset, so a typo fails even where the policy would have no effect
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise MedclfError(f"unknown --uncertain policy {self.uncertain!r} ({', '.join(UNCERTAIN_POLICIES)})")


Mapper = Callable[[Callable, list], list]  # a (possibly parallel) map used for header reads


class Adapter:
    name: str = ""

    @staticmethod
    def detect(root: Path) -> bool:
        return False

    def plan(self, sources: list[Path], opts: AdapterOptions, mapper: Mapper) -> Plan:  # pragma: no cover
        raise NotImplementedError


DATASETS: dict[str, type[Adapter]] = {}


def register_dataset(cls: type[Adapter]) -> type[Adapter]:
    DATASETS[cls.name] = cls
    return cls


def find(root: Path, names: Iterable[str], depth: int = 2) -> Path | None:
    """First of ``names`` under root, looking ``depth`` folders down (some downloads nest twice)."""
    names = list(names)
    level = [root]
    for _ in range(depth + 1):
        for d in level:
            for n in names:
                if (d / n).exists():
                    return d / n
        level = [c for d in level if d.is_dir() for c in sorted(d.iterdir()) if c.is_dir()]
    return None


def read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise MedclfError("file not found", path) from None
    except IsADirectoryError:
        raise MedclfError("is a folder, not a CSV file", path) from None
    except PermissionError:
        raise MedclfError("cannot read this CSV file (permission denied)", path) from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise MedclfError(f"unreadable CSV ({e})", path) from None


def require_columns(rows: list[dict], columns: Iterable[str], path: Path) -> None:
    have = set(rows[0].keys()) if rows else set()
    missing = [c for c in columns if c not in have]
    if missing:
        raise MedclfError(f"CSV lacks column(s) {', '.join(missing)}", path)


def single_root(sources: list[Path], dataset: str) -> Path:
    if len(sources) != 1 or not sources[0].is_dir():
        raise MedclfError(f"--dataset {dataset} takes one dataset root folder")
    return sources[0]
