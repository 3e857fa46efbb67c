"""medclf: medical image classification with diffusion models."""

__version__ = "0.1.0"
