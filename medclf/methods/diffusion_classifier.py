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
    schedule: str = "linear_beta"  #: MONAI noise schedule, or shifted_cosine (Favero et al.; shifted for the image size)
    cond_dropout: float = 0.15  #: share of training samples whose class is replaced by the null class
    prediction: str = "epsilon"  #: what the network predicts: epsilon | v (Salimans & Ho; Favero et al.)
    loss_weight: str = "none"  #: none (plain MSE) | min_snr (Hang et al.'s min-SNR-gamma weighting)
    min_snr_gamma: float = 5.0
    continuous_t: bool = False  #: train on t ~ U(0, 1) (needs shifted_cosine); scoring uses the T-step grid of it
    #: favero: shifted_cosine + v + min_snr 5 + continuous t (their released recipe); medclf: the fields as set
    recipe: str = "medclf"
    # scoring defaults (overridable at classify time)
    trials: int = 64
    decision: str = "posterior"  #: posterior | vote | mean (see medclf.scoring.denoising)
    adaptive: bool = True
    prune_alpha: float = 0.05  #: see medclf.scoring.denoising.ScoringConfig
    chunk: int = 64
    #: per-pixel error pooling (medclf.scoring.denoising.pool_error_maps): mean (default) | max | top;
    #: max/top find small lesions a whole-image mean drowns (issue #16, benchmarks/subtle.py)
    pool: str = "mean"
    pool_kernel: int = 3
    pool_top: float = 0.02
    #: off | fit: calibration fits per-t-bin weights of the trials' errors on the validation split
    #: (``medclf.scoring.denoising.fit_t_weights``), records them in the run and the scorer uses them:
    #: weighted mean errors, bins of weight 0 not evaluated (issue #12, benchmarks/classify.py)
    t_weights: str = "off"
    t_weight_bins: int = 16  #: even bins over the scorer's t range

    def __post_init__(self) -> None:
        if self.recipe == "favero":
            self.schedule, self.prediction, self.loss_weight, self.continuous_t = "shifted_cosine", "v", "min_snr", True


class ClassConditionalDenoiser(nn.Module):
    """eps_hat(x_t, t, y) (or v_hat, by the run's ``prediction``) for y in 0..K-1, plus the null class K (unconditional)."""

    def __init__(self, arch: str, size: str, in_channels: int, n_classes: int, image_size: int):
        super().__init__()
        self.arch = arch
        self.image_size = image_size  #: the shifted-cosine schedule depends on it
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


class EpsFromV(nn.Module):
    """A v-predicting denoiser seen as an eps-predicting one, which is what the scorer compares:
    eps = sqrt(a_t) v + sqrt(1 - a_t) x_t (from v = sqrt(a_t) eps - sqrt(1 - a_t) x0)."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("ab", alphas_cumprod.float().clone(), persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.ab.to(x_t.device)[t.long()].view(-1, *[1] * (x_t.dim() - 1))
        return a.sqrt() * self.net(x_t, t, y).float() + (1 - a).sqrt() * x_t.float()


@register_method
class DiffusionClassifier(Method):
    name = "diffusion-classifier"
    Config = DiffusionClassifierConfig

    def _scheduler(self, image_size: int | None = None):
        from medclf.models.diffusion import SHIFTED_COSINE, make_scheduler

        c = self.config
        if c.schedule == SHIFTED_COSINE:
            if image_size is None:
                raise ValueError("the shifted-cosine schedule needs the image size")
            return make_scheduler(c.timesteps, c.schedule, image_size=image_size)
        return make_scheduler(c.timesteps, c.schedule)

    def check_recipe(self) -> None:
        from medclf.errors import MedclfError

        c = self.config
        if c.recipe not in ("medclf", "favero"):
            raise MedclfError(f"unknown recipe {c.recipe!r} (medclf, favero)")
        if c.prediction not in ("epsilon", "v") or c.loss_weight not in ("none", "min_snr"):
            raise MedclfError(f"unknown prediction/loss_weight {c.prediction!r}/{c.loss_weight!r} (epsilon|v, none|min_snr)")
        if c.continuous_t and c.schedule != "shifted_cosine":
            raise MedclfError("continuous_t needs schedule=shifted_cosine (an alpha-bar defined at every t)")
        if c.t_weights not in ("off", "fit") or int(c.t_weight_bins) < 1:
            raise MedclfError(f"unknown t_weights/t_weight_bins {c.t_weights!r}/{c.t_weight_bins!r} (off|fit, >= 1)")
        if c.t_weights == "fit" and c.pool != "mean":
            raise MedclfError(f"t_weights=fit weighs the mean error: it needs pool=mean (got {c.pool!r})")

    def build(self, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
        from medclf.errors import MedclfError

        c = self.config
        if c.arch not in ("unet", "dit") or c.model_size not in UNET_SIZES:
            raise MedclfError(f"unknown --arch/--model-size {c.arch}/{c.model_size} (unet|dit, tiny|small|base)")
        self.check_recipe()
        if image_size % (2 ** (len(UNET_SIZES[c.model_size][0]) - 1)) and c.arch == "unet":
            raise MedclfError(f"image size {image_size} must be divisible by {2 ** (len(UNET_SIZES[c.model_size][0]) - 1)} for this UNet")
        return ClassConditionalDenoiser(c.arch, c.model_size, in_channels, n_classes, image_size)

    def loss_fn(self, n_classes: int):
        from medclf.models.diffusion import add_noise, shifted_cosine_logsnr, velocity

        c = self.config
        T, p_drop = c.timesteps, c.cond_dropout
        scheds: dict[int, object] = {}  # per image size (the shifted-cosine schedule depends on it)

        def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
            x0 = batch["image"] * 2 - 1  # (B, C, H, W) in [-1, 1]
            y = batch["label"]
            dev = x0.device
            size = x0.shape[-1]
            sched = scheds.get(size) or scheds.setdefault(size, self._scheduler(size))
            if c.continuous_t:  # Favero et al.: t ~ U(0, 1), the net sees t on the T-step grid's scale
                tc = torch.rand(x0.shape[0], generator=g, device=dev)
                logsnr = shifted_cosine_logsnr(tc, size).float()
                t = tc * (T - 1)
            else:
                t = torch.randint(0, T, (x0.shape[0],), generator=g, device=dev)
            eps = torch.randn(x0.shape, generator=g, device=dev)
            drop = torch.rand(x0.shape[0], generator=g, device=dev) < p_drop
            y = torch.where(drop, torch.full_like(y, n_classes), y)
            if c.continuous_t:
                # hand-written: MONAI's add_noise/get_velocity index a discrete alpha-bar table by int t
                a = torch.sigmoid(logsnr).view(-1, 1, 1, 1)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
                target = a.sqrt() * eps - (1 - a).sqrt() * x0 if c.prediction == "v" else eps
            else:
                x_t = add_noise(sched, x0, eps, t)
                target = velocity(sched, x0, eps, t) if c.prediction == "v" else eps
                if c.loss_weight != "none":
                    ab = sched.alphas_cumprod.to(dev)[t]
                    logsnr = (ab / (1 - ab).clamp_min(1e-12)).clamp_min(1e-12).log()
            if c.loss_weight == "none":
                return nn.functional.mse_loss(model(x_t, t, y).float(), target)
            per = ((model(x_t, t, y).float() - target) ** 2).mean(dim=(1, 2, 3))
            snr = logsnr.exp()
            # min-SNR-gamma (Hang et al. 2023) in the weighting of each prediction target's loss
            w = snr.clamp(max=c.min_snr_gamma) / (snr + 1 if c.prediction == "v" else snr.clamp_min(1e-12))
            return (w * per).mean()

        return loss

    def scorer(self, model: nn.Module, classes: list[str], calibration: dict, device: torch.device,
               **options: Any) -> DenoisingScorer:
        c = self.config
        opts = {k: v for k, v in options.items() if v is not None}
        if opts.get("decision", c.decision) not in ("posterior", "vote", "mean"):
            from medclf.errors import MedclfError

            raise MedclfError(f"unknown --decision {opts['decision']!r} (posterior, vote, mean)")
        if opts.get("counterfactual", "onestep") not in ("onestep", "guided"):
            from medclf.errors import MedclfError

            raise MedclfError(f"unknown --counterfactual {opts['counterfactual']!r} (onestep, guided)")
        if opts.get("amp", "off") not in ("off", "bf16", "fp16"):
            from medclf.errors import MedclfError

            raise MedclfError(f"unknown amp {opts['amp']!r} (off, bf16, fp16)")
        if opts.get("pool", c.pool) not in ("mean", "max", "top"):
            from medclf.errors import MedclfError

            raise MedclfError(f"unknown pool {opts.get('pool', c.pool)!r} (mean, max, top)")
        # the run's fitted timestep weights (calibration) unless the caller passes its own ("off": none)
        t_weights = opts.get("t_weights", calibration.get("t_weights"))
        t_weights = None if isinstance(t_weights, str) and t_weights == "off" else t_weights
        if t_weights is not None and opts.get("pool", c.pool) != "mean":
            from medclf.errors import MedclfError

            raise MedclfError(f"this run weighs timesteps (t_weights), which needs pool=mean (got {opts['pool']!r})")
        cfg = ScoringConfig(trials=opts.get("trials", c.trials), decision=opts.get("decision", c.decision),
                            adaptive=opts.get("adaptive", c.adaptive), prune_alpha=opts.get("prune_alpha", c.prune_alpha),
                            chunk=opts.get("chunk", c.chunk), seed=opts.get("seed", 0),
                            pool=opts.get("pool", c.pool), pool_kernel=opts.get("pool_kernel", c.pool_kernel),
                            pool_top=opts.get("pool_top", c.pool_top),
                            counterfactual=opts.get("counterfactual") or "onestep",
                            amp=opts.get("amp", "off"), channels_last=bool(opts.get("channels_last", False)),
                            compile=bool(opts.get("compile", False)),
                            t_weights=None if t_weights is None else tuple(float(v) for v in t_weights))
        model.eval().to(device)
        sched = self._scheduler(getattr(model, "image_size", None))
        if c.prediction == "v":  # the scorer compares eps predictions
            model = EpsFromV(model, sched.alphas_cumprod).to(device)
        return DenoisingScorer(model, sched, classes, cfg,
                               temperature=float(calibration.get("temperature", 1.0)), bias=calibration.get("bias"),
                               device=device)

    def calibrate(self, model: nn.Module, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict:
        """Temperature and class bias for softmax(-mean error / T + b), fitted on the validation split
        (raw errors give near-uniform probabilities: diffusion-classifier issues #11/#23).

        With ``t_weights=fit``, per-t-bin weights are fitted first on the same full-budget errors and
        recorded (``t_weights``, low t first); temperature and bias are then fitted on the weighted
        mean errors, the score the weighted scorer (and its pruning test) ranks."""
        from medclf.scoring.denoising import bank_timesteps, fit_t_weights, t_bins

        c = self.config
        scorer = self.scorer(model, classes, {}, device)
        batches = [to_unit_float(images[i : i + 32].to(device)) * 2 - 1 for i in range(0, len(images), 32)]
        extra: dict = {}
        if c.t_weights == "fit":
            E = torch.cat([scorer.errors(x, adaptive=False).cpu() for x in batches])  # (n, N, K), all evaluated
            T, N = len(scorer.ab), scorer.cfg.trials
            bins = max(1, min(int(c.t_weight_bins), N))  # every bin holds a trial of the bank
            t = bank_timesteps(N, T, scorer.cfg.t_range)
            w = fit_t_weights(E, labels, t_bins(t, T, scorer.cfg.t_range, bins), bins)
            extra["t_weights"] = [round(float(v), 6) for v in w]
            weighted = self.scorer(model, classes, {"t_weights": extra["t_weights"]}, device)
            scores = weighted.error_scores(E.to(device)).cpu()
            extra["t_weights_nfe_share"] = float((weighted.trial_weights() > 0).float().mean())
        else:
            scores = torch.cat([scorer.mean_error_scores(x).cpu() for x in batches])
        cal = fit_calibration(scores, labels)
        return {**cal, **extra, "fitted_on": int(len(labels)), "health": calibration_health(scores, labels, cal)}
