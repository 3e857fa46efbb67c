"""Classification metrics (scikit-learn) plus what it lacks: ECE, reliability bins, bootstrap CIs.

Every function returns plain Python (dicts, lists, floats, ints, None) so the result can go straight
into ``metrics.json``; an undefined value (AUROC of a class absent from the data) is ``None``, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, log_loss,
                             precision_recall_fscore_support, roc_auc_score)

from medclf.errors import MedclfError

#: probabilities may be float32/float16 softmax outputs: rows must sum to 1 within this
_SUM_TOL = 1e-2
#: clip for the log loss, so one confident mistake gives a large but finite NLL
_NLL_EPS = 1e-12
#: bootstrap resamples are drawn in blocks of at most this many (resample x item) cells (memory bound)
_BLOCK_CELLS = 4_000_000


# --------------------------------------------------------------------------------------------- checks

def _check_common(n_bins: int, n_bootstrap: int) -> None:
    if int(n_bins) < 1:
        raise MedclfError(f"n_bins must be at least 1, got {n_bins}")
    if int(n_bootstrap) < 0:
        raise MedclfError(f"n_bootstrap must be 0 or more, got {n_bootstrap}")


def _check_names(names: Sequence[str], what: str) -> list[str]:
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise MedclfError(f"{what} names are not unique: {names}")
    return names


def check_classification(y_true, probs, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, probs) as int labels in [0, K) and a (N, K) float64 array of probabilities, or MedclfError.

    Catches the usual mistakes early with a message that says which: empty split, logits passed
    instead of probabilities, labels and probabilities from different item lists.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise MedclfError(f"labels must be a 1-D array of class indices, got shape {y.shape}")
    if len(y) == 0:
        raise MedclfError("no items to evaluate (empty labels)")
    if p.ndim != 2 or p.shape != (len(y), n_classes):
        raise MedclfError(f"probabilities have shape {p.shape}, expected ({len(y)}, {n_classes}) "
                          f"(one row per label, one column per class name)")
    if not np.isfinite(p).all():
        raise MedclfError(f"probabilities contain NaN or infinite values ({int((~np.isfinite(p)).sum())} entries)")
    if (p < -1e-6).any() or (p > 1 + 1e-6).any():
        raise MedclfError("probabilities must lie in [0, 1] (were logits passed instead?)")
    sums = p.sum(1)
    if np.abs(sums - 1).max() > _SUM_TOL:
        raise MedclfError(f"probability rows must sum to 1, found sums from {sums.min():.4f} to {sums.max():.4f}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise MedclfError("labels must be whole class indices (found NaN or fractional values)")
    elif y.dtype.kind not in "iub":
        raise MedclfError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        raise MedclfError(f"labels must lie in [0, {n_classes - 1}], found {y.min()}..{y.max()}")
    return y, np.clip(p, 0.0, 1.0)


def _check_pred(pred, n: int, n_classes: int) -> np.ndarray:
    yhat = np.asarray(pred)
    if yhat.shape != (n,):
        raise MedclfError(f"predictions have shape {yhat.shape}, expected ({n},)")
    yhat = yhat.astype(np.int64)
    if n and (yhat.min() < 0 or yhat.max() >= n_classes):
        raise MedclfError(f"predictions must lie in [0, {n_classes - 1}]")
    return yhat


# ---------------------------------------------------------------------------------------- calibration

def _calibration(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> tuple[float, list[dict]]:
    """ECE = sum_b |B_b|/N * |mean conf_b - mean hit_b| over equal-width bins (lo, hi] (the first bin
    also takes 0), and the non-empty bins for a reliability diagram.

    Hand-written: scikit-learn has ``calibration_curve`` (binary, no counts) but no ECE.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(idx, weights=hit.astype(np.float64), minlength=n_bins)
    ece, bins = 0.0, []
    for b in np.flatnonzero(count):
        c, a = conf_sum[b] / count[b], hit_sum[b] / count[b]
        ece += count[b] / len(conf) * abs(c - a)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "confidence": float(c), "accuracy": float(a),
                     "count": int(count[b])})
    return float(ece), bins


def reliability(y_true, probs, n_bins: int = 15) -> tuple[float, list[dict]]:
    """Top-label ECE (Guo et al. 2017: confidence = max probability, hit = argmax is right) and its bins."""
    y, p = check_classification(y_true, probs, np.asarray(probs).shape[-1] if np.ndim(probs) == 2 else -1)
    _check_common(n_bins, 0)
    return _calibration(p.max(1), p.argmax(1) == y, int(n_bins))


def binary_reliability(y_true, p_pos, n_bins: int = 15) -> tuple[float, list[dict]]:
    """Calibration of a positive-class probability: bins of p against the fraction of positives
    (``accuracy`` in the bins is that fraction), as for one label of a multi-label model."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(p_pos, dtype=np.float64)
    return _calibration(p, y, int(n_bins))


# ---------------------------------------------------------------------------------------------- AUROC

def _auroc_or_none(pos: np.ndarray, score: np.ndarray) -> float | None:
    """sklearn's AUROC, or None when only one class is present (undefined, not 0.5)."""
    return float(roc_auc_score(pos, score)) if 0 < pos.sum() < len(pos) else None


def _auroc_per_class(y: np.ndarray, p: np.ndarray) -> list[float | None]:
    return [_auroc_or_none(y == k, p[:, k]) for k in range(p.shape[1])]


def _macro(per: list[float | None], binary: bool) -> float | None:
    """Binary: the positive class's AUROC (the usual number); else the mean over defined classes."""
    if binary:
        return per[1]
    vals = [v for v in per if v is not None]
    return float(np.mean(vals)) if vals else None


class _SortedScores:
    """One score column sorted once, with its tie groups, for AUROCs of many weighted resamples.

    Hand-written for the bootstrap only: one ``roc_auc_score`` call per class per resample spends
    ~1 ms validating its input (~10 s for 1000 resamples of a 4-class split). A resample with
    replacement is a vector of item counts, and the AUROC of a weighted sample is the Mann-Whitney
    statistic with those weights (ties count 1/2, as in ``roc_auc_score``): linear per resample
    once the scores are sorted.
    """

    def __init__(self, score: np.ndarray, pos: np.ndarray, neg: np.ndarray):
        self.order = np.argsort(score, kind="stable")
        s = score[self.order]
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        self.pos = pos[self.order].astype(np.float64)
        self.neg = neg[self.order].astype(np.float64)

    def auroc(self, counts: np.ndarray) -> np.ndarray:
        """AUROC of each row of a (B, N) count matrix; NaN where a row has no positives or no negatives."""
        w = counts[:, self.order]
        gp, gn = w * self.pos, w * self.neg
        if len(self.starts) < len(self.order):  # ties: sum each tie group (no ties: groups are the items)
            gp, gn = np.add.reduceat(gp, self.starts, axis=1), np.add.reduceat(gn, self.starts, axis=1)
        below = np.cumsum(gn, axis=1) - gn  # negative weight strictly below each tie group
        n1, n0 = gp.sum(1), gn.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((n1 > 0) & (n0 > 0), (gp * (below + 0.5 * gn)).sum(1) / (n1 * n0), np.nan)


def _resample_counts(rng: np.random.Generator, n_items: int, n_bootstrap: int):
    """Blocks of (B, N) count matrices: how often each item was drawn in each resample (with
    replacement, N draws), kept within ``_BLOCK_CELLS`` cells per block."""
    size = max(1, _BLOCK_CELLS // max(n_items, 1))
    for start in range(0, n_bootstrap, size):
        b = min(size, n_bootstrap - start)
        idx = rng.integers(0, n_items, size=(b, n_items))
        flat = (idx + n_items * np.arange(b)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n_items).reshape(b, n_items).astype(np.float64)


def _percentile_ci(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


# ------------------------------------------------------------------------------------ single-label

def bootstrap_ci(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, n_bootstrap: int = 1000,
                 seed: int = 0) -> tuple[dict, dict]:
    """Percentile 95% intervals of accuracy and macro AUROC over items resampled with replacement.

    The macro AUROC of a resample averages the same classes as the point estimate (those defined
    on the whole set); a resample where any of them has no positives or no negatives is skipped
    rather than averaged over fewer classes. Returns (ci95, bookkeeping).
    """
    y, p = np.asarray(y), np.asarray(probs, dtype=np.float64)
    correct = (np.asarray(pred) == y).astype(np.float64)
    n, K = p.shape
    per = _auroc_per_class(y, p)
    classes = [k for k in ([1] if K == 2 else range(K)) if per[k] is not None]
    sorted_cols = [_SortedScores(p[:, k], y == k, y != k) for k in classes]
    rng = np.random.default_rng(seed)
    accs, aucs = [], []
    for counts in _resample_counts(rng, n, n_bootstrap):
        accs.append(counts @ correct / n)
        if sorted_cols:
            # NaN (the resample is skipped) where any of the classes is undefined in it
            aucs.append(np.mean([c.auroc(counts) for c in sorted_cols], axis=0))
    accs = np.concatenate(accs) if accs else np.empty(0)
    aucs = np.concatenate(aucs) if aucs else np.empty(0)
    ci = {"accuracy": _percentile_ci(accs), "auroc_macro": _percentile_ci(aucs)}
    info = {"resamples": int(n_bootstrap), "auroc_resamples": int(np.isfinite(aucs).sum()), "seed": int(seed)}
    return ci, info


def classification_metrics(y_true, probs, class_names: Sequence[str], n_bootstrap: int = 1000, seed: int = 0,
                           n_bins: int = 15, pred=None) -> dict:
    """Everything a report needs for a K-class problem, JSON-serialisable.

    ``pred`` defaults to argmax of ``probs``; a method whose decision rule differs (majority vote
    over trials) passes its own, and accuracy/F1/confusion use it while AUROC/ECE/Brier/NLL use
    ``probs``. ECE is top-label, so it always describes the argmax confidence.
    """
    names = _check_names(class_names, "class")
    K = len(names)
    if K < 2:
        raise MedclfError(f"need at least 2 class names, got {names}")
    _check_common(n_bins, n_bootstrap)
    y, p = check_classification(y_true, probs, K)
    yhat = p.argmax(1) if pred is None else _check_pred(pred, len(y), K)
    labels = list(range(K))

    per_auc = _auroc_per_class(y, p)
    ece, bins = _calibration(p.max(1), p.argmax(1) == y, int(n_bins))
    prec, rec, f1, sup = precision_recall_fscore_support(y, yhat, labels=labels, zero_division=0)
    # balanced accuracy = mean recall over the classes present in y, which is what
    # sklearn's balanced_accuracy_score computes, minus its warning when a class is only predicted
    balanced = float(np.mean(rec[np.unique(y)]))
    q = np.clip(p, _NLL_EPS, 1.0)
    out = {
        "n": int(len(y)),
        "classes": names,
        "accuracy": float(accuracy_score(y, yhat)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(y, yhat, labels=labels, average="macro", zero_division=0)),
        "auroc_per_class": dict(zip(names, per_auc)),
        "auroc_macro": _macro(per_auc, K == 2),
        "auroc_macro_kind": "binary (positive class)" if K == 2 else "one-vs-rest macro over classes present",
        "ece": ece,
        "brier": float(((p - np.eye(K)[y]) ** 2).sum(1).mean()),
        "nll": float(log_loss(y, q / q.sum(1, keepdims=True), labels=labels)),
        "confusion_matrix": confusion_matrix(y, yhat, labels=labels).tolist(),
        "per_class": {names[k]: {"precision": float(prec[k]), "recall": float(rec[k]), "f1": float(f1[k]),
                                 "support": int(sup[k])} for k in range(K)},
        "reliability": bins,
        "n_bins": int(n_bins),
    }
    out["warnings"] = degenerate_prediction_warnings(y, p, yhat, K)
    if n_bootstrap > 0:
        out["ci95"], out["bootstrap"] = bootstrap_ci(y, p, yhat, int(n_bootstrap), seed)
    else:
        out["ci95"], out["bootstrap"] = {}, {"resamples": 0, "auroc_resamples": 0, "seed": int(seed)}
    return out


def degenerate_prediction_warnings(y: np.ndarray, p: np.ndarray, yhat: np.ndarray, n_classes: int) -> list[str]:
    """Why this split's ECE/Brier say nothing good about the model, if they don't (issues #16/#17).

    A model that calls one class for every image, or whose probabilities are all ~1/K, can have an
    ECE near 0: its confidence matches its (chance) accuracy. Such a figure must not be read alone.
    """
    from medclf.scoring.base import separation

    warnings = []
    present = np.unique(y)
    n_pred = len(np.unique(yhat))
    auc, at_chance = separation(y, p)
    if len(present) > 1 and (n_pred == 1 or (auc is not None and auc <= at_chance)):
        warnings.append(f"predictions are at chance (macro AUROC {auc:.3f}, chance level up to {at_chance:.3f}; {n_pred} of "
                        f"{n_classes} classes ever predicted): ECE and Brier are not meaningful for this model")
    conf = float(p.max(1).mean())
    if conf - 1.0 / n_classes < 0.02 * (1 - 1.0 / n_classes):
        warnings.append(f"every probability is ~1/{n_classes} (mean confidence {conf:.3f}): a near-zero ECE here "
                        "means the model says nothing, not that it is calibrated")
    return warnings


# ------------------------------------------------------------------------------------- multi-label

def check_multilabel(y_true, probs, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(Y, P) as (N, L) float64; Y holds 0, 1 or NaN (ignored / missing / uncertain), P finite in [0, 1]."""
    Y = np.asarray(y_true, dtype=np.float64)
    P = np.asarray(probs, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != P.shape:
        raise MedclfError(f"targets {Y.shape} and probabilities {P.shape} must both be (N, L)")
    if Y.shape[0] == 0:
        raise MedclfError("no items to evaluate (empty targets)")
    if Y.shape[1] != n_labels:
        raise MedclfError(f"{Y.shape[1]} label columns but {n_labels} label names")
    if not np.isfinite(P).all():
        raise MedclfError(f"probabilities contain NaN or infinite values ({int((~np.isfinite(P)).sum())} entries)")
    if (P < -1e-6).any() or (P > 1 + 1e-6).any():
        raise MedclfError("probabilities must lie in [0, 1] (were logits passed instead?)")
    known = Y[~np.isnan(Y)]
    if not np.isin(known, (0.0, 1.0)).all():
        bad = sorted(set(known[~np.isin(known, (0.0, 1.0))].tolist()))[:5]
        raise MedclfError(f"targets must be 0, 1 or NaN (ignored), found {bad} (map uncertain labels first)")
    return Y, np.clip(P, 0.0, 1.0)


def _multilabel_macro_ci(Y: np.ndarray, P: np.ndarray, labels: list[int], n_bootstrap: int,
                         seed: int) -> tuple[list[float] | None, int]:
    """Bootstrap over items (rows, so a row's labels stay together) of the macro AUROC over ``labels``."""
    cols = [_SortedScores(P[:, j], Y[:, j] == 1, Y[:, j] == 0) for j in labels]  # NaN targets: neither
    rng = np.random.default_rng(seed)
    aucs = [np.mean([c.auroc(counts) for c in cols], axis=0) for counts in _resample_counts(rng, len(Y), n_bootstrap)]
    aucs = np.concatenate(aucs) if aucs else np.empty(0)
    return _percentile_ci(aucs), int(np.isfinite(aucs).sum())


def multilabel_metrics(y_true, probs, label_names: Sequence[str], n_bootstrap: int = 1000, seed: int = 0,
                       n_bins: int = 15, threshold: float = 0.5) -> dict:
    """Per-label metrics of independent binary labels; NaN targets are masked per label (not per row).

    Per label: n (non-NaN targets), positives, auroc (None unless both classes present), accuracy and
    f1 at ``threshold``, ece (calibration of the positive-class probability), brier, reliability bins.
    """
    names = _check_names(label_names, "label")
    if not names:
        raise MedclfError("need at least one label name")
    _check_common(n_bins, n_bootstrap)
    Y, P = check_multilabel(y_true, probs, len(names))
    per, defined = {}, []
    for j, name in enumerate(names):
        m = ~np.isnan(Y[:, j])
        y, p = Y[m, j].astype(np.int64), P[m, j]
        entry: dict = {"n": int(m.sum()), "positives": int(y.sum()), "auroc": None, "accuracy": None, "f1": None,
                       "ece": None, "brier": None, "reliability": []}
        if m.any():
            hat = p >= threshold
            entry["auroc"] = _auroc_or_none(y == 1, p)
            entry["accuracy"] = float(accuracy_score(y, hat))
            entry["f1"] = float(f1_score(y, hat, pos_label=1, zero_division=0))
            entry["ece"], entry["reliability"] = binary_reliability(y, p, int(n_bins))
            entry["brier"] = float(((p - y) ** 2).mean())
            if entry["auroc"] is not None:
                defined.append(j)
        per[name] = entry
    aucs = [per[names[j]]["auroc"] for j in defined]
    out = {
        "n": int(len(Y)),
        "labels": names,
        "threshold": float(threshold),
        "per_label": per,
        "auroc_macro": float(np.mean(aucs)) if aucs else None,
        "auroc_macro_labels": [names[j] for j in defined],
        "n_bins": int(n_bins),
        "ci95": {},
        "bootstrap": {"resamples": int(n_bootstrap), "auroc_resamples": 0, "seed": int(seed)},
    }
    if n_bootstrap > 0 and defined:
        ci, used = _multilabel_macro_ci(Y, P, defined, int(n_bootstrap), seed)
        out["ci95"] = {"auroc_macro": ci}
        out["bootstrap"]["auroc_resamples"] = used
    return out


# -------------------------------------------------------------------------------------- referral

def selective_accuracy(y_true, probs, uncertainty, fractions: Sequence[float] = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1),
                       pred=None) -> list[dict]:
    """Accuracy on the most certain fraction of items (a referral curve: the rest go to a reader).

    If the uncertainty is useful, accuracy rises as the kept fraction falls (Favero et al.). Ties in
    uncertainty keep the input order. Each point: fraction asked, n kept, accuracy, and the largest
    uncertainty kept (the referral threshold that fraction implies).
    """
    p = np.asarray(probs, dtype=np.float64)
    y, p = check_classification(y_true, p, p.shape[1] if p.ndim == 2 else -1)
    u = np.asarray(uncertainty, dtype=np.float64)
    if u.shape != y.shape:
        raise MedclfError(f"uncertainty has shape {u.shape}, expected ({len(y)},)")
    if not np.isfinite(u).all():
        raise MedclfError("uncertainty contains NaN or infinite values")
    fr = [float(f) for f in fractions]
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise MedclfError(f"fractions must be in (0, 1], got {list(fractions)}")
    yhat = p.argmax(1) if pred is None else _check_pred(pred, len(y), p.shape[1])
    order = np.argsort(u, kind="stable")
    out = []
    for f in fr:
        keep = order[: max(1, int(round(f * len(y))))]
        out.append({"fraction": f, "n": int(len(keep)), "accuracy": float((yhat[keep] == y[keep]).mean()),
                    "uncertainty_max": float(u[keep].max())})
    return out


# -------------------------------------------------------------------------------------- intervals

def interval_coverage(target, low, high) -> np.ndarray:
    """Per column, the share of rows whose target lies in [low, high] (ends included): (N, K) -> (K,)."""
    t, lo, hi = (np.asarray(a, dtype=np.float64) for a in (target, low, high))
    if not (t.shape == lo.shape == hi.shape) or t.ndim != 2:
        raise MedclfError(f"interval arrays must share one (N, K) shape, got {t.shape}, {lo.shape}, {hi.shape}")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise MedclfError("interval bounds contain NaN or infinite values")
    if (lo > hi).any():
        raise MedclfError("interval low bound above its high bound")
    return ((t >= lo) & (t <= hi)).mean(0)


def picp(y_true, low, high, class_names: Sequence[str], nominal: float = 0.95, samples: int | None = None) -> dict:
    """CARD's prediction interval coverage probability, for classification.

    Per class k: the share of items whose one-hot label value 1[y = k] lies in that item's interval
    [low_k, high_k] of sampled label values; ``picp`` is the mean over classes, ``picp_all_classes``
    the share of items covered in every class at once. A calibrated 95% interval covers ~0.95.
    ``samples``: label samples per item behind the intervals (recorded; under 40 the 2.5-97.5
    percentiles are about the samples' min and max, and a warning says so).
    """
    lo = np.asarray(low, dtype=np.float64)
    k = len(class_names)
    y, _ = check_classification(y_true, np.full((len(np.asarray(y_true)), k), 1.0 / max(1, k)), k)  # labels only
    onehot = np.eye(len(class_names))[y]
    per = interval_coverage(onehot, lo, high)
    covered_all = ((onehot >= lo) & (onehot <= np.asarray(high, dtype=np.float64))).all(1)
    out = {"picp": float(per.mean()), "picp_per_class": {c: float(v) for c, v in zip(class_names, per)},
           "picp_all_classes": float(covered_all.mean()), "nominal": nominal, "samples": samples,
           "definition": "share of items whose one-hot label value lies in the per-class interval "
                         "[2.5th, 97.5th percentile] of the sampled label values; mean over classes", "warnings": []}
    if samples is not None and samples < 40:
        out["warnings"].append(f"intervals from {samples} label samples per image: the 2.5-97.5 percentiles are about "
                               "the samples' min and max; use --samples 100 for a 95% interval")
    return out
