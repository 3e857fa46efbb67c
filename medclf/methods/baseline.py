"""The discriminative baseline: a timm backbone + linear head trained with cross-entropy.

What a user would train without medclf's diffusion methods; every report can show it beside them,
with the same backbone, data, loop, calibration and explanation maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medclf.methods.base import Method, register_method
from medclf.scoring.label import LabelOutput, LabelScorer, calibrate_label_scorer


@dataclass
class BackboneConfig:
    """Options every backbone-based method shares (``finetune --init RUN`` sets ``backbone``)."""

    backbone: str = "resnet18"  #: any timm model name (e.g. resnet18, vit_small_patch16_224, test_resnet)
    pretrained: bool = False  #: timm hub weights at the start of training (online only)
    encoder_weights: str | None = None  #: local weights file for the backbone at the start of training


#: timm pools that keep the trunk's feature width (catavgmax doubles it, which the linear head does not expect)
GLOBAL_POOLS = (None, "avg", "max", "avgmax")


@dataclass
class BaselineConfig(BackboneConfig):
    dropout: float = 0.0  #: before the linear head
    label_smoothing: float = 0.0
    #: timm's global pool of the trunk's feature map (None: the model's own, avg for CNNs). ``max`` lets a
    #: finding of a few pixels fire the head where an average over the whole map dilutes it (issue #16)
    global_pool: str | None = None


class BackboneMethod(Method):
    """A method whose network holds an ``Encoder`` as ``model.backbone``: loads starting weights once."""

    def prepare(self, model: nn.Module, in_channels: int, image_size: int) -> dict:
        """Before the first step of a new run: hub or local weights into ``model.backbone``."""
        from medclf.models.backbone import start_encoder

        c = self.config
        return start_encoder(model.backbone, c.backbone, in_channels, image_size, c.pretrained, c.encoder_weights)


class LinearClassifier(nn.Module):
    def __init__(self, backbone: str, in_channels: int, n_classes: int, image_size: int, dropout: float = 0.0,
                 global_pool: str | None = None):
        super().__init__()
        from medclf.models.backbone import create_encoder

        kw = {"global_pool": global_pool} if global_pool else {}
        self.backbone = create_encoder(backbone, in_channels, image_size, **kw)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.backbone.num_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.backbone(x)))


@register_method
class Baseline(BackboneMethod):
    """Single-label: softmax + cross-entropy. Multi-label caches (CheXpert): one sigmoid per label and
    binary cross-entropy over the known targets only (NaN = blank/ignored-uncertain is masked)."""

    name = "baseline"
    Config = BaselineConfig
    supports_multilabel = True

    def build(self, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
        c = self.config
        if c.global_pool not in GLOBAL_POOLS:
            from medclf.errors import MedclfError

            raise MedclfError(f"--set global_pool={c.global_pool}: expected one of {', '.join(p for p in GLOBAL_POOLS if p)}")
        return LinearClassifier(c.backbone, in_channels, n_classes, image_size, c.dropout, c.global_pool)

    def loss_fn(self, n_classes: int):
        smoothing = self.config.label_smoothing

        if self.task == "multilabel":
            def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
                y = batch["labels"]
                known = ~torch.isnan(y)
                target = torch.nan_to_num(y) * (1 - smoothing) + 0.5 * smoothing
                per = nn.functional.binary_cross_entropy_with_logits(model(batch["image"]).float(), target, reduction="none")
                return (per * known).sum() / known.sum().clamp_min(1)

            return loss

        def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
            return nn.functional.cross_entropy(model(batch["image"]).float(), batch["label"], label_smoothing=smoothing)

        return loss

    def scorer(self, model: nn.Module, classes: list[str], calibration: dict, device: torch.device,
               **options: Any) -> LabelScorer:
        model.eval().to(device)

        if self.task == "multilabel":
            def forward(x: torch.Tensor) -> LabelOutput:
                return LabelOutput(probs=torch.sigmoid(model(x).float()), nfe=torch.ones(len(x), dtype=torch.long))

            return LabelScorer(classes, forward, device, calibration, logit_fn=model, multilabel=True)

        def forward(x: torch.Tensor) -> LabelOutput:
            return LabelOutput(probs=torch.softmax(model(x).float(), 1), nfe=torch.ones(len(x), dtype=torch.long))

        return LabelScorer(classes, forward, device, calibration, logit_fn=model)

    def calibrate(self, model: nn.Module, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict:
        return calibrate_label_scorer(self.scorer(model, classes, {}, device), images, labels)  # multi-label: per label
