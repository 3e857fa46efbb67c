"""The scorer interface: what ``classify``, ``eval`` and ``explain`` call, whatever the method."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Prediction:
    probs: torch.Tensor  #: (B, K) calibrated class probabilities
    pred: torch.Tensor  #: (B,) predicted class index
    uncertainty: dict[str, torch.Tensor]  #: name -> (B,), higher = less certain (e.g. entropy, 1 - margin)
    nfe: torch.Tensor  #: (B,) network evaluations spent per image
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  #: e.g. vote shares (B, K)
    maps: dict[str, torch.Tensor] | None = None  #: explanation maps, each (B, ..., H, W)
    #: per-image statistics that are not the calibrated uncertainty (the diffusion classifier's
    #: vote entropy and margin): reported as their own fields, never in place of it
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Scorer(Protocol):
    classes: list[str]

    def predict(self, images: torch.Tensor, explain: bool = False) -> Prediction:
        """images: (B, C, H, W) in [0, 1], preprocessed as the run's cache was."""
        ...


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Normalised entropy in [0, 1] of each row of p."""
    k = p.shape[-1]
    h = -(p.clamp_min(1e-12) * p.clamp_min(1e-12).log()).sum(-1)
    return h / torch.log(torch.tensor(float(max(k, 2))))


def fit_temperature(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature T minimising the NLL of softmax(scores / T) (Guo et al. 2017) on held-out data.

    A 1-D search over log T is exact enough and, unlike LBFGS, cannot diverge when scores are tiny
    (diffusion errors differ between classes by ~1e-3).
    """
    scores = scores.double()
    labels = labels.long()
    grid = torch.logspace(math.log10(T_BOUNDS[0]), math.log10(T_BOUNDS[1]), 400, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(scores / t, labels) for t in grid])
    i = int(torch.argmin(nll))
    lo, hi = grid[max(i - 1, 0)].log(), grid[min(i + 1, len(grid) - 1)].log()
    fine = torch.exp(torch.linspace(float(lo), float(hi), 200, dtype=torch.float64))
    nll = torch.stack([torch.nn.functional.cross_entropy(scores / t, labels) for t in fine])
    return float(fine[int(torch.argmin(nll))])


def fit_calibration(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """Temperature and per-class bias for softmax(scores / T + b), by NLL on held-out data.

    The bias is a learned log prior: a diffusion classifier scores p(x | c) with every class equally
    likely, so on data whose classes are imbalanced (most slices show no haemorrhage) its decisions
    and probabilities need the prior back. T alone is Guo et al.'s temperature scaling; T + b is its
    vector-scaling variant (Platt scaling for two classes).
    """
    scores, labels = scores.double(), labels.long()
    log_t = torch.tensor(float(torch.log(torch.tensor(fit_temperature(scores, labels)))), dtype=torch.float64,
                         requires_grad=True)
    bias = torch.zeros(scores.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores / log_t.exp() + bias, labels)
        loss.backward()
        return loss

    opt.step(closure)
    b = bias.detach() - bias.detach().mean()
    return {"temperature": float(log_t.detach().exp()), "bias": [float(v) for v in b]}


#: the search range of ``fit_temperature``: a fit at either end means no temperature explained the data
T_BOUNDS = (1e-6, 1e3)


def separation(labels, probs) -> tuple[float | None, float]:
    """(macro one-vs-rest AUROC over the classes present, its threshold for "at chance").

    Rank-based, so a decision rule or a class prior cannot hide or fake it; the threshold is 0.5 plus
    two standard errors of a null AUROC (Hanley & McNeil: sqrt((n1 + n0 + 1) / (12 n1 n0))), averaged
    over the classes: on small validation splits (48 slices, 11 positive) balanced accuracy swings by
    0.17 and would flag working models.
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score

    y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    aucs, ses = [], []
    for c in np.unique(y):
        pos = y == c
        n1, n0 = int(pos.sum()), int((~pos).sum())
        if n1 and n0:
            aucs.append(roc_auc_score(pos, p[:, int(c)]))
            ses.append(((n1 + n0 + 1) / (12 * n1 * n0)) ** 0.5)
    if not aucs:
        return None, 1.0
    if len(np.unique(y)) == 2 and p.shape[1] == 2:  # binary: one AUROC, not two mirrored ones
        aucs, ses = aucs[1:], ses[1:]
    return float(np.mean(aucs)), 0.5 + 2 * float(np.mean(ses))


def calibration_health(scores: torch.Tensor, labels: torch.Tensor, cal: dict) -> dict:
    """Whether a fitted calibration hides a model that learned nothing (issues #16/#17).

    Temperature scaling is fitted by NLL, and on validation data the model cannot separate the NLL
    optimum is the uniform distribution: T runs to its bound, every probability becomes 1/K, and ECE
    then reads ~0 as if the model were perfectly calibrated. The three checks are scale-free (a
    diffusion classifier's raw scores differ by ~1e-3, so a small T alone is normal there):
    separation at chance (see ``separation``) or one class for every image, probabilities flattened
    to ~uniform, and T at the search bound.
    Returns ``{"ok", "warnings", "val_balanced_accuracy", "val_auroc", "chance", "mean_confidence"}``.
    """
    from sklearn.metrics import balanced_accuracy_score

    scores, labels = scores.double(), labels.long()
    k = scores.shape[1]
    b = torch.tensor(cal.get("bias") or [0.0] * k, dtype=torch.float64)
    t = float(cal.get("temperature", 1.0))
    probs = torch.softmax(scores / t + b, dim=1)
    pred = probs.argmax(1)
    present = torch.unique(labels)
    chance = 1.0 / max(len(present), 2)
    bal = float(balanced_accuracy_score(labels.numpy(), pred.numpy()))
    conf = float(probs.max(1).values.mean())
    auc, at_chance = separation(labels.numpy(), scores.numpy())  # raw scores: the ranking calibration keeps
    warnings = []
    n_pred = len(torch.unique(pred))
    if len(present) > 1 and ((auc is not None and auc <= at_chance) or n_pred == 1):
        warnings.append(f"validation separation is at chance (macro AUROC {auc:.3f}, chance level up to {at_chance:.3f}; "
                        f"balanced accuracy {bal:.3f}, {n_pred} of {k} classes ever predicted): the model has not "
                        "learned to separate the classes")
    if conf - 1.0 / k < 0.02 * (1 - 1.0 / k):
        warnings.append(f"calibration flattened every probability to ~1/{k} (mean confidence {conf:.3f}): "
                        "ECE will look perfect while the model says nothing")
    if not T_BOUNDS[0] * 1.01 < t < T_BOUNDS[1] / 1.01:
        warnings.append(f"fitted temperature {t:.3g} is at the search bound: no temperature fits this model")
    return {"ok": not warnings, "warnings": warnings, "val_balanced_accuracy": bal, "val_auroc": auc,
            "chance": chance, "mean_confidence": conf}
