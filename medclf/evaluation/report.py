"""Report folder: ``metrics.json`` and small PNG plots (ROC, reliability diagram, confusion matrix).

Every file is written atomically (temp file + rename), so a crashed or concurrent run never leaves a
half-written ``metrics.json`` or PNG for a reader to trip over.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medclf.data.cache import atomic_write_text
from medclf.errors import MedclfError
from medclf.evaluation.metrics import binary_reliability, check_classification, check_multilabel, reliability
from medclf.figures import pyplot, save_figure

_DPI = 100


def _jsonable(obj):
    """Plain JSON: numpy scalars/arrays -> Python, NaN/inf -> None (strict JSON has no NaN), Path -> str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_metrics_json(path: Path, metrics: dict) -> Path:
    """``metrics`` as indented strict JSON, written atomically."""
    try:
        text = json.dumps(_jsonable(metrics), indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise MedclfError(f"metrics are not JSON-serialisable: {e}", path) from None
    atomic_write_text(Path(path), text + "\n")
    return Path(path)


def _figure(path: Path, figsize: tuple[float, float], draw: Callable) -> Path:
    """Draw on a fresh figure and save it atomically; the figure is closed even if drawing fails."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    try:
        draw(ax)
    except BaseException:
        plt.close(fig)
        raise
    save_figure(fig, path, dpi=_DPI)
    return path


def _roc_axes(ax, curves: list[tuple[str, np.ndarray, np.ndarray]], title: str) -> None:
    """One ROC curve per (name, positive mask, score); absent classes are named in the legend."""
    from sklearn.metrics import auc, roc_curve

    for name, pos, score in curves:
        if 0 < pos.sum() < len(pos):
            fpr, tpr, _ = roc_curve(pos, score)
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
        else:
            ax.plot([], [], " ", label=f"{name} (AUC n/a: one class only)")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC {title}".strip())
    ax.legend(loc="lower right", fontsize=7)


def _reliability_axes(ax, bins: list[dict], ece: float | None, xlabel: str, ylabel: str) -> None:
    if bins:
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        widths = [(b["hi"] - b["lo"]) * 0.9 for b in bins]
        acc = [b["accuracy"] for b in bins]
        ax.bar(centres, acc, width=widths, alpha=0.6, edgecolor="C0", label=ylabel)
        ax.plot([b["confidence"] for b in bins], acc, "o", ms=3, color="C1", label="bin mean confidence")
        for c, b in zip(centres, bins):
            ax.annotate(f"n={b['count']}", (c, 0.01), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    ece_s = "n/a" if ece is None else f"{ece:.3f}"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xlabel, ylabel=ylabel, title=f"reliability, ECE {ece_s}")
    ax.legend(loc="upper left", fontsize=7)


def _start_report(out_dir: Path, metrics: dict) -> tuple[Path, list[Path]]:
    """Create the report folder and write ``metrics.json`` first (the plots are extras)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MedclfError(f"cannot create the report folder: {e.strerror}", out_dir) from None
    return out_dir, [write_metrics_json(out_dir / "metrics.json", metrics)]


def write_report(out_dir: Path, metrics: dict, y_true, probs, class_names: Sequence[str],
                 title: str = "") -> list[Path]:
    """``metrics.json``, ``roc.png`` (one-vs-rest per class; the positive class only when binary,
    whose other curve is its mirror), ``reliability.png`` and ``confusion.png``; returns the paths.

    Plots read ``metrics["reliability"]``/``["ece"]``/``["confusion_matrix"]`` when present (so they
    show what the JSON says, e.g. a vote-based confusion) and compute them from the inputs otherwise.
    """
    from sklearn.metrics import confusion_matrix

    names = [str(c) for c in class_names]
    K = len(names)
    y, p = check_classification(y_true, probs, K)
    out_dir, written = _start_report(out_dir, metrics)

    classes = [1] if K == 2 else range(K)
    curves = [(names[k], y == k, p[:, k]) for k in classes]
    written.append(_figure(out_dir / "roc.png", (4.5, 4.5), lambda ax: _roc_axes(ax, curves, title)))

    if "reliability" in metrics and "ece" in metrics:
        ece, bins = metrics["ece"], metrics["reliability"]
    else:
        ece, bins = reliability(y, p, int(metrics.get("n_bins", 15)))
    written.append(_figure(out_dir / "reliability.png", (4.5, 4.5),
                           lambda ax: _reliability_axes(ax, bins, ece, "confidence (top class)", "accuracy")))

    cm = np.asarray(metrics["confusion_matrix"]) if "confusion_matrix" in metrics else \
        confusion_matrix(y, p.argmax(1), labels=list(range(K)))
    if cm.shape != (K, K):
        raise MedclfError(f"confusion matrix has shape {cm.shape}, expected ({K}, {K})")

    def draw_confusion(ax):
        ax.imshow(cm, cmap="Blues", vmin=0)
        for i in range(K):
            for j in range(K):
                dark = cm.max() > 0 and cm[i, j] > cm.max() / 2
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(K), names, rotation=45, ha="right")
        ax.set_yticks(range(K), names)
        ax.set(xlabel="predicted", ylabel="true", title=f"confusion {title}".strip())

    side = 1.5 + 0.6 * K
    written.append(_figure(out_dir / "confusion.png", (side, side), draw_confusion))
    return written


def write_multilabel_report(out_dir: Path, metrics: dict, y_true, probs, label_names: Sequence[str],
                            title: str = "") -> list[Path]:
    """``metrics.json``, ``roc.png`` (one curve per label over its non-NaN targets) and
    ``reliability.png`` (positive-class calibration per label); returns the paths."""
    names = [str(n) for n in label_names]
    Y, P = check_multilabel(y_true, probs, len(names))
    out_dir, written = _start_report(out_dir, metrics)

    masks = [~np.isnan(Y[:, j]) for j in range(len(names))]
    curves = [(name, Y[m, j] == 1, P[m, j]) for j, (name, m) in enumerate(zip(names, masks))]
    written.append(_figure(out_dir / "roc.png", (4.5, 4.5), lambda ax: _roc_axes(ax, curves, title)))

    n_bins = int(metrics.get("n_bins", 15))

    def draw_reliability(ax):
        for j, (name, m) in enumerate(zip(names, masks)):
            if m.any():
                ece, bins = binary_reliability(Y[m, j], P[m, j], n_bins)
                ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", ms=3, lw=1,
                        label=f"{name} (ECE {ece:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="fraction positive",
               title=f"reliability {title}".strip())
        ax.legend(loc="upper left", fontsize=7)

    written.append(_figure(out_dir / "reliability.png", (4.5, 4.5), draw_reliability))
    return written
