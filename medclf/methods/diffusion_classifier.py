"""Diffusion classifier (Favero et al. 2025, after Li et al. 2023).

Train a class-conditional denoiser with the usual eps-prediction loss (class dropped to a null
class 15% of the time, as in Favero et al.'s classifier-free setup); classify by which class
label best explains the noise (``medclf.scoring.denoising``). Networks: MONAI's
``DiffusionModelUNet`` with class embeddings, or a DiT from timm blocks; schedule: MONAI's
``DDPMScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medclf.data.cache import to_unit_float
from medclf.methods.base import Method, register_method
from medclf.scoring.base import calibration_health, fit_calibration
from medclf.scoring.denoising import DenoisingScorer, ScoringConfig
from medclf.models.sizes import UNET_SIZES  # noqa: F401  (re-exported: the table lives torch-free)

#: name -> (channels, attention levels, res blocks, norm groups)


@dataclass
class DiffusionClassifierConfig:
    arch: str = "unet"  #: unet (MONAI DiffusionModelUNet) | dit (timm blocks, adaLN-Zero)
    model_size: str = "small"  #: tiny | small | base
    timesteps: int = 1000  #: DDPM steps
    schedule: str = "linear_beta"  #: MONAI noise schedule
    cond_dropout: float = 0.15  #: share of training samples whose class is replaced by the null class
    # scoring defaults (overridable at classify time)
    trials: int = 64
    decision: str = "posterior"  #: posterior | vote | mean (see medclf.scoring.denoising)
    adaptive: bool = True
    prune_z: float = 1.8  #: see medclf.scoring.denoising.ScoringConfig
    chunk: int = 64


class ClassConditionalDenoiser(nn.Module):
    """eps_hat(x_t, t, y) for y in 0..K-1, plus the null class K (unconditional)."""

    def __init__(self, arch: str, size: str, in_channels: int, n_classes: int, image_size: int):
        super().__init__()
        self.arch = arch
        if arch == "unet":
            from monai.networks.nets import DiffusionModelUNet

            ch, attn, nres, groups = UNET_SIZES[size]
            self.net = DiffusionModelUNet(spatial_dims=2, in_channels=in_channels, out_channels=in_channels,
                                          channels=ch, attention_levels=attn, num_res_blocks=nres,
                                          norm_num_groups=groups, num_head_channels=ch[-1] // 4 if size != "tiny" else 8,
                                          num_class_embeds=n_classes + 1)
        elif arch == "dit":
            from medclf.models.dit import build_dit

            self.net = build_dit(size, image_size, in_channels, num_classes=n_classes + 1)
        else:
            raise ValueError(f"unknown arch {arch!r}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.arch == "unet":
            return self.net(x_t, timesteps=t, class_labels=y)
        return self.net(x_t, t, y)


@register_method
class DiffusionClassifier(Method):
    name = "diffusion-classifier"
    Config = DiffusionClassifierConfig

    def _scheduler(self):
        from medclf.models.diffusion import make_scheduler

        return make_scheduler(self.config.timesteps, self.config.schedule)

    def build(self, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
        from medclf.errors import MedclfError

        c = self.config
        if c.arch not in ("unet", "dit") or c.model_size not in UNET_SIZES:
            raise MedclfError(f"unknown --arch/--model-size {c.arch}/{c.model_size} (unet|dit, tiny|small|base)")
        if image_size % (2 ** (len(UNET_SIZES[c.model_size][0]) - 1)) and c.arch == "unet":
            raise MedclfError(f"image size {image_size} must be divisible by {2 ** (len(UNET_SIZES[c.model_size][0]) - 1)} for this UNet")
        return ClassConditionalDenoiser(c.arch, c.model_size, in_channels, n_classes, image_size)

    def loss_fn(self, n_classes: int):
        from medclf.models.diffusion import add_noise

        sched = self._scheduler()
        T, p_drop = self.config.timesteps, self.config.cond_dropout

        def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
            x0 = batch["image"] * 2 - 1  # (B, C, H, W) in [-1, 1]
            y = batch["label"]
            dev = x0.device
            t = torch.randint(0, T, (x0.shape[0],), generator=g, device=dev)
            eps = torch.randn(x0.shape, generator=g, device=dev)
            drop = torch.rand(x0.shape[0], generator=g, device=dev) < p_drop
            y = torch.where(drop, torch.full_like(y, n_classes), y)
            x_t = add_noise(sched, x0, eps, t)
            return nn.functional.mse_loss(model(x_t, t, y).float(), eps)

        return loss

    def scorer(self, model: nn.Module, classes: list[str], calibration: dict, device: torch.device,
               **options: Any) -> DenoisingScorer:
        c = self.config
        opts = {k: v for k, v in options.items() if v is not None}
        if opts.get("decision", c.decision) not in ("posterior", "vote", "mean"):
            from medclf.errors import MedclfError

            raise MedclfError(f"unknown --decision {opts['decision']!r} (posterior, vote, mean)")
        cfg = ScoringConfig(trials=opts.get("trials", c.trials), decision=opts.get("decision", c.decision),
                            adaptive=opts.get("adaptive", c.adaptive), prune_z=opts.get("prune_z", c.prune_z),
                            chunk=opts.get("chunk", c.chunk), seed=opts.get("seed", 0))
        model.eval().to(device)
        return DenoisingScorer(model, self._scheduler(), classes, cfg,
                               temperature=float(calibration.get("temperature", 1.0)), bias=calibration.get("bias"),
                               device=device)

    def calibrate(self, model: nn.Module, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict:
        """Temperature and class bias for softmax(-mean error / T + b), fitted on the validation split
        (raw errors give near-uniform probabilities: diffusion-classifier issues #11/#23)."""
        scorer = self.scorer(model, classes, {}, device)
        scores = torch.cat([scorer.mean_error_scores(to_unit_float(images[i : i + 32].to(device)) * 2 - 1).cpu()
                            for i in range(0, len(images), 32)])
        cal = fit_calibration(scores, labels)
        return {**cal, "fitted_on": int(len(labels)), "health": calibration_health(scores, labels, cal)}
