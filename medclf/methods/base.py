"""What a method provides; the registry the CLI's ``--method`` choices come from."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar

import torch
from torch import nn

from medclf.scoring.base import Scorer
from medclf.training.loop import LossFn


class Method:
    """A method = a config dataclass, a model builder, a training objective and a scorer.

    The training loop, run directory, CLI and reports are shared; a method overrides these hooks.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def from_options(cls, options: dict) -> "Method":
        """Config from CLI/JSON options; unknown keys are ignored, so old runs keep loading."""
        names = {f.name for f in fields(cls.Config)}
        return cls(cls.Config(**{k: v for k, v in options.items() if k in names and v is not None}))

    def config_dict(self) -> dict:
        return asdict(self.config)

    def build(self, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
        raise NotImplementedError

    def loss_fn(self, n_classes: int) -> LossFn:
        raise NotImplementedError

    def scorer(self, model: nn.Module, classes: list[str], calibration: dict, device: torch.device,
               **options: Any) -> Scorer:
        raise NotImplementedError

    def calibrate(self, model: nn.Module, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict:
        """Fit post-hoc calibration on validation images; returns what ``scorer`` receives."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
