"""``repdiff``: representation-conditioned diffusion pretraining (after Ukita, Okita & Xiaolong 2025, arXiv 2505.06890).

A timm ViT encoder reads the **clean** image and gives a representation r; r conditions a DiT
(``medclf.models.dit``: adaLN-Zero, r summed into the timestep embedding, so it modulates every
block and the final layer) that denoises a noised copy of the same image. The loss is the usual
denoising MSE and nothing else; the encoder learns only through it, on unlabeled scans (cache
labels are ignored). The paper works in a VAE latent; medclf denoises pixels, which is fine for the
small images (<= 64 px) this runs on and avoids training an autoencoder first.

Collapse, and what prevents it:

* The loss has no trivial optimum. Unlike a contrastive or self-distillation loss, the denoising
  loss cannot be met by a constant r: a constant r is the unconditional model, strictly worse,
  since at high noise every bit of image content in r lowers the error.
* It still happened here in practice: without the choices below the encoder's features shrank to
  nearly constant within a few hundred steps (variance across images / squared norm from 0.07 at
  init to 1e-5). Early on r is noise to the DiT, the cheapest fix is to silence it, and once r is
  constant nothing pulls it back. Two choices stop that: the bottleneck ends in a **BatchNorm
  without affine**, so r keeps unit variance across the batch and cannot be silenced (an
  architectural constraint, not an extra loss term); and **v-prediction** (default), whose error
  at high noise is the x0 error, exactly where r is needed, while eps-prediction scales it by
  sqrt(a / (1 - a)) ~ 0 there and leaves the encoder almost no gradient.
* The opposite failure is r as a pixel copy (the encoder sees the clean target). The **narrow
  bottleneck** (``rep_dim``, default 64) holds only a summary; the encoder reads an **augmented
  view** (random crop-and-rescale and left-right flip of its input, never of the denoised target),
  so exact positions are not recoverable from r (the DiT takes them from x_t); **r dropout**
  (``rep_dropout``: a learned null r, classifier-free style) also trains the unconditional model
  used by ``sample --guidance`` and by the check below.
* ``collapse_check`` (recorded in the run's config): the denoising error with r vs with the null r
  on held-out images, and the features' spread.

The run folder holds ``encoder.safetensors`` (the EMA encoder, ``Encoder.state_dict()``) beside
the full model: ``finetune --init RUN`` loads it into any method's ``model.backbone``. A method like
the others (registered with ``kind = "pretrain"``); ``medclf.training.pretrain`` only picks the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medclf.data.cache import to_unit_float
from medclf.errors import MedclfError
from medclf.methods.base import Method, register_method

ENCODER_WEIGHTS = "encoder.safetensors"


@dataclass
class PretrainConfig:
    encoder: str = "vit_small_patch16_224"  #: timm model name (any timm trunk works; a ViT is the method's)
    pretrained: bool = False  #: start the encoder from timm's hub weights (online only)
    encoder_weights: str | None = None  #: start the encoder from a local file (DINOv2 / timm state dict)
    model_size: str = "tiny"  #: DiT denoiser size (medclf.models.dit.DIT_SIZES)
    rep_dim: int = 64  #: bottleneck: width of r after the projection
    rep_dropout: float = 0.1  #: share of samples denoised with the learned null r (classifier-free)
    min_crop: float = 0.7  #: encoder view: random crop of this to 1.0 of the side, rescaled (1.0 = off)
    flip: bool = True  #: encoder view: random left-right flip
    timesteps: int = 1000  #: DDPM steps
    schedule: str = "linear_beta"  #: MONAI noise schedule
    prediction: str = "v"  #: v (v-prediction, default) | eps: what the DiT predicts (see module docstring)
    split: str = "train"  #: cache split to pretrain on: train | all (labels are never read)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        return RepDiff.from_options(d).config


class RepresentationDiffusion(nn.Module):
    """Encoder -> projection (r) -> DiT conditioned on r. ``forward`` is the training path (one call, so DDP syncs)."""

    def __init__(self, cfg: PretrainConfig, in_channels: int, image_size: int):
        super().__init__()
        from medclf.models.backbone import create_encoder
        from medclf.models.dit import DIT_SIZES, build_dit

        if cfg.model_size not in DIT_SIZES:
            raise MedclfError(f"unknown --model-size {cfg.model_size!r} ({', '.join(DIT_SIZES)})")
        if image_size % DIT_SIZES[cfg.model_size][0]:
            raise MedclfError(f"image size {image_size} is not a multiple of the DiT patch {DIT_SIZES[cfg.model_size][0]}")
        self.encoder = create_encoder(cfg.encoder, in_channels, image_size)
        self.project = nn.Sequential(nn.Linear(self.encoder.num_features, cfg.rep_dim), nn.BatchNorm1d(cfg.rep_dim, affine=False))
        self.null = nn.Parameter(torch.zeros(cfg.rep_dim))
        self.denoiser = build_dit(cfg.model_size, image_size, in_channels, cond_dim=cfg.rep_dim)

    def represent(self, view: torch.Tensor) -> torch.Tensor:
        """r (B, rep_dim) of clean images in [0, 1]."""
        return self.project(self.encoder(view))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, t, cond=r)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, view: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        r = self.represent(view)
        r = torch.where(keep[:, None], r, self.null.to(r.dtype).expand_as(r))
        return self.denoise(x_t, t, r)


def augment_view(x: torch.Tensor, g: torch.Generator, min_crop: float, flip: bool) -> torch.Tensor:
    """Random crop-and-rescale + left-right flip, one affine resample per image.

    Hand-written rather than MONAI/torchvision random transforms because every draw must come from
    the training loop's generator (bit-for-bit ``--resume``); those draw from their own RNGs.
    """
    if min_crop >= 1.0 and not flip:
        return x
    b, dev = x.shape[0], x.device
    u = torch.rand(b, 4, generator=g, device=dev)
    s = min_crop + (1.0 - min_crop) * u[:, 0]  # side of the crop, as a share of the image
    tx, ty = (1 - s) * (2 * u[:, 1] - 1), (1 - s) * (2 * u[:, 2] - 1)  # crop stays inside the image
    sx = torch.where((u[:, 3] < 0.5) & flip, -s, s)
    zero = torch.zeros_like(s)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, s, ty], 1)], 1)
    grid = nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def scheduler(cfg: PretrainConfig):
    from medclf.models.diffusion import make_scheduler

    return make_scheduler(cfg.timesteps, cfg.schedule)


def noised_and_target(sched, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                      prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, what the DiT regresses: eps, or v = sqrt(a) eps - sqrt(1 - a) x0), from MONAI's scheduler."""
    from medclf.models.diffusion import add_noise, velocity

    return add_noise(sched, x0, eps, t), eps if prediction == "eps" else velocity(sched, x0, eps, t)


def loss_fn(cfg: PretrainConfig):
    """MSE of the DiT's prediction on x_t, conditioned on r of an augmented clean view; all draws from ``g``."""
    sched = scheduler(cfg)
    if cfg.prediction not in ("v", "eps"):
        raise MedclfError(f"unknown prediction {cfg.prediction!r} (v, eps)")

    def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        x = batch["image"]  # [0, 1]; labels in the batch are ignored
        dev, b = x.device, x.shape[0]
        view = augment_view(x, g, cfg.min_crop, cfg.flip)
        t = torch.randint(0, cfg.timesteps, (b,), generator=g, device=dev)
        eps = torch.randn(x.shape, generator=g, device=dev)
        keep = torch.rand(b, generator=g, device=dev) >= cfg.rep_dropout
        x_t, y = noised_and_target(sched, x * 2 - 1, eps, t, cfg.prediction)
        return nn.functional.mse_loss(model(x_t, t, view, keep).float(), y)

    return loss


@torch.no_grad()
def collapse_check(model: RepresentationDiffusion, cfg: PretrainConfig, images: torch.Tensor, device: torch.device,
                   trials: int = 4, seed: int = 0) -> dict:
    """Is r used, and does it vary? Denoising MSE with r vs with the null r at shared (t, eps) draws,
    plus the features' spread: variance across images / mean squared norm (0 = every image alike)."""
    model.eval().to(device)
    sched = scheduler(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    x = to_unit_float(images.to(device))
    f = model.encoder(x)
    r = model.project(f)
    null = model.null.expand_as(r)
    with_r, without = [], []
    for _ in range(trials):
        t = torch.randint(0, cfg.timesteps, (len(x),), generator=g, device=device)
        eps = torch.randn(x.shape, generator=g, device=device)
        x_t, y = noised_and_target(sched, x * 2 - 1, eps, t, cfg.prediction)
        with_r.append(((model.denoise(x_t, t, r) - y) ** 2).mean())
        without.append(((model.denoise(x_t, t, null) - y) ** 2).mean())
    mse_r, mse_0 = float(torch.stack(with_r).mean()), float(torch.stack(without).mean())
    f = f.float()
    spread = ((f - f.mean(0)) ** 2).sum(1).mean() / (f**2).sum(1).mean().clamp_min(1e-12)
    return {"n_images": len(x), "mse_with_r": mse_r, "mse_null_r": mse_0, "target": cfg.prediction,
            "relative_gain": (mse_0 - mse_r) / max(mse_0, 1e-12), "feature_spread": float(spread)}


@register_method
class RepDiff(Method):
    """Pretraining: no classes, no scorer; exports the EMA encoder for ``finetune --init`` and zero-shot."""

    name = "repdiff"
    kind = "pretrain"
    Config = PretrainConfig

    def build(self, in_channels: int, n_classes: int, image_size: int) -> RepresentationDiffusion:
        return RepresentationDiffusion(self.config, in_channels, image_size)

    def prepare(self, model: nn.Module, in_channels: int, image_size: int) -> dict:
        from medclf.models.backbone import start_encoder

        c = self.config
        return start_encoder(model.encoder, c.encoder, in_channels, image_size, c.pretrained, c.encoder_weights)

    def loss_fn(self, n_classes: int):
        return loss_fn(self.config)

    def encoder_of(self, model: nn.Module):
        return model.encoder

    def exports(self, ema: dict) -> dict[str, tuple[dict, dict]]:
        enc = {k.removeprefix("encoder."): v for k, v in ema.items() if k.startswith("encoder.")}
        return {ENCODER_WEIGHTS: (enc, {"encoder": self.config.encoder})}

    def record(self, model: nn.Module, in_channels: int, image_size: int, start: dict | None) -> dict[str, Any]:
        """What ``finetune --init`` and zero-shot read from the run's config."""
        return {"encoder": {"name": self.config.encoder, "num_features": model.encoder.num_features,
                            "in_chans": in_channels, "image_size": image_size, "patch_size": model.encoder.patch_size,
                            "weights": ENCODER_WEIGHTS, "start": start}}

    def check(self, model: nn.Module, images: torch.Tensor, device: torch.device, seed: int) -> dict[str, Any]:
        return {"collapse_check": collapse_check(model, self.config, images, device, seed=seed)}

    def sample(self, model: nn.Module, like: torch.Tensor, n: int, **kw: Any) -> torch.Tensor:
        """``medclf sample``: images conditioned on r of ``like`` (see ``sample``)."""
        return sample(model, self.config, like, n, **kw)


@torch.no_grad()
def sample(model: RepresentationDiffusion, cfg: PretrainConfig, like: torch.Tensor, n: int, steps: int = 50,
           guidance: float = 1.0, seed: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """``n`` images (n, C, H, W) in [0, 1] drawn by DDIM, conditioned on r of ``like`` (C, H, W in [0, 1]).

    ``guidance`` > 1 extrapolates from the unconditional (null-r) prediction, classifier-free style.
    """
    from monai.networks.schedulers import DDIMScheduler

    device = device or torch.device("cpu")
    model.eval().to(device)
    if steps < 1 or steps > cfg.timesteps:
        raise MedclfError(f"--steps must be in 1..{cfg.timesteps}")
    sched = DDIMScheduler(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule, clip_sample=True,
                          prediction_type="epsilon" if cfg.prediction == "eps" else "v_prediction")
    sched.set_timesteps(steps)
    r = model.represent(like.float().unsqueeze(0).to(device)).expand(n, -1)
    null = model.null.expand_as(r)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((n, *like.shape), generator=g, device=device)
    for t in sched.timesteps:
        tt = torch.full((n,), int(t), device=device, dtype=torch.long)
        out = model.denoise(x, tt, r)
        if guidance != 1.0:
            out0 = model.denoise(x, tt, null)
            out = out0 + guidance * (out - out0)
        x, _ = sched.step(out, int(t), x, generator=g)
    return ((x + 1) / 2).clamp(0, 1).cpu()
