"""Dataset adapters, registered by name (``--dataset``)."""

from __future__ import annotations

from pathlib import Path

from medclf.datasets.base import DATASETS, Adapter, AdapterOptions, Plan, Unit, register_dataset
from medclf.datasets import generic, public  # noqa: F401  (registers the adapters)
from medclf.errors import MedclfError

__all__ = ["DATASETS", "Adapter", "AdapterOptions", "Plan", "Unit", "register_dataset", "get_adapter", "detect_dataset"]

# Most specific layouts first; "folder" is the fallback.
_DETECT_ORDER = ("rsna-ich", "chexpert", "isic", "ham10000", "medmnist", "csv")


def detect_dataset(sources: list[Path]) -> str:
    """The adapter name for ``--dataset auto``."""
    if len(sources) == 1:
        for name in _DETECT_ORDER:
            if DATASETS[name].detect(sources[0]):
                return name
    return "folder"


def get_adapter(name: str, sources: list[Path]) -> Adapter:
    if name == "auto":
        name = detect_dataset(sources)
    if name not in DATASETS:
        raise MedclfError(f"unknown dataset {name!r}; choose from auto, {', '.join(sorted(DATASETS))}")
    return DATASETS[name]()
