"""DiDiCM: discrete diffusion over the class label (Belhasin et al., CVPR 2026; github omerb01/didicm).

The label is a single token on K states. Forward process: the uniform rate matrix
Q = (11^T - K I)/K with the log-linear schedule sigma(t) = -log(1 - (1 - eps) t): the label survives
with probability e^-sigma, otherwise it jumps to a uniformly drawn class. The network sees the image,
the noisy label c_t and sigma and returns K log concrete scores log p_t(j | x) / p_t(c_t | x) (the
entry of c_t itself is 0 by construction). Trained with SEDD's score entropy weighted by dsigma;
with mixup the same entropy on the noised probability vector. Two samplers turn the scores into
p(y | x): CP evolves the class-probability vector itself (one network call per step), CL runs N
tau-leaping label chains and reports where they end.

Network choice: a timm trunk (``model.backbone``, any ``create_encoder`` name, so ``--init``,
``--pretrained`` and ``--encoder-weights`` work unchanged) whose pooled features feed a small
FiLM-conditioned MLP head; the head alone sees (c_t, sigma). The paper's DiDiRN instead adds the
(label + sigma) embedding inside every residual block, which needs a ResNet written for it; with a
generic timm trunk (ViTs, ConvNeXts, ...) there is no common block interface to inject into. A
by-product: the trunk runs once per image and only the head is re-run along a chain, so NFE (counted
as conditioned network evaluations, as in the paper: steps for CP, N x steps for CL) is cheap here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medclf.errors import MedclfError
from medclf.methods.base import register_method
from medclf.methods.baseline import BackboneConfig, BackboneMethod
from medclf.models.diffusion import timestep_embedding
from medclf.scoring.label import LabelOutput, LabelScorer, calibrate_label_scorer

SAMPLERS = ("cp", "cl")
CP_LABELS = ("min", "max", "random")


@dataclass
class DiDiCMConfig(BackboneConfig):
    cond_dim: int = 128  #: width of the (noisy label + sigma) embedding
    hidden: int = 256  #: width of the score head
    head_blocks: int = 2  #: FiLM-conditioned residual MLP blocks in the head
    noise_draws: int = 4  #: (t, c_t) draws per image and step: the head re-runs on the trunk's features (variance, not cost)
    mixup: float = 0.0  #: Beta(a, a) mixup of images and labels (0: off); on, the loss is the probability-vector form
    noise_eps: float = 1e-3  #: log-linear schedule: sigma(1) = -log(noise_eps)
    sampling_eps: float = 1e-5  #: training times t ~ U(sampling_eps, 1): the samplers' end time, as DiDiCM's train.py (SEDD: 1e-3)
    end_time: float = 1e-5  #: samplers run t from 1 down to this (paper)
    sampler: str = "cp"  #: default sampler recorded with the run: cp | cl
    diffusion_steps: int = 8  #: default reverse steps
    samples: int = 10  #: default CL chains per image
    cp_label: str = "min"  #: label CP conditions each call on: argmin of p (paper's default) | max | random (drawn from p)


# ---------------------------------------------------------------- forward process


def log_linear(t: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma(t), dsigma/dt) of the log-linear schedule: 1 - e^-sigma runs linearly from 0 to 1 - eps."""
    sigma = -torch.log1p(-(1 - eps) * t)
    dsigma = (1 - eps) / (1 - (1 - eps) * t)
    return sigma, dsigma


def rate_matrix(k: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> torch.Tensor:
    """The uniform rate matrix Q = (11^T - K I)/K (columns sum to 0)."""
    return (torch.ones(k, k, dtype=dtype, device=device) - k * torch.eye(k, dtype=dtype, device=device)) / k


def transition(p0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """p_t = exp(sigma Q) p_0 in closed form.

    Q = J - I with J = 11^T/K a projection (J^2 = J), so exp(sigma Q) = J + e^-sigma (I - J):
    p_t = e^-sigma p_0 + (1 - e^-sigma)/K. No eigendecomposition (the reference code's float64 eigh) needed.
    """
    keep = torch.exp(-sigma).to(p0.dtype)[:, None]
    return keep * p0 + (1 - keep) / p0.shape[1]


def noise_labels(c0: torch.Tensor, sigma: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Draw c_t ~ exp(sigma Q) e_{c0}: keep c0 with prob. e^-sigma, else a uniform class (c0 included)."""
    move = torch.rand(c0.shape, generator=g, device=c0.device) < -torch.expm1(-sigma)
    jump = torch.randint(0, k, c0.shape, generator=g, device=c0.device)
    return torch.where(move, jump, c0)


def conditional_ratios(c0: torch.Tensor, ct: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K) p_t(j | c0) / p_t(c_t | c0): the target the hard-label score entropy is built on."""
    off = -torch.expm1(-sigma)[:, None] / k  # p_t(j | c0) for j != c0
    p = off.expand(len(c0), k).clone()
    p.scatter_(1, c0[:, None], (torch.exp(-sigma)[:, None] + off))
    return p / p.gather(1, ct[:, None])


def score_entropy(log_score: torch.Tensor, ct: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """SEDD's score entropy per item for the uniform graph (rate Q(c_t, j) = 1/K to every j != c_t).

    sum_{j != c_t} (1/K) [e^s_j - r_j s_j + r_j (log r_j - 1)]: a Bregman divergence between the scores
    and the target ratios r, so >= 0 and exactly 0 at s = log r. With r = p_t(j|c0)/p_t(c_t|c0) this is
    SEDD's denoising score entropy (same closed form as their ``Uniform.score_entropy``).
    """
    k = log_score.shape[1]
    off = torch.ones_like(log_score).scatter_(1, ct[:, None], 0.0)
    r = ratios.clamp_min(1e-20)
    terms = log_score.exp() - r * log_score + r * (r.log() - 1)
    return (off * terms).sum(1) / k


# ---------------------------------------------------------------- network


class FiLMBlock(nn.Module):
    """Residual MLP block whose normalised input is scaled and shifted by the condition (FiLM)."""

    def __init__(self, hidden: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(cond_dim, 2 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond).chunk(2, dim=-1)
        return h + self.mlp(nn.functional.silu(self.norm(h) * (1 + scale) + shift))


class ScoreHead(nn.Module):
    """Pooled image features + (noisy label, sigma) -> K log concrete scores (own entry zeroed)."""

    def __init__(self, in_features: int, n_classes: int, hidden: int, cond_dim: int, blocks: int, freq_dim: int = 128):
        super().__init__()
        self.n_classes = n_classes
        self.freq_dim = freq_dim
        self.proj = nn.Linear(in_features, hidden)
        self.label_embed = nn.Embedding(n_classes, cond_dim)  # K states: the uniform graph has no mask state
        self.sigma_embed = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.blocks = nn.ModuleList(FiLMBlock(hidden, cond_dim) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, n_classes)
        nn.init.zeros_(self.out.weight)  # start at score 1 (log 0): every ratio equal, as at t = 1
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond = nn.functional.silu(self.label_embed(labels) + self.sigma_embed(timestep_embedding(sigma, self.freq_dim)))
        h = self.proj(feats)
        for blk in self.blocks:
            h = blk(h, cond)
        s = self.out(self.out_norm(h)).float()
        # log p_t(c_t)/p_t(c_t) = 0 exactly: the network never has to learn it
        return s.masked_fill(nn.functional.one_hot(labels, self.n_classes).bool(), 0.0)


class DiDiCMNet(nn.Module):
    """``model.backbone`` (timm Encoder) + conditioned score head; ``forward(x, c_t, sigma)`` -> (B, K)."""

    def __init__(self, backbone: str, in_channels: int, n_classes: int, image_size: int, cfg: DiDiCMConfig):
        super().__init__()
        from medclf.models.backbone import create_encoder

        self.backbone = create_encoder(backbone, in_channels, image_size)
        self.head = ScoreHead(self.backbone.num_features, n_classes, cfg.hidden, cfg.cond_dim, cfg.head_blocks)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def scores(self, feats: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.head(feats, labels, sigma)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``labels``/``sigma`` may hold M draws per image (image-major, length M x B): the trunk runs once."""
        feats = self.backbone(x)
        if len(labels) != len(feats):
            if len(labels) % len(feats):
                raise MedclfError(f"{len(labels)} labels for {len(feats)} images")
            feats = feats.repeat_interleave(len(labels) // len(feats), 0)
        return self.head(feats, labels, sigma)


# ---------------------------------------------------------------- samplers

_LOG_CLAMP = 50.0  # log-ratios beyond e^50 change nothing after clipping, and keep exp() finite


def _times(steps: int, end_time: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """The paper's grid: t = linspace(1, end_time, steps), Euler step dt = (1 - end_time)/steps."""
    return torch.linspace(1.0, end_time, steps, dtype=torch.float64, device=device), (1.0 - end_time) / steps


@torch.no_grad()
def sample_cp(net: DiDiCMNet, feats: torch.Tensor, steps: int, noise_eps: float, end_time: float,
              cp_label: str = "min", g: torch.Generator | None = None) -> torch.Tensor:
    """Class-probability sampler: evolve p from uniform with p <- (I + dt dsigma (R * Q)) p, clip, renormalise.

    Each step makes one network call conditioned on a label chosen from p (argmin by default, as the
    reference code). The normalised scores estimate p_t(. | x); R[i, j] = p_t(i)/p_t(j) turns Q into the
    reverse-time rate matrix (columns summing to 0). Returns (B, K) probabilities.
    """
    b, k = feats.shape[0], net.head.n_classes
    q = rate_matrix(k, device=feats.device)
    p = torch.full((b, k), 1.0 / k, dtype=torch.float64, device=feats.device)
    ts, dt = _times(steps, end_time, feats.device)
    for t in ts:
        sigma, dsigma = log_linear(t.expand(b), noise_eps)
        if cp_label == "min":
            labels = p.argmin(1)
        elif cp_label == "max":
            labels = p.argmax(1)
        else:
            labels = torch.multinomial(p, 1, generator=g).squeeze(1)
        log_pt = torch.log_softmax(net.scores(feats, labels, sigma.float()).double(), 1)
        ratio = torch.exp((log_pt[:, :, None] - log_pt[:, None, :]).clamp(-_LOG_CLAMP, _LOG_CLAMP))
        rev = ratio * q
        rev = rev - torch.diag_embed(rev.sum(1))  # diagonal: minus the total rate out of each state
        p = p + (dt * dsigma)[:, None] * torch.bmm(rev, p[:, :, None]).squeeze(2)
        p = p.clamp(0.0, 1.0)
        p = p / p.sum(1, keepdim=True).clamp_min(1e-300)
    return p.float()


@torch.no_grad()
def sample_cl(net: DiDiCMNet, feats: torch.Tensor, steps: int, chains: int, noise_eps: float, end_time: float,
              g: torch.Generator) -> torch.Tensor:
    """Class-label sampler: N tau-leaping (Euler) chains from uniform labels; returns (B, N) final labels.

    Per step the reverse rate from c to j != c is dsigma * Q(c, j) * s_j = dsigma * s_j / K; a chain jumps
    with prob. dt * rate (the stay probability clipped at 0, as SEDD's Euler predictor effectively does).
    All chains of all images go through the head in one batch per step.
    """
    b, k = feats.shape[0], net.head.n_classes
    f = feats.repeat(chains, 1)  # chain-major: row n*b + i is chain n of image i
    c = torch.randint(0, k, (chains * b,), generator=g, device=feats.device)
    ts, dt = _times(steps, end_time, feats.device)
    for t in ts:
        sigma, dsigma = log_linear(t.expand(chains * b), noise_eps)
        log_s = net.scores(f, c, sigma.float()).double().clamp(-_LOG_CLAMP, _LOG_CLAMP)
        move = (dt * dsigma)[:, None] * log_s.exp() / k
        move = move.scatter(1, c[:, None], 0.0)
        stay = (1.0 - move.sum(1, keepdim=True)).clamp_min(0.0)
        probs = move.scatter(1, c[:, None], stay)
        c = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return c.view(chains, b).T


# ---------------------------------------------------------------- method


@register_method
class DiDiCM(BackboneMethod):
    name = "didicm"
    Config = DiDiCMConfig

    def __init__(self, config: DiDiCMConfig):
        super().__init__(config)
        self._check(config.sampler, config.diffusion_steps, config.samples, config.cp_label)
        if config.noise_draws < 1:
            raise MedclfError(f"noise_draws must be at least 1, not {config.noise_draws}")
        if config.mixup < 0:
            raise MedclfError(f"mixup must be >= 0 (a Beta(a, a) parameter; 0 is off), not {config.mixup}")
        if not 0 < config.noise_eps < 1 or not 0 < config.sampling_eps < 1 or not 0 < config.end_time < 1:
            raise MedclfError("noise_eps, sampling_eps and end_time must lie in (0, 1)")

    @staticmethod
    def _check(sampler: str, steps: int, samples: int, cp_label: str) -> None:
        if sampler not in SAMPLERS:
            raise MedclfError(f"unknown --sampler {sampler!r} for didicm (cp, cl)")
        if cp_label not in CP_LABELS:
            raise MedclfError(f"unknown cp_label {cp_label!r} (min, max, random)")
        if int(steps) < 1 or int(samples) < 1:
            raise MedclfError("--diffusion-steps and --samples must be at least 1")

    def build(self, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
        if n_classes < 2:
            raise MedclfError("didicm needs at least 2 classes")
        return DiDiCMNet(self.config.backbone, in_channels, n_classes, image_size, self.config)

    def loss_fn(self, n_classes: int):
        """Score entropy x dsigma(t), t ~ U(sampling_eps, 1); every draw from the loop's generator."""
        c, k = self.config, n_classes

        def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
            x, y = batch["image"], batch["label"]
            m, dev = c.noise_draws, y.device
            if c.mixup > 0:
                x, p0 = _mixup(x, y, k, c.mixup, g)
                p0 = p0.repeat_interleave(m, 0)
            y = y.repeat_interleave(m, 0)  # image-major: draws of image i are rows i*m .. i*m + m - 1
            n = len(y)
            # stratified times (one uniform offset, n evenly spaced strata; as VDM): same law as t ~ U, less variance
            u = (torch.rand(1, generator=g, device=dev) + torch.arange(n, device=dev) / n) % 1.0
            u = u[torch.randperm(n, generator=g, device=dev)]
            t = (1 - c.sampling_eps) * u + c.sampling_eps
            sigma, dsigma = log_linear(t, c.noise_eps)
            if c.mixup > 0:
                pt = transition(p0.double(), sigma.double())
                ct = torch.multinomial(pt, 1, generator=g).squeeze(1)
                ratios = (pt / pt.gather(1, ct[:, None])).float()
            else:
                ct = noise_labels(y, sigma, k, g)
                ratios = conditional_ratios(y, ct, sigma, k)
            log_score = model(x, ct, sigma).float()
            return (dsigma * score_entropy(log_score, ct, ratios)).mean()

        return loss

    def _options(self, options: dict) -> dict:
        c = self.config
        o = {k: v for k, v in options.items() if v is not None}
        opts = {"sampler": str(o.get("sampler", c.sampler)), "steps": int(o.get("diffusion_steps", c.diffusion_steps)),
                "samples": int(o.get("samples", c.samples)), "cp_label": str(o.get("cp_label", c.cp_label)),
                "seed": int(o.get("seed", 0))}
        self._check(opts["sampler"], opts["steps"], opts["samples"], opts["cp_label"])
        return opts

    def scorer(self, model: nn.Module, classes: list[str], calibration: dict, device: torch.device,
               **options: Any) -> LabelScorer:
        """A LabelScorer running the chosen sampler (options: sampler, diffusion_steps, samples, seed, cp_label;
        others, e.g. trials/decision/adaptive, are for other methods and ignored)."""
        c, o = self.config, self._options(options)
        model.eval().to(device)

        def forward(x: torch.Tensor) -> LabelOutput:
            # one generator per call: the same images give the same answer, call after call
            g = torch.Generator(device=x.device).manual_seed(o["seed"])
            feats = model.features(x)
            n = torch.full((len(x),), o["steps"], dtype=torch.long)
            if o["sampler"] == "cp":
                probs = sample_cp(model, feats, o["steps"], c.noise_eps, c.end_time, o["cp_label"], g)
                return LabelOutput(probs=probs, nfe=n)
            ends = sample_cl(model, feats, o["steps"], o["samples"], c.noise_eps, c.end_time, g)
            counts = nn.functional.one_hot(ends, len(classes)).float().sum(1)
            shares = counts / o["samples"]
            # Probabilities: the chain counts with a Jeffreys prior (+1/2 per class), so a class no chain
            # reached gets a small probability instead of 0 (with 10 chains most classes end at 0, and a
            # temperature fitted on log(0 -> 1e-8) would be set by that floor); the argmax is the same.
            probs = (counts + 0.5) / (o["samples"] + 0.5 * len(classes))
            # disagreement: the share of chains that did not end at the most common class
            return LabelOutput(probs=probs, nfe=n * o["samples"], uncertainty={"disagreement": 1 - shares.max(1).values})

        def logit_fn(x: torch.Tensor) -> torch.Tensor:
            # One differentiable call at the sampler's last time, conditioned on class 0: the scores are
            # log p_t(j|x) - log p_t(0|x) with p_t ~ p_0 there, i.e. class logits up to a per-image constant
            # (which cancels in the evidence map's pred - runner-up difference).
            sigma, _ = log_linear(torch.full((len(x),), c.end_time, device=x.device), c.noise_eps)
            return model(x, torch.zeros(len(x), dtype=torch.long, device=x.device), sigma)

        cal = (calibration or {}).get("by_sampler", {}).get(o["sampler"])
        if cal is None:  # older/foreign calibration: use it only when it was fitted for this sampler
            cal = calibration if (calibration or {}).get("sampler", c.sampler) == o["sampler"] else {}
        return LabelScorer(classes, forward, device, cal, logit_fn=logit_fn)

    def calibrate(self, model: nn.Module, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict:
        """A temperature per sampler (CP and CL give differently shaped probabilities), each at the
        run's default steps/samples; the default sampler's also at the top level."""
        by = {s: calibrate_label_scorer(self.scorer(model, classes, {}, device, sampler=s), images, labels)
              for s in SAMPLERS}
        return {**by[self.config.sampler], "sampler": self.config.sampler, "by_sampler": by}


def _mixup(x: torch.Tensor, y: torch.Tensor, k: int, alpha: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mixup (Zhang et al.): lam ~ Beta(alpha, alpha), one partner per item from a permutation.

    Hand-written: timm's ``Mixup`` draws from numpy's global RNG, which would break the loop's
    seeded, bit-for-bit resumable steps; here the Beta draw is seeded from ``g``.
    """
    import numpy as np

    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(y), generator=g, device=g.device).to(y.device)
    onehot = nn.functional.one_hot(y, k).float()
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]
