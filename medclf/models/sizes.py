"""Model-size tables, kept free of torch so the CLI can list ``--model-size`` choices without importing it."""

#: DiT denoiser: name -> (patch, hidden width, depth, heads)
DIT_SIZES = {
    "tiny": (4, 64, 2, 2),
    "small": (4, 384, 12, 6),
    "base": (4, 768, 12, 12),
}

#: diffusion classifier's MONAI UNet: name -> (channels per level, attention per level, res blocks, norm groups)
UNET_SIZES = {
    "tiny": ((16, 32, 32), (False, False, True), 1, 8),
    "small": ((32, 64, 64), (False, False, True), 1, 16),  # the 1.1M-parameter net METHODS.md costs
    "base": ((64, 128, 256, 256), (False, False, True, True), 2, 32),
}
