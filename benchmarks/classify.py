"""Diffusion-classifier cost (issue #12, "a tenth of the cost"): accuracy vs NFE per task, per lever.

    python benchmarks/classify.py --task-dir DIR [--trials 501] [--split test] [--out OUT]
    python benchmarks/classify.py --model RUN --cache CACHE [--model RUN2 --cache CACHE2 ...]

``--task-dir`` reads benchmarks/recipe.py's ``--work`` layout (DIR/<task>/cache, DIR/<task>/run-medclf).
Per task, every test (and validation) image is scored once at the full budget with every class on
every trial: the (images, trials, classes) error tensor. Trials are in van der Corput order, so
every prefix of it is exactly what a smaller budget would have scored (same bank prefix; checked
by tests/test_cost_benchmark.py), and every row below except ``default`` is evaluated offline from it:

  full vote / mean / posterior   budgets 1, 2, 4, ... trials (Favero's vote; Li's mean; calibrated)
  window                         (a) the t-window [lo, hi] (and vote/mean rule) with the best
                                 validation accuracy at each budget, applied to test: that many of
                                 the bank's trials whose t falls in the window
  weights mean / vote            (b) per-t-bin weights fitted on validation (the library's
                                 medclf.scoring.denoising.fit_t_weights): weighted mean error
                                 (w = mu / sigma^2 of the paired wrong-minus-true error difference)
                                 and weighted vote (w = log-odds of a trial's vote being right);
                                 trials of weight 0 are not evaluated; budget = the first n trials
                                 of weight > 0
  elim a=...                     (c) class elimination: the scorer's adaptive pruning at several
                                 prune_alpha values and trial caps, replayed on the tensor
  default                        scorer.predict as a user gets it (the run's trials, adaptive,
                                 posterior), run for real: NFE per image and ms per image measured
  t-weights fit                  the scorer as ``finetune --set t_weights=fit`` leaves it: the run
                                 recalibrated on the whole --fit-split with t_weights=fit (weights,
                                 then temperature and bias on the weighted scores), the run's trials,
                                 adaptive, posterior; run for real. ``t-weights full`` is the same
                                 scorer without pruning (offline, from the test tensor)

ms/image: measured for ``default`` and the full pass; for offline rows NFE x the full pass's
measured ms per NFE (marked ~). Speed: ms per NFE of the batched scoring loop vs --chunk sizes.
Goal (per task): accuracy within 1 point of the full-budget vote at <= 10% of its NFE, for the best
lever and for the default; PASS/FAIL with the measured distance.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
GOAL_NFE, GOAL_POINTS = 0.10, 1.0
ALPHAS = (0.2, 0.05, 0.01)
SCORERS = ("default", "t-weights fit")  #: rows of a scorer run for real, judged on their own


@dataclasses.dataclass
class Row:
    lever: str
    trials: int  #: trials per image (the budget or cap)
    nfe: float  #: network evaluations per image
    acc: float
    ci: tuple[float, float]
    ms: float  #: ms per image
    measured: bool  #: ms measured (else NFE x measured ms/NFE)
    note: str = ""


# ------------------------------------------------------------------------------------ scoring

def load_split(cache: Path, split: str, limit: int | None) -> tuple[torch.Tensor, np.ndarray]:
    """Images as stored (int16) and labels of a split's labelled items, the first ``limit`` of them."""
    from medclf.data import open_cache
    from medclf.data.dataset import CacheDataset

    ds = CacheDataset(open_cache(cache), split=split, labelled_only=True)
    n = len(ds) if limit is None else min(limit, len(ds))
    return torch.stack([ds[i]["image"] for i in range(n)]), np.array([ds[i]["label"] for i in range(n)])


def full_errors(scorer, images: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, float]:
    """(images, trials, classes) errors at full budget, every class on every trial; and seconds taken."""
    from medclf.data import to_unit_float

    t0 = time.perf_counter()
    parts = [scorer.errors(to_unit_float(images[i : i + batch]) * 2 - 1, adaptive=False).cpu()
             for i in range(0, len(images), batch)]
    return torch.cat(parts), time.perf_counter() - t0


def with_cfg(scorer, **changes):
    """A shallow copy of the scorer with ScoringConfig fields changed (same net, bank, calibration)."""
    s = copy.copy(scorer)
    s.cfg = dataclasses.replace(scorer.cfg, **changes)
    return s


def decide(scorer, E: torch.Tensor, decision: str) -> tuple[np.ndarray, np.ndarray]:
    """(pred, NFE per image) of a decision rule on an error tensor (NaN = not evaluated)."""
    pred, _, _, nfe = with_cfg(scorer, decision=decision).decide(E)
    return pred.numpy(), nfe.float().numpy()


def replay_adaptive(scorer, E: torch.Tensor, trials: int, alpha: float, decision: str) -> tuple[np.ndarray, np.ndarray]:
    """The scorer's adaptive pruning replayed on a full error tensor: its evaluate() looks values up
    instead of running the net, so stages, tests and stopping are the scorer's own code."""
    s = with_cfg(scorer, trials=trials, prune_alpha=alpha, decision=decision, adaptive=True)
    Ef = E[:, :trials].to(scorer.device)
    s.evaluate = lambda x, bb, kk, cc, maps=None: Ef[bb, kk, cc]
    Ep = s.errors(torch.empty(len(E), 0), adaptive=True)
    return decide(s, Ep.cpu(), decision)


def weighted_pred(E: torch.Tensor, w: torch.Tensor, rule: str) -> np.ndarray:
    """Argmin of the w-weighted mean error (rule mean) or argmax of the w-weighted vote (rule vote)."""
    if rule == "mean":
        return (E * w[None, :, None]).sum(1).argmin(1).numpy()
    votes = torch.zeros(E.shape[0], E.shape[2]).scatter_add_(1, E.argmin(2), w[None].expand(E.shape[0], -1).contiguous())
    return votes.argmax(1).numpy()


# ------------------------------------------------------------------------------------- levers

def acc_ci(y: np.ndarray, pred: np.ndarray, K: int, n_boot: int) -> tuple[float, tuple[float, float]]:
    """Accuracy and its percentile bootstrap 95% CI (medclf.evaluation.metrics.bootstrap_ci)."""
    from medclf.evaluation.metrics import bootstrap_ci

    acc = float((pred == y).mean())
    ci, _ = bootstrap_ci(y, np.eye(K)[pred], pred, n_bootstrap=n_boot)
    return acc, tuple(ci["accuracy"]) if ci["accuracy"] else (acc, acc)


def budgets(n: int) -> list[int]:
    out = [2**i for i in range(int(math.log2(n)) + 1) if 2**i < n]
    return out + [n]


def task_rows(scorer, Ev: torch.Tensor, yv: np.ndarray, Et: torch.Tensor, yt: np.ndarray, ms_nfe: float,
              n_boot: int, bins: int = 16) -> tuple[list[Row], dict]:
    """Every offline row of one task from its validation and test error tensors."""
    N, K = Et.shape[1], Et.shape[2]
    rows: list[Row] = []
    fitted: dict = {}

    def add(lever: str, n: int, pred: np.ndarray, nfe: float, note: str = "") -> None:
        acc, ci = acc_ci(yt, pred, K, n_boot)
        rows.append(Row(lever, n, nfe, acc, ci, nfe * ms_nfe, False, note))

    for n in budgets(N):
        for d in ("vote", "mean", "posterior"):
            pred, nfe = decide(scorer, Et[:, :n], d)
            add(f"full {d}", n, pred, float(nfe.mean()))
    # (a) the informative-timestep window, chosen on validation per budget
    t_bank = bank_t(scorer, N)
    T = len(scorer.ab)
    tf = t_bank.double() / (T - 1)
    lo, hi = scorer.cfg.t_range
    edges = [lo + (hi - lo) * i / 10 for i in range(11)]
    windows = [(edges[i], edges[j]) for i in range(10) for j in range(i + 1, 11)]
    fitted["window"] = {}
    for n in budgets(N):
        best = None
        for a, b in windows:
            idx = torch.nonzero((tf >= a - 1e-9) & (tf <= b + 1e-9)).flatten()[:n]
            if len(idx) < n:
                continue
            for d in ("vote", "mean"):
                acc_v = float((decide(scorer, Ev[:, idx], d)[0] == yv).mean())
                key = (acc_v, b - a)  # ties: the wider window
                if best is None or key > best[0]:
                    best = (key, (a, b), d, idx)
        if best is None:
            continue
        (acc_v, _), (a, b), d, idx = best
        pred, nfe = decide(scorer, Et[:, idx], d)
        add("window", n, pred, float(nfe.mean()), f"t in [{a:.2f}, {b:.2f}], {d}, val {acc_v:.3f}")
        fitted["window"][n] = {"t_window": (a, b), "decision": d, "val_accuracy": acc_v}
    # (b) timestep weights fitted on validation; zero-weight trials are skipped (not evaluated)
    from medclf.scoring.denoising import fit_t_weights, t_bins

    tbin = t_bins(t_bank, T, (lo, hi), bins)
    w_bins = {r: fit_t_weights(Ev, yv, tbin, bins, rule=r).float() for r in ("mean", "vote")}
    fitted["weights"] = {r: [round(float(v), 3) for v in wb] for r, wb in w_bins.items()}
    for rule, wb in w_bins.items():
        wr = wb[tbin]
        pos = torch.nonzero(wr > 0).flatten()
        for n in budgets(N):
            idx = pos[:n]
            if len(idx) < n and n != N:
                continue
            add(f"weights {rule}", n, weighted_pred(Et[:, idx], wr[idx], rule), float(len(idx) * K))
    # (c) class elimination: adaptive pruning replayed, at several levels and trial caps
    for d in ("posterior", "vote"):
        for alpha in ALPHAS:
            for n in [m for m in budgets(N) if m >= scorer.cfg.min_trials]:
                pred, nfe = replay_adaptive(scorer, Et, n, alpha, d)
                add(f"elim {d} a={alpha:g}", n, pred, float(nfe.mean()))
    return rows, fitted


def bank_t(scorer, n: int) -> torch.Tensor:
    """The bank's timesteps for n trials (DenoisingScorer.bank's, without drawing eps)."""
    from medclf.scoring.denoising import bank_timesteps

    return bank_timesteps(n, len(scorer.ab), scorer.cfg.t_range)


def default_row(model: Path, images: torch.Tensor, y: np.ndarray, K: int, n_boot: int, cap: int) -> Row:
    """The scorer as ``medclf classify`` builds it (run's trials capped at --trials, adaptive, posterior), run for real."""
    from medclf.inference import load_scorer

    run, scorer, _ = load_scorer(model, "cpu")
    if scorer.cfg.trials > cap:
        run, scorer, _ = load_scorer(model, "cpu", trials=cap)
    return real_row("default", scorer, images, y, K, n_boot)


def t_weights_rows(model: Path, xv: torch.Tensor, yv: np.ndarray, xt: torch.Tensor, yt: np.ndarray, Et: torch.Tensor,
                   K: int, n_boot: int, cap: int, ms_nfe: float) -> tuple[list[Row], dict]:
    """``t-weights fit`` (run for real) and ``t-weights full`` (offline) rows: the run recalibrated as
    ``finetune --set t_weights=fit`` would (DiffusionClassifier.calibrate on xv, yv), and its calibration."""
    from medclf.runs import load_classifier

    run, method, net = load_classifier(model, torch.device("cpu"))
    if run.config.get("resize"):
        return [], {"skipped": "a resized run (the rows would need its resize)"}
    method.config = dataclasses.replace(method.config, t_weights="fit", trials=min(method.config.trials, cap))
    t0 = time.perf_counter()
    cal = method.calibrate(net, run.classes, xv, torch.as_tensor(yv), torch.device("cpu"))
    cal["seconds"] = round(time.perf_counter() - t0, 1)
    scorer = method.scorer(net, run.classes, cal, torch.device("cpu"))
    share = cal["t_weights_nfe_share"]
    rows = [real_row("t-weights fit", scorer, xt, yt, K, n_boot, f"; {share:.0%} of trials evaluated")]
    n = scorer.cfg.trials
    w = scorer.trial_weights(n).cpu()
    Em = torch.where(w.view(1, -1, 1) > 0, Et[:, :n], torch.nan)  # trials of weight 0 are never evaluated
    pred, nfe = decide(with_cfg(scorer, adaptive=False), Em, "posterior")
    acc, ci = acc_ci(yt, pred, K, n_boot)
    rows.append(Row("t-weights full", n, float(nfe.mean()), acc, ci, float(nfe.mean()) * ms_nfe, False,
                    "posterior, full budget, recalibrated"))
    return rows, cal


def real_row(lever: str, scorer, images: torch.Tensor, y: np.ndarray, K: int, n_boot: int, note: str = "") -> Row:
    """scorer.predict on the images, timed: accuracy, NFE per image and ms per image measured."""
    scorer.predict(images[:2])  # warm-up
    t0 = time.perf_counter()
    preds = [scorer.predict(images[i : i + 32]) for i in range(0, len(images), 32)]
    dt = time.perf_counter() - t0
    pred = torch.cat([p.pred for p in preds]).numpy()
    nfe = float(torch.cat([p.nfe for p in preds]).float().mean())
    acc, ci = acc_ci(y, pred, K, n_boot)
    c = scorer.cfg
    return Row(lever, c.trials, nfe, acc, ci, 1000 * dt / len(images), True,
               f"{c.decision}, adaptive={c.adaptive}, prune_alpha={c.prune_alpha}{note}")


def chunk_speed(scorer, images: torch.Tensor, chunks: list[int], nfe: int) -> dict[int, float]:
    """ms per NFE of the batched scoring loop (evaluate) at each chunk size, best of 2, same triples."""
    from medclf.data import to_unit_float

    x = to_unit_float(images[:4]) * 2 - 1
    K, N = len(scorer.classes), scorer.cfg.trials
    per = min(N, max(1, nfe // (len(x) * K)))  # trials per image
    bb = torch.arange(len(x)).repeat_interleave(per * K)
    kk = torch.arange(per).repeat_interleave(K).repeat(len(x))
    cc = torch.arange(K).repeat(len(x) * per)
    out = {}
    for ch in chunks:
        s = with_cfg(scorer, chunk=ch)
        s.evaluate(x, bb[:ch], kk[:ch], cc[:ch])  # warm-up
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            s.evaluate(x, bb, kk, cc)
            best = min(best, time.perf_counter() - t0)
        out[ch] = 1000 * best / len(bb)
    return out


# ------------------------------------------------------------------------------------ report

def goal(rows: list[Row], target: float, full_nfe: float) -> list[str]:
    """Best-lever line, default line (and a t-weights fit line): PASS/FAIL against the goal, with the distance when FAIL."""
    ok_nfe = GOAL_NFE * full_nfe + 1e-9
    cand = [r for r in rows if r.nfe <= ok_nfe and r.lever not in SCORERS]
    lines = []
    if cand:
        b = max(cand, key=lambda r: (r.acc, -r.nfe))
        gap = (target - b.acc) * 100
        ok = gap <= GOAL_POINTS + 1e-9
        lines.append(f"best lever  {b.lever} @ {b.trials} trials: {b.nfe:.0f} NFE ({b.nfe / full_nfe:.1%} of full), "
                     f"accuracy {b.acc:.3f} vs {target:.3f} ({-gap:+.1f} points) -> "
                     + ("PASS" if ok else f"FAIL ({gap - GOAL_POINTS:.1f} points short)"))
    else:
        lines.append("best lever  no row at <= 10% of full NFE -> FAIL")
    for d in (r for r in rows if r.lever in SCORERS):
        gap = (target - d.acc) * 100
        ratio = d.nfe / full_nfe
        ok = gap <= GOAL_POINTS + 1e-9 and ratio <= GOAL_NFE + 1e-9
        why = [f"{gap - GOAL_POINTS:.1f} points short"] if gap > GOAL_POINTS + 1e-9 else []
        why += [f"NFE {ratio:.1%} > 10%"] if ratio > GOAL_NFE + 1e-9 else []
        lines.append(f"{d.lever:<11} {d.note} @ {d.trials} trials: {d.nfe:.1f} NFE ({ratio:.1%} of full), accuracy "
                     f"{d.acc:.3f} vs {target:.3f} ({-gap:+.1f} points) -> " + ("PASS" if ok else f"FAIL ({'; '.join(why)})"))
    return lines


def print_table(rows: list[Row]) -> None:
    print(f"{'lever':<24}{'trials':>7}{'NFE/image':>11}{'accuracy':>10}{'95% CI':>16}{'ms/image':>11}  note")
    for r in rows:
        ms = f"{r.ms:.1f}" if r.measured else f"~{r.ms:.1f}"
        print(f"{r.lever:<24}{r.trials:>7}{r.nfe:>11.1f}{r.acc:>10.3f}   [{r.ci[0]:.3f}, {r.ci[1]:.3f}]{ms:>11}  {r.note}")


def plot(results: dict, out: Path) -> Path:
    from medclf.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (task, res) in zip(axes[0], results.items()):
        rows, target, full_nfe = res["rows"], res["target"], res["full_nfe"]
        levers = dict.fromkeys(r.lever for r in rows)
        for lev in levers:
            rs = sorted((r for r in rows if r.lever == lev), key=lambda r: r.nfe)
            style = (dict(marker="*", ms=14, ls="none", color="k") if lev == "default" else
                     dict(marker="P", ms=10, ls="none", color="tab:red") if lev == "t-weights fit" else dict(marker="o", ms=3))
            if lev.startswith("elim") and "a=0.05" not in lev:
                continue  # one alpha per decision keeps the plot readable; the table has them all
            ax.plot([max(r.nfe, 1e-9) for r in rs], [r.acc for r in rs], label=lev, **style)
        ax.axhline(target - GOAL_POINTS / 100, color="grey", ls="--", lw=0.8, label="full vote - 1 point")
        ax.axvline(GOAL_NFE * full_nfe, color="grey", ls=":", lw=0.8, label="10% of full NFE")
        ax.set_xscale("log")
        ax.set_xlabel("NFE per image")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task} ({res['n']} {res['split']} images, {res['K']} classes)", fontsize=9)
        ax.legend(fontsize=6, loc="best")
    path = out / "accuracy_vs_nfe.png"
    save_figure(fig, path)
    return path


def tasks_from(args) -> list[tuple[str, Path, Path]]:
    """(name, run, cache) per task, from --task-dir or the --model/--cache pairs."""
    if args.task_dir:
        found = [(d.name, d / "run-medclf", d / "cache") for d in sorted(args.task_dir.iterdir())
                 if (d / "run-medclf" / "model.safetensors").exists() and (d / "cache" / "manifest.json").exists()
                 and '"calibration"' in (d / "run-medclf" / "config.json").read_text()]  # finished: calibrated
        if not found:
            raise SystemExit(f"no DIR/<task>/run-medclf/model.safetensors + DIR/<task>/cache under {args.task_dir}")
        return found
    if not args.model or len(args.model) != len(args.cache or []):
        raise SystemExit("give --task-dir DIR, or --model RUN --cache CACHE pairs (benchmarks/recipe.py trains both tasks)")
    names = [m.parent.name if m.name.startswith("run-") else m.name for m in args.model]  # DIR/<task>/run-x -> task
    return [(n if names.count(n) == 1 else f"{n}-{i}", m, c) for i, (n, m, c) in enumerate(zip(names, args.model, args.cache))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", help="a run (repeat, paired with --cache)")
    ap.add_argument("--cache", type=Path, action="append", help="its cache (repeat)")
    ap.add_argument("--task-dir", type=Path, help="benchmarks/recipe.py --work layout: DIR/<task>/{cache,run-medclf}")
    ap.add_argument("--trials", type=int, default=501, help="full budget (Favero et al.: 501)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--fit-split", default="val", help="where the window and weights are fitted")
    ap.add_argument("--images", type=int, default=None, help="at most this many images per split (default: all)")
    ap.add_argument("--fit-images", type=int, default=None, help="at most this many --fit-split images (default: --images)")
    ap.add_argument("--reuse", action="store_true", help="reuse OUT/<task>-errors.pt from an earlier run of the same setting")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--chunks", default="1,16,64,256", help="chunk sizes of the speed rows")
    ap.add_argument("--out", type=Path, default=Path("bench-classify"))
    ap.add_argument("--quick", action="store_true", help="8 images, 8 trials, 100 bootstrap resamples (the test's setting)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.trials, args.bootstrap, args.chunks = args.images or 8, min(args.trials, 8), 100, "1,16"
    from medclf.inference import load_scorer

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    verdicts: list[str] = []
    for task, model, cache in tasks_from(args):
        run, scorer, _ = load_scorer(model, "cpu", trials=args.trials, adaptive=False, decision="vote")
        scorer = getattr(scorer, "inner", scorer)
        K = len(scorer.classes)
        xt, yt = load_split(cache, args.split, args.images)
        xv, yv = load_split(cache, args.fit_split, args.fit_images or args.images)
        saved = args.out / f"{task}-errors.pt"
        got = torch.load(saved, weights_only=True) if args.reuse and saved.exists() else None
        if got is not None and (got["trials"] < args.trials or got["n"] != (len(yv), len(yt))
                                or got["model"] != str(model.resolve())):
            print(f"{task}: {saved} is from another setting (run, images or fewer trials): scoring again")
            got = None
        if got is not None:  # same run and data, budget >= --trials: its prefix, without rescoring
            n = args.trials
            Ev, Et, sec = got["Ev"][:, :n], got["Et"][:, :n], got["seconds"] * n / got["trials"]
            print(f"{task}: errors reused from {saved} ({got['trials']} trials, first {n})")
        else:
            Ev, _ = full_errors(scorer, xv)
            Et, sec = full_errors(scorer, xt)
            torch.save({"Ev": Ev, "Et": Et, "seconds": sec, "trials": args.trials, "n": (len(yv), len(yt)),
                        "model": str(model.resolve())}, saved)
        ms_nfe = 1000 * sec / (len(xt) * args.trials * K)
        rows, fitted = task_rows(scorer, Ev, yv, Et, yt, ms_nfe, args.bootstrap)
        rows.append(default_row(model, xt, yt, K, args.bootstrap, args.trials))
        xv_all, yv_all = load_split(cache, args.fit_split, args.images)  # what finetune calibrates on: the split
        tw_rows, tw_cal = t_weights_rows(model, xv_all, yv_all, xt, yt, Et, K, args.bootstrap, args.trials, ms_nfe)
        rows += tw_rows
        speed = chunk_speed(scorer, xt, [int(c) for c in args.chunks.split(",")], nfe=64 if args.quick else 512)
        full = next(r for r in rows if r.lever == "full vote" and r.trials == args.trials)
        full.ms, full.measured = full.nfe * ms_nfe, True
        res = {"rows": rows, "target": full.acc, "full_nfe": full.nfe, "n": len(yt), "K": K, "split": args.split}
        results[task] = res
        enough = "" if len(yt) >= 200 else f" (fewer than 200: all the split has)" if args.images is None else " (capped by --images)"
        print(f"\n== {task}: {model} on {cache}\n{len(yt)} {args.split} images{enough}, {len(yv)} {args.fit_split} images "
              f"(fit), {K} classes, {args.trials} trials, full pass {sec:.1f} s = {ms_nfe:.3f} ms/NFE "
              f"(chunk {scorer.cfg.chunk}, torch threads {torch.get_num_threads()})")
        print_table(rows)
        print("scoring loop speed, ms/NFE by chunk: " + ", ".join(f"{c}: {v:.3f}" for c, v in speed.items()))
        print(f"fitted weights per t bin (low t -> high t): mean {fitted['weights']['mean']}; vote {fitted['weights']['vote']}")
        if "t_weights" in tw_cal:
            print(f"t_weights=fit calibration ({tw_cal['fitted_on']} {args.fit_split} images, {tw_cal['seconds']} s): "
                  f"weights {tw_cal['t_weights']}, temperature {tw_cal['temperature']:.3g}, bias "
                  f"{[round(b, 3) for b in tw_cal['bias']]}, health ok {tw_cal['health']['ok']}")
        lines = goal(rows, full.acc, full.nfe)
        print(f"goal: within {GOAL_POINTS:g} point of full vote ({full.acc:.3f} at {full.nfe:.0f} NFE) at <= 10% of its NFE")
        print("".join(f"  {line}\n" for line in lines), end="")
        verdicts += [f"{task}: {line}" for line in lines]
        sys.stdout.flush()
    png = plot(results, args.out)
    print(f"\nplot: {png}")
    print("summary:\n  " + "\n  ".join(verdicts))


if __name__ == "__main__":
    main()
