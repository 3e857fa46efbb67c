"""DiDiCM: discrete diffusion over the class label (Belhasin et al., CVPR 2026; github omerb01/didicm).

The label is a single token on K states. Forward process: the uniform rate matrix
Q = (11^T - K I)/K with the log-linear schedule sigma(t) = -log(1 - (1 - eps) t): the label survives
with probability e^-sigma, otherwise it jumps to a uniformly drawn class. The network sees the image,
the noisy label c_t and sigma and returns K log concrete scores log p_t(j | x) / p_t(c_t | x) (the
entry of c_t itself is 0 by construction). Trained with SEDD's score entropy weighted by dsigma;
with soft targets (mixup, CutMix, label smoothing) the same entropy on the noised probability vector. Two samplers turn the scores into
p(y | x): CP evolves the class-probability vector itself (one network call per step), CL runs N
tau-leaping label chains and reports where they end.

Network (``conditioning``): a timm trunk (``model.backbone``, any ``create_encoder`` name, so ``--init``,
``--pretrained`` and ``--encoder-weights`` work unchanged) whose pooled features feed a small
FiLM-conditioned MLP head. With ``conditioning="blocks"`` (the default for timm ResNet-family trunks,
``timm.models.resnet.ResNet`` with BasicBlock/Bottleneck stages: resnet10t/18/34/50, test_resnet,
seresnet, resnext, ...) the (noisy label + sigma) embedding is also projected into every residual
block's channels and added to the output of the block's last norm (bn2 / bn3), before the residual sum,
as the paper's DiDiRN does; forward hooks on timm's own blocks, so trunk weights keep their names and
load as before. The trunk then runs once per network call (per sampler step, per chain). With
``conditioning="head"`` (any other trunk, whose blocks have no common interface, and every run
recorded before the field existed) only the head sees (c_t, sigma): the trunk runs once per image and
only the head is re-run along a chain. NFE counts conditioned network evaluations either way, as the
paper does (steps for CP, N x steps for CL); with "blocks" each one is a trunk pass.

Training recipe (``recipe``): "paper" = DiDiCM's ImageNet recipe, timm ``Mixup`` with mixup 0.2,
CutMix 1.0 (switch prob. 0.5) and label smoothing 0.1, the soft targets trained with the score entropy
on p_t = exp(sigma Q) p_0 (the release's DiDiCMLoss); "none" = hard labels (SEDD's denoising score
entropy). ``mixup``, ``cutmix`` and ``label_smoothing`` set explicitly win over the preset.
"""

from __future__ import annotations

import functools
import logging
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
CONDITIONINGS = ("blocks", "head")
#: recipe presets: (mixup alpha, cutmix alpha, label smoothing); "paper" is DiDiCM's train.py recipe
RECIPES = {"paper": (0.2, 1.0, 0.1), "none": (0.0, 0.0, 0.0)}
#: "none": at the test budget (test_resnet, 150 steps, 32-px sample CT, seeds 0-2) the paper's recipe
#: lowered CP test AUROC from 0.84 to 0.74 (mean); it is a regulariser for long ImageNet schedules
DEFAULT_RECIPE = "none"
#: noise draws per image when not set: the head-only trunk runs once however many draws (variance, not
#: cost); with per-block conditioning every draw is a trunk pass, so one, as the release
NOISE_DRAWS = {"head": 4, "blocks": 1}
#: fields every recorded config has had since the first release of this method; all present and no
#: ``conditioning`` -> a run recorded before per-block conditioning existed (see ``DiDiCM.from_options``)
_RECORDED = ("cond_dim", "hidden", "head_blocks", "noise_draws", "mixup", "noise_eps", "sampler", "diffusion_steps")
log = logging.getLogger("medclf.methods.didicm")


@dataclass
class DiDiCMConfig(BackboneConfig):
    cond_dim: int = 128  #: width of the (noisy label + sigma) embedding
    hidden: int = 256  #: width of the score head
    head_blocks: int = 2  #: FiLM-conditioned residual MLP blocks in the head
    conditioning: str | None = None  #: blocks (embedding into every residual block) | head (FiLM head only); None: blocks for timm ResNets, else head
    noise_draws: int | None = None  #: (t, c_t) draws per image and step (None: 4 with head, 1 with blocks, where each draw is a trunk pass)
    recipe: str = DEFAULT_RECIPE  #: none (hard labels) | paper (mixup 0.2 + CutMix 1.0 + label smoothing 0.1); fields below win
    mixup: float | None = None  #: mixup Beta(a, a) (0: off; None: the recipe's)
    cutmix: float | None = None  #: CutMix Beta(a, a) (0: off; None: the recipe's); with mixup too, one of the two per batch (p = 0.5)
    label_smoothing: float | None = None  #: timm's smoothing of the (mixed) targets (None: the recipe's)
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

    def embed(self, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(noisy label + sinusoidal(sigma)) embedding, shared by the head's FiLM and the per-block projections."""
        return self.label_embed(labels) + self.sigma_embed(timestep_embedding(sigma, self.freq_dim))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor,
                emb: torch.Tensor | None = None) -> torch.Tensor:
        cond = nn.functional.silu(self.embed(labels, sigma) if emb is None else emb)
        h = self.proj(feats)
        for blk in self.blocks:
            h = blk(h, cond)
        s = self.out(self.out_norm(h)).float()
        # log p_t(c_t)/p_t(c_t) = 0 exactly: the network never has to learn it
        return s.masked_fill(nn.functional.one_hot(labels, self.n_classes).bool(), 0.0)


@functools.lru_cache(maxsize=None)
def is_resnet_family(name: str) -> bool:
    """Whether timm's ``name`` is a ``timm.models.resnet.ResNet`` whose stages hold BasicBlock/Bottleneck
    (the block structure per-block conditioning hooks into). Built on the meta device: no memory."""
    import timm

    try:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception:  # unknown or not buildable on meta: create_encoder reports the name later
        return False
    return bool(_resnet_blocks(net))


def _resnet_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, last norm before the residual sum) of every residual block of a timm ResNet; [] otherwise.

    BasicBlock: bn2, Bottleneck: bn3: where DiDiRN adds the embedding (after the last norm, before the
    shortcut is added)."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    if not isinstance(net, ResNet):
        return []
    out = []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(net, stage, ())):
            if isinstance(blk, BasicBlock):
                out.append((f"{stage}.{i}", blk.bn2))
            elif isinstance(blk, Bottleneck):
                out.append((f"{stage}.{i}", blk.bn3))
            else:
                return []
    return out


class BlockCond(nn.Module):
    """Projection of the condition into one residual block's channels, added by a forward hook on the
    block's last norm. Keeps timm's block (and its weight names); the net sets ``cond`` per call.

    Zero-initialised: at the start the trunk computes exactly what its (pretrained) weights do, as the
    head's zero output layer starts at uniform scores; gradients reach it from the first step on.
    """

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.cond: torch.Tensor | None = None  # silu(embedding), (B, cond_dim); None: the trunk runs unconditioned

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.cond is None:
            return out
        if torch.compiler.is_compiling():  # torch.export / ONNX: a symbolic check keeps the batch axis dynamic
            torch._check(self.cond.shape[0] == out.shape[0])
        elif len(self.cond) != len(out):
            raise MedclfError(f"{len(self.cond)} conditions for {len(out)} images in a conditioned block")
        return out + self.proj(self.cond).to(out.dtype)[:, :, None, None]


class DiDiCMNet(nn.Module):
    """``model.backbone`` (timm Encoder) + conditioned score head; ``forward(x, c_t, sigma)`` -> (B, K).

    ``conditioning="blocks"``: the condition also enters every residual block (``block_cond``), so
    ``features`` is the identity and ``scores`` runs the trunk; "head": ``features`` runs the trunk once and
    ``scores`` only the head. The samplers call ``features`` once and ``scores`` per step either way.
    """

    def __init__(self, backbone: str, in_channels: int, n_classes: int, image_size: int, cfg: DiDiCMConfig):
        super().__init__()
        from medclf.models.backbone import create_encoder

        self.backbone = create_encoder(backbone, in_channels, image_size)
        self.head = ScoreHead(self.backbone.num_features, n_classes, cfg.hidden, cfg.cond_dim, cfg.head_blocks)
        self.conditioning = cfg.conditioning or "head"
        self.block_cond = nn.ModuleList()
        if self.conditioning == "blocks":
            blocks = _resnet_blocks(self.backbone.net)
            if not blocks:
                raise MedclfError(f"conditioning=blocks needs a timm ResNet-family backbone (BasicBlock/Bottleneck "
                                  f"stages, e.g. resnet18, test_resnet); {backbone!r} is not one: use conditioning=head")
            for _, norm in blocks:
                bc = BlockCond(cfg.cond_dim, norm.num_features)
                norm.register_forward_hook(bc.hook)  # a bound method: deep copies (EMA) rebind it to their copy
                self.block_cond.append(bc)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What ``scores`` reads: pooled trunk features (head) or the images themselves (blocks)."""
        return x if self.conditioning == "blocks" else self.backbone(x)

    def scores(self, feats: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.conditioning == "head":
            return self.head(feats, labels, sigma)
        emb = self.head.embed(labels, sigma)
        cond = nn.functional.silu(emb)
        for bc in self.block_cond:
            bc.cond = cond
        try:
            pooled = self.backbone(feats)
        finally:
            for bc in self.block_cond:
                bc.cond = None
        return self.head(pooled, labels, sigma, emb=emb)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``labels``/``sigma`` may hold M draws per image (image-major, length M x B): with "head" the trunk
        runs once, with "blocks" once per draw."""
        feats = self.features(x)
        if len(labels) != len(feats):
            if len(labels) % len(feats):
                raise MedclfError(f"{len(labels)} labels for {len(feats)} images")
            feats = feats.repeat_interleave(len(labels) // len(feats), 0)
        return self.scores(feats, labels, sigma)


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
    All chains of all images go through the network in one batch per step (with per-block conditioning,
    chains x images trunk passes per step).
    """
    b, k = feats.shape[0], net.head.n_classes
    f = feats.repeat(chains, *([1] * (feats.ndim - 1)))  # chain-major: row n*b + i is chain n of image i
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
        c = config
        self._check(c.sampler, c.diffusion_steps, c.samples, c.cp_label)
        resnet = is_resnet_family(c.backbone)
        if c.conditioning is None:
            c.conditioning = "blocks" if resnet else "head"
            if not resnet:
                log.warning("didicm: %s is not a timm ResNet-family trunk, so the noisy label conditions the score "
                            "head only (conditioning=head), not every residual block as in the paper", c.backbone)
        if c.conditioning not in CONDITIONINGS:
            raise MedclfError(f"unknown conditioning {c.conditioning!r} (blocks, head)")
        if c.conditioning == "blocks" and not resnet:
            raise MedclfError(f"conditioning=blocks needs a timm ResNet-family backbone (resnet18, resnet50, "
                              f"test_resnet, ...), not {c.backbone!r}: use conditioning=head")
        if c.recipe not in RECIPES:
            raise MedclfError(f"unknown recipe {c.recipe!r} ({', '.join(RECIPES)})")
        preset = dict(zip(("mixup", "cutmix", "label_smoothing"), RECIPES[c.recipe]))
        for key, value in preset.items():  # the recipe fills what was not set; the run records the values used
            if getattr(c, key) is None:
                setattr(c, key, value)
        if c.noise_draws is None:
            c.noise_draws = NOISE_DRAWS[c.conditioning]
        if c.noise_draws < 1:
            raise MedclfError(f"noise_draws must be at least 1, not {c.noise_draws}")
        if c.mixup < 0 or c.cutmix < 0:
            raise MedclfError(f"mixup and cutmix must be >= 0 (Beta(a, a) parameters; 0 is off), not {c.mixup}, {c.cutmix}")
        if not 0 <= c.label_smoothing < 1:
            raise MedclfError(f"label_smoothing must lie in [0, 1), not {c.label_smoothing}")
        if not 0 < c.noise_eps < 1 or not 0 < c.sampling_eps < 1 or not 0 < c.end_time < 1:
            raise MedclfError("noise_eps, sampling_eps and end_time must lie in (0, 1)")

    @classmethod
    def from_options(cls, options: dict) -> "DiDiCM":
        """As ``Method.from_options``; a config recorded before ``conditioning`` existed (every field of that
        time present, ``conditioning`` absent) loads as it was trained: head-only, hard labels unless its
        recorded mixup, no CutMix or smoothing."""
        if "conditioning" not in options and all(k in options for k in _RECORDED):
            options = {"conditioning": "head", "recipe": "none", "cutmix": 0.0, "label_smoothing": 0.0, **options}
        return super().from_options(options)

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

    @property
    def soft_targets(self) -> bool:
        """Whether training uses soft targets (mixup, CutMix or label smoothing on)."""
        c = self.config
        return c.mixup > 0 or c.cutmix > 0 or c.label_smoothing > 0

    def loss_fn(self, n_classes: int):
        """Score entropy x dsigma(t), t ~ U(sampling_eps, 1); every draw from the loop's generator.

        Hard labels: SEDD's denoising form on c_t ~ exp(sigma Q) e_y. Soft targets (timm ``Mixup``: mixup,
        CutMix, label smoothing): c_t ~ p_t = exp(sigma Q) p_0 and the entropy against p_t's own ratios, as
        the release's DiDiCMLoss."""
        c, k = self.config, n_classes
        mixer = _mixer(c, k)

        def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
            x, y = batch["image"], batch["label"]
            m, dev = c.noise_draws, y.device
            if self.soft_targets:
                x, p0 = soft_targets(x, y, k, c, g, mixer)
                p0 = p0.repeat_interleave(m, 0)
            y = y.repeat_interleave(m, 0)  # image-major: draws of image i are rows i*m .. i*m + m - 1
            n = len(y)
            # stratified times (one uniform offset, n evenly spaced strata; as VDM): same law as t ~ U, less variance
            u = (torch.rand(1, generator=g, device=dev) + torch.arange(n, device=dev) / n) % 1.0
            u = u[torch.randperm(n, generator=g, device=dev)]
            t = (1 - c.sampling_eps) * u + c.sampling_eps
            sigma, dsigma = log_linear(t, c.noise_eps)
            if self.soft_targets:
                pt = transition(p0.double(), sigma.double())
                ct = torch.multinomial(pt, 1, generator=g).squeeze(1)
                ratios = (pt / pt.gather(1, ct[:, None])).float()
            else:
                ct = noise_labels(y, sigma, k, g)
                ratios = conditional_ratios(y, ct, sigma, k)
            log_score = model(x, ct, sigma).float()
            return (dsigma * score_entropy(log_score, ct, ratios)).mean()

        return loss

    def record(self, model: nn.Module, in_channels: int, image_size: int, start: dict | None) -> dict[str, Any]:
        """What the network conditions, and what one network evaluation costs (recorded in config.json)."""
        blocks = self.config.conditioning == "blocks"
        return {"didicm": {"conditioning": self.config.conditioning,
                           "conditioned_blocks": len(getattr(model, "block_cond", ())),
                           "trunk_passes_per_nfe": 1 if blocks else 0,
                           "note": "each NFE is a full trunk pass" if blocks else
                           "the trunk runs once per image; each NFE re-runs the score head only"}}

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


def _mixer(c: DiDiCMConfig, k: int):
    """timm's batch ``Mixup`` for the config (None when neither mixup nor CutMix is on)."""
    from timm.data import Mixup

    if c.mixup <= 0 and c.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, label_smoothing=c.label_smoothing, num_classes=k,
                 mode="batch", prob=1.0, switch_prob=0.5)


def soft_targets(x: torch.Tensor, y: torch.Tensor, k: int, c: DiDiCMConfig, g: torch.Generator,
                 mixer: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, (B, K) soft targets summing to 1) by timm's ``Mixup`` (mixup / CutMix, partner = the
    batch reversed) and its label smoothing.

    timm draws lam and the CutMix box from numpy's global RNG: here that RNG is seeded from ``g`` for the
    call and restored after, so steps stay seeded and bit-for-bit resumable and nobody else's numpy draws
    move. timm mixes in place and wants an even batch: the images are cloned, and an odd last item is only
    smoothed.
    """
    import numpy as np
    from timm.data.mixup import mixup_target

    mixer = _mixer(c, k) if mixer is None else mixer
    if mixer is None:
        return x, mixup_target(y, k, 1.0, c.label_smoothing)
    seed = int(torch.randint(0, 2**32, (1,), generator=g, device=g.device).item())
    even = len(y) - len(y) % 2
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        xm, pm = mixer(x[:even].clone(), y[:even])
    finally:
        np.random.set_state(state)
    if even < len(y):
        xm = torch.cat([xm, x[even:]])
        pm = torch.cat([pm, mixup_target(y[even:], k, 1.0, c.label_smoothing)])
    return xm, pm
