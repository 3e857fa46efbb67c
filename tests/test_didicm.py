"""DiDiCM: the uniform discrete forward process, the score-entropy objectives, the CP/CL samplers, and
acceptance on held-out sample data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medclf.errors import MedclfError
from medclf.methods.didicm import (DiDiCM, conditional_ratios, is_resnet_family, log_linear, noise_labels, rate_matrix,
                                   sample_cl, sample_cp, score_entropy, soft_targets, transition)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
EPS = 1e-3


# ---------------------------------------------------------------- forward process


def test_schedule_and_closed_form_transition_match_the_matrix_exponential():
    t = torch.tensor([0.0, 0.3, 0.9, 1.0], dtype=torch.float64, requires_grad=True)
    sigma, dsigma = log_linear(t, EPS)
    assert sigma[0] == 0 and math.isclose(float(sigma[-1].detach()), -math.log(EPS), rel_tol=1e-9)
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    assert torch.allclose(grad, dsigma.detach())
    k = 5
    q = rate_matrix(k)
    assert torch.allclose(q.sum(0), torch.zeros(k, dtype=torch.float64))
    p0 = torch.softmax(torch.randn(4, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 1)
    exact = torch.stack([torch.linalg.matrix_exp(s * q) @ p for s, p in zip(sigma.detach(), p0)])
    assert torch.allclose(transition(p0, sigma.detach()), exact, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0])
def test_noised_labels_follow_exp_sigma_q(sigma):
    """Empirical marginals of c_t (c_0 drawn from a soft p_0) vs exp(sigma Q) p_0, within 5 standard errors."""
    k, n = 4, 200_000
    g = torch.Generator().manual_seed(1)
    p0 = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
    c0 = torch.multinomial(p0, n, replacement=True, generator=g)
    ct = noise_labels(c0, torch.full((n,), sigma), k, g)
    freq = torch.bincount(ct, minlength=k).double() / n
    want = transition(p0[None], torch.tensor([sigma], dtype=torch.float64))[0]
    assert (freq - want).abs().max() < 5 * math.sqrt(0.25 / n), (freq, want)
    assert not torch.allclose(freq, p0, atol=0.01)  # it did move


# ---------------------------------------------------------------- objective


def _sedd_uniform(score, sigma, x, x0, k):
    """SEDD's closed form for the uniform graph (written out independently of medclf's generic form)."""
    esigm1 = torch.expm1(sigma)
    ratio = 1 - k / (esigm1 + k)
    neg = score.mean(-1) - score.gather(-1, x[:, None]).squeeze(-1) / k
    neg = torch.where(x == x0, ratio * neg, score.gather(-1, x0[:, None]).squeeze(-1) / esigm1 + neg)
    const = torch.where(x == x0, (k - 1) / k * ratio * (ratio.log() - 1), ((-ratio.log() - 1) / ratio - (k - 2)) / k)
    sexp = score.exp()
    pos = sexp.mean(-1) - sexp.gather(-1, x[:, None]).squeeze(-1) / k
    return pos - neg + const


def test_score_entropy_is_sedds_nonnegative_and_zero_at_the_true_score():
    k, n = 5, 4000
    g = torch.Generator().manual_seed(2)
    sigma = log_linear(torch.rand(n, generator=g, dtype=torch.float64) * (1 - EPS) + EPS, EPS)[0]
    c0 = torch.randint(0, k, (n,), generator=g)
    ct = noise_labels(c0, sigma, k, g)
    assert (ct != c0).any() and (ct == c0).any()
    s = torch.randn(n, k, generator=g, dtype=torch.float64).scatter(1, ct[:, None], 0.0)
    r = conditional_ratios(c0, ct, sigma, k)
    mine = score_entropy(s, ct, r)
    assert torch.allclose(mine, _sedd_uniform(s, sigma, ct, c0, k), atol=1e-8, rtol=1e-6)
    assert (mine >= 0).all() and mine.mean() > 0.1
    at_truth = score_entropy(r.log(), ct, r)
    assert at_truth.abs().max() < 1e-9
    # soft (probability-vector) form: ratios of p_t = exp(sigma Q) p_0 itself
    p0 = torch.softmax(3 * torch.randn(n, k, generator=g, dtype=torch.float64), 1)
    pt = transition(p0, sigma)
    rs = pt / pt.gather(1, ct[:, None])
    assert score_entropy(rs.log(), ct, rs).abs().max() < 1e-9
    assert (score_entropy(s, ct, rs) >= 0).all()


def test_hard_label_objective_is_minimised_by_the_marginal_score():
    """Averaged over c_0 ~ p(c_0 | c_t), the hard-label entropy's gradient vanishes at log p_t(j)/p_t(c_t):
    what the soft form targets directly. Fails if the conditional ratios are wrong."""
    k = 4
    p0 = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    for sig, ct in [(0.2, 0), (1.5, 3), (0.01, 2)]:
        sigma = torch.tensor([sig], dtype=torch.float64)
        pt = transition(p0[None], sigma)[0]
        s = (pt / pt[ct]).log().requires_grad_(True)
        c0 = torch.arange(k)
        post = p0 * transition(torch.eye(k, dtype=torch.float64), sigma.expand(k))[:, ct]  # p(c0) p_t(ct | c0)
        post = post / post.sum()
        cts = torch.full((k,), ct)
        r = conditional_ratios(c0, cts, sigma.expand(k), k)
        loss = (post * score_entropy(s[None].expand(k, k), cts, r)).sum()
        (grad,) = torch.autograd.grad(loss, s)
        assert grad.abs().max() < 1e-10, (sig, ct, grad)
        s_off = s.detach() + torch.tensor([0.0, 0.3, -0.2, 0.1], dtype=torch.float64).roll(ct)
        assert (post * score_entropy(s_off[None].expand(k, k), cts, r)).sum() > loss


@pytest.mark.parametrize("opts", [{"recipe": "none"}, {"recipe": "none", "mixup": 0.4}, {"recipe": "paper"},
                                  {"recipe": "paper", "conditioning": "head"}])
def test_loss_is_seeded_by_the_generator_nonnegative_and_trains_the_trunk(opts):
    torch.manual_seed(0)
    method = DiDiCM.from_options({"backbone": "test_resnet", "noise_draws": 3, **opts})
    assert method.soft_targets == (opts.get("mixup", 0) > 0 or opts["recipe"] == "paper")
    model = method.build(1, 3, 16)
    torch.nn.init.normal_(model.head.out.weight, std=0.1)  # zero-initialised: let gradients reach the trunk now
    loss_fn = method.loss_fn(3)
    batch = {"image": torch.rand(6, 1, 16, 16), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    a = loss_fn(model, batch, torch.Generator().manual_seed(7))
    b = loss_fn(model, batch, torch.Generator().manual_seed(7))
    c = loss_fn(model, batch, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a >= 0 and torch.isfinite(a)
    a.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


# ---------------------------------------------------------------- samplers


def _oracle(p0: torch.Tensor):
    """A 'network' returning the exact log concrete scores of p_t = exp(sigma Q) p0 (per item)."""

    def scores(feats, labels, sigma):
        pt = transition(p0[feats[:, 0].long()].double(), sigma.double())
        return (pt / pt.gather(1, labels[:, None])).log().float()

    return SimpleNamespace(head=SimpleNamespace(n_classes=p0.shape[1]), scores=scores)


P0 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.45, 0.55, 0.0]], dtype=torch.float64)


def test_cp_sampler_recovers_p0_from_exact_scores_and_sums_to_one():
    net, feats = _oracle(P0), torch.arange(len(P0)).float()[:, None]
    for steps in (1, 2, 8):
        p = sample_cp(net, feats, steps, EPS, 1e-5)
        assert p.shape == (4, 3) and torch.allclose(p.sum(1), torch.ones(4), atol=1e-6) and (p >= 0).all()
    p = sample_cp(net, feats, 400, EPS, 1e-5)
    assert (p.double() - P0).abs().max() < 0.05, p
    assert p[:, :].argmax(1).tolist() == [0, 2, p[2].argmax().item(), 1]
    for mode in ("max", "random"):  # the ratio estimate does not depend on the conditioning label
        assert torch.allclose(sample_cp(net, feats, 64, EPS, 1e-5, mode, torch.Generator().manual_seed(0)),
                              sample_cp(net, feats, 64, EPS, 1e-5, "min"), atol=1e-5)


def test_cl_chains_end_distributed_as_p0_from_exact_scores():
    net, feats = _oracle(P0), torch.arange(len(P0)).float()[:, None]
    ends = sample_cl(net, feats, 64, 3000, EPS, 1e-5, torch.Generator().manual_seed(0))
    assert ends.shape == (4, 3000)
    shares = torch.nn.functional.one_hot(ends, 3).double().mean(1)
    assert (shares - P0).abs().max() < 0.05, shares
    again = sample_cl(net, feats, 64, 3000, EPS, 1e-5, torch.Generator().manual_seed(0))
    assert torch.equal(ends, again)


def test_bad_options_are_refused():
    with pytest.raises(MedclfError, match="unknown --sampler"):
        DiDiCM.from_options({"sampler": "ddim"})
    with pytest.raises(MedclfError, match="at least 1"):
        DiDiCM.from_options({"diffusion_steps": 0})
    with pytest.raises(MedclfError, match="mixup"):
        DiDiCM.from_options({"mixup": -1.0})
    with pytest.raises(MedclfError, match="cutmix"):
        DiDiCM.from_options({"cutmix": -1.0})
    with pytest.raises(MedclfError, match="label_smoothing"):
        DiDiCM.from_options({"label_smoothing": 1.0})
    with pytest.raises(MedclfError, match="unknown recipe"):
        DiDiCM.from_options({"recipe": "imagenet"})
    with pytest.raises(MedclfError, match="unknown conditioning"):
        DiDiCM.from_options({"backbone": "test_resnet", "conditioning": "film"})
    with pytest.raises(MedclfError, match="ResNet-family"):
        DiDiCM.from_options({"backbone": "test_vit", "conditioning": "blocks"})
    m = DiDiCM.from_options({"backbone": "test_resnet"})
    with pytest.raises(MedclfError, match="unknown --sampler"):
        m.scorer(m.build(1, 2, 16), ["a", "b"], {}, torch.device("cpu"), sampler="x")


# ---------------------------------------------------------------- conditioning: per residual block or head only


def _blocks_net(k: int = 3, size: int = 16):
    torch.manual_seed(0)
    method = DiDiCM.from_options({"backbone": "test_resnet"})
    assert method.config.conditioning == "blocks" and method.config.noise_draws == 1
    return method, method.build(1, k, size)


def test_backbones_get_blocks_when_resnet_family_else_head():
    for name in ("test_resnet", "resnet10t", "resnet18", "resnet50", "seresnet18"):
        assert is_resnet_family(name), name
        assert DiDiCM.from_options({"backbone": name}).config.conditioning == "blocks"
    for name in ("test_vit", "test_convnext", "resnetv2_50", "efficientnet_b0", "not_a_model"):
        assert not is_resnet_family(name), name
    m = DiDiCM.from_options({"backbone": "test_vit"})
    assert m.config.conditioning == "head" and m.config.noise_draws == 4
    assert DiDiCM.from_options({"backbone": "test_resnet", "conditioning": "head"}).config.noise_draws == 4


def test_block_conditioning_reaches_every_residual_block():
    from timm.models.resnet import BasicBlock, Bottleneck

    _, model = _blocks_net()
    blocks = [b for st in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model.backbone.net, st)]
    assert len(blocks) == len(model.block_cond) >= 4 and all(isinstance(b, (BasicBlock, Bottleneck)) for b in blocks)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((4,), 0.5)
    model.eval()
    # zero-initialised projections: at the start the trunk computes what its own weights do
    feats = model.backbone(x)
    with torch.no_grad():
        for bc in model.block_cond:
            bc.cond = torch.randn(4, bc.proj.in_features)
        assert torch.allclose(model.backbone(x), feats)
        for bc in model.block_cond:
            bc.cond = None
    torch.nn.init.normal_(model.head.out.weight, std=0.1)
    out = model(x, torch.tensor([0, 1, 2, 0]), sigma)
    grads = torch.autograd.grad(out.square().sum(), [bc.proj.weight for bc in model.block_cond])
    assert all(float(g.abs().sum()) > 0 for g in grads), [float(g.abs().sum()) for g in grads]
    # with trained (non-zero) projections, the noisy label moves every block's output
    for bc in model.block_cond:
        torch.nn.init.normal_(bc.proj.weight, std=0.1)
    acts: dict[int, list[torch.Tensor]] = {}
    hooks = [b.register_forward_hook(lambda mod, a, o, i=i: acts.setdefault(i, []).append(o.detach()))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(x, torch.zeros(4, dtype=torch.long), sigma)
        model(x, torch.full((4,), 2, dtype=torch.long), sigma)
    for h in hooks:
        h.remove()
    assert len(acts) == len(blocks)
    assert all((a - b).abs().max() > 1e-4 for a, b in acts.values()), [float((a - b).abs().max()) for a, b in acts.values()]
    assert all(bc.cond is None for bc in model.block_cond)  # cleared after the call: the bare trunk is unconditioned


@pytest.mark.parametrize("conditioning", ["blocks", "head"])
def test_trunk_passes_per_sampler_step(conditioning):
    """head: one trunk pass per image whatever the sampler; blocks: one per network evaluation (honest NFE)."""
    import copy

    method = DiDiCM.from_options({"backbone": "test_resnet", "conditioning": conditioning})
    model = method.build(1, 3, 16)
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda mod, a, o: calls.append(len(o)))
    x = torch.rand(5, 1, 16, 16)
    for opts, nfe in [({"diffusion_steps": 3}, 3), ({"sampler": "cl", "diffusion_steps": 3, "samples": 2}, 6)]:
        calls.clear()
        p = method.scorer(model, ["a", "b", "c"], {}, torch.device("cpu"), **opts).raw(x)
        assert (p.nfe == nfe).all() and torch.allclose(p.probs.sum(1), torch.ones(5), atol=1e-5)
        if conditioning == "head":
            assert calls == [5], calls
        else:  # every step runs the trunk on every image (CL: on every chain of every image)
            assert sum(calls) == 5 * nfe and len(calls) == 3, calls
    ema = copy.deepcopy(model)  # the loop's EMA is a deep copy: its hooks must be its own projections
    if conditioning == "blocks":
        for bc in ema.block_cond:
            torch.nn.init.normal_(bc.proj.weight, std=0.1)
        torch.nn.init.normal_(ema.head.out.weight, std=0.1)
        labels, sigma = torch.tensor([0, 1, 2, 0, 1]), torch.full((5,), 0.5)
        with torch.no_grad():
            a = ema(x, labels, sigma)
            b = ema(x, torch.zeros(5, dtype=torch.long), sigma)
            assert not torch.allclose(a.masked_fill(a == 0, 1), b.masked_fill(b == 0, 1))
            assert torch.equal(model(x, labels, sigma), torch.zeros(5, 3))  # the original is untouched (zero head)


def test_old_run_config_without_conditioning_loads_head_only():
    old = {"backbone": "test_resnet", "pretrained": False, "encoder_weights": None, "cond_dim": 128, "hidden": 256,
           "head_blocks": 2, "noise_draws": 4, "mixup": 0.0, "noise_eps": 1e-3, "sampling_eps": 1e-5, "end_time": 1e-5,
           "sampler": "cp", "diffusion_steps": 8, "samples": 10, "cp_label": "min"}
    m = DiDiCM.from_options(old)
    c = m.config
    assert (c.conditioning, c.recipe, c.mixup, c.cutmix, c.label_smoothing, c.noise_draws) == ("head", "none", 0.0, 0.0, 0.0, 4)
    assert not m.soft_targets
    # its weights (written by the head-only network) load strictly: no per-block parameters expected
    torch.manual_seed(0)
    written = DiDiCM.from_options({**old, "conditioning": "head"}).build(1, 2, 16).state_dict()
    net = m.build(1, 2, 16)
    net.load_state_dict(written)
    assert len(net.block_cond) == 0 and not any(k.startswith("block_cond") for k in written)
    # a new run's recorded config round-trips as recorded; a new run with no options gets the new defaults
    new = DiDiCM.from_options({"backbone": "test_resnet"})
    assert DiDiCM.from_options(new.config_dict()).config == new.config
    assert (new.config.conditioning, new.config.recipe) == ("blocks", "none") and not new.soft_targets
    paper = DiDiCM.from_options({"backbone": "test_resnet", "recipe": "paper"}).config
    assert (paper.mixup, paper.cutmix, paper.label_smoothing) == (0.2, 1.0, 0.1)
    assert DiDiCM.from_options({"recipe": "paper", "cutmix": 0.0}).config.cutmix == 0.0  # a set field wins
    assert DiDiCM.from_options({**old, "mixup": 0.3}).config.mixup == 0.3  # an old mixup run keeps its mixup


# ---------------------------------------------------------------- CutMix, mixup, label smoothing


def test_paper_recipe_soft_targets_sum_to_one_are_seeded_and_cutmix_pastes_boxes():
    import numpy as np

    k, n = 4, 7  # odd: timm mixes the even prefix, the last item is only smoothed
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 16, 16).contiguous()
    paper = DiDiCM.from_options({"backbone": "test_resnet", "recipe": "paper"}).config
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    lams, cut = set(), 0
    for seed in range(12):
        xm, p = soft_targets(x, y, k, paper, torch.Generator().manual_seed(seed))
        assert p.shape == (n, k) and torch.allclose(p.sum(1), torch.ones(n), atol=1e-6)
        assert (p >= 0.1 / k - 1e-7).all()  # smoothing 0.1: every class keeps at least 0.1 / K
        assert torch.equal(x, torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 16, 16))  # not in place
        assert torch.allclose(p[-1], torch.full((k,), 0.1 / k) + 0.9 * torch.nn.functional.one_hot(y[-1], k))
        lam = float(p[0, 0] - 0.1 / k) / 0.9 if y[0] != y[5] else None  # item 0's partner is item 5 (reversed prefix)
        vals = set(xm[0].unique().tolist())
        if lam is not None:
            lams.add(round(lam, 4))
        if vals == {0.0, 5.0}:  # CutMix: a box of the partner pasted, pixel values unmixed
            cut += 1
            share = float((xm[0] == 0.0).float().mean())
            assert abs(share - lam) < 1e-5, (share, lam)
        xm2, p2 = soft_targets(x, y, k, paper, torch.Generator().manual_seed(seed))
        assert torch.equal(xm, xm2) and torch.equal(p, p2)
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global RNG untouched
    assert 0 < cut < 12 and len(lams) > 6  # both mixup and CutMix batches, lam varies
    smooth = DiDiCM.from_options({"backbone": "test_resnet", "recipe": "none", "label_smoothing": 0.2}).config
    xs, ps = soft_targets(x, y, k, smooth, torch.Generator().manual_seed(0))
    assert xs is x and torch.allclose(ps, 0.05 + 0.8 * torch.nn.functional.one_hot(y, k).float())


@pytest.mark.parametrize("conditioning", ["blocks", "head"])
def test_paper_recipe_loss_is_finite_and_decreases(conditioning):
    torch.manual_seed(0)
    method = DiDiCM.from_options({"backbone": "test_resnet", "conditioning": conditioning, "noise_draws": 2,
                                  "recipe": "paper"})
    assert method.soft_targets
    model = method.build(1, 3, 16)
    loss_fn = method.loss_fn(3)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 1, 16, 16, generator=g), "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):  # the same draws each step (one seed): the loss of one fixed objective
        loss = loss_fn(model, batch, torch.Generator().manual_seed(11))
        assert torch.isfinite(loss) and loss >= 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    if conditioning == "blocks":
        assert all(float(bc.proj.weight.detach().abs().sum()) > 0 for bc in model.block_cond)  # the projections trained


# ---------------------------------------------------------------- trained run: acceptance and plumbing


@pytest.fixture(scope="module")
def didicm_run(ct32_cache, tmp_path_factory) -> Path:
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "didicm"
    # the defaults for a ResNet trunk: per-block conditioning, one noise draw per image, hard labels
    finetune(ct32_cache, "didicm", out, {"backbone": "test_resnet"},
             TrainConfig(steps=150, batch_size=32, lr=1e-3, warmup_steps=10, ema_decay=0.95, checkpoint_every=150,
                         log_every=50, seed=0))
    return out


def _metrics(run_path, cache, **options):
    """score_split metrics (calibrated) + the balanced accuracy of the sampler's own (uncalibrated) argmax.

    Calibration is a temperature only, so both decisions must agree: a class bias fitted on the small
    imbalanced val split once flattened CP into calling "normal" for every image (AUROC 0.9, bacc 0.5).
    """
    from sklearn.metrics import balanced_accuracy_score

    from medclf.data.cache import open_cache
    from medclf.data.dataset import CacheDataset
    from medclf.evaluation.evaluate import score_split
    from medclf.evaluation.metrics import classification_metrics
    from medclf.inference import load_scorer

    run, scorer, _ = load_scorer(run_path, "cpu", **options)
    res = score_split(scorer, open_cache(cache), "test")
    m = classification_metrics(res["y"], res["probs"], run.classes, n_bootstrap=0, pred=res["pred"])
    ds = CacheDataset(open_cache(cache), split="test", labelled_only=True)
    raw = scorer.raw(torch.stack([ds[i]["image"] for i in range(len(ds))])).probs
    m["raw_balanced_accuracy"] = balanced_accuracy_score(res["y"], raw.argmax(1).numpy())
    m["raw_probs"] = raw
    m["majority"] = max(np.bincount(res["y"])) / len(res["y"])
    return res, m


def test_didicm_cp_beats_chance_on_held_out_slices(didicm_run, ct32_cache):
    res, m = _metrics(didicm_run, ct32_cache)  # the run's default: CP, 8 steps
    print("didicm cp", {k: round(float(m[k]), 3) for k in ("balanced_accuracy", "raw_balanced_accuracy", "auroc_macro", "accuracy")})
    assert m["auroc_macro"] >= 0.8 and m["raw_balanced_accuracy"] >= 0.7 and m["balanced_accuracy"] >= 0.7, m
    assert m["accuracy"] >= m["majority"] - 0.05, m
    assert (res["nfe"] == 8).all() and set(res["uncertainty"]) >= {"entropy", "margin"}
    assert np.allclose(res["probs"].sum(1), 1, atol=1e-5)
    cfg = json.loads((didicm_run / "config.json").read_text())
    assert cfg["method_config"]["sampler"] == "cp" and cfg["method_config"]["diffusion_steps"] == 8
    assert cfg["method_config"]["conditioning"] == "blocks" and cfg["method_config"]["recipe"] == "none"
    assert cfg["didicm"]["conditioned_blocks"] >= 4 and cfg["didicm"]["trunk_passes_per_nfe"] == 1
    cal = cfg["calibration"]
    assert cal["sampler"] == "cp" and set(cal["by_sampler"]) == {"cp", "cl"} and cal["temperature"] > 0


def test_didicm_cl_beats_chance_and_reports_chain_disagreement(didicm_run, ct32_cache):
    res, m = _metrics(didicm_run, ct32_cache, sampler="cl", diffusion_steps=4, samples=20, seed=3,
                      trials=99, decision="vote", adaptive=True)  # other methods' options are ignored
    print("didicm cl", {k: round(float(m[k]), 3) for k in ("balanced_accuracy", "raw_balanced_accuracy", "auroc_macro", "accuracy")})
    assert m["auroc_macro"] >= 0.75 and m["raw_balanced_accuracy"] >= 0.65 and m["balanced_accuracy"] >= 0.65, m
    assert m["accuracy"] >= m["majority"] - 0.05, m
    assert (res["nfe"] == 80).all()
    d = res["uncertainty"]["disagreement"]
    assert ((d >= 0) & (d <= 0.5 + 1e-9)).all() and d.max() > 0  # binary: the minority share of 20 chains
    # probabilities: chain counts with a Jeffreys prior, never exactly 0, same order as the counts
    raw = m["raw_probs"].double().numpy()
    counts = raw * (20 + 0.5 * 2) - 0.5  # (count + 1/2) / (chains + K/2), K = 2
    assert (raw > 0).all() and np.allclose(counts, np.round(counts), atol=1e-4) and np.allclose(counts.sum(1), 20)
    assert np.allclose(counts.max(1), 20 * (1 - d), atol=1e-4)  # the same chains the disagreement counts


def test_didicm_scorer_options_nfe_determinism_and_evidence_map(didicm_run, ct32_cache):
    from medclf.data.cache import open_cache
    from medclf.data.dataset import CacheDataset
    from medclf.inference import load_scorer

    ds = CacheDataset(open_cache(ct32_cache), split="test", labelled_only=True)
    x = torch.stack([ds[i]["image"] for i in range(6)])
    for opts, nfe in [({"diffusion_steps": 2}, 2), ({"sampler": "cl", "samples": 3, "diffusion_steps": 5}, 15),
                      ({"sampler": "cp", "diffusion_steps": None}, 8)]:
        _, scorer, _ = load_scorer(didicm_run, "cpu", **opts)
        p = scorer.predict(x)
        assert (p.nfe == nfe).all(), (opts, p.nfe)
        assert torch.allclose(p.probs.sum(1), torch.ones(6), atol=1e-5)
        assert ("disagreement" in p.uncertainty) == (opts.get("sampler") == "cl")
        assert torch.equal(scorer.predict(x).probs, p.probs)  # seeded: same call, same answer
    _, scorer, _ = load_scorer(didicm_run, "cpu", sampler="cl")
    p = scorer.predict(x, explain=True)
    ev = p.maps["evidence"]
    assert ev.shape == (6, 32, 32) and torch.isfinite(ev).all() and ev.abs().sum() > 0


def test_cli_didicm_finetune_and_classify_with_sampler_options(tiny_cache, tmp_path):
    from medclf.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(app, ["finetune", str(tiny_cache), "--method", "didicm", "--backbone", "test_resnet", "--out",
                            str(run), "--steps", "6", "--batch-size", "16", "--warmup-steps", "1",
                            "--set", "mixup=0.2", "--set", "samples=4", "--json"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "didicm" and cfg["method_config"]["mixup"] == 0.2 and cfg["method_config"]["samples"] == 4
    dcm = sorted((SAMPLE / "rsna" / "stage_2_train").glob("ID_*.dcm"))[0]
    r = runner.invoke(app, ["classify", "--model", str(run), "--json", "--sampler", "cl", "--diffusion-steps", "3", str(dcm)])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout.strip().splitlines()[0])
    assert row["nfe"] == 12 and "disagreement" in row["uncertainty"]
    r = runner.invoke(app, ["classify", "--model", str(run), "--json", "--sampler", "nope", str(dcm)])
    assert r.exit_code != 0

