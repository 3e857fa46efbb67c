"""benchmarks/classify.py (issue #12): offline prefix evaluation is exact, and the benchmark runs end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from medclf.scoring.denoising import DenoisingScorer, ScoringConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def _scorer(trials: int, **cfg) -> DenoisingScorer:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100), 0)

    def den(x_t, t, y):  # class-dependent, so classes differ on every trial
        return net(x_t) * (1 + 0.3 * y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1) / 200

    return DenoisingScorer(den, ab, ["a", "b", "c"], ScoringConfig(trials=trials, chunk=7, **cfg))


def test_prefix_of_the_full_tensor_equals_scoring_at_the_smaller_budget():
    import classify as bench

    x = torch.rand(5, 1, 8, 8) * 2 - 1
    full = _scorer(32, adaptive=False)
    E = full.errors(x, adaptive=False)
    for n in (1, 4, 8, 16):
        small = _scorer(n, adaptive=False)
        t_s, eps_s = small.bank((1, 8, 8))
        t_f, eps_f = full.bank((1, 8, 8))
        assert torch.equal(t_s, t_f[:n]) and torch.equal(eps_s, eps_f[:n])  # the bank's prefix
        En = small.errors(x, adaptive=False)
        assert torch.allclose(En, E[:, :n], rtol=1e-5, atol=1e-6)
        for d in ("vote", "mean", "posterior"):
            pred, nfe = bench.decide(full, E[:, :n], d)
            p = _scorer(n, adaptive=False, decision=d).predict((x + 1) / 2)
            assert pred.tolist() == p.pred.tolist() and (nfe == n * 3).all()


def test_replayed_pruning_equals_the_adaptive_scorer():
    import classify as bench

    x = torch.rand(6, 1, 8, 8) * 2 - 1
    E = _scorer(64, adaptive=False).errors(x, adaptive=False)
    for alpha in (0.2, 0.01):
        pred, nfe = bench.replay_adaptive(_scorer(64), E, 32, alpha, "vote")
        p = _scorer(32, adaptive=True, decision="vote", prune_alpha=alpha).predict((x + 1) / 2)
        assert pred.tolist() == p.pred.tolist() and nfe.tolist() == p.nfe.float().tolist()


def test_amp_off_is_the_default_and_leaves_cpu_results_alone():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    ref = _scorer(8, adaptive=False).errors(x)
    for amp in ("off", "bf16", "fp16"):  # CPU never autocasts
        assert torch.equal(_scorer(8, adaptive=False, amp=amp, channels_last=True).errors(x), ref)
    assert ScoringConfig().amp == "off" and not ScoringConfig().compile


def test_benchmark_quick_end_to_end(tiny_run, tiny_cache, tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "classify.py"), "--quick", "--model", str(tiny_run),
                        "--cache", str(tiny_cache), "--out", str(out)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert "NFE/image" in text and "95% CI" in text and "ms/image" in text
    assert (out / "accuracy_vs_nfe.png").stat().st_size > 1000
    rows = re.findall(r"^full vote\s+(\d+)\s+([\d.]+)\s+([\d.]+)", text, flags=re.M)
    trials = [int(t) for t, _, _ in rows]
    nfe = [float(n) for _, n, _ in rows]
    assert trials == [1, 2, 4, 8] and nfe == sorted(nfe) and nfe[-1] > nfe[0]
    assert all(0 <= float(a) <= 1 for *_, a in rows)
    assert re.search(r"best lever .* -> (PASS|FAIL)", text) and re.search(r"default .* -> (PASS|FAIL)", text)
    assert "default" in text and "window" in text and "weights mean" in text and "elim posterior" in text
