"""The scorer of label-space methods (baseline, DiffMIC, DiDiCM): the network gives p(y | x) itself.

A method supplies ``forward(images) -> LabelOutput`` (its sampler: one softmax, a DDIM chain over the
label, a discrete-diffusion chain...) and optionally a differentiable ``logit_fn`` for explanations.
Everything a user sees is then made the same way for every such method: calibration (a temperature
on log-probabilities, fitted on validation), entropy and margin, an evidence map, NFE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from medclf.data.cache import to_unit_float
from medclf.scoring.base import Prediction, entropy


@dataclass
class LabelOutput:
    probs: torch.Tensor  #: (B, K) uncalibrated class probabilities (rows sum to 1)
    nfe: torch.Tensor  #: (B,) network evaluations spent per image
    uncertainty: dict[str, torch.Tensor] = field(default_factory=dict)  #: method-specific, e.g. sample spread
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  #: (B, K) per-class extras
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  #: method-specific maps, each (B, H, W)


Forward = Callable[[torch.Tensor], LabelOutput]
LogitFn = Callable[[torch.Tensor], torch.Tensor]


def calibrated(probs: torch.Tensor, calibration: dict | None) -> torch.Tensor:
    """softmax(log p / T (+ b)): Guo et al.'s temperature applied to a distribution (a bias, if a
    calibration carries one, is vector scaling; medclf's label methods fit T only)."""
    cal = calibration or {}
    logp = probs.double().clamp_min(1e-8).log()
    t = float(cal.get("temperature", 1.0))
    b = cal.get("bias")
    z = logp / t + (torch.tensor(b, dtype=torch.float64, device=probs.device) if b is not None else 0.0)
    return torch.softmax(z, dim=-1).to(probs.dtype)


def calibrated_multilabel(probs: torch.Tensor, calibration: dict | None) -> torch.Tensor:
    """sigmoid(logit p_l / T_l): one temperature per label (``calibration["temperatures"]``)."""
    ts = (calibration or {}).get("temperatures")
    if not ts:
        return probs
    p = probs.double().clamp(1e-8, 1 - 1e-8)
    z = (p / (1 - p)).log() / torch.tensor(ts, dtype=torch.float64, device=probs.device)
    return torch.sigmoid(z).to(probs.dtype)


def margin(p: torch.Tensor) -> torch.Tensor:
    """1 - (top1 - top2): 0 for a sure call, 1 for a tie."""
    top = p.topk(min(2, p.shape[1]), dim=1).values
    return 1 - (top[:, 0] - top[:, 1]) if p.shape[1] > 1 else torch.zeros(len(p))


def evidence_map(logit_fn: LogitFn, images: torch.Tensor, pred: torch.Tensor, smooth: int = 4,
                 noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Signed (B, H, W) map: SmoothGrad input x gradient of (logit_pred - logit_runner-up).

    Positive where the pixels push toward the predicted class, negative toward the runner-up: the
    same reading as the diffusion classifier's evidence map, so overlays mean one thing everywhere.
    Hand-written because neither MONAI nor timm ship a gradient attribution for arbitrary heads
    (MONAI's GradCAM needs a named conv layer, which ViTs and label-diffusion nets lack).
    """
    g = torch.Generator(device=images.device).manual_seed(seed)
    out = torch.zeros(images.shape[0], *images.shape[2:], device=images.device)
    with torch.enable_grad():
        for _ in range(max(1, smooth)):
            x = (images + noise * torch.randn(images.shape, generator=g, device=images.device)).requires_grad_(True)
            logits = logit_fn(x)
            masked = logits.detach().clone()
            masked.scatter_(1, pred[:, None], float("-inf"))
            runner = masked.argmax(1)
            score = logits.gather(1, pred[:, None]) - logits.gather(1, runner[:, None])
            (grad,) = torch.autograd.grad(score.sum(), x)
            out += (grad * images).sum(1)
    return (out / max(1, smooth)).detach()


class LabelScorer:
    """``Scorer`` over a method's label sampler; see the module docstring."""

    def __init__(self, classes: list[str], forward: Forward, device: torch.device, calibration: dict | None = None,
                 logit_fn: LogitFn | None = None, multilabel: bool = False, samples: int | None = None):
        self.classes = list(classes)
        self.samples = samples  #: label samples per image behind any intervals (eval records it beside PICP)
        self.forward = forward
        self.device = device
        self.calibration = calibration or {}
        self.logit_fn = logit_fn
        self.multilabel = multilabel  #: probs are independent per label; pred is (B, L) 0/1 at 0.5

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> LabelOutput:
        return self.forward(to_unit_float(images.to(self.device)))

    def predict(self, images: torch.Tensor, explain: bool = False) -> Prediction:
        images = to_unit_float(images.to(self.device))
        out = self.raw(images)
        if self.multilabel:
            probs = calibrated_multilabel(out.probs, self.calibration).cpu()
            h = -(probs * probs.clamp_min(1e-12).log2() + (1 - probs) * (1 - probs).clamp_min(1e-12).log2())
            return Prediction(probs=probs, pred=(probs >= 0.5).long(), uncertainty={"entropy": h.mean(1)},
                              nfe=out.nfe.cpu().long(), extras={}, maps=None)
        probs = calibrated(out.probs, self.calibration).cpu()
        pred = probs.argmax(1)
        unc = {"entropy": entropy(probs), "margin": margin(probs)}
        unc.update({k: v.detach().cpu() for k, v in out.uncertainty.items()})
        maps = None
        if explain:
            maps = {k: v.detach().cpu() for k, v in out.maps.items()}
            if "evidence" not in maps and self.logit_fn is not None:
                maps["evidence"] = evidence_map(self.logit_fn, images, pred.to(self.device)).cpu()
        return Prediction(probs=probs, pred=pred, uncertainty=unc, nfe=out.nfe.cpu().long(),
                          extras={k: v.detach().cpu() for k, v in out.extras.items()}, maps=maps)


def calibrate_label_scorer(scorer: LabelScorer, images: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> dict:
    """Temperature on the sampler's log-probabilities, by NLL on the validation split (Guo et al. 2017).

    Temperature only, no class bias: these methods learn the class prior from the training labels
    already, and a temperature never changes the argmax, so calibration cannot trade the method's
    decisions for NLL. (With a bias fitted on a small imbalanced validation split, over-confident
    samplers such as few-step DiDiCM were flattened into calling the majority class for every
    image: balanced accuracy 0.83 -> 0.50.)
    """
    from medclf.scoring.base import calibration_health, fit_temperature

    probs = torch.cat([scorer.raw(images[i : i + batch]).probs.cpu() for i in range(0, len(images), batch)])
    if scorer.multilabel:  # labels (N, L) with NaN where unknown: a temperature per label, on its known items
        p = probs.double().clamp(1e-8, 1 - 1e-8)
        z = (p / (1 - p)).log()
        temps, warnings = [], []
        for j, name in enumerate(scorer.classes):
            known = ~torch.isnan(labels[:, j])
            y = labels[known, j].long()
            if known.sum() < 2 or len(torch.unique(y)) != 2:
                temps.append(1.0)
                continue
            logits = torch.stack([torch.zeros_like(z[known, j]), z[known, j]], 1)
            temps.append(fit_temperature(logits, y))
            warnings += [f"{name}: {w}" for w in calibration_health(logits, y, {"temperature": temps[-1]})["warnings"]]
        return {"temperatures": temps, "fitted_on": int(len(labels)), "health": {"ok": not warnings, "warnings": warnings}}
    logp = probs.double().clamp_min(1e-8).log()
    cal = {"temperature": fit_temperature(logp, labels), "fitted_on": int(len(labels))}
    return {**cal, "health": calibration_health(logp, labels, cal)}
