"""Representation-conditioned diffusion pretraining (after Ukita, Okita & Xiaolong 2025, arXiv 2505.06890).

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
the full model: ``finetune --init RUN`` loads it into any method's ``model.backbone``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from medclf.errors import MedclfError
from medclf.training.loop import ProgressFn, TrainConfig, distributed_env, resolve_device, train
from medclf.training.run import CONFIG, WEIGHTS, load_run, load_tensors, save_tensors, write_config

KIND = "pretrain"
METHOD = "repdiff"
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
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def alphas_cumprod(cfg: PretrainConfig) -> torch.Tensor:
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule).alphas_cumprod


def target(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the DiT regresses: eps, or v = sqrt(a) eps - sqrt(1 - a) x0."""
    return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0


def loss_fn(cfg: PretrainConfig):
    """MSE of the DiT's prediction on x_t, conditioned on r of an augmented clean view; all draws from ``g``."""
    ab = alphas_cumprod(cfg)
    if cfg.prediction not in ("v", "eps"):
        raise MedclfError(f"unknown prediction {cfg.prediction!r} (v, eps)")

    def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        x = batch["image"]  # [0, 1]; labels in the batch are ignored
        dev, b = x.device, x.shape[0]
        view = augment_view(x, g, cfg.min_crop, cfg.flip)
        t = torch.randint(0, cfg.timesteps, (b,), generator=g, device=dev)
        eps = torch.randn(x.shape, generator=g, device=dev)
        keep = torch.rand(b, generator=g, device=dev) >= cfg.rep_dropout
        a = ab.to(dev)[t].view(-1, 1, 1, 1)
        x0 = x * 2 - 1
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return nn.functional.mse_loss(model(x_t, t, view, keep).float(), target(x0, eps, a, cfg.prediction))

    return loss


def _prepare_encoder(model: RepresentationDiffusion, cfg: PretrainConfig, in_channels: int, image_size: int) -> dict:
    """Starting weights for the encoder of a new run: a local file, timm's hub, or none (random init)."""
    from medclf.models.backbone import create_encoder, load_encoder_weights

    if cfg.encoder_weights:
        info = load_encoder_weights(model.encoder, cfg.encoder_weights)
        return {"init": "file", "file": cfg.encoder_weights, "loaded": info["loaded"], "missing": len(info["missing"])}
    if cfg.pretrained:
        src = create_encoder(cfg.encoder, in_channels, image_size, pretrained=True)
        model.encoder.load_state_dict(src.state_dict())
        return {"init": "hub"}
    return {"init": "random"}


@torch.no_grad()
def collapse_check(model: RepresentationDiffusion, cfg: PretrainConfig, images: torch.Tensor, device: torch.device,
                   trials: int = 4, seed: int = 0) -> dict:
    """Is r used, and does it vary? Denoising MSE with r vs with the null r at shared (t, eps) draws,
    plus the features' spread: variance across images / mean squared norm (0 = every image alike)."""
    model.eval().to(device)
    ab = alphas_cumprod(cfg).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    from medclf.data.cache import to_unit_float

    x = to_unit_float(images.to(device))
    f = model.encoder(x)
    r = model.project(f)
    null = model.null.expand_as(r)
    with_r, without = [], []
    for _ in range(trials):
        t = torch.randint(0, cfg.timesteps, (len(x),), generator=g, device=device)
        eps = torch.randn(x.shape, generator=g, device=device)
        a = ab[t].view(-1, 1, 1, 1)
        x0 = x * 2 - 1
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        y = target(x0, eps, a, cfg.prediction)
        with_r.append(((model.denoise(x_t, t, r) - y) ** 2).mean())
        without.append(((model.denoise(x_t, t, null) - y) ** 2).mean())
    mse_r, mse_0 = float(torch.stack(with_r).mean()), float(torch.stack(without).mean())
    f = f.float()
    spread = ((f - f.mean(0)) ** 2).sum(1).mean() / (f**2).sum(1).mean().clamp_min(1e-12)
    return {"n_images": len(x), "mse_with_r": mse_r, "mse_null_r": mse_0, "target": cfg.prediction,
            "relative_gain": (mse_0 - mse_r) / max(mse_0, 1e-12), "feature_spread": float(spread)}


def pretrain(cache_path: str | Path, out: str | Path, cfg: PretrainConfig, train_cfg: TrainConfig,
             resume: bool = False, progress: ProgressFn | None = None) -> dict:
    """Pretrain an encoder on a cache's images (labels never read); write a run folder.

    RUN/config.json (kind "pretrain": encoder name/size/channels, preprocessing, cache fingerprint,
    seed, collapse check), RUN/model.safetensors (EMA of the whole model), RUN/encoder.safetensors.
    """
    from medclf.data.cache import open_cache
    from medclf.data.dataset import CacheDataset

    out = Path(out)
    cache = open_cache(cache_path)
    if resume:
        if not (out / CONFIG).exists():
            raise MedclfError("nothing to resume: no config.json", out)
        saved = json.loads((out / CONFIG).read_text())
        if saved.get("kind") != KIND:
            raise MedclfError("not a pretraining run: resume it with the command that wrote it", out)
        if saved["cache_fingerprint"] != cache.fingerprint:
            raise MedclfError(f"this run was trained on cache {saved['cache_fingerprint']}, not {cache.fingerprint}", out)
        cfg = PretrainConfig.from_dict(saved["method_config"])
        train_cfg = TrainConfig(**{**saved["train"], "steps": max(train_cfg.steps, saved["train"]["steps"]),
                                   "device": train_cfg.device, "num_workers": train_cfg.num_workers})
    if cfg.split not in ("train", "all"):
        raise MedclfError(f"unknown --split {cfg.split!r} (train, all)")
    ds = CacheDataset(cache, split=None if cfg.split == "all" else "train")
    if len(ds) == 0:
        raise MedclfError(f"the cache has no {cfg.split} items to pretrain on", cache.path)
    C, H, W = cache.shape
    rank, _, _ = distributed_env()
    torch.manual_seed(train_cfg.seed)  # the encoder's random init is the seed's ("untrained" baseline = it)
    model = RepresentationDiffusion(cfg, C, H)
    init = {"init": "resumed"} if resume else _prepare_encoder(model, cfg, C, H)
    base = {
        "kind": KIND,
        "method": METHOD,
        "method_config": asdict(cfg),
        "train": asdict(train_cfg),
        "encoder": {"name": cfg.encoder, "num_features": model.encoder.num_features, "in_chans": C, "image_size": H,
                    "patch_size": model.encoder.patch_size,
                    "weights": ENCODER_WEIGHTS, **({} if resume else {"start": init})},
        "cache": str(cache.path),
        "cache_fingerprint": cache.fingerprint,
        "classes": cache.classes,  # informational: pretraining never reads labels
        "shape": [C, H, W],
        "preprocessing": cache.manifest["preprocessing"],
        "dataset": cache.manifest["dataset"],
        "split_seed": cache.manifest.get("seed", 0),
        "n_train": len(ds),
        "seed": train_cfg.seed,
    }
    if resume:
        base["encoder"]["start"] = saved.get("encoder", {}).get("start")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (out / WEIGHTS).exists():
            raise MedclfError("already holds a trained model; choose a new --out (or --resume to train longer)", out)
        write_config(out, base)
    result = train(model, loss_fn(cfg), ds, train_cfg, out, resume=resume, progress=progress)
    summary = {"run": str(out), "steps": train_cfg.steps, "n_train": len(ds), "rank": result["rank"],
               "world_size": result["world_size"]}
    if rank != 0:
        return summary
    ema = result["ema"]
    save_tensors(out / WEIGHTS, ema, metadata={"method": METHOD})
    save_tensors(out / ENCODER_WEIGHTS, {k.removeprefix("encoder."): v for k, v in ema.items() if k.startswith("encoder.")},
                 metadata={"encoder": cfg.encoder})
    model.load_state_dict(ema)
    check_ds = CacheDataset(cache, split="val")
    if len(check_ds) < 2 or cfg.split == "all":
        check_ds = ds  # nothing held out: check on training images (recorded as such)
    idx = torch.linspace(0, len(check_ds) - 1, min(len(check_ds), 128)).long().unique()
    images = torch.stack([check_ds[int(i)]["image"] for i in idx])
    check = collapse_check(model, cfg, images, resolve_device(train_cfg.device), seed=train_cfg.seed)
    check["on"] = "val" if check_ds is not ds else "train"
    write_config(out, {**base, "collapse_check": check, "world_size": result["world_size"]})
    summary["collapse_check"] = check
    load_pretrained(out)  # the run we just wrote must load
    return summary


def is_pretrain_run(config: dict) -> bool:
    return config.get("kind") == KIND


def load_pretrained(run_path: str | Path, device: torch.device | None = None):
    """(run, PretrainConfig, model on device, eval mode) for a finished pretraining run."""
    run = load_run(run_path)
    if not is_pretrain_run(run.config):
        raise MedclfError("not a pretraining run (written by `medclf pretrain`)", run.path)
    cfg = PretrainConfig.from_dict(run.config["method_config"])
    C, H, _ = run.config["shape"]
    model = RepresentationDiffusion(cfg, C, H)
    try:
        model.load_state_dict(run.weights())
    except RuntimeError as e:
        raise MedclfError(f"weights do not fit the recorded model ({' '.join(str(e).split())[:120]})", run.path) from None
    return run, cfg, model.to(device or torch.device("cpu")).eval()


def load_pretrained_encoder(run_path: str | Path):
    """(encoder name, Encoder state dict) of a pretraining run: what ``finetune --init`` loads."""
    run = load_run(run_path)
    if not is_pretrain_run(run.config):
        raise MedclfError("--init expects a run written by `medclf pretrain`", run.path)
    return run.config["encoder"]["name"], load_tensors(run.path / ENCODER_WEIGHTS), run


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
