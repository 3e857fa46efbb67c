"""Image encoders from timm, the one place medclf makes them.

Every method that reads an image with a feature extractor (the baseline, DiffMIC's guidance and
denoiser, DiDiCM's network, the pretraining encoder) gets an ``Encoder`` from here, so weights move
between them by name (``finetune --init RUN`` loads a pretrained encoder into any of them).

Pretrained weights: ``pretrained=True`` is timm's own hub loading (needs the internet);
``weights=PATH`` loads a local file (safetensors, or a state dict read with ``weights_only=True``),
including DINOv2 or other timm checkpoints with their own key names (timm's per-model
``checkpoint_filter_fn`` maps them). Offline, hub loading fails with a message that says how to pass
a local file.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from torch import nn

from medclf.errors import MedclfError

#: Encoders that take ``img_size`` (position embeddings are built for the cache's image size).
_SIZED = ("vit", "deit", "eva", "beit", "dinov", "test_vit", "swin", "maxvit", "coatnet", "mambaout")


#: Fewest tokens a side a ViT should see; below it the patch is made smaller (see ``vit_patch_size``).
MIN_TOKEN_GRID = 8
_PATCHABLE = ("timm.models.vision_transformer", "timm.models.eva", "timm.models.deit")


@functools.lru_cache(maxsize=None)
def _native_patch(name: str) -> int | None:
    """The patch side a timm ViT-family model is defined with (None for other trunks).

    Read from a model built on the meta device (no memory, ~0.2 s once per name), because timm
    keeps the default only in the constructor call, not in the registry.
    """
    import timm

    try:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception:  # a model that cannot be built on meta: keep its own patch
        return None
    if type(net).__module__ not in _PATCHABLE or not hasattr(net, "patch_embed"):
        return None
    return int(net.patch_embed.patch_size[0])


def vit_patch_size(name: str, image_size: int) -> int | None:
    """Patch side for a ViT on ``image_size`` images: the model's own, unless that leaves fewer than
    ``MIN_TOKEN_GRID`` tokens a side; then the largest smaller patch that tiles the image into at least
    that many (None: not a ViT, or keep the model's own).

    Why: a 16-px patch on a 32-px cache is a 2x2 grid, four tokens for the whole scan. Measured on the
    32-px head-CT sample, timm's ``test_vit`` trained with labels reached test AUROC 0.38 at patch 16
    (chance), 0.67 at 8 and 0.77 at 4. timm resamples pretrained patch embeddings to the new size
    (FlexiViT-style) when loading hub or local weights.
    """
    native = _native_patch(name)
    if native is None or image_size // native >= MIN_TOKEN_GRID:
        return None
    for p in range(min(native, image_size // MIN_TOKEN_GRID), 0, -1):
        if image_size % p == 0:
            return p
    return None


def _timm_create(name: str, in_chans: int, image_size: int, pretrained: bool, **kw) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise MedclfError(f"unknown timm encoder {name!r} (see timm.list_models(); e.g. resnet18, "
                          "vit_small_patch16_224, test_resnet)")
    if any(s in name for s in _SIZED):
        kw.setdefault("img_size", image_size)
        if "patch_size" not in kw and (patch := vit_patch_size(name, image_size)) is not None:
            kw["patch_size"] = patch
    if pretrained and not _hub_reachable():
        raise MedclfError(_OFFLINE.format(name=name))
    try:
        return timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=0, **kw)
    except (OSError, RuntimeError, ValueError, ConnectionError) as e:
        if not pretrained:
            raise MedclfError(f"could not build encoder {name!r}: {' '.join(str(e).split())[:160]}") from None
        raise MedclfError(_OFFLINE.format(name=name)) from None


_OFFLINE = ("could not fetch pretrained weights for {name!r} from the Hugging Face hub (offline?): download "
            "them elsewhere and pass the file with --encoder-weights PATH (.safetensors or a .pth/.bin state dict)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast offline: the hub client otherwise retries for about a minute per file before giving up."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


class Encoder(nn.Module):
    """A timm trunk (no head) reading images in [0, 1]; ``forward`` -> (B, num_features).

    Normalisation lives here so a method never has to know what the weights were trained on:
    ImageNet mean/std for 3-channel inputs (what timm's pretrained weights expect), else a fixed
    centring to roughly unit scale.
    """

    def __init__(self, name: str, in_chans: int, image_size: int, pretrained: bool = False, **kw):
        super().__init__()
        self.name = name
        self.net = _timm_create(name, in_chans, image_size, pretrained, **kw)
        self.num_features = int(self.net.num_features)
        patch = getattr(getattr(self.net, "patch_embed", None), "patch_size", None)
        self.patch_size = int(patch[0]) if patch else None  #: recorded in runs
        cfg = getattr(self.net, "pretrained_cfg", {}) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406)) if in_chans == 3 else (0.5,) * in_chans
        std = cfg.get("std", (0.229, 0.224, 0.225)) if in_chans == 3 else (0.25,) * in_chans
        self.register_buffer("mean", torch.tensor(mean[:in_chans], dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std[:in_chans], dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features: (B, C, h, w) for CNNs; ViT tokens are reshaped to a grid (prefix tokens dropped)."""
        f = self.net.forward_features(self.normalise(x))
        if f.ndim == 3:  # (B, N, C) tokens
            n_prefix = int(getattr(self.net, "num_prefix_tokens", 0))
            f = f[:, n_prefix:]
            side = int(round(f.shape[1] ** 0.5))
            f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
        elif f.ndim == 4 and f.shape[1] != self.num_features and f.shape[-1] == self.num_features:
            f = f.permute(0, 3, 1, 2)  # NHWC trunks (some ConvNeXt/MaxViT variants)
        return f


def create_encoder(name: str, in_chans: int, image_size: int, *, pretrained: bool = False,
                   weights: str | Path | None = None, **kw) -> Encoder:
    """An ``Encoder``; ``weights`` (a local file) wins over ``pretrained`` (hub)."""
    enc = Encoder(name, in_chans, image_size, pretrained=pretrained and weights is None, **kw)
    if weights is not None:
        load_encoder_weights(enc, weights)
    return enc


def _strip(key: str) -> str:
    """Drop wrapper prefixes (DDP ``module.``, a method's ``backbone.``, an Encoder's ``net.``)."""
    while True:
        for p in ("module.", "backbone.", "net.", "encoder."):
            if key.startswith(p):
                key = key[len(p):]
                break
        else:
            return key


def load_encoder_weights(enc: Encoder, path: str | Path) -> dict:
    """Load a local checkpoint into ``enc``; returns {"loaded": n, "missing": [...], "unexpected": [...]}.

    Accepts a plain timm state dict, one wrapped in {"model"|"state_dict"|"teacher": ...}, one saved
    from an ``Encoder`` (``net.`` prefix), or an original-format checkpoint timm knows how to map
    (DINOv2, CLIP, ...). Classifier heads are dropped; input channels are adapted as timm does for
    its own pretrained weights (summing/repeating RGB kernels).
    """
    from medclf.io.weights import load_torch_weights

    path = Path(path)
    sd = load_torch_weights(path)
    for key in ("model", "state_dict", "teacher", "module"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    sd = {_strip(k): v for k, v in sd.items() if torch.is_tensor(v)}
    net = enc.net
    filt = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            sd = filt(sd, net)
        except Exception as e:  # a filter written for another layout: fall back to the keys as they are
            if not any(k in net.state_dict() for k in sd):
                raise MedclfError(f"checkpoint does not fit encoder {enc.name!r} ({' '.join(str(e).split())[:100]})", path) from None
    own = net.state_dict()
    fitted: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k not in own:
            continue
        if v.shape != own[k].shape and v.ndim == 4 and v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
            from timm.models import adapt_input_conv

            v = adapt_input_conv(own[k].shape[1], v)
        if v.shape == own[k].shape:
            fitted[k] = v
    if not fitted:
        raise MedclfError(f"no tensor in this checkpoint fits encoder {enc.name!r} (wrong --encoder for these weights?)", path)
    missing = [k for k in own if k not in fitted]
    net.load_state_dict(fitted, strict=False)
    return {"loaded": len(fitted), "missing": missing, "unexpected": [k for k in sd if k not in own]}


def start_encoder(enc: Encoder, name: str, in_chans: int, image_size: int, pretrained: bool = False,
                  weights: str | Path | None = None) -> dict:
    """Starting weights of a new run's encoder: a local file (wins), timm's hub, or the seed's random init.

    Returns what the run records (and the CLI shows): {"init": "file"|"hub"|"random", and for a file
    "file", "loaded", "missing" and "unexpected" key lists}, so a partial load is never silent.
    """
    if weights:
        info = load_encoder_weights(enc, weights)
        return {"init": "file", "file": str(weights), **info}
    if pretrained:
        src = create_encoder(name, in_chans, image_size, pretrained=True)
        enc.load_state_dict(src.state_dict())
        return {"init": "hub", "loaded": len(src.state_dict()), "missing": [], "unexpected": []}
    return {"init": "random"}
