"""Small, low-contrast bleeds (issue #16): the diffusion classifier and the baseline beside a plain CNN.

    python benchmarks/subtle.py [--sizes 32,64] [--steps 800] [--quick] [--patients 100] [--work DIR]
    python benchmarks/subtle.py --sizes 32,64,128          # 128 px: a GPU, or a long CPU run

Generates medclf.synthetic.make_subtle_rsna_tree (RSNA-ICH layout, --patients x 8 slices, half of
them with one round lesion of --radius-mm at +--contrast-hu; splits by patient 70/15/15, so the
default 800 slices hold out 120 test slices), then for each --sizes px: ingests it (--window, one
channel per window), trains the baseline and the diffusion classifier with medclf.training.finetune
(the code `medclf finetune` runs) for --steps, and a 4-layer CNN reference in plain torch on the same
cache and split. Every figure is measured in this run on the test split.

Rows per size:
  baseline                 --baseline-set options (default: the library's, resnet18)
  diffusion (pool=mean)    the scorer's default whole-image mean error
  diffusion (pool=POOL)    the same trained denoiser scored with --pool (max: spatial max of the
                           locally averaged per-pixel error excess, see scoring.denoising.pool_error_maps)
  CNN reference            4 conv blocks (16-32-64-64, BN, ReLU, max-pool), global max pool, AdamW
                           1e-3, --cnn-epochs epochs
Both diffusion rows come from one trained run: the per-pixel error maps of the val and test slices
are computed once (full budget, --trials), each pool is calibrated on val (temperature + bias by
NLL, as finetune does) and scored on test. AUROC CIs: 1000 bootstrap resamples of the test slices
(slices of one patient are correlated, so the CI is optimistic). PASS = "beats chance clearly":
the CI's lower bound is above 0.5.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def auroc_ci(y: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC, 2.5%, 97.5% bootstrap percentiles); resamples holding one class only are skipped."""
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(y, score))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            boots.append(roc_auc_score(y[i], score[i]))
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan"))
    return auc, float(lo), float(hi)


def split_tensors(cache_path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(int16 images (N, C, H, W), labels (N,)) of a cache split, in cache order."""
    from medclf.data.dataset import CacheDataset

    ds = CacheDataset(cache_path, split=split, labelled_only=True)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


# ----------------------------------------------------------------------------------- CNN reference
def small_cnn(in_channels: int, n_classes: int = 2) -> nn.Module:
    """Four conv blocks and a global max pool: a lesion anywhere in the slice can fire the head."""
    layers: list[nn.Module] = []
    ch = in_channels
    for i, w in enumerate((16, 32, 64, 64)):
        layers += [nn.Conv2d(ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        if i < 3:
            layers.append(nn.MaxPool2d(2))
        ch = w
    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(ch, n_classes))


def train_cnn(cache_path: Path, epochs: int, seed: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, float]:
    """Train the reference CNN on the train split; (test labels, test P(positive), train seconds)."""
    from medclf.data import to_unit_float

    xtr, ytr = split_tensors(cache_path, "train")
    xte, yte = split_tensors(cache_path, "test")
    xtr, xte = to_unit_float(xtr), to_unit_float(xte)
    torch.manual_seed(seed)
    model = small_cnn(xtr.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for s in range(0, len(perm) - batch_size + 1, batch_size):
            b = perm[s : s + batch_size]
            loss = nn.functional.cross_entropy(model(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        p = torch.cat([torch.softmax(model(xte[s : s + 64]), 1)[:, 1] for s in range(0, len(xte), 64)])
    return yte.numpy(), p.numpy(), seconds


# ------------------------------------------------------------------------------------ medclf methods
def train_run(cache_path: Path, method: str, options: dict, run: Path, steps: int, batch_size: int, lr: float,
              seed: int, image_size: int | None = None, calibrate: bool = True) -> float:
    """``medclf finetune`` through the library; returns training seconds (0 if the run already exists)."""
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    if (run / "model.safetensors").exists():
        return 0.0
    t0 = time.perf_counter()
    finetune(cache_path, method, run, options,
             TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                         checkpoint_every=10**6, log_every=50, seed=seed, device="cpu"),
             calibrate=calibrate, image_size=image_size)
    return time.perf_counter() - t0


def baseline_scores(run: Path, cache_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test labels, P(positive), predictions) of a run, as `medclf eval` scores it."""
    from medclf.data.cache import open_cache
    from medclf.evaluation.evaluate import score_split
    from medclf.inference import load_scorer

    _, scorer, _ = load_scorer(run, "cpu")
    res = score_split(scorer, open_cache(cache_path), "test")
    return np.asarray(res["y"]), np.asarray(res["probs"])[:, 1], np.asarray(res["pred"])


def diffusion_pool_scores(run: Path, cache_path: Path, pools: list[tuple[str, int, float]], trials: int,
                          ) -> dict[tuple[str, int, float], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per pool: (test labels, calibrated P(positive), posterior predictions) from one pass of error maps."""
    from medclf.data import to_unit_float
    from medclf.runs import load_classifier
    from medclf.scoring.base import fit_calibration
    from medclf.scoring.denoising import pool_error_maps
    from medclf.scoring.resize import resize_images

    run_info, method, model = load_classifier(run, torch.device("cpu"))
    scorer = method.scorer(model, run_info.classes, {}, torch.device("cpu"), trials=trials, adaptive=False)
    to = (run_info.config.get("resize") or {}).get("to")

    def maps_of(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = split_tensors(cache_path, split)
        out = []
        for s in range(0, len(x), 32):
            xb = resize_images(x[s : s + 32], to) if to else to_unit_float(x[s : s + 32])
            out.append(scorer.pooled_scores(xb * 2 - 1, keep_maps=True)[2] / trials)
        return torch.cat(out), y

    val_maps, yv = maps_of("val")
    test_maps, yt = maps_of("test")
    result = {}
    for pool in pools:
        def logits(maps: torch.Tensor) -> torch.Tensor:
            m = pool_error_maps(maps, *pool)
            return -(m - m.min(1, keepdim=True).values)

        lv, lt = logits(val_maps), logits(test_maps)
        cal = fit_calibration(lv, yv)
        probs = torch.softmax(lt.double() / cal["temperature"] + torch.tensor(cal["bias"], dtype=torch.float64), 1)
        result[pool] = (yt.numpy(), probs[:, 1].numpy(), probs.argmax(1).numpy())
    return result


def method_options(method: str, sets: list[str], extra: dict | None = None) -> dict:
    """KEY=VALUE strings typed and checked as `medclf finetune --set` reads them."""
    from medclf.methods import get_method

    return get_method(method).parse_options(extra or {}, sets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="ingest sizes, comma-separated (default 32,64; 128 on a GPU)")
    ap.add_argument("--steps", type=int, help="training steps of baseline and diffusion classifier (default 800)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 patients, 32 px, 200 steps, 16 trials, 8 CNN epochs (explicit options win)")
    ap.add_argument("--patients", type=int, help="phantom patients, 8 slices each (default 100: 800 slices, 120 test)")
    ap.add_argument("--radius-mm", type=float, default=6.0)
    ap.add_argument("--contrast-hu", type=float, default=20.0)
    ap.add_argument("--window", default="brain,subdural,soft")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of both medclf methods")
    ap.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE",
                    help="baseline option (repeatable), e.g. backbone=resnet10t")
    ap.add_argument("--diffusion-set", action="append", default=[], metavar="KEY=VALUE",
                    help="diffusion-classifier option (repeatable), e.g. model_size=tiny")
    ap.add_argument("--pool", default="max", help="pooled diffusion row: max | top")
    ap.add_argument("--pool-kernel", type=int, default=3)
    ap.add_argument("--pool-top", type=float, default=0.02)
    ap.add_argument("--trials", type=int, help="diffusion scoring trials per image, full budget (default 64)")
    ap.add_argument("--cnn-epochs", type=int, help="default 15")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=16)
    ap.add_argument("--methods", default="baseline,diffusion,cnn",
                    help="rows to run, comma-separated (e.g. baseline with --baseline-set global_pool=max)")
    ap.add_argument("--work", type=Path, help="keep data and runs here (default: a temporary folder); reruns reuse them")
    args = ap.parse_args()
    for key, full, quick in (("patients", 100, 64), ("steps", 800, 200), ("trials", 64, 16), ("cnn_epochs", 15, 8)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.quick:
        args.sizes = args.sizes or "32"
    sizes = [int(s) for s in (args.sizes or ("32,64,128" if torch.cuda.is_available() else "32,64")).split(",")]

    from medclf import __version__
    from medclf.data.cache import open_cache
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig, parse_windows
    from medclf.synthetic import make_subtle_rsna_tree

    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="medclf-subtle-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"raw-p{args.patients}-r{args.radius_mm:g}-c{args.contrast_hu:g}-s{args.data_seed}"
    if not (src / "stage_2_train.csv").exists():
        make_subtle_rsna_tree(src, n_patients=args.patients, size=256, seed=args.data_seed,
                              lesion_radius_mm=args.radius_mm, lesion_contrast_hu=args.contrast_hu)
    windows = parse_windows(args.window)
    dc_opts = method_options("diffusion-classifier", args.diffusion_set)
    bl_opts = method_options("baseline", args.baseline_set)
    pools = [("mean", 1, 0.0), (args.pool, args.pool_kernel, args.pool_top)]
    print(f"medclf {__version__} subtle-lesion benchmark: {args.patients} patients x 8 slices (256 px source), lesion "
          f"{args.radius_mm:g} mm at +{args.contrast_hu:g} HU in half the slices; windows {','.join(windows)}; sizes "
          f"{sizes}; {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}; baseline {bl_opts or 'defaults'}; "
          f"diffusion {dc_opts or 'defaults'}, {args.trials} trials; CNN {args.cnn_epochs} epochs; {threads} threads")
    methods = set(args.methods.split(","))
    rows: list = []
    for size in sizes:
        cache = work / f"cache-{src.name}-{size}-{'-'.join(w.replace('/', '_') for w in windows)}"
        ingest(IngestConfig(sources=[src], out=cache, dataset="rsna-ich",
                            preprocess=PreprocessConfig(size=size, windows=windows, channels=None), workers=1))
        info = open_cache(cache)
        n = {s: sum(1 for it in info.items if it.get("split") == s) for s in ("train", "val", "test")}
        print(f"  {size} px: splits {n}", flush=True)

        tag = f"{size}-{args.steps}-{args.lr:g}-{args.seed}"
        if "baseline" in methods:
            run = work / f"baseline-{tag}-{'_'.join(args.baseline_set) or 'default'}"
            secs = train_run(cache, "baseline", bl_opts, run, args.steps, args.batch_size, args.lr, args.seed)
            y, p, pred = baseline_scores(run, cache)
            name = "baseline" + (f" ({', '.join(args.baseline_set)})" if args.baseline_set else "")
            rows.append((name, size, args.steps, y, p, pred, secs))
            print(f"  {size} px: baseline done ({secs:.0f} s)", flush=True)
        if "diffusion" in methods:
            diffusion_rows(args, work, tag, cache, dc_opts, pools, size, rows)
        if "cnn" in methods:
            y, p, secs = train_cnn(cache, args.cnn_epochs, args.seed, args.batch_size)
            rows.append(("CNN reference", size, f"{args.cnn_epochs} ep", y, p, (p > 0.5).astype(int), secs))
            print(f"  {size} px: CNN done ({secs:.0f} s)", flush=True)
    print_rows(rows, args.seed)


def diffusion_rows(args, work: Path, tag: str, cache: Path, dc_opts: dict, pools: list, size: int, rows: list) -> None:
    """Train (or reuse) the diffusion classifier and add one row per pool from one pass of error maps."""
    run = work / f"diffusion-{tag}-{'_'.join(args.diffusion_set) or 'default'}"
    secs = train_run(cache, "diffusion-classifier", dc_opts, run, args.steps, args.batch_size, args.lr, args.seed,
                     calibrate=False)
    t0 = time.perf_counter()
    scored = diffusion_pool_scores(run, cache, pools, args.trials)
    score_s = time.perf_counter() - t0
    for pool in pools:
        y, p, pred = scored[pool]
        name = "diffusion (pool=mean)" if pool[0] == "mean" else f"diffusion (pool={pool[0]}, k={pool[1]})"
        rows.append((name, size, args.steps, y, p, pred, secs + score_s))
    print(f"  {size} px: diffusion classifier done ({secs:.0f} s train, {score_s:.0f} s scoring)", flush=True)


def print_rows(rows: list, seed: int) -> None:
    head = f"{'method':<28}{'size':>5}{'steps':>8}{'accuracy':>10}{'AUROC [95% CI]':>24}{'wall s':>8}  beats chance"
    print()
    print(head)
    print("-" * len(head))
    for name, size, steps, y, p, pred, secs in rows:
        auc, lo, hi = auroc_ci(y, p, seed=seed)
        acc = float((pred == y).mean())
        verdict = "PASS" if lo > 0.5 else "FAIL"
        print(f"{name:<28}{size:>5}{steps!s:>8}{acc:>10.3f}{auc:>9.3f} [{lo:.3f}, {hi:.3f}]{secs:>8.0f}  {verdict}")
    print(f"\n(test split: {len(rows[0][3])} slices, positives {int(np.sum(rows[0][3]))}; wall s = training "
          "(+ scoring val and test for the diffusion rows, one pass shared by both pools) on this machine; "
          "PASS = AUROC CI lower bound > 0.5)")


if __name__ == "__main__":
    main()
