"""The shared diffusion maths, in one place, on MONAI.

medclf had the DDPM forward step x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps written out by hand
in the classifier's loss and twice in the denoising scorer, and the sinusoidal embedding in
three networks. Those copies could drift apart. Now the maths is written once, here, as calls to
MONAI's ``DDPMScheduler`` (``add_noise``, ``get_velocity``, ``alphas_cumprod``) and
``get_timestep_embedding``. The wrappers below are kept only where they add something to MONAI:

* MONAI is imported on first use, because ``import monai.networks`` takes about 3 s and
  ``medclf --help`` must not import it (tests/test_cli_ingest.py);
* ``add_noise`` and ``velocity`` work in float32 or wider. MONAI's versions store the scheduler's
  alpha-bar back in the sample's dtype, so one half-precision call would round it for every
  later call;
* ``as_scheduler`` turns a bare alpha-bar tensor (the scorer's public input) into a scheduler,
  through MONAI's own extension point (a ``NoiseSchedules`` entry).

CARD's prior-shifted label process (``medclf.methods.diffmic``) is a different formula and stays
there. It takes its alpha-bar from ``make_scheduler``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from monai.networks.schedulers import DDPMScheduler, Scheduler

GIVEN = "medclf_given_alphas_cumprod"  #: MONAI NoiseSchedules entry: a precomputed alpha-bar tensor
SHIFTED_COSINE = "shifted_cosine"  #: MONAI NoiseSchedules entry: Favero et al.'s shifted-cosine log-SNR schedule


def shifted_cosine_logsnr(t: torch.Tensor, image_size: int, base: int = 64, clip: float = 15.0) -> torch.Tensor:
    """log SNR at continuous t in [0, 1]: the cosine schedule shifted for resolution (Hoogeboom et al.'s
    simple diffusion), -2 log tan(pi t / 2) + 2 log(base / size), clipped to [-clip, clip] as Favero
    et al. train. MONAI has no such schedule (its cosine is Nichol & Dhariwal's, unshifted, in beta form)."""
    import math

    t = t.double().clamp(0.0, 1.0)
    ls = -2 * torch.log(torch.tan(math.pi * t / 2).clamp_min(1e-30)) + 2 * math.log(base / image_size)
    return ls.clamp(-clip, clip)


def _shifted_cosine(num_train_timesteps: int, image_size: int, base: int = 64, clip: float = 15.0):
    """The schedule on MONAI's discrete grid: step i is continuous t = i / (T - 1)."""
    t = torch.linspace(0, 1, num_train_timesteps, dtype=torch.float64)
    return _given(num_train_timesteps, torch.sigmoid(shifted_cosine_logsnr(t, image_size, base, clip)).float())


def make_scheduler(timesteps: int = 1000, schedule: str = "linear_beta", **schedule_args: object) -> DDPMScheduler:
    """MONAI's DDPM scheduler. ``schedule_args`` go to the schedule function (e.g. ``beta_start``/``beta_end``)."""
    from monai.networks.schedulers import DDPMScheduler, NoiseSchedules

    if schedule == GIVEN and GIVEN not in NoiseSchedules:
        NoiseSchedules.add_def(GIVEN, "A precomputed alpha-bar; betas and alphas derived from it")(_given)
    if schedule == SHIFTED_COSINE and SHIFTED_COSINE not in NoiseSchedules:
        NoiseSchedules.add_def(SHIFTED_COSINE, "Shifted-cosine log-SNR (Favero et al.), clipped")(_shifted_cosine)
    return DDPMScheduler(num_train_timesteps=timesteps, schedule=schedule, **schedule_args)


def _given(num_train_timesteps: int, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float32).flatten()
    if len(ab) != num_train_timesteps:
        raise ValueError(f"alphas_cumprod has {len(ab)} steps, not {num_train_timesteps}")
    alphas = ab / torch.cat([ab.new_ones(1), ab[:-1]])
    return 1 - alphas, alphas, ab


def as_scheduler(schedule: Scheduler | torch.Tensor) -> Scheduler:
    """A MONAI scheduler as it is, or one built on a bare alpha-bar tensor (T,)."""
    if isinstance(schedule, torch.Tensor):
        return make_scheduler(len(schedule), GIVEN, alphas_cumprod=schedule)
    return schedule


def _wide(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dt = torch.promote_types(xs[0].dtype, torch.float32)
    return tuple(x.to(dt) for x in xs)


def ddim_like(sched: Scheduler, inference_steps: int) -> Scheduler:
    """MONAI's DDIM scheduler on another scheduler's alpha-bar (deterministic, eta 0), its timesteps
    set to ``inference_steps`` evenly spaced steps over the whole schedule."""
    from monai.networks.schedulers import DDIMScheduler, NoiseSchedules

    if GIVEN not in NoiseSchedules:
        NoiseSchedules.add_def(GIVEN, "A precomputed alpha-bar; betas and alphas derived from it")(_given)
    ab = sched.alphas_cumprod.detach().cpu().float()
    d = DDIMScheduler(num_train_timesteps=len(ab), schedule=GIVEN, alphas_cumprod=ab)
    d.set_timesteps(inference_steps)
    return d


def add_noise(sched: Scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with a per-sample t of shape (B,) and x0 and eps of shape (B, ...)."""
    return sched.add_noise(*_wide(x0, eps), t)


def velocity(sched: Scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v_t = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022). Shapes as in ``add_noise``."""
    return sched.get_velocity(*_wide(x0, eps), t)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10_000) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos | sin] (GLIDE/DiT order). Takes integer t or a float such as sigma."""
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    return get_timestep_embedding(t, dim, max_period)
