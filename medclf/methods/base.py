"""What a method provides; the registry the CLI's ``--method`` choices come from."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from medclf.scoring.base import Scorer

#: a method's training objective: (model, batch, generator) -> scalar loss; every random draw uses the generator
LossFn = Callable[[nn.Module, dict, torch.Generator], torch.Tensor]


class Method:
    """A method = a config dataclass, a model builder, a training objective and a scorer.

    The training loop, run directory, CLI and reports are shared; a method overrides these hooks.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    #: "classifier" (``finetune``: classes, a scorer, calibration) or "pretrain" (``pretrain``: no labels)
    kind: ClassVar[str] = "classifier"
    #: can train on a multi-label cache (independent binary labels, e.g. CheXpert's 14 observations)
    supports_multilabel: ClassVar[bool] = False
    #: "single" (one class per image) or "multilabel"; set by finetune / load_model from the data/run
    task: str = "single"

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def from_options(cls, options: dict) -> "Method":
        """Config from CLI/JSON options; unknown keys are ignored, so old runs keep loading."""
        names = {f.name for f in fields(cls.Config)}
        return cls(cls.Config(**{k: v for k, v in options.items() if k in names and v is not None}))

    @classmethod
    def parse_options(cls, options: dict, sets: list[str]) -> dict:
        """CLI options + ``--set KEY=VALUE`` strings -> options this method knows (typed; unknown keys refused)."""
        import typing

        from medclf.errors import MedclfError

        hints = typing.get_type_hints(cls.Config)
        known = {f.name for f in fields(cls.Config)}
        for k in options:
            if k not in known:
                raise MedclfError(f"--{k.replace('_', '-')} does not apply to --method {cls.name}")
        out = dict(options)
        for item in sets:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in known:
                raise MedclfError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
            out[key] = _coerce(raw.strip(), hints[key], item)
        return out

    def config_dict(self) -> dict:
        return asdict(self.config)

    def build(self, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
        raise NotImplementedError

    def prepare(self, model: nn.Module, in_channels: int, image_size: int) -> dict:
        """Before the first step of a new run (not on resume or load): starting weights, if any.

        Returns how the weights started (``models.backbone.start_encoder``'s record); the run keeps
        it and the CLI shows missing keys, so a partial load is never silent."""
        return {"init": "random"}

    def encoder_of(self, model: nn.Module) -> nn.Module | None:
        """The image encoder (``Encoder``) zero-shot evaluation embeds with, if the model has one."""
        return getattr(model, "backbone", None)

    def exports(self, ema: dict) -> dict[str, tuple[dict, dict]]:
        """Weight files written beside model.safetensors: {file name: (tensors, metadata)}."""
        return {}

    def record(self, model: nn.Module, in_channels: int, image_size: int, start: dict | None) -> dict[str, Any]:
        """Entries of the run's config.json beyond the shared ones."""
        return {}

    def check(self, model: nn.Module, images: torch.Tensor, device: torch.device, seed: int) -> dict[str, Any]:
        """Checks after training on held-out images (recorded in config.json), for methods without calibration."""
        return {}

    def loss_fn(self, n_classes: int) -> LossFn:
        raise NotImplementedError

    def scorer(self, model: nn.Module, classes: list[str], calibration: dict, device: torch.device,
               **options: Any) -> Scorer:
        raise NotImplementedError

    def calibrate(self, model: nn.Module, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict:
        """Fit post-hoc calibration on validation images; returns what ``scorer`` receives."""
        return {}


def _coerce(raw: str, hint, item: str):
    """A --set value to its field's type (bool/int/float/str, Optional[...] allowing 'none')."""
    import typing

    from medclf.errors import MedclfError

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    typ = args[0] if args else hint
    if raw.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    try:
        if typ is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        return typ(raw)
    except (TypeError, ValueError):
        raise MedclfError(f"--set {item!r}: {raw!r} is not a valid {getattr(typ, '__name__', typ)}") from None


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
