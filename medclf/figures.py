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


def save_sample_grid(path: Path, image, samples, title: str = "") -> None:
    """The conditioning image, then each sample, in one row (channel 0 in grey; 3 channels as RGB)."""
    import numpy as np

    plt = pyplot()
    panels = [image, *samples]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.8 * len(panels), 2.1), squeeze=False)
    for i, (ax, p) in enumerate(zip(axes[0], panels)):
        a = np.asarray(p, dtype=np.float32)
        if a.shape[0] == 3:
            ax.imshow(np.clip(a.transpose(1, 2, 0), 0, 1))
        else:
            ax.imshow(a[0], cmap="gray", vmin=0, vmax=1)
        ax.set_title("input" if i == 0 else f"sample {i}", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    save_figure(fig, Path(path))
