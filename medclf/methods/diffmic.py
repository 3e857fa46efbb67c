"""DiffMIC (Yang et al., MICCAI 2023; after CARD, Han et al. 2022): diffusion on the label vector.

A dual-granularity conditional guidance model (DCG) gives a prior ``y_hat`` from the whole image
(class-activation map -> top-t% pooling -> ``y_global``) and from ROI crops picked at the map's peaks
(local CNN + gated-attention MIL -> ``y_local``); ``y_hat = softmax((z_global + z_local) / 2)``.
The label is diffused with CARD's prior-shifted forward process

    y_t = sqrt(a_t) y_0 + (1 - sqrt(a_t)) y_hat + sqrt(1 - a_t) eps,

and a denoiser (image features x timestep-gated embedding of [y_t, y_hat]) predicts eps. Loss:
||eps - eps_hat||^2 + mmd_weight [MMD(eps, eps_hat | y_global) + MMD(eps, eps_hat | y_local)]
+ ce_weight CE(DCG). Inference: ``samples`` deterministic DDIM chains of ``diffusion_steps`` steps
from y_T ~ N(y_hat, I) over the respaced 1,000-step schedule; their mean is the prediction, their
spread the uncertainty, their per-class 2.5-97.5 percentiles a 95% label interval (CARD's PICP
range), the DCG's class-activation map the explanation.

Arrangement (as DiffMIC's ``diffusion_trainer.py`` and configs): the DCG is its own network
(``dcg="separate"``), trained alone with cross-entropy on the fused logits first
(``dcg_warmup_steps``; the release pretrains 15 epochs, CE on the fused logits only, its per-branch
CE commented out), then the priors come from the DCG in eval mode while the denoiser trains, and
the DCG keeps learning from its own CE in a train-mode pass (``joint_train: True`` in the released
configs; ``dcg_after_warmup="frozen"`` fixes it instead). medclf's earlier arrangement (one trunk
for DCG and denoiser, both from step 0, per-branch CE 0.5) is ``dcg="shared", dcg_warmup_steps=0,
branch_ce_weight=0.5``, and runs recorded before these options load with it.

Read against scott-yjyang/DiffMIC (``model.py``, ``diffusion_utils.py``, ``pretraining/``) and
XzwHan/CARD; written afresh. Where medclf departs from the released code, the docstring says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medclf.errors import MedclfError
from medclf.methods.base import register_method
from medclf.methods.baseline import BackboneConfig, BackboneMethod
from medclf.models.diffusion import make_scheduler, timestep_embedding
from medclf.scoring.label import LabelOutput, LabelScorer, calibrate_label_scorer


@dataclass
class DiffMICConfig(BackboneConfig):
    """DiffMIC options; ``backbone`` is the denoiser's image encoder (the paper: ResNet-18)."""

    dcg: str = "separate"  #: "separate": the DCG has its own trunk (the paper); "shared": one trunk for DCG and denoiser
    dcg_backbone: str | None = None  #: the separate DCG's CNNs (the paper: ResNet-50); None: the ``backbone`` architecture
    cam_stride: int = 0  #: output stride of the CAM's CNN (timm CNNs that take it); 0 = auto, see ``auto_cam_stride``
    top_percent: float = 1.0  #: share of CAM cells averaged into y_global (DiffMIC's released setting: 1.0)
    n_crops: int = 6  #: K ROI crops for the local prior (the paper: 6)
    crop_size: int = 0  #: ROI side in pixels; 0 = auto (32 px at 224 px as in the paper, at least min(12, size/3))
    attention_dim: int = 128  #: gated-attention MIL width (the paper: 128)
    feature_dim: int = 512  #: denoiser width (the paper: 6144; 512 is plenty for K <= 10 classes)
    timesteps: int = 1000  #: training steps of the label diffusion
    beta_start: float = 1e-4  #: linear beta schedule (MONAI ``linear_beta``), as DiffMIC's configs
    beta_end: float = 0.02
    mmd_weight: float = 0.5  #: lambda of the dual-granularity MMD terms (the paper: 0.5)
    ce_weight: float = 1.0  #: weight of the DCG's cross-entropy on the fused prior
    branch_ce_weight: float = 0.0  #: extra CE on y_global and y_local each (DiffMIC's release: none; medclf's old default 0.5)
    dcg_warmup_steps: int = 50  #: first steps train the DCG's cross-entropy alone (DiffMIC pretrains it: 15 epochs); 0 = none
    #: after the warm-up: "joint" (priors from the DCG in eval mode; the DCG keeps learning from its cross-entropy
    #: alone in a train-mode pass: DiffMIC's released configs, ``joint_train: True``), "frozen" (eval mode, weights
    #: fixed: CARD's pretrained-guidance path), "train" (one train-mode pass gives priors and CE: medclf's old
    #: arrangement); None: "joint" for a separate DCG, "train" for a shared trunk (the only one that applies)
    dcg_after_warmup: str | None = None
    # scoring defaults (``classify --samples/--diffusion-steps`` override them)
    samples: int = 16  #: label chains per image (CARD draws ~100 on GPU; 16 keeps CPU scoring quick)
    diffusion_steps: int = 10  #: DDIM steps over the respaced schedule (DiffMICv2: 10)
    clip_label: bool = True  #: clip each step's y_0 estimate to [0, 1] (DDIM clip_sample; CARD: off)

    def __post_init__(self) -> None:
        """Check the arrangement and resolve ``dcg_after_warmup`` so the run records what it trained with."""
        if self.dcg not in ("separate", "shared"):
            raise MedclfError(f"--set dcg={self.dcg!r}: expected separate or shared")
        if self.dcg_after_warmup is None:
            self.dcg_after_warmup = "joint" if self.dcg == "separate" else "train"
        if self.dcg_after_warmup not in AFTER_WARMUP:
            raise MedclfError(f"--set dcg_after_warmup={self.dcg_after_warmup!r}: expected one of {', '.join(AFTER_WARMUP)}")
        if self.dcg == "shared" and self.dcg_after_warmup != "train":
            raise MedclfError(f"--set dcg_after_warmup={self.dcg_after_warmup}: with dcg=shared the DCG's trunk is the "
                              "denoiser's encoder, which the noise loss must train; use dcg=separate")
        if self.dcg == "shared" and self.dcg_backbone:
            raise MedclfError("--set dcg_backbone names a separate DCG trunk: it needs dcg=separate")
        if self.dcg_warmup_steps < 0:
            raise MedclfError(f"--set dcg_warmup_steps={self.dcg_warmup_steps}: must be >= 0")


#: what the DCG does after its warm-up (``DiffMICConfig.dcg_after_warmup``)
AFTER_WARMUP = ("joint", "frozen", "train")
#: fields every DiffMIC run recorded before ``dcg`` existed (config.json holds the whole config), so a
#: recorded config lacking ``dcg`` is told from CLI options, which never carry all of them
_RECORDED_BEFORE_DCG = frozenset({"dcg_backbone", "branch_ce_weight", "samples", "diffusion_steps", "clip_label",
                                  "n_crops", "mmd_weight"})
INTERVAL_NOMINAL = 0.95  #: coverage the conformal margin is fitted for
#: 2.5-97.5 percentiles of the sampled label vectors: CARD's/DiffMIC's ``PICP_range``
INTERVAL_PERCENTILES = (2.5, 97.5)


def legacy_options(options: dict) -> dict:
    """A run recorded before ``dcg``/``dcg_after_warmup`` keeps its arrangement: the shared trunk unless
    it named a ``dcg_backbone``, a train-mode DCG throughout, and its recorded warm-up and branch CE
    (0 and 0.5 where even those are missing). Other options pass through unchanged."""
    if "dcg" in options or not _RECORDED_BEFORE_DCG <= set(options):
        return dict(options)
    return {"dcg_warmup_steps": 0, "branch_ce_weight": 0.5, **options,
            "dcg": "separate" if options.get("dcg_backbone") else "shared", "dcg_after_warmup": "train"}


# ----------------------------------------------------------------------------- diffusion maths


def alphas_cumprod(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """a_t of the linear-beta schedule, from the shared MONAI scheduler (``medclf.models.diffusion``)."""
    return make_scheduler(timesteps, "linear_beta", beta_start=beta_start, beta_end=beta_end).alphas_cumprod.float()


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The respaced grid from T-1 down to 0 (MONAI's ``DDIMScheduler.set_timesteps``: linspace, rounded)."""
    from monai.networks.schedulers import DDIMScheduler

    if not 1 <= steps <= timesteps:
        raise MedclfError(f"--diffusion-steps must be in 1..{timesteps}, not {steps}")
    s = DDIMScheduler(num_train_timesteps=timesteps)
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


def card_q_sample(y0: torch.Tensor, prior: torch.Tensor, a_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """CARD's forward process: y_t = sqrt(a_t) y_0 + (1 - sqrt(a_t)) prior + sqrt(1 - a_t) eps (a_t: (B, 1))."""
    sa = a_t.sqrt()
    return sa * y0 + (1 - sa) * prior + (1 - a_t).sqrt() * eps


def card_ddim_step(y_t: torch.Tensor, eps: torch.Tensor, prior: torch.Tensor, a_t: torch.Tensor | float,
                   a_prev: torch.Tensor | float, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic (eta = 0) DDIM step of CARD's prior-shifted process; returns (y_prev, y0_hat).

    Hand-written because MONAI's ``DDIMScheduler.step`` knows only zero-mean processes: here
    z_t = y_t - prior is an ordinary DDPM variable (z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps), so the
    step is the textbook DDIM step on z, shifted back. (MONAI 1.6's ``step`` also infers the previous
    timestep as t - T // steps, which does not match its own linspace grid, e.g. 999 -> 899 against
    the grid's 888; this function takes the pair explicitly.) y0_hat is CARD's ``y_0_reparam``.

    ``clip``: DDIM's ``clip_sample`` (on by default in MONAI) in label space: y0_hat is clipped to
    [0, 1], where one-hot labels live, and eps re-derived from the clipped estimate. Early steps
    divide the eps error by sqrt(a_t) (~0.006 at t = 999); unclipped, a short-trained denoiser's
    chains wander far from the simplex. CARD does not clip (``clip=False`` reproduces it).
    """
    a_t = torch.as_tensor(a_t, dtype=y_t.dtype, device=y_t.device)
    a_prev = torch.as_tensor(a_prev, dtype=y_t.dtype, device=y_t.device)
    z_t = y_t - prior
    z0 = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip:
        z0 = (prior + z0).clamp(0, 1) - prior
        eps = (z_t - a_t.sqrt() * z0) / (1 - a_t).sqrt()
    z_prev = a_prev.sqrt() * z0 + (1 - a_prev).clamp_min(0).sqrt() * eps
    return prior + z_prev, prior + z0


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """Biased (V-statistic) MMD^2 between two samples (N, D) / (M, D) with an RBF kernel.

    k(a, b) = exp(-||a - b||^2 / (2 bandwidth^2 D)): DiffMIC's ``compute_mmd`` kernel up to the scale
    (theirs divides the squared distance by D^2), normalised by D so the weight means the same for
    any number of classes. Zero for identical samples, >= 0 always (the kernel is positive definite).
    """
    d = x.shape[1]

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a.float(), b.float()).pow(2) / (2 * bandwidth**2 * d))

    return (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).clamp_min(0)


# ----------------------------------------------------------------------------- DCG


def auto_crop_size(image_size: int) -> int:
    """32 px at 224 px (the paper) scaled with the image, but at least min(12, size // 3) px: a CNN
    needs something to read (8-12 px at 32 px), and the crop must fit the image."""
    return max(1, min(image_size, max(round(image_size * 32 / 224), min(12, image_size // 3))))


def roi_corners(saliency: torch.Tensor, crop: int, n: int) -> torch.Tensor:
    """Upper-left corners (B, n, 2) [row, col] of n crop x crop windows, greedily at the saliency's peaks.

    DiffMIC/GMIC's ``RetrieveROIModule``: the window with the largest mean saliency, then that window
    zeroed, n times. Done on the map upsampled to the image (not on the 7x7 CAM grid) so corners are
    pixel-exact, and with windows that never leave the image (the released code pads past the edge).
    """
    m = saliency[:, None].detach().clone()
    out = []
    rows = torch.arange(m.shape[2], device=m.device)
    cols = torch.arange(m.shape[3], device=m.device)
    for _ in range(n):
        pooled = F.avg_pool2d(m, crop, stride=1)  # (B, 1, H - c + 1, W - c + 1)
        idx = pooled.flatten(1).argmax(1)
        r, c = idx // pooled.shape[3], idx % pooled.shape[3]
        out.append(torch.stack([r, c], 1))
        inside = ((rows[None, :, None] >= r[:, None, None]) & (rows[None, :, None] < (r + crop)[:, None, None])
                  & (cols[None, None, :] >= c[:, None, None]) & (cols[None, None, :] < (c + crop)[:, None, None]))
        m = m.masked_fill(inside[:, None], 0.0)
    return torch.stack(out, 1)


def extract_crops(x: torch.Tensor, corners: torch.Tensor, crop: int) -> torch.Tensor:
    """(B, C, H, W) images + (B, n, 2) corners -> (B, n, C, crop, crop) crops (vectorised gather)."""
    B, n = corners.shape[:2]
    off = torch.arange(crop, device=x.device)
    r = (corners[..., 0:1] + off)[..., :, None]  # (B, n, c, 1)
    c = (corners[..., 1:2] + off)[..., None, :]  # (B, n, 1, c)
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    return x.permute(0, 2, 3, 1)[b, r, c].permute(0, 1, 4, 2, 3)


def crop_mask(corners: torch.Tensor, weights: torch.Tensor, crop: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W): sum over crops of weight x the crop's indicator (the attention-weighted ROI map)."""
    H, W = size
    rows = torch.arange(H, device=corners.device)[None, None, :, None]
    cols = torch.arange(W, device=corners.device)[None, None, None, :]
    r, c = corners[..., 0, None, None], corners[..., 1, None, None]
    inside = (rows >= r) & (rows < r + crop) & (cols >= c) & (cols < c + crop)
    return (inside.float() * weights[..., None, None]).sum(1)


def auto_cam_stride(image_size: int) -> int:
    """The largest of 32/16/8 giving a CAM of at least 7 cells a side (the paper's 7x7 at 224 px); 8 below 56 px."""
    return next((s for s in (32, 16) if image_size // s >= 7), 8)


def _cam_encoder(name: str, in_chans: int, image_size: int, stride: int):
    """An Encoder whose feature map has the given output stride where timm supports it (ResNets and
    other dilatable CNNs: same weights, finer map); otherwise the model's own stride. At 32 px a
    stride-32 CNN gives a 1x1 map: nothing to pick ROIs from."""
    from medclf.models.backbone import create_encoder

    stride = stride or auto_cam_stride(image_size)
    if stride != 32:
        try:
            return create_encoder(name, in_chans, image_size, output_stride=stride)
        except (TypeError, MedclfError):
            pass
    return create_encoder(name, in_chans, image_size)


class DCG(nn.Module):
    """Dual-granularity conditional guidance: global CAM prior + local ROI/MIL prior (logits).

    The global CNN's feature map comes in from outside (``forward(x, fmap)``) so the trunk can be the
    denoiser's own encoder (see ``DiffMICNet``); the local CNN reading the crops is always its own.
    """

    def __init__(self, local_name: str, in_chans: int, n_classes: int, cam_features: int, n_crops: int, crop: int,
                 top_percent: float, attention_dim: int):
        super().__init__()
        from medclf.models.backbone import create_encoder

        self.n_crops, self.crop, self.top_percent = n_crops, crop, top_percent
        self.cam_head = nn.Conv2d(cam_features, n_classes, 1, bias=False)
        self.local_net = create_encoder(local_name, in_chans, crop)
        f = self.local_net.num_features
        self.attn_v = nn.Linear(f, attention_dim, bias=False)
        self.attn_u = nn.Linear(f, attention_dim, bias=False)
        self.attn_w = nn.Linear(attention_dim, 1, bias=False)
        self.local_head = nn.Linear(f, n_classes, bias=False)

    def forward(self, x: torch.Tensor, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, C, H, W) images; fmap: (B, F, h, w) the global CNN's unpooled features of x."""
        B, _, H, W = x.shape
        cam = self.cam_head(fmap).float()  # (B, K, h, w)
        k = max(1, round(cam.shape[2] * cam.shape[3] * self.top_percent))
        z_global = cam.flatten(2).topk(k, dim=2).values.mean(2)
        cam_up = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)
        saliency = self.saliency(cam_up.detach())
        corners = roi_corners(saliency, self.crop, self.n_crops)
        crops = extract_crops(x, corners, self.crop)  # (B, n, C, c, c)
        h = self.local_net(crops.flatten(0, 1)).view(B, self.n_crops, -1).float()
        score = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        attention = torch.softmax(score, 1)  # gated attention MIL (Ilse et al. 2018), as DiffMIC
        z_local = self.local_head((attention[..., None] * h).sum(1))
        return {"logits": 0.5 * (z_global + z_local), "global_logits": z_global, "local_logits": z_local,
                "cam": cam_up, "saliency": saliency, "corners": corners, "attention": attention}

    @staticmethod
    def saliency(cam: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) CAM -> (B, H, W) in [0, 1]: max over classes of the class-centred CAM, min-max per image.

        GMIC/DiffMIC sum the per-class min-max-normalised CAMs; with two softmax classes the CAMs are
        mirror images (cross-entropy trains only their difference), so that sum is nearly flat and the
        crops land anywhere. The largest class-specific evidence (CAM minus its class mean) is where
        either class is most strongly supported, for any K.
        """
        s = (cam - cam.mean(1, keepdim=True)).amax(1)
        lo = s.flatten(1).amin(1)[:, None, None]
        hi = s.flatten(1).amax(1)[:, None, None]
        return (s - lo) / (hi - lo).clamp_min(1e-8)


# ----------------------------------------------------------------------------- denoiser


class GatedLinear(nn.Module):
    """Linear layer whose output is scaled by a timestep gate (DiffMIC's ``ConditionalLinear``).

    DiffMIC's gate is a 1,000-row embedding table; in a short run each row is updated a handful of
    times and DDIM visits only ~10 of them, so medclf gates with a linear map of a shared sinusoidal
    embedding of t (smooth in t), initialised near 1.
    """

    def __init__(self, n_in: int, n_out: int, temb_dim: int):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)
        self.gate = nn.Linear(temb_dim, n_out)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * (1 + self.gate(temb))


class DenoiserHead(nn.Module):
    """eps_hat(x, y_t, y_hat, t): DiffMIC's ConditionalModel after the image encoder, plus a shortcut.

    The shortcut is a timestep-gated linear map of [y_t, y_hat] added to the output. At large t the
    answer is nearly eps = (y_t - y_hat) / sqrt(1 - a_t), a linear function of the inputs that the
    multiplicative image path (softplus(BN(.)) x features) learns only slowly; an error there is
    amplified by 1 / sqrt(a_t) (~160 at t = 999) in DDIM's first y_0 estimate. Measured on the sample
    data after 150 CPU steps (unclipped chains): sample spread 2.5 -> 1.3, test AUROC 0.66 -> 0.77;
    with ``clip_label`` as well, 0.86.
    """

    def __init__(self, n_features: int, n_classes: int, width: int, temb_dim: int = 128):
        super().__init__()
        self.temb_dim = temb_dim
        self.proj = nn.Linear(n_features, width)
        self.norm_x = nn.BatchNorm1d(width)
        self.temb = nn.Sequential(nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.lin1, self.norm1 = GatedLinear(2 * n_classes, width, temb_dim), nn.BatchNorm1d(width)
        self.lin2, self.norm2 = GatedLinear(width, width, temb_dim), nn.BatchNorm1d(width)
        self.lin3, self.norm3 = GatedLinear(width, width, temb_dim), nn.BatchNorm1d(width)
        self.out = nn.Linear(width, n_classes)
        self.skip = GatedLinear(2 * n_classes, n_classes, temb_dim)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled image features -> the denoiser's image embedding (computed once per image at inference)."""
        return self.norm_x(self.proj(features.float()))

    def forward(self, hx: torch.Tensor, y_t: torch.Tensor, prior: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.temb_dim))
        h = F.softplus(self.norm1(self.lin1(torch.cat([y_t, prior], 1), temb))) * hx
        h = F.softplus(self.norm2(self.lin2(h, temb)))
        h = F.softplus(self.norm3(self.lin3(h, temb)))
        return self.out(h) + self.skip(torch.cat([y_t, prior], 1), temb)


class DiffMICNet(nn.Module):
    """The DCG, the denoiser's image encoder (``backbone``) and its head; ``forward`` is the training pass.

    ``dcg="separate"`` (default, the paper): the DCG reads the image with its own CNN (``dcg_net``,
    ``dcg_backbone`` or the ``backbone`` architecture) and the denoiser with ``backbone``, so the noise
    and MMD losses never reach the guidance. ``dcg="shared"`` (medclf's earlier default): the DCG's
    global CNN *is* ``backbone``; one trunk pass gives the CAM (unpooled map) and the denoiser's
    features (its mean), half the cost, and the noise loss trains the trunk the DCG reads.
    """

    def __init__(self, c: DiffMICConfig, in_chans: int, n_classes: int, image_size: int):
        super().__init__()
        from medclf.models.backbone import create_encoder

        crop = c.crop_size or auto_crop_size(image_size)
        if not 1 <= crop <= image_size:
            raise MedclfError(f"--set crop_size={c.crop_size} does not fit {image_size} px images")
        if c.n_crops < 1 or not 0 < c.top_percent <= 1:
            raise MedclfError("n_crops must be >= 1 and top_percent in (0, 1]")
        self.n_classes, self.timesteps = n_classes, c.timesteps
        dcg_name = c.dcg_backbone or c.backbone
        if c.dcg == "separate":
            self.backbone = create_encoder(c.backbone, in_chans, image_size)
            self.dcg_net = _cam_encoder(dcg_name, in_chans, image_size, c.cam_stride)
        else:
            self.backbone = _cam_encoder(c.backbone, in_chans, image_size, c.cam_stride)
            self.dcg_net = None
        cam_net = self.dcg_net or self.backbone
        self.dcg = DCG(dcg_name, in_chans, n_classes, cam_net.num_features, c.n_crops, crop,
                       c.top_percent, c.attention_dim)
        self.head = DenoiserHead(self.backbone.num_features, n_classes, c.feature_dim)
        self.register_buffer("alphas_cumprod", alphas_cumprod(c.timesteps, c.beta_start, c.beta_end), persistent=False)

    def guidance_modules(self) -> list[nn.Module]:
        """The separate DCG's modules (its CNN + the DCG heads and local CNN); empty when the trunk is shared."""
        return [] if self.dcg_net is None else [self.dcg_net, self.dcg]

    def _dcg_train_mode(self, on: bool) -> None:
        for m in self.guidance_modules():
            m.train(on)

    def forward(self, x: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                phase: str = "train") -> dict[str, torch.Tensor]:
        """One training pass: eps_hat under the fused, global and local priors (one batch of 3B) + DCG logits.

        The priors enter the diffusion terms detached, so the noise and MMD losses never move them
        through y_hat. ``phase`` (a separate DCG only; the loss picks it from the step):
        "train"/"warmup": one pass with the DCG in training mode gives priors (batch statistics) and
        logits; "frozen": the DCG in eval mode under no_grad (weights and BN statistics untouched; the
        returned logits carry no gradient); "joint": priors from that eval-mode pass and logits from a
        second, train-mode pass for the cross-entropy, as DiffMIC's trainer (``cond_pred_model.eval()``
        for the priors, then ``nonlinear_guidance_model_train_step``).
        """
        if phase in ("frozen", "joint") and self.dcg_net is not None:
            self._dcg_train_mode(False)
            with torch.no_grad():
                d = self.dcg(x, self.dcg_net.feature_map(x))
            priors_from = d
            if phase == "joint":
                self._dcg_train_mode(True)
                d = self.dcg(x, self.dcg_net.feature_map(x))
            feats = self.backbone(x)
        else:
            self._dcg_train_mode(self.training)
            d, feats = self.guidance(x)
            priors_from = d
        priors = [torch.softmax(priors_from[k].float(), 1).detach() for k in ("logits", "global_logits", "local_logits")]
        a = self.alphas_cumprod[t][:, None]
        y_t = torch.cat([card_q_sample(y0, p, a, eps) for p in priors])
        hx = self.head.encode(feats).repeat(3, 1)
        eps_hat = self.head(hx, y_t, torch.cat(priors), t.repeat(3)).float()
        main, glob, loc = eps_hat.chunk(3)
        return {"eps": main, "eps_global": glob, "eps_local": loc, "logits": d["logits"],
                "global_logits": d["global_logits"], "local_logits": d["local_logits"]}

    def guidance(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(DCG outputs, the denoiser's pooled image features); a shared trunk reads x once."""
        if self.dcg_net is None:
            fmap = self.backbone.feature_map(x)
            return self.dcg(x, fmap), fmap.float().mean((2, 3))
        return self.dcg(x, self.dcg_net.feature_map(x)), self.backbone(x)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, samples: int, steps: int, generator: torch.Generator,
               clip: bool = True) -> dict[str, torch.Tensor]:
        """``samples`` DDIM chains per image from y_T ~ N(y_hat, I): final label vectors (B, S, K) + DCG outputs."""
        d, feats = self.guidance(x)
        prior = torch.softmax(d["logits"].float(), 1)
        B, K = prior.shape
        hx = self.head.encode(feats).repeat_interleave(samples, 0)
        p = prior.repeat_interleave(samples, 0)
        y = p + torch.randn(p.shape, generator=generator, device=p.device)
        ab = self.alphas_cumprod
        grid = ddim_timesteps(self.timesteps, steps)
        for i, t in enumerate(grid):
            a_prev = ab[grid[i + 1]] if i + 1 < len(grid) else torch.ones((), device=ab.device)
            eps = self.head(hx, y, p, torch.full((len(y),), t, device=y.device, dtype=torch.long)).float()
            y, _ = card_ddim_step(y, eps, p, ab[t], a_prev, clip)
        return {"y0": y.view(B, samples, K), "prior": prior, **d}


# ----------------------------------------------------------------------------- method


def label_interval(y0: torch.Tensor, percentiles: tuple[float, float] = INTERVAL_PERCENTILES) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, K) sampled label vectors -> per-class (low, high), each (B, K): percentiles across the S samples.

    CARD's prediction interval (``PICP_range: [2.5, 97.5]``, numpy's linear interpolation, which
    ``torch.quantile`` shares), taken on the label vectors themselves, where the one-hot truth lives
    (a softmax of each sample would never reach 0 or 1). With S < 40 samples the 2.5th percentile
    interpolates between the two lowest samples: the interval is about the samples' min-max.
    """
    q = torch.tensor([percentiles[0] / 100, percentiles[1] / 100], dtype=torch.float32, device=y0.device)
    lo, hi = torch.quantile(y0.float(), q, dim=1)
    return lo, hi


def label_scores(y0: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, S, K) sampled label vectors -> probs, uncertainty, vote shares and 95% label intervals.

    probs = softmax of the sample mean (DiffMIC applies softmax to the final label vector; taking it
    of the mean makes the calibrated temperature a temperature on the label vector itself:
    softmax(mean / T + b)). spread = mean over classes of the std across samples (CARD's spread of
    y_0; 0 when every chain agrees); disagreement = share of samples whose argmax is not the
    majority class; interval_low/high = ``label_interval``.
    """
    mean = y0.mean(1)
    votes = F.one_hot(y0.argmax(2), y0.shape[2]).float().mean(1)
    spread = y0.std(1, unbiased=y0.shape[1] > 1).mean(1) if y0.shape[1] > 1 else torch.zeros(len(y0), device=y0.device)
    lo, hi = label_interval(y0)
    return {"probs": torch.softmax(mean, 1), "spread": spread, "disagreement": 1 - votes.amax(1), "votes": votes,
            "interval_low": lo, "interval_high": hi}


@register_method
class DiffMIC(BackboneMethod):
    name = "diffmic"
    Config = DiffMICConfig

    @classmethod
    def from_options(cls, options: dict) -> "DiffMIC":
        """As ``Method.from_options``, but a run recorded before ``dcg`` loads (and resumes) as it trained."""
        return super().from_options(legacy_options(options))

    def build(self, in_channels: int, n_classes: int, image_size: int) -> nn.Module:
        return DiffMICNet(self.config, in_channels, n_classes, image_size)

    def prepare(self, model: nn.Module, in_channels: int, image_size: int) -> dict:
        """Starting weights into the denoiser's encoder and, when they share the trunk's name, the DCG's CNNs."""
        info = super().prepare(model, in_channels, image_size)
        c = self.config
        if info and (c.dcg_backbone or c.backbone) == c.backbone:
            src = model.backbone.state_dict()
            targets = {"dcg.local_net": model.dcg.local_net}
            if model.dcg_net is not None:
                targets["dcg_net"] = model.dcg_net
            for enc in targets.values():
                enc.load_state_dict(src)  # dilation (output_stride) changes no weight shapes
            info = {**info, "also_into": sorted(targets)}
        return info

    def phase(self, step: int) -> str:
        """What the DCG does at a training step: "warmup" (CE alone) before ``dcg_warmup_steps``, then ``dcg_after_warmup``."""
        return "warmup" if step < self.config.dcg_warmup_steps else str(self.config.dcg_after_warmup)

    def loss_fn(self, n_classes: int):
        c = self.config
        T = c.timesteps

        def loss(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
            x, y = batch["image"], batch["label"]
            n, dev = x.shape[0], x.device
            phase = self.phase(batch.get("step", c.dcg_warmup_steps))
            if phase == "frozen" and isinstance(model, nn.parallel.DistributedDataParallel):
                # the frozen DCG gets no gradient, which DDP (find_unused_parameters=False) refuses
                raise MedclfError("dcg_after_warmup=frozen does not run under torchrun yet: use "
                                  "--set dcg_after_warmup=joint (DiffMIC's released arrangement)")
            t = torch.randint(0, T, (n // 2 + 1,), generator=g, device=dev)
            t = torch.cat([t, T - 1 - t])[:n]  # antithetic timesteps, as DiffMIC/CARD
            y0 = F.one_hot(y, n_classes).float()
            eps = torch.randn(y0.shape, generator=g, device=dev)
            out = model(x, y0, t, eps, phase=phase)
            mse = (eps - out["eps"]).pow(2).mean()
            mmd = mmd_rbf(eps, out["eps_global"]) + mmd_rbf(eps, out["eps_local"])
            # warm-up: the diffusion terms weigh 0 (not skipped, so DDP still sees every parameter used)
            diffusion = 0.0 if phase == "warmup" else 1.0
            total = diffusion * (mse + c.mmd_weight * mmd)
            if phase != "frozen":  # a frozen DCG's logits carry no gradient: its CE would only pad the logged loss
                ce = F.cross_entropy(out["logits"].float(), y)
                branch = F.cross_entropy(out["global_logits"].float(), y) + F.cross_entropy(out["local_logits"].float(), y)
                total = total + c.ce_weight * ce + c.branch_ce_weight * branch
            return total

        return loss

    def scorer(self, model: nn.Module, classes: list[str], calibration: dict, device: torch.device,
               **options: Any) -> LabelScorer:
        """Options: ``samples``, ``diffusion_steps``, ``seed``; others (trials, decision, sampler...) are ignored.

        NFE = samples x steps denoiser-head calls + the image passes run once per image: 1 with a
        shared trunk (trunk + DCG), 2 with a separate DCG (its CNN with the local CNN over the crops,
        and the denoiser's encoder); the image features are reused by every chain and step, where
        CARD's loop re-encodes each step. Extras ``interval_low``/``interval_high``: per-class 95%
        intervals of the sampled label vectors (``label_interval``; meaningful from ~40 samples, CARD
        draws 100).
        Maps: ``evidence`` (signed: CAM of the predicted class minus the runner-up's, at image size),
        ``saliency`` (non-negative, [0, 1]: the exact map the ROI crops were picked on), ``roi``
        (the crops weighted by their MIL attention).
        """
        c = self.config
        opts = {k: v for k, v in options.items() if v is not None}
        samples = int(opts.get("samples", c.samples))
        steps = int(opts.get("diffusion_steps", c.diffusion_steps))
        seed = int(opts.get("seed", 0))
        if samples < 1:
            raise MedclfError(f"--samples must be >= 1, not {samples}")
        ddim_timesteps(c.timesteps, steps)  # validates the step count up front
        model.eval().to(device)
        passes = 1 if model.dcg_net is None else 2
        margin = float(calibration.get("interval_margin", 0.0))  # split-conformal widening fitted on val

        def forward(x: torch.Tensor) -> LabelOutput:
            g = torch.Generator(device=x.device).manual_seed(seed)
            out = model.sample(x, samples, steps, g, clip=c.clip_label)
            s = label_scores(out["y0"])
            probs = s["probs"]
            top2 = probs.topk(min(2, probs.shape[1]), 1).indices
            pred, runner = top2[:, 0], top2[:, -1]
            cam = out["cam"]
            evidence = cam.gather(1, pred.view(-1, 1, 1, 1).expand(-1, 1, *cam.shape[2:])) - \
                cam.gather(1, runner.view(-1, 1, 1, 1).expand(-1, 1, *cam.shape[2:]))
            roi = crop_mask(out["corners"], out["attention"], model.dcg.crop, tuple(x.shape[2:]))
            return LabelOutput(
                probs=probs, nfe=torch.full((len(x),), samples * steps + passes, dtype=torch.long),
                uncertainty={"spread": s["spread"], "disagreement": s["disagreement"]},
                extras={"votes": s["votes"], "prior": out["prior"], "interval_low": s["interval_low"] - margin,
                        "interval_high": s["interval_high"] + margin, "raw_interval_low": s["interval_low"],
                        "raw_interval_high": s["interval_high"]},
                maps={"evidence": evidence[:, 0], "saliency": out["saliency"], "roi": roi})

        return LabelScorer(classes, forward, device, calibration, samples=samples)

    def calibrate(self, model: nn.Module, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict:
        """Temperature (``calibrate_label_scorer``), then a split-conformal margin for the label intervals.

        The samples' 2.5-97.5 percentiles under-cover (measured PICP 0.70-0.94 at 16-100 samples):
        the chains' spread is not the label's uncertainty. On the validation split, each (image,
        class) gets the score s = max(low - y, y - high) for its one-hot target y (> 0: missed by s);
        the margin m is the ceil((n + 1) 0.95)-th smallest of the n scores (at least 0), and intervals
        become [low - m, high + m], which covers a new (image, class) with probability >= 0.95 when it
        is exchangeable with the validation ones, at the same sample count (Lei et al. 2018; recorded:
        a run scored with other ``--samples`` gets another spread and keeps the margin only approximately).
        """
        scorer = self.scorer(model, classes, {}, device)
        cal = calibrate_label_scorer(scorer, images, labels)
        lows, highs = [], []
        for i in range(0, len(images), 64):
            ex = scorer.raw(images[i : i + 64]).extras
            lows.append(ex["interval_low"].cpu())
            highs.append(ex["interval_high"].cpu())
        lo, hi = torch.cat(lows).double(), torch.cat(highs).double()
        y = F.one_hot(torch.as_tensor(labels).long(), lo.shape[1]).double()
        score = torch.maximum(lo - y, y - hi).flatten()
        n = len(score)
        rank = min(n, math.ceil((n + 1) * INTERVAL_NOMINAL))
        margin = max(0.0, float(score.sort().values[rank - 1]))
        return {**cal, "interval_margin": round(margin, 6), "interval_nominal": INTERVAL_NOMINAL,
                "interval_samples": int(scorer.samples)}
