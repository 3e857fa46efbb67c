"""medclf.models.diffusion: the shared MONAI-backed helpers match the closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from medclf.models.diffusion import add_noise, as_scheduler, make_scheduler, timestep_embedding, velocity


def _draws(T: int, shape=(6, 3, 5, 4), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randint(0, T, (shape[0],), generator=g)


@pytest.mark.parametrize("schedule", ["linear_beta", "scaled_linear_beta", "cosine"])
def test_add_noise_and_velocity_match_the_closed_form_per_sample(schedule):
    sched = make_scheduler(200, schedule)
    x0, eps, t = _draws(200)
    a = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)  # one a_t per sample
    want_xt = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    want_v = a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()
    assert torch.allclose(add_noise(sched, x0, eps, t).double(), want_xt, atol=1e-6)
    assert torch.allclose(velocity(sched, x0, eps, t).double(), want_v, atol=1e-6)
    # rows really use their own t: swapping two rows' t changes exactly those rows
    t2 = t.clone()
    t2[[0, 1]] = torch.tensor([0, 199])
    diff = (add_noise(sched, x0, eps, t2) - add_noise(sched, x0, eps, t)).flatten(1).abs().amax(1)
    assert (diff[2:] == 0).all() and (diff[:2] > 0).all()


def test_bare_alpha_bar_becomes_a_consistent_scheduler():
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100), 0)
    sched = as_scheduler(ab)
    assert torch.equal(sched.alphas_cumprod, ab)
    assert torch.allclose(torch.cumprod(sched.alphas, 0), ab) and torch.allclose(sched.betas, 1 - sched.alphas)
    assert as_scheduler(sched) is sched
    x0, eps, t = _draws(100)
    a = ab[t].view(-1, 1, 1, 1)
    assert torch.allclose(add_noise(sched, x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    # the same numbers as the named MONAI schedule it was taken from
    assert torch.equal(make_scheduler(100).alphas_cumprod, ab)


def test_half_precision_input_does_not_round_the_schedule():
    sched = make_scheduler(1000)
    ab = sched.alphas_cumprod.clone()
    x0, eps, t = _draws(1000)
    out = add_noise(sched, x0.half(), eps.half(), t)
    velocity(sched, x0.bfloat16(), eps.bfloat16(), t)
    assert out.dtype == torch.float32
    assert sched.alphas_cumprod.dtype == torch.float32 and torch.equal(sched.alphas_cumprod, ab)


def test_timestep_embedding_is_cos_then_sin_and_takes_floats():
    dim, max_period = 16, 10_000
    for t in (torch.tensor([0, 1, 7, 999]), torch.tensor([0.0, 0.013, 2.5, 37.9])):  # integer t and float sigma
        e = timestep_embedding(t, dim)
        freqs = torch.tensor([math.exp(-math.log(max_period) * i / (dim // 2)) for i in range(dim // 2)], dtype=torch.float64)
        args = t.double()[:, None] * freqs[None]
        assert e.shape == (len(t), dim) and e.dtype == torch.float32
        assert torch.allclose(e.double(), torch.cat([args.cos(), args.sin()], 1), atol=1e-5)


# ------------------------------------------------------------------ Favero et al.'s training recipe
def test_shifted_cosine_schedule_is_clipped_shifted_and_on_monai_grid():
    from medclf.models.diffusion import SHIFTED_COSINE, shifted_cosine_logsnr

    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shifted_cosine_logsnr(t, 64), torch.tensor([15.0, 0.0, -15.0], dtype=torch.float64), atol=1e-6)
    # larger images get more noise at the same t (the shift is 2 log(64 / size))
    assert shifted_cosine_logsnr(torch.tensor([0.5]), 256).item() == pytest.approx(2 * math.log(64 / 256))
    s = make_scheduler(1000, SHIFTED_COSINE, image_size=32)
    ab = s.alphas_cumprod
    assert len(ab) == 1000 and bool((ab[1:] <= ab[:-1]).all())
    expect = torch.sigmoid(shifted_cosine_logsnr(torch.tensor([500 / 999]), 32)).float()
    assert ab[500].item() == pytest.approx(expect.item(), rel=1e-5)


def test_v_prediction_seen_as_eps_is_exact():
    from medclf.methods.diffusion_classifier import EpsFromV
    from medclf.models.diffusion import SHIFTED_COSINE

    s = make_scheduler(100, SHIFTED_COSINE, image_size=8)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([3, 30, 60, 97])
    x_t, v = add_noise(s, x0, eps, t), velocity(s, x0, eps, t)
    oracle = lambda x, tt, y: v  # noqa: E731  (the true velocity)
    assert torch.allclose(EpsFromV(oracle, s.alphas_cumprod)(x_t, t, torch.zeros(4, dtype=torch.long)), eps, atol=1e-4)


@pytest.mark.parametrize("recipe", ["medclf", "favero"])
def test_both_recipes_train_and_weight_by_min_snr(recipe):
    from medclf.methods.diffusion_classifier import DiffusionClassifier

    m = DiffusionClassifier.from_options({"arch": "dit", "model_size": "tiny", "recipe": recipe, "timesteps": 100})
    if recipe == "favero":
        c = m.config
        assert (c.schedule, c.prediction, c.loss_weight, c.continuous_t) == ("shifted_cosine", "v", "min_snr", True)
    net = m.build(1, 2, 8)
    loss = m.loss_fn(2)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(6, 1, 8, 8), "label": torch.tensor([0, 1] * 3)}
    value = loss(net, batch, g)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    # the scorer of a v-run compares eps: its denoiser is the converting wrapper
    sc = m.scorer(net, ["a", "b"], {}, torch.device("cpu"), trials=4)
    assert type(sc.denoiser).__name__ == ("EpsFromV" if recipe == "favero" else "ClassConditionalDenoiser")
    p = sc.predict(torch.rand(2, 1, 8, 8))
    assert torch.allclose(p.probs.sum(1), torch.ones(2))
