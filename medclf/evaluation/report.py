"""Report folder: ``metrics.json`` and PNG plots (ROC, reliability diagram, confusion matrix)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from medclf.data.cache import atomic_write_text


def _savefig(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.stem, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(out_dir: Path, metrics: dict, y_true, probs, class_names: list[str], title: str = "") -> list[Path]:
    from sklearn.metrics import roc_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1, default=float))
    plt = _plt()
    y, p = np.asarray(y_true).astype(int), np.asarray(probs)
    written = [out_dir / "metrics.json"]

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for k, name in enumerate(class_names):
        if len(class_names) == 2 and k == 0:
            continue  # binary: one curve, for the positive class
        pos = y == k
        if 0 < pos.sum() < len(y):
            fpr, tpr, _ = roc_curve(pos, p[:, k])
            auc = metrics["auroc_per_class"].get(name)
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}".strip())
    ax.legend(loc="lower right", fontsize=8)
    _savefig(fig, out_dir / "roc.png")
    plt.close(fig)
    written.append(out_dir / "roc.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bins = metrics.get("reliability", [])
    if bins:
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        width = bins[0]["hi"] - bins[0]["lo"]
        ax.bar(centres, [b["accuracy"] for b in bins], width=width * 0.9, alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", ms=3, color="C1", label="bin mean")
        for c, b in zip(centres, bins):
            ax.annotate(str(b["count"]), (c, 0.02), ha="center", fontsize=6)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"reliability, ECE {metrics.get('ece', float('nan')):.3f}")
    ax.legend(loc="upper left", fontsize=8)
    _savefig(fig, out_dir / "reliability.png")
    plt.close(fig)
    written.append(out_dir / "reliability.png")

    cm = np.asarray(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(class_names), 1 + 0.8 * len(class_names)))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black" if cm[i, j] < cm.max() / 2 else "white")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion")
    _savefig(fig, out_dir / "confusion.png")
    plt.close(fig)
    written.append(out_dir / "confusion.png")
    return written
