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
    assert (p.nfe == 16).all()  # explanation always uses the full budget


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
