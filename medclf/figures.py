"""Matplotlib, imported lazily with the Agg backend, and atomic PNG writes (reports and overlays)."""

from __future__ import annotations

from pathlib import Path

from medclf.atomic import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Write the PNG atomically (no half-written file), then close the figure."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"))
    finally:
        pyplot().close(fig)
