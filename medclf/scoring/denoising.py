"""Classification by denoising error (Li et al. 2023; Favero et al. 2025), batched and adaptive.

For an image x, N trials (t_k, eps_k) are drawn once and shared by every class (paired errors
cut variance, Li et al. 3.3); e_{k,c} = ||eps_k - eps_hat(x_t, t_k, c)||^2. Decision: majority
vote of per-trial argmins (Favero), argmin of mean error (Li), or (default) argmax of the
probabilities calibrated on validation data, which puts the class prior back in. All (image, trial, class)
evaluations of a batch are flattened and run in chunks, instead of one forward per pair.

Adaptive budget: trials are spent in stages; after each stage a class is pruned for an image
when it is significantly worse than the best class on the score the decision ranks (a sequential
test on paired per-trial differences, in the spirit of Li et al.'s top-k stages); an image stops as
soon as one class is left. For the default posterior decision that score is the calibrated one,
-(mean error)/T + b: the class prior b enters the test (as the error ratio it is worth, see
``_prune``), so pruning cannot drop the class the calibrated full-budget decision would pick only
because its raw error is a little higher. The
repeated looks are controlled: each look tests at ``prune_alpha / looks`` (Bonferroni over the
stages), so the chance of ever pruning a class that is not worse stays below ``prune_alpha``.
A pruned class's mean error is estimated from its paired excess over a standing class
(the standing class's mean over every trial used plus the mean difference over the trials both
had): unbiased for the full-budget mean that calibration was fitted on, and of lower variance than
its own short mean. Timesteps follow a van der Corput order on an even grid, so every prefix of
the trials covers the t range evenly (evenly spaced t is what scales best, Li et al.).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from medclf.data.cache import to_unit_float
from medclf.models.diffusion import add_noise, as_scheduler
from medclf.scoring.base import Prediction, entropy

if TYPE_CHECKING:
    from monai.networks.schedulers import Scheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, y) -> eps_hat


@dataclass
class ScoringConfig:
    trials: int = 64  #: (t, eps) pairs per image at full budget
    decision: str = "posterior"  #: posterior (argmax of the calibrated probabilities) | vote (Favero et al.) | mean (Li et al.)
    adaptive: bool = True  #: spend trials in stages and prune decided classes
    prune_alpha: float = 0.05  #: family-wise one-sided level of the pruning test over all looks (each look: alpha / looks)
    min_trials: int = 4  #: first stage; stages then double (4, 8, 16, ... trials), so decided images stop early
    t_range: tuple[float, float] = (0.02, 0.98)  #: fraction of the schedule covered by the t grid
    chunk: int = 64  #: network evaluations per forward pass (64 is fastest for small nets on CPU)
    counterfactual: str = "onestep"  #: explain: onestep (x0 estimate at t = 0.5, K NFE) | guided (Favero et al.: DDIM from t = 0.5 with CFG, 2 x 50 x K NFE)
    guidance: float = 4.5  #: classifier-free guidance scale of guided counterfactuals (Favero et al.)
    cf_steps: int = 50  #: DDIM steps of guided counterfactuals from t = 0.5 to 0
    seed: int = 0  #: fixes the (t, eps) bank: same image, same answer
    #: how per-pixel errors become a class's score: mean (whole image, Li et al.) | max (spatial max of the
    #: locally averaged per-pixel excess over the across-class mean) | top (mean of its top ``pool_top``
    #: share of pixels). A whole-image mean drowns a lesion of a few pixels in the rest of the image;
    #: max/top look where the classes disagree most. Non-mean pools score at full budget (no pruning).
    pool: str = "mean"
    pool_kernel: int = 3  #: side of the local average (px) before max/top
    pool_top: float = 0.02  #: share of pixels averaged by pool=top
    #: CUDA only (CPU always runs fp32, so CPU results never change): off | bf16 | fp16 autocast of the
    #: denoiser; the squared errors are still formed in fp32
    amp: str = "off"
    channels_last: bool = False  #: CUDA only: channels_last inputs and weights (faster convolutions with amp)
    compile: bool = False  #: torch.compile the denoiser (first call pays the compile)
    #: per-t-bin weights (``fit_t_weights``; bins split ``t_range`` evenly, low t first) or None
    #: (unweighted). A class's score is then the weighted mean of its per-trial errors; trials whose
    #: bin weighs 0 are not evaluated (fewer NFE); pool=mean only
    t_weights: tuple[float, ...] | None = None


POOLS = ("mean", "max", "top")
AMPS = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pool_error_maps(maps: torch.Tensor, pool: str = "mean", kernel: int = 3, top: float = 0.02) -> torch.Tensor:
    """(B, K) class error scores from mean per-pixel error maps (B, K, H, W); lower = the class explains x better.

    ``mean`` is the whole-image mean error (the scorer's default score). ``max``/``top`` pool each
    class's per-pixel excess over the across-class mean: the class-independent part of the error
    (noise, edges, anatomy every class reconstructs alike) cancels, so the spatial max finds the few
    pixels where one class fails to explain the image (a small lesion the normal class cannot make).
    """
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r} ({', '.join(POOLS)})")
    if pool == "mean":
        return maps.mean(dim=(2, 3))
    d = maps - maps.mean(1, keepdim=True)
    if kernel > 1:
        d = torch.nn.functional.avg_pool2d(d, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    flat = d.flatten(2)
    if pool == "max":
        return flat.amax(2)
    k = max(1, int(round(top * flat.shape[2])))
    return flat.topk(k, dim=2).values.mean(2)


def van_der_corput(n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        x, denom, k = 0.0, 1.0, i
        while k:
            denom *= 2
            x += (k & 1) / denom
            k >>= 1
        out[i] = x
    return out


def bank_timesteps(n: int, T: int, t_range: tuple[float, float]) -> torch.Tensor:
    """The bank's integer timesteps (n,): van der Corput order on an even grid over ``t_range`` of T steps."""
    lo, hi = t_range
    return torch.round((lo + (hi - lo) * van_der_corput(n)) * (T - 1)).long()


def t_bins(t: torch.Tensor, T: int, t_range: tuple[float, float], bins: int) -> torch.Tensor:
    """Each timestep's bin (0 = lowest t) among ``bins`` even bins over ``t_range``."""
    lo, hi = t_range
    tf = t.double() / (T - 1)
    return ((tf - lo) / (hi - lo) * bins).long().clamp(0, bins - 1)


def fit_t_weights(E: torch.Tensor, labels: torch.Tensor, tbin: torch.Tensor, bins: int,
                  rule: str = "mean", z_min: float = 2.0) -> torch.Tensor:
    """Per-bin trial weights (bins,), max 1, fitted on validation errors E (n, N, K) with trial bins ``tbin`` (N,).

    Trials at different t carry very different class evidence (near t = 0 every class denoises
    alike; near t = T the image is gone), so an even average wastes most of the budget.
    ``mean``: w = mu / sigma^2 of d = e(wrong class) - e(true class) over the bin's trials, the weight
    that maximises the signal-to-noise ratio of a weighted sum of independent trials (the scorer's
    rule). ``vote``: w = log((K - 1) p / (1 - p)) for the bin's per-trial vote accuracy p, the
    optimal weight of a symmetric noisy voter (benchmarks/classify.py's weighted vote). A bin weighs
    0 unless its evidence (per image: the mean of d, or the vote accuracy above 1/K) is more than
    ``z_min`` standard errors above 0 across images: a bin the fit cannot tell from noise only adds
    variance, and a bin of weight 0 is never evaluated, so dropping it also saves its NFE. A bin
    without trials takes its nearest bin's weight; if no bin carries evidence, every bin weighs 1
    (unweighted).
    """
    if rule not in ("mean", "vote"):
        raise ValueError(f"unknown rule {rule!r} (mean, vote)")
    E = E.double()
    K = E.shape[2]
    y = torch.as_tensor(labels).long().view(-1, 1, 1).expand(-1, E.shape[1], 1)
    d = E - E.gather(2, y)  # (n, N, K), 0 at the true class
    wrong = torch.ones_like(E, dtype=torch.bool).scatter_(2, y, False)
    hit = (E.argmin(2) == y[:, :, 0]).double()  # (n, N)
    w = torch.zeros(bins, dtype=torch.float64)
    seen = torch.zeros(bins, dtype=torch.bool)
    for b in range(bins):
        sel = tbin == b
        if not sel.any():
            continue
        seen[b] = True
        if rule == "mean":
            db = d[:, sel][wrong[:, sel]]
            var = db.var() if db.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
            w[b] = (db.mean() / var).clamp_min(0) if var > 0 else 0.0
            per_image = (d[:, sel] * wrong[:, sel]).sum((1, 2)) / wrong[:, sel].sum((1, 2))  # (n,)
        else:
            p = hit[:, sel].mean().clamp(1e-3, 1 - 1e-3)
            w[b] = torch.log((K - 1) * p / (1 - p)).clamp_min(0)
            per_image = hit[:, sel].mean(1) - 1 / K
        z = per_image.mean() / (per_image.std() / math.sqrt(len(per_image))) if len(per_image) > 1 else torch.nan
        if not z > z_min:  # NaN (one image, or no spread at chance) fails too
            w[b] = 0.0
    if not seen.any() or not torch.isfinite(w).all() or w.max() <= 0:
        return torch.ones(bins, dtype=torch.float64)
    have = torch.nonzero(seen).flatten()
    for b in torch.nonzero(~seen).flatten().tolist():  # empty bins: the nearest bin's weight
        w[b] = w[have[(have - b).abs().argmin()]]
    return w / w.max()


class DenoisingScorer:
    """Scorer over any class-conditional eps-predicting denoiser and its schedule.

    ``schedule``: a MONAI scheduler, or a bare alpha-bar tensor (T,) (``medclf.models.diffusion.as_scheduler``).
    """

    def __init__(self, denoiser: Denoiser, schedule: Scheduler | torch.Tensor, classes: list[str], cfg: ScoringConfig,
                 temperature: float = 1.0, bias: list[float] | None = None, device: torch.device | str = "cpu"):
        self.denoiser = denoiser
        self.classes = list(classes)
        self.cfg = cfg
        self.temperature = temperature
        self.bias = torch.tensor(bias if bias else [0.0] * len(classes), dtype=torch.float32)
        self.device = torch.device(device)
        self.sched = as_scheduler(schedule)
        self.sched.alphas_cumprod = self.sched.alphas_cumprod.to(self.device, torch.float32)
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.amp not in AMPS:
            raise ValueError(f"unknown amp {cfg.amp!r} ({', '.join(AMPS)})")
        self._cuda = self.device.type == "cuda"
        if self._cuda and cfg.channels_last and isinstance(denoiser, torch.nn.Module):
            denoiser.to(memory_format=torch.channels_last)
        #: what evaluate() calls: the denoiser, compiled if asked (lazily, so building a scorer stays cheap)
        self._net: Denoiser | None = None
        if cfg.t_weights is not None:
            w = torch.as_tensor(cfg.t_weights, dtype=torch.float64)
            if w.ndim != 1 or not len(w) or not torch.isfinite(w).all() or (w < 0).any() or w.max() <= 0:
                raise ValueError(f"t_weights must be finite, >= 0, with one > 0 (got {list(cfg.t_weights)})")
            if cfg.pool != "mean":
                raise ValueError(f"t_weights weigh the mean error: pool={cfg.pool!r} takes none")

    @property
    def ab(self) -> torch.Tensor:
        """The alpha-bar schedule (T,), on the scorer's device."""
        return self.sched.alphas_cumprod

    # --------------------------------------------------------------------------------- trials
    def bank(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (N,), eps (N, C, H, W)): fixed by the seed, shared by all images and classes."""
        if self._bank is None or self._bank[1].shape[1:] != shape:
            n = self.cfg.trials
            t = bank_timesteps(n, len(self.ab), self.cfg.t_range)
            g = torch.Generator().manual_seed(self.cfg.seed)
            eps = torch.randn((n, *shape), generator=g)
            self._bank = (t.to(self.device), eps.to(self.device))
        return self._bank

    def trial_weights(self, n: int | None = None) -> torch.Tensor | None:
        """(n,) weight of each of the bank's first n (default: ``trials``) trials from its t bin
        (``cfg.t_weights``), or None when unweighted."""
        if self.cfg.t_weights is None:
            return None
        wb = torch.as_tensor(self.cfg.t_weights, dtype=torch.float32)
        t = bank_timesteps(self.cfg.trials if n is None else n, len(self.ab), self.cfg.t_range)
        return wb[t_bins(t, len(self.ab), self.cfg.t_range, len(wb))].to(self.device)

    @torch.inference_mode()
    def evaluate(self, x: torch.Tensor, bb: torch.Tensor, kk: torch.Tensor, cc: torch.Tensor,
                 maps: torch.Tensor | None = None) -> torch.Tensor:
        """Errors for the flattened (image bb, trial kk, class cc) triples, in chunks.

        If ``maps`` (B, K, H, W) is given, per-pixel squared errors are summed into it.
        """
        t_bank, eps_bank = self.bank(tuple(x.shape[1:]))
        out = torch.empty(len(bb), device=self.device)
        if self._net is None:
            self._net = torch.compile(self.denoiser) if self.cfg.compile else self.denoiser
        # autocast and channels_last on CUDA only; no host syncs (.item(), .cpu()) inside the loop
        dtype = AMPS[self.cfg.amp] if self._cuda else None
        last = self._cuda and self.cfg.channels_last
        for s in range(0, len(bb), self.cfg.chunk):
            b, k, c = bb[s : s + self.cfg.chunk], kk[s : s + self.cfg.chunk], cc[s : s + self.cfg.chunk]
            t = t_bank[k]
            eps = eps_bank[k]
            x_t = add_noise(self.sched, x[b], eps, t)  # (L, C, H, W)
            if last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None) if self._cuda else nullcontext():
                eps_hat = self._net(x_t, t, c)
            err = (eps - eps_hat.float()) ** 2  # (L, C, H, W)
            out[s : s + len(b)] = err.mean(dim=(1, 2, 3))
            if maps is not None:
                maps.index_put_((b, c), err.mean(dim=1), accumulate=True)
        return out

    # ------------------------------------------------------------------------------- predict
    @torch.no_grad()
    def errors(self, x: torch.Tensor, adaptive: bool | None = None, maps: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, K) errors with NaN where a (trial, class) was not evaluated (pruned/stopped, or a
        trial of weight 0 under ``t_weights``: those are never evaluated, and stages count the rest)."""
        B, K, N = x.shape[0], len(self.classes), self.cfg.trials
        adaptive = self.cfg.adaptive if adaptive is None else adaptive
        E = torch.full((B, N, K), float("nan"), device=self.device)
        w = self.trial_weights()
        order = None if w is None else torch.nonzero(w > 0).flatten()  # the trials to evaluate, in bank order
        M = N if order is None else len(order)
        active = torch.ones(B, K, dtype=torch.bool, device=self.device)
        stages = [min(M, self.cfg.min_trials * 2**i) for i in range(max(1, math.ceil(math.log2(max(M, 1)))) + 1)] if adaptive else [M]
        prev = 0
        for n in stages:
            live = active & (active.sum(1, keepdim=True) > 1) if prev else active
            b_idx, c_idx = live.nonzero(as_tuple=True)
            if len(b_idx) and n > prev:
                ks = torch.arange(prev, n, device=self.device) if order is None else order[prev:n]
                bb = b_idx.repeat_interleave(len(ks))
                cc = c_idx.repeat_interleave(len(ks))
                kk = ks.repeat(len(b_idx))
                E[bb, kk, cc] = self.evaluate(x, bb, kk, cc, maps)
            prev = n
            if n >= M:
                break
            looks = sum(1 for m in stages if m < M)
            if order is None:
                active = self._prune(E[:, :n], active, looks=looks)
            else:
                active = self._prune(E[:, order[:n]], active, looks=looks, w=w[order[:n]])
        return E

    def _calibrated(self) -> bool:
        """Whether the decision ranks calibrated scores (then the class prior enters pruning)."""
        return self.cfg.decision == "posterior"

    def _prune(self, E: torch.Tensor, active: torch.Tensor, looks: int, w: torch.Tensor | None = None) -> torch.Tensor:
        """Drop classes significantly worse than the best one on the score the decision ranks.

        Active classes were evaluated on all n trials so far, so differences are paired throughout.
        Class c is worse than the best r on the calibrated score -m/T + b when m_c > m_r + T (b_c - b_r),
        i.e. when log(m_c / m_r) > delta_c = log(1 + T (b_c - b_r) / m_r) (zero bias, so delta 0, for
        vote and mean). The test estimates log(m_c / m_r) by the mean paired log-error difference:
        errors span orders of magnitude across t, so raw differences are too heavy-tailed for a
        t-test to ever decide, while their logs are not (at the cost of testing the geometric mean
        ratio, which equals the ratio of means when the class changes the error by the same factor
        at every t). Tested against its standard error at the Bonferroni level alpha / looks.

        With trial weights ``w`` (n,) the score is the weighted mean error, and the estimate the
        w-weighted mean of the paired log differences, with its sandwich standard error
        sqrt(n_e / (n_e - 1) sum w_k^2 (d_k - d_w)^2) / sum w_k, n_e = (sum w_k)^2 / sum w_k^2 (equal
        weights: exactly the unweighted test), so the test stays on the score that calibration was fitted on."""
        n = E.shape[1]
        if n < 2:
            return active
        from statistics import NormalDist

        calibrated = self._calibrated()
        bias = self.bias.to(E.device) if calibrated else torch.zeros(E.shape[2], device=E.device)
        T = self.temperature if calibrated else 1.0
        mean = E.nanmean(1) if w is None else self._wmean(E, w)
        best = torch.where(active, -mean / T + bias, -torch.inf).argmax(1)
        logE = E.clamp_min(1e-12).log()
        d = logE - logE.gather(2, best.view(-1, 1, 1).expand(-1, n, 1))  # (B, n, K) paired log differences
        m_best = mean.gather(1, best[:, None])  # (B, 1)
        allowed = m_best + T * (bias[None, :] - bias[best][:, None])  # the error c may have and still win
        delta = torch.where(allowed > 0, (allowed.clamp_min(1e-30) / m_best.clamp_min(1e-30)).log(), torch.inf)
        if w is None:
            excess = d.mean(1) - delta
            se = d.std(1, unbiased=True) / math.sqrt(n)
        else:
            wn = (w / w.sum()).view(1, -1, 1)
            d_w = (wn * d).sum(1)  # (B, K)
            n_eff = 1.0 / float((wn**2).sum())  # Kish's effective number of trials: unequal weights count less
            se = ((wn**2 * (d - d_w[:, None]) ** 2).sum(1) * n_eff / max(n_eff - 1, 1e-6)).sqrt()
            excess = d_w - delta
        level = 1 - self.cfg.prune_alpha / max(looks, 1)
        z_crit = NormalDist().inv_cdf(level)
        if w is not None and n_eff < n - 1e-6:
            # unequal weights leave fewer effective trials than n, most at the early looks, where the
            # unweighted test's normal quantile then prunes too often (measured under a null at 64 trials:
            # 28% vs 19% early stops). Widen it by the ratio of Student-t quantiles at n_e - 1 and n - 1
            # degrees of freedom: 1 for equal weights (exactly the unweighted test), larger as n_e shrinks
            from scipy.stats import t as student_t

            z_crit *= float(student_t.ppf(level, max(n_eff - 1, 1.0)) / student_t.ppf(level, n - 1))
        worse = (excess > z_crit * se) & (excess > 0) & (best[:, None] != torch.arange(E.shape[2], device=E.device))
        return active & ~torch.nan_to_num(worse.float()).bool()

    @staticmethod
    def _wmean(E: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(B, K) w-weighted mean over the trials of E (B, N, K) that were evaluated (not NaN)."""
        ok = ~torch.isnan(E)
        ww = w.view(1, -1, 1).to(E.dtype) * ok
        return (torch.where(ok, E, 0.0) * ww).sum(1) / ww.sum(1)

    @staticmethod
    def class_means(E: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) mean error per class on the full set of trials an image used (w-weighted if trial weights w (N,)).

        A standing class (evaluated on every trial used) keeps its own mean; a pruned class gets the
        best standing class's mean plus its mean paired difference on the trials both had."""
        evaluated = ~torch.isnan(E)
        used = evaluated.any(2)  # (B, N)
        standing = evaluated.sum(1) == used.sum(1, keepdim=True)
        raw = E.nanmean(1) if w is None else DenoisingScorer._wmean(E, w)
        ref = torch.where(standing, raw, torch.inf).argmin(1)  # (B,)
        e_ref = E.gather(2, ref.view(-1, 1, 1).expand(-1, E.shape[1], 1))  # (B, N, 1)
        diff = (E - e_ref).nanmean(1) if w is None else DenoisingScorer._wmean(E - e_ref, w)
        return raw.gather(1, ref[:, None]) + diff

    def decide(self, E: torch.Tensor, pooled: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pred, softmax probs, vote shares, nfe) from an error tensor with NaNs.

        ``pooled``: (B, K) class scores from ``pool_error_maps`` used instead of the mean errors."""
        evaluated = ~torch.isnan(E)
        nfe = evaluated.sum((1, 2))
        # (B, K): pruned classes through their paired excess
        mean = self.class_means(E, self.trial_weights(E.shape[1])) if pooled is None else pooled
        Einf = torch.where(evaluated, E, torch.inf)
        trial_done = evaluated.any(2)  # (B, N)
        winners = Einf.argmin(2)  # (B, N)
        votes = torch.zeros_like(mean)
        votes.scatter_add_(1, winners, trial_done.float())
        share = votes / trial_done.sum(1, keepdim=True).clamp_min(1)
        # Classes evaluated on every trial the image used are the ones still standing.
        standing = evaluated.sum(1) == trial_done.sum(1, keepdim=True)
        scores = -(mean - mean.min(1, keepdim=True).values)
        probs = torch.softmax(scores / self.temperature + self.bias.to(scores.device), dim=1)
        if self.cfg.decision == "mean":
            pred = torch.where(standing, mean, torch.inf).argmin(1)
        elif self.cfg.decision == "vote":
            pred = torch.where(standing, votes, -1.0).argmax(1)
        else:
            pred = torch.where(standing, probs, -1.0).argmax(1)
        return pred, probs, share, nfe

    def mean_error_scores(self, x: torch.Tensor) -> torch.Tensor:
        """-(mean error) per class at full budget: the logits temperature scaling is fitted on."""
        if self.cfg.pool != "mean":
            m = self.pooled_scores(x)[1]
            return -(m - m.min(1, keepdim=True).values)
        return self.error_scores(self.errors(x, adaptive=False))

    def error_scores(self, E: torch.Tensor) -> torch.Tensor:
        """-(mean error) per class of full-budget errors E (B, N, K), w-weighted under ``t_weights``
        (trials of weight 0, NaN or not, are left out): what calibration is fitted on."""
        w = self.trial_weights(E.shape[1])
        m = E.mean(1) if w is None else self._wmean(torch.where(w.view(1, -1, 1) > 0, E, torch.nan), w)
        return -(m - m.min(1, keepdim=True).values)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, explain: bool = False) -> Prediction:
        x = to_unit_float(images.to(self.device)) * 2 - 1  # the denoiser was trained on [-1, 1]
        B, K = x.shape[0], len(self.classes)
        maps = torch.zeros(B, K, *x.shape[2:], device=self.device) if explain else None
        pooled = None
        if self.cfg.pool != "mean":  # full budget: every class needs its whole error map
            E, pooled, maps = self.pooled_scores(x, keep_maps=explain)
        else:
            # explain spends the same budget as classify: same inputs, same run, same settings, same answer
            E = self.errors(x, maps=maps)
        pred, probs, share, nfe = self.decide(E, pooled)
        top2 = share.topk(min(2, K), dim=1).values
        margin = top2[:, 0] - (top2[:, 1] if K > 1 else 0)
        # the uncertainty is the calibrated one (a 0.48 / 0.52 posterior is uncertain even when every
        # trial voted alike); vote statistics are reported beside it
        stats = {"vote_entropy": entropy(share), "vote_margin": 1 - margin}
        out = Prediction(probs=probs.cpu(), pred=pred.cpu(), uncertainty={"entropy": entropy(probs).cpu()},
                         nfe=nfe.cpu(), extras={"vote_share": share.cpu()}, stats={k: v.cpu() for k, v in stats.items()})
        if explain:
            counts = (~torch.isnan(E)).sum(1).clamp_min(1)  # (B, K) trials each class was evaluated on
            err_maps = maps / counts[:, :, None, None]  # (B, K, H, W) mean per-pixel error per class
            runner = torch.where(torch.arange(K, device=self.device)[None] == pred[:, None].to(self.device),
                                 torch.inf, self.class_means(E, self.trial_weights(E.shape[1]))).argmin(1) if K > 1 else pred
            idx = torch.arange(B, device=self.device)
            evidence = err_maps[idx, runner.to(self.device)] - err_maps[idx, pred.to(self.device)]
            cf = self.guided_counterfactuals(x) if self.cfg.counterfactual == "guided" else self.counterfactuals(x)
            out.maps = {"error": err_maps.cpu(), "evidence": evidence.cpu(), "counterfactual": cf.cpu()}
        return out

    def pooled_scores(self, x: torch.Tensor, keep_maps: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(errors E (B, N, K), pooled class scores (B, K), summed error maps or None) at full budget, x in [-1, 1]."""
        B, K = x.shape[0], len(self.classes)
        maps = torch.zeros(B, K, *x.shape[2:], device=self.device)
        E = self.errors(x, adaptive=False, maps=maps)
        pooled = pool_error_maps(maps / self.cfg.trials, self.cfg.pool, self.cfg.pool_kernel, self.cfg.pool_top)
        return E, pooled, maps if keep_maps else None

    @torch.no_grad()
    def counterfactuals(self, x: torch.Tensor, t_frac: float = 0.5) -> torch.Tensor:
        """Per class, the clean image the denoiser reconstructs from x noised to t_frac: (B, K, C, H, W) in [0, 1].

        A one-step reading of Favero et al.'s counterfactuals: what changes when only the class changes.
        """
        B, K = x.shape[0], len(self.classes)
        t = torch.full((B * K,), int(t_frac * (len(self.ab) - 1)), device=self.device, dtype=torch.long)
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        eps = torch.randn(x.shape[1:], generator=g).to(self.device).expand(B * K, *x.shape[1:])
        x_t = add_noise(self.sched, x.repeat_interleave(K, 0), eps, t)
        c = torch.arange(K, device=self.device).repeat(B)
        eps_hat = torch.cat([self.denoiser(x_t[s : s + self.cfg.chunk], t[s : s + self.cfg.chunk], c[s : s + self.cfg.chunk]).float()
                             for s in range(0, B * K, self.cfg.chunk)])
        # Hand-written: MONAI's only x0 estimate sits inside DDPMScheduler.step, which takes one int t
        # and also forms x_{t-1}, drawing its noise (from the global RNG unless given a generator).
        a = self.ab[t].view(-1, 1, 1, 1)
        x0 = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
        return ((x0.clamp(-1, 1) + 1) / 2).view(B, K, *x.shape[1:])

    @torch.no_grad()
    def guided_counterfactuals(self, x: torch.Tensor, t_frac: float = 0.5) -> torch.Tensor:
        """Favero et al.'s counterfactuals: x noised to t_frac, then denoised with deterministic DDIM
        under each class with classifier-free guidance, eps = eps_null + w (eps_c - eps_null):
        (B, K, C, H, W) in [0, 1]. The null class is index K (the diffusion classifier trains it by
        dropping the label); the noise is fixed by the seed, so every class starts from the same x_t."""
        from medclf.models.diffusion import ddim_like

        B, K, C = x.shape[0], len(self.classes), self.cfg.cf_steps
        ddim = ddim_like(self.sched, max(1, round(C / t_frac)))
        ts = [int(t) for t in ddim.timesteps if int(t) <= t_frac * (len(self.ab) - 1)]
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        eps = torch.randn(x.shape[1:], generator=g).to(self.device).expand(B * K, *x.shape[1:])
        t0 = torch.full((B * K,), ts[0], device=self.device, dtype=torch.long)
        z = add_noise(self.sched, x.repeat_interleave(K, 0), eps, t0).float()
        c = torch.arange(K, device=self.device).repeat(B)
        null = torch.full_like(c, K)
        w = self.cfg.guidance
        for t in ts:
            tt = torch.full((B * K,), t, device=self.device, dtype=torch.long)
            eps_hat = torch.empty_like(z)
            for s in range(0, B * K, max(1, self.cfg.chunk // 2)):
                sl = slice(s, s + max(1, self.cfg.chunk // 2))
                n = len(z[sl])
                both = self.denoiser(torch.cat([z[sl], z[sl]]), torch.cat([tt[sl], tt[sl]]),
                                     torch.cat([c[sl], null[sl]])).float()
                cond, unc = both[:n], both[n:]
                eps_hat[sl] = unc + w * (cond - unc)
            z, _ = ddim.step(eps_hat, t, z)
        return ((z.clamp(-1, 1) + 1) / 2).view(B, K, *x.shape[1:])
