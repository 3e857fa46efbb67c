"""Timestep weights (issue #12): fitted on validation errors, recorded in the run, used by the scorer;
weighted scoring beats even averaging when only some t carry the class, and skips weight-0 trials."""

from __future__ import annotations

import json

import pytest
import torch

from medclf.scoring.denoising import DenoisingScorer, ScoringConfig, bank_timesteps, fit_t_weights, t_bins

T = 1000  # the diffusion classifier's default schedule length (linear beta)


def _ab() -> torch.Tensor:
    from medclf.models.diffusion import make_scheduler

    return make_scheduler(T, "linear_beta").alphas_cumprod.float()


class SplitDenoiser(torch.nn.Module):
    """Class evidence only in the lowest quarter of the t range (4 bins over (0.02, 0.98): bin 0); above
    it the class changes nothing but noise, as large as the signal's spread times three.

    Images are constant, x0 = -0.5 (class 0) or +0.5 (class 1). Below t_sig the net estimates x0 from
    x_t and predicts eps off by ``delta`` times the distance from class c's x0 to that estimate: the
    true class's error is ~0, the wrong one's ~delta^2 (signal). Above, eps_hat is class-independent
    plus fresh N(0, sigma^2) noise per (image, trial, class): zero mean difference, large spread."""

    def __init__(self, delta: float = 0.3, sigma: float = 1.0, seed: int = 0):
        super().__init__()
        self.ab, self.delta, self.sigma = _ab(), delta, sigma
        self.t_sig = 0.26 * (T - 1)  # the upper edge of bin 0 of 4 over t_range (0.02, 0.98)
        self.g = torch.Generator().manual_seed(seed)
        self.calls = 0

    def forward(self, x_t, t, y):
        self.calls += len(t)
        a = self.ab[t].view(-1, 1, 1, 1)
        x0_hat = x_t.mean(dim=(1, 2, 3), keepdim=True) / a.sqrt()  # the constant image, estimated
        base = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()  # eps given that estimate: class-independent
        x0_c = (y.float() - 0.5).view(-1, 1, 1, 1)
        signal = base + self.delta * (x0_c - x0_hat).abs()
        noise = x_t / (1 - a).sqrt() + self.sigma * torch.randn(x_t.shape, generator=self.g)
        return torch.where((t < self.t_sig).view(-1, 1, 1, 1), signal, noise)


def _images(labels: list[int]) -> torch.Tensor:
    return torch.stack([torch.full((1, 8, 8), 0.25 + 0.5 * c) for c in labels])  # x0 = -0.5 / +0.5 in [-1, 1]


def _labels(n: int, seed: int) -> list[int]:
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _fitted(den: SplitDenoiser, trials: int = 32, bins: int = 4) -> torch.Tensor:
    y = _labels(48, seed=1)
    s = DenoisingScorer(den, den.ab, ["a", "b"], ScoringConfig(trials=trials, adaptive=False))
    E = s.errors(_images(y) * 2 - 1, adaptive=False)
    return fit_t_weights(E, torch.tensor(y), t_bins(bank_timesteps(trials, T, s.cfg.t_range), T, s.cfg.t_range, bins), bins)


def test_fit_finds_the_bin_that_carries_the_class():
    w = _fitted(SplitDenoiser())
    assert w[0] == 1.0 and (w[1:] < 0.05).all(), w  # the noise bins weigh (next to) nothing
    assert (w >= 0).all() and w.max() == 1.0


def test_fit_without_evidence_is_unweighted():
    den = SplitDenoiser(delta=0.0)  # no bin carries the class
    assert torch.equal(_fitted(den), torch.ones(4, dtype=torch.float64))


def test_weighted_scorer_beats_unweighted_at_equal_trials():
    w = tuple(float(v) for v in _fitted(SplitDenoiser()))
    y = _labels(80, seed=2)
    x = _images(y)
    acc, nfe = {}, {}
    for name, tw in (("unweighted", None), ("weighted", w)):
        den = SplitDenoiser(seed=3)
        s = DenoisingScorer(den, den.ab, ["a", "b"], ScoringConfig(trials=16, decision="mean", adaptive=False, t_weights=tw))
        p = s.predict(x)
        acc[name] = (p.pred == torch.tensor(y)).float().mean().item()
        nfe[name] = p.nfe.float().mean().item()
    assert acc["weighted"] >= 0.9 and acc["weighted"] >= acc["unweighted"] + 0.15, acc
    assert nfe["weighted"] < nfe["unweighted"] == 32, nfe  # and cheaper: the noise bins are skipped


def test_zero_weight_bins_are_not_evaluated():
    den = SplitDenoiser()
    w = (1.0, 0.0, 0.5, 0.0)
    s = DenoisingScorer(den, den.ab, ["a", "b"], ScoringConfig(trials=16, adaptive=False, t_weights=w))
    x = _images([0, 1, 1]) * 2 - 1
    E = s.errors(x, adaptive=False)
    tb = t_bins(bank_timesteps(16, T, s.cfg.t_range), T, s.cfg.t_range, 4)
    kept = torch.tensor(w)[tb] > 0
    assert 0 < kept.sum() < 16 and torch.equal(kept, s.trial_weights() > 0)
    assert not torch.isnan(E[:, kept]).any() and torch.isnan(E[:, ~kept]).all()
    assert den.calls == 3 * int(kept.sum()) * 2  # only the kept trials ran the net
    p = s.predict(x * 0.5 + 0.5)
    assert (p.nfe == 2 * kept.sum()).all()
    den.calls = 0
    ada = DenoisingScorer(den, den.ab, ["a", "b"], ScoringConfig(trials=16, adaptive=True, t_weights=w)).predict(x * 0.5 + 0.5)
    assert (ada.nfe <= 2 * kept.sum()).all() and den.calls == int(ada.nfe.sum())


def test_equal_weights_score_exactly_as_unweighted():
    # one weight everywhere: the weighted mean, paired estimates and pruning test reduce to the unweighted ones
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    ab = _ab()

    def den(x_t, t, y):
        return net(x_t) * (1 + 0.3 * y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1) / 2000

    x = torch.rand(12, 1, 8, 8)
    out = {}
    for tw in (None, (1.0,) * 4):
        s = DenoisingScorer(den, ab, ["a", "b", "c"], ScoringConfig(trials=64, adaptive=True, t_weights=tw),
                            temperature=0.01, bias=[0.0, 0.5, -0.5])
        out[tw] = (s.errors(x * 2 - 1), s.predict(x))
    (E0, p0), (E1, p1) = out.values()
    assert torch.isnan(E0).any()  # something was pruned
    assert torch.equal(torch.isnan(E0), torch.isnan(E1)) and torch.allclose(E0, E1, equal_nan=True)
    assert torch.equal(p0.pred, p1.pred) and torch.equal(p0.nfe, p1.nfe)
    assert torch.allclose(p0.probs, p1.probs, atol=1e-5)


def test_weighted_adaptive_keeps_the_full_budget_decisions_and_saves():
    w = tuple(float(v) for v in _fitted(SplitDenoiser()))
    y = _labels(40, seed=4)
    x = _images(y)
    preds = {}
    for adaptive in (False, True):
        den = SplitDenoiser(seed=5)
        s = DenoisingScorer(den, den.ab, ["a", "b"], ScoringConfig(trials=64, adaptive=adaptive, t_weights=w),
                            temperature=0.01, bias=[0.0, 0.0])
        preds[adaptive] = s.predict(x)
    full, ada = preds[False], preds[True]
    assert (full.pred == torch.tensor(y)).float().mean() >= 0.95
    assert (ada.pred == full.pred).float().mean() >= 0.95
    assert ada.nfe.float().mean() < 0.6 * full.nfe.float().mean()


def test_weighted_pruning_keeps_its_error_rate_under_a_null():
    # classes identical in distribution (fresh noise per class): any pruning is a false alarm of the
    # sequential test; unequal weights must not make it (much) more frequent than even weights
    ab = _ab()
    g = torch.Generator().manual_seed(7)

    def den(x_t, t, y):
        return 0.3 * torch.randn(x_t.shape, generator=g)

    x = torch.rand(300, 1, 4, 4)
    rate = {}
    for tw in (None, (1.0, 0.6, 0.3, 0.0)):
        s = DenoisingScorer(den, ab, ["a", "b"], ScoringConfig(trials=64, adaptive=True, t_weights=tw))
        full = 2 * (64 if tw is None else int((s.trial_weights() > 0).sum()))
        rate[tw] = (s.predict(x).nfe < full).float().mean().item()
    rates = list(rate.values())
    assert rates[1] <= rates[0] + 0.04, rate


def test_weights_need_the_mean_pool_and_valid_values():
    ab = _ab()
    den = SplitDenoiser()
    with pytest.raises(ValueError):
        DenoisingScorer(den, ab, ["a", "b"], ScoringConfig(t_weights=(1.0, 0.0), pool="max"))
    for bad in ((0.0, 0.0), (1.0, -0.5), (float("nan"), 1.0), ()):
        with pytest.raises(ValueError):
            DenoisingScorer(den, ab, ["a", "b"], ScoringConfig(t_weights=bad))


def test_calibrate_fits_weights_then_temperature_on_the_weighted_scores():
    from medclf.errors import MedclfError
    from medclf.methods.diffusion_classifier import DiffusionClassifier, DiffusionClassifierConfig
    from medclf.scoring.base import fit_calibration

    y = _labels(48, seed=1)
    x, labels = _images(y), torch.tensor(y)
    off = DiffusionClassifier(DiffusionClassifierConfig(trials=32))
    cal_off = off.calibrate(SplitDenoiser(), ["a", "b"], x, labels, torch.device("cpu"))
    assert "t_weights" not in cal_off
    assert off.scorer(SplitDenoiser(), ["a", "b"], cal_off, torch.device("cpu")).cfg.t_weights is None
    m = DiffusionClassifier(DiffusionClassifierConfig(trials=32, t_weights="fit", t_weight_bins=4))
    cal = m.calibrate(SplitDenoiser(), ["a", "b"], x, labels, torch.device("cpu"))
    w = cal["t_weights"]
    assert len(w) == 4 and w[0] == 1.0 and max(w[1:]) < 0.05 and cal["t_weights_nfe_share"] < 1
    s = m.scorer(SplitDenoiser(seed=9), ["a", "b"], cal, torch.device("cpu"))
    assert s.cfg.t_weights == tuple(w)
    # temperature and bias are the fit on the weighted scores of the same errors
    ref = DiffusionClassifier(DiffusionClassifierConfig(trials=32)).scorer(SplitDenoiser(), ["a", "b"], {}, "cpu")
    E = torch.cat([ref.errors(x[i : i + 32] * 2 - 1, adaptive=False) for i in (0, 32)])  # calibrate's batches, same noise
    again = fit_calibration(s.error_scores(E), labels)
    assert abs(again["temperature"] / cal["temperature"] - 1) < 1e-6
    # and it classifies held-out images well, at fewer NFE than the unweighted scorer
    yt = _labels(40, seed=6)
    p = s.predict(_images(yt))
    assert (p.pred == torch.tensor(yt)).float().mean() >= 0.9 and p.nfe.float().mean() < 2 * 32
    with pytest.raises(MedclfError):
        DiffusionClassifier(DiffusionClassifierConfig(t_weights="yes")).check_recipe()
    with pytest.raises(MedclfError):
        DiffusionClassifier(DiffusionClassifierConfig(t_weights="fit", pool="max")).check_recipe()


def test_finetune_records_the_weights_and_the_run_scorer_uses_them(tiny_cache, tmp_path):
    from medclf.inference import load_scorer
    from medclf.methods.diffusion_classifier import DiffusionClassifier
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    opts = DiffusionClassifier.parse_options({"arch": "dit", "model_size": "tiny", "trials": 8}, ["t_weights=fit"])
    assert opts["t_weights"] == "fit"
    out = tmp_path / "run"
    finetune(tiny_cache, "diffusion-classifier", out, opts,
             TrainConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=1, checkpoint_every=8, log_every=4, seed=0))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method_config"]["t_weights"] == "fit"
    w = cfg["calibration"]["t_weights"]
    assert len(w) == 8 and max(w) == 1.0 and min(w) >= 0  # 8 trials: 8 bins
    _, scorer, _ = load_scorer(out, "cpu")
    scorer = getattr(scorer, "inner", scorer)
    assert scorer.cfg.t_weights == tuple(w)
    _, plain, _ = load_scorer(out, "cpu", t_weights="off")  # a caller's own choice wins over the run's
    assert getattr(plain, "inner", plain).cfg.t_weights is None
