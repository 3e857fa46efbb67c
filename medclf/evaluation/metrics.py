"""Classification metrics (scikit-learn) plus what it lacks: top-label ECE and bootstrap CIs."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                             precision_recall_fscore_support, roc_auc_score)

from medclf.errors import MedclfError


def _check(y: np.ndarray, probs: np.ndarray, n_classes: int) -> None:
    if len(y) == 0:
        raise MedclfError("no items to evaluate")
    if probs.ndim != 2 or probs.shape != (len(y), n_classes):
        raise MedclfError(f"probabilities have shape {probs.shape}, expected ({len(y)}, {n_classes})")
    if not np.isfinite(probs).all():
        raise MedclfError("probabilities contain NaN or infinite values")


def reliability(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> tuple[float, list[dict]]:
    """Top-label ECE with equal-width bins (Guo et al. 2017), and the bins for a reliability diagram.

    scikit-learn's ``calibration_curve`` is binary-only and returns no ECE, hence this.
    """
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece, bins = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - correct[m].mean())
            bins.append({"lo": float(lo), "hi": float(hi), "confidence": float(conf[m].mean()),
                         "accuracy": float(correct[m].mean()), "count": int(m.sum())})
    return float(ece), bins


def _auroc(y: np.ndarray, probs: np.ndarray) -> tuple[dict[int, float | None], float | None]:
    K = probs.shape[1]
    per = {}
    for k in range(K):
        pos = y == k
        per[k] = float(roc_auc_score(pos, probs[:, k])) if 0 < pos.sum() < len(y) else None
    if K == 2:
        macro = per[1]
    else:
        vals = [v for v in per.values() if v is not None]
        macro = float(np.mean(vals)) if vals else None
    return per, macro


def classification_metrics(y_true, probs, class_names: list[str], n_bootstrap: int = 1000, seed: int = 0,
                           n_bins: int = 15, pred=None) -> dict:
    """Everything a report needs, JSON-serialisable. ``pred`` defaults to argmax of ``probs`` (a method
    whose decision rule differs, e.g. majority vote, passes its own)."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    K = len(class_names)
    _check(y, p, K)
    yhat = p.argmax(1) if pred is None else np.asarray(pred).astype(int)
    per_auc, macro_auc = _auroc(y, p)
    ece, bins = reliability(y, p, n_bins)
    onehot = np.eye(K)[y]
    prec, rec, f1, sup = precision_recall_fscore_support(y, yhat, labels=list(range(K)), zero_division=0)
    out = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, yhat)),
        "balanced_accuracy": float(balanced_accuracy_score(y, yhat)) if len(set(y)) > 1 else float(accuracy_score(y, yhat)),
        "macro_f1": float(f1_score(y, yhat, labels=list(range(K)), average="macro", zero_division=0)),
        "auroc_per_class": {class_names[k]: v for k, v in per_auc.items()},
        "auroc_macro": macro_auc,
        "ece": ece,
        "brier": float(((p - onehot) ** 2).sum(1).mean()),
        "nll": float(log_loss(y, np.clip(p, 1e-12, 1) / np.clip(p, 1e-12, 1).sum(1, keepdims=True), labels=list(range(K)))),
        "confusion_matrix": confusion_matrix(y, yhat, labels=list(range(K))).tolist(),
        "per_class": {class_names[k]: {"precision": float(prec[k]), "recall": float(rec[k]), "f1": float(f1[k]),
                                       "support": int(sup[k])} for k in range(K)},
        "reliability": bins,
        "classes": list(class_names),
    }
    out["ci95"] = bootstrap_ci(y, p, yhat, n_bootstrap, seed) if n_bootstrap > 0 else {}
    return out


def bootstrap_ci(y: np.ndarray, p: np.ndarray, yhat: np.ndarray, n: int, seed: int) -> dict:
    """Percentile 95% intervals of accuracy and macro AUROC over resampled items."""
    rng = np.random.default_rng(seed)
    accs, aucs = [], []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        accs.append(float((yhat[idx] == y[idx]).mean()))
        _, a = _auroc(y[idx], p[idx])
        if a is not None:
            aucs.append(a)
    ci = {"accuracy": [float(np.percentile(accs, 2.5)), float(np.percentile(accs, 97.5))]}
    if aucs:
        ci["auroc_macro"] = [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]
    return ci


def multilabel_metrics(y_true, probs, label_names: list[str], n_bootstrap: int = 200, seed: int = 0) -> dict:
    """Per-label AUROC/accuracy/F1/ECE/Brier with NaN targets (ignored/uncertain) masked out."""
    Y = np.asarray(y_true, dtype=np.float64)
    P = np.asarray(probs, dtype=np.float64)
    if Y.shape != P.shape or Y.ndim != 2:
        raise MedclfError(f"targets {Y.shape} and probabilities {P.shape} differ")
    per, aucs = {}, []
    for j, name in enumerate(label_names):
        m = ~np.isnan(Y[:, j])
        y, p = Y[m, j].astype(int), P[m, j]
        entry = {"n": int(m.sum()), "positives": int(y.sum())}
        if m.sum():
            two = np.stack([1 - p, p], 1)
            entry.update(accuracy=float(((p >= 0.5) == y).mean()), f1=float(f1_score(y, p >= 0.5, zero_division=0)),
                         ece=reliability(y, two)[0], brier=float(((p - y) ** 2).mean()))
            entry["auroc"] = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
            if entry["auroc"] is not None:
                aucs.append(entry["auroc"])
        per[name] = entry
    return {"per_label": per, "auroc_macro": float(np.mean(aucs)) if aucs else None, "labels": list(label_names)}


def selective_accuracy(y_true, probs, uncertainty, fractions=(1.0, 0.9, 0.75, 0.5, 0.25, 0.1), pred=None) -> list[dict]:
    """Accuracy on the most certain fraction of items (referral curve: refer the rest to a reader)."""
    y = np.asarray(y_true).astype(int)
    yhat = np.asarray(probs).argmax(1) if pred is None else np.asarray(pred)
    order = np.argsort(np.asarray(uncertainty), kind="stable")
    out = []
    for f in fractions:
        k = max(1, int(round(f * len(y))))
        keep = order[:k]
        out.append({"fraction": float(f), "n": int(k), "accuracy": float((yhat[keep] == y[keep]).mean())})
    return out
