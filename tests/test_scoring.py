"""The denoising scorer: batching is exact, adaptive saves NFE, decisions and calibration behave."""

from __future__ import annotations

import torch

from medclf.scoring.base import entropy, fit_temperature
from medclf.scoring.denoising import DenoisingScorer, ScoringConfig, van_der_corput


class OracleDenoiser(torch.nn.Module):
    """Predicts eps well only for the true class of each image (encoded in the image's mean)."""

    def __init__(self, ab: torch.Tensor, calls: list | None = None):
        super().__init__()
        self.ab = ab
        self.calls = calls if calls is not None else []

    def forward(self, x_t, t, y):
        self.calls.append(len(t))
        a = self.ab[t].view(-1, 1, 1, 1)
        # class c assumes the clean image is constant c-0.5 (in [-1, 1] units)
        x0 = (y.float() - 0.5).view(-1, 1, 1, 1).expand_as(x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def _ab(T: int = 100) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0)


def _images(labels: list[int]) -> torch.Tensor:
    # images in [0, 1]: class c -> constant (c - 0.5 + 1) / 2
    return torch.stack([torch.full((1, 8, 8), (c - 0.5 + 1) / 2) for c in labels])


def test_van_der_corput_prefixes_cover_the_range():
    v = van_der_corput(8)
    assert v.tolist() == [0.0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]


def test_oracle_is_classified_perfectly_by_vote_and_mean():
    ab = _ab()
    x = _images([0, 1, 1, 0])
    for decision in ("vote", "mean"):
        s = DenoisingScorer(OracleDenoiser(ab), ab, ["a", "b"], ScoringConfig(trials=16, decision=decision, adaptive=False))
        p = s.predict(x)
        assert p.pred.tolist() == [0, 1, 1, 0]
        assert (p.nfe == 32).all()
        assert torch.allclose(p.probs.sum(1), torch.ones(4))


def test_batched_errors_equal_one_forward_per_pair():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    ab = _ab()
    den = lambda x_t, t, y: net(x_t) * (1 + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1) / 100  # noqa: E731
    s = DenoisingScorer(den, ab, ["a", "b", "c"], ScoringConfig(trials=5, adaptive=False, chunk=7))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    E = s.errors(x, adaptive=False)
    t_bank, eps_bank = s.bank((1, 8, 8))
    for b in range(2):
        for k in range(5):
            for c in range(3):
                a = ab[t_bank[k]]
                x_t = a.sqrt() * x[b : b + 1] + (1 - a).sqrt() * eps_bank[k : k + 1]
                with torch.no_grad():
                    e = ((eps_bank[k : k + 1] - den(x_t, t_bank[k : k + 1], torch.tensor([c]))) ** 2).mean()
                assert torch.allclose(E[b, k, c], e, atol=1e-6)


def test_adaptive_prunes_easy_images_and_keeps_decisions():
    ab = _ab()
    x = _images([0, 1] * 8)
    full = DenoisingScorer(OracleDenoiser(ab), ab, ["a", "b"], ScoringConfig(trials=64, adaptive=False)).predict(x)
    ada = DenoisingScorer(OracleDenoiser(ab), ab, ["a", "b"], ScoringConfig(trials=64, adaptive=True)).predict(x)
    assert torch.equal(full.pred, ada.pred)
    assert ada.nfe.float().mean() <= 0.3 * full.nfe.float().mean()


def test_adaptive_spends_full_budget_on_undecidable_images():
    ab = _ab()
    # a denoiser that ignores the class: nothing can be pruned, so the full budget is used
    den = lambda x_t, t, y: torch.zeros_like(x_t)  # noqa: E731
    p = DenoisingScorer(den, ab, ["a", "b"], ScoringConfig(trials=16, adaptive=True)).predict(_images([0, 1]))
    assert (p.nfe == 32).all()


def test_same_image_same_answer_regardless_of_batch():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    den = lambda x_t, t, y: net(x_t) + y.view(-1, 1, 1, 1).float() * 0.01  # noqa: E731
    s = DenoisingScorer(den, _ab(), ["a", "b"], ScoringConfig(trials=8, adaptive=False, seed=4))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        together = s.predict(x).probs
        alone = s.predict(x[1:2]).probs
    assert torch.allclose(together[1], alone[0], atol=1e-6)


def test_explain_maps_shapes_and_evidence_sign():
    ab = _ab()
    s = DenoisingScorer(OracleDenoiser(ab), ab, ["a", "b"], ScoringConfig(trials=8, adaptive=True))
    p = s.predict(_images([1, 0]), explain=True)
    assert p.maps["error"].shape == (2, 2, 8, 8)
    assert p.maps["evidence"].shape == (2, 8, 8)
    assert p.maps["counterfactual"].shape == (2, 2, 1, 8, 8)
    assert (p.maps["evidence"] > 0).float().mean() > 0.9  # the runner-up explains the pixels worse
    plain = s.predict(_images([1, 0]))
    assert torch.equal(p.nfe, plain.nfe) and torch.equal(p.probs, plain.probs)  # explain spends classify's budget


def _offset_denoiser(offsets: list[float]):
    """eps_hat = a constant a_c per class: e_kc = mean((eps_k - a_c)^2), so the raw error difference
    between classes is a_c^2 - 2 a_c mean(eps_k): small, with per-trial noise, known in expectation."""
    a = torch.tensor(offsets)
    return lambda x_t, t, y: a[y].view(-1, 1, 1, 1).expand_as(x_t).clone()


def test_pruning_tests_the_calibrated_score_so_the_prior_is_kept():
    # raw errors favour class a by 0.04 per trial (class b's offset 0.2), but the calibrated prior
    # favours b by more than that (T * (b_b - b_a) = 0.06): the full-budget posterior picks b, and
    # pruning must not drop b on raw errors (it did before the test used the calibrated score)
    ab = _ab()
    x = torch.rand(12, 1, 16, 16)
    # (a third class c, close to a on raw errors, keeps the image going after b is pruned)
    kw = dict(temperature=0.01, bias=[0.0, 6.0, 0.0])
    full = DenoisingScorer(_offset_denoiser([0.0, 0.2, 0.15]), ab, ["a", "b", "c"], ScoringConfig(trials=64, adaptive=False), **kw).predict(x)
    ada = DenoisingScorer(_offset_denoiser([0.0, 0.2, 0.15]), ab, ["a", "b", "c"], ScoringConfig(trials=64, adaptive=True), **kw).predict(x)
    assert (full.pred == 1).all()
    assert torch.equal(ada.pred, full.pred)
    assert ada.nfe.float().mean() < full.nfe.float().mean()  # and it still saves: a is pruned instead
    # without the prior, a wins and b is the one pruned
    none = DenoisingScorer(_offset_denoiser([0.0, 0.2, 0.15]), ab, ["a", "b", "c"], ScoringConfig(trials=64, adaptive=True)).predict(x)
    assert (none.pred == 0).all()


def test_pruned_class_means_are_paired_estimates_of_the_full_budget_means():
    ab = _ab()
    x = torch.rand(6, 1, 16, 16)
    s = DenoisingScorer(_offset_denoiser([0.0, 0.3, 0.05]), ab, ["a", "b", "c"], ScoringConfig(trials=64, adaptive=True))
    E = s.errors(s_x := x * 2 - 1)
    assert torch.isnan(E).any()  # something was pruned
    full = s.errors(s_x, adaptive=False)
    est, true, naive = DenoisingScorer.class_means(E), full.mean(1), E.nanmean(1)
    # what the softmax sees, each class's excess over the best: the paired estimate is closer to the
    # full-budget excess than the pruned class's own short mean is
    gap = lambda m: m - m.min(1, keepdim=True).values  # noqa: E731
    assert (gap(est) - gap(true)).abs().sum() < (gap(naive) - gap(true)).abs().sum()
    standing = ~torch.isnan(E).any(1)
    assert torch.allclose(est[standing], naive[standing])


def test_more_looks_do_not_raise_the_wrong_pruning_rate():
    # a denoiser that ignores the class: any pruning is an error of the sequential test; with the
    # looks controlled (alpha / looks per look), it stays rare however many stages there are
    ab = _ab()
    den = lambda x_t, t, y: torch.zeros_like(x_t)  # noqa: E731
    torch.manual_seed(1)
    x = torch.rand(200, 1, 4, 4)
    for trials in (16, 256):
        p = DenoisingScorer(den, ab, ["a", "b"], ScoringConfig(trials=trials, adaptive=True, min_trials=4)).predict(x)
        pruned = (p.nfe < 2 * trials).float().mean().item()
        assert pruned <= 0.05 + 0.03, (trials, pruned)


def test_temperature_fit_recovers_scale():
    torch.manual_seed(0)
    true_T = 0.01
    logits = torch.randn(2000, 3)
    y = torch.distributions.Categorical(logits=logits).sample()
    T = fit_temperature(logits * true_T, y)
    assert abs(T / true_T - 1) < 0.2


def test_entropy_bounds():
    assert torch.allclose(entropy(torch.tensor([[0.5, 0.5]])), torch.tensor([1.0]))
    assert entropy(torch.tensor([[1.0, 0.0]])).item() < 1e-6


def test_guided_counterfactuals_land_on_each_class_and_use_the_null_class():
    # the oracle knows each class's clean image (constant c - 0.5); deterministic DDIM from t = 0.5
    # under class c must end on it, whatever class the input shows
    ab = _ab(1000)
    calls: list = []
    s = DenoisingScorer(OracleDenoiser(ab, calls), ab, ["a", "b"],
                        ScoringConfig(trials=4, adaptive=False, counterfactual="guided", guidance=1.0, cf_steps=20))
    cf = s.guided_counterfactuals(_images([0, 1]) * 2 - 1)
    assert cf.shape == (2, 2, 1, 8, 8)
    for b in range(2):
        assert torch.allclose(cf[b, 0], torch.full_like(cf[b, 0], 0.25), atol=1e-3)
        assert torch.allclose(cf[b, 1], torch.full_like(cf[b, 1], 0.75), atol=1e-3)
    assert 20 <= len(calls) <= 22  # one (conditional + null) forward per DDIM step for this small batch
    # guidance pushes past the conditional answer (w > 1 extrapolates away from the null class)
    strong = DenoisingScorer(OracleDenoiser(ab), ab, ["a", "b"],
                             ScoringConfig(trials=4, adaptive=False, counterfactual="guided", guidance=4.5, cf_steps=20))
    p = strong.predict(_images([0, 1]), explain=True)
    assert p.maps["counterfactual"].shape == (2, 2, 1, 8, 8)
    assert p.maps["counterfactual"][:, 0].max() < 0.25 + 1e-3  # class a's image is darker still than a's clean image
