"""Image corruptions for robustness reports (the label-diffusion papers claim their gains grow there).

Each maps a float batch (B, C, H, W) in [0, 1] to a corrupted one, deterministically (seeded), at a
severity the caller picks. Noise and blur are MONAI's transforms; the contrast change is one line.
"""

from __future__ import annotations

from typing import Callable

import torch


def gaussian_noise(std: float = 0.1, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=x.device).manual_seed(seed)
        return x + std * torch.randn(x.shape, generator=g, device=x.device)

    return f


def blur(sigma: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    from monai.transforms import GaussianSmooth

    smooth = GaussianSmooth(sigma=sigma)

    def f(x: torch.Tensor) -> torch.Tensor:
        # MONAI's GaussianSmooth smooths all spatial dims of one channel-first image: apply per image
        return torch.stack([torch.as_tensor(smooth(im)) for im in x]).to(x.dtype)

    return f


def contrast(factor: float = 0.5) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scale each image's deviations from its own mean (factor < 1 flattens, > 1 stretches)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * factor + m

    return f


def corruption(name: str, severity: float | None = None, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """By name: noise (std, default 0.1), blur (sigma px, default 1.0), contrast (factor, default 0.5)."""
    from medclf.errors import MedclfError

    if name == "noise":
        return gaussian_noise(0.1 if severity is None else severity, seed)
    if name == "blur":
        return blur(1.0 if severity is None else severity)
    if name == "contrast":
        return contrast(0.5 if severity is None else severity)
    raise MedclfError(f"unknown corruption {name!r} (noise, blur, contrast)")


CORRUPTIONS = ("noise", "blur", "contrast")
