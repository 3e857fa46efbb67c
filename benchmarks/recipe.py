"""The diffusion classifier's training recipe: medclf's (eps, linear beta, plain MSE, integer t)
beside Favero et al.'s (v-prediction, shifted-cosine log-SNR clipped to [-15, 15], min-SNR-5,
continuous t), same network, data, steps and seed, measured in one run.

    python benchmarks/recipe.py [--steps 800] [--patients 60] [--trials 64] [--tasks ct,digits] [--work DIR]

Tasks: a binary head-CT phantom set (medclf.synthetic, RSNA layout, a fresh seed, 32 px, brain
window) and scikit-learn's digits as 8 classes (ISIC 2019 layout, 16 px). Each recipe is scored on
the test split three ways: Favero's protocol (vote, full budget), the calibrated posterior at full
budget, and medclf's default (posterior, adaptive). Columns: accuracy, AUROC, ECE, NFE per image.
The recipe whose posterior accuracy is higher on both tasks is the one the README recommends; the
last lines say which.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("medclf", "favero")
SCORINGS = (("vote, full", {"decision": "vote", "adaptive": False}),
            ("posterior, full", {"decision": "posterior", "adaptive": False}),
            ("posterior, adaptive", {"decision": "posterior", "adaptive": True}))


def make_task(name: str, root: Path, patients: int, seed: int) -> Path:
    """Raw data of one task, ingested; returns the cache."""
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig

    if name == "ct":
        from medclf.synthetic import make_rsna_tree

        raw = make_rsna_tree(root / "raw", n_patients=patients, size=64, seed=seed, corrupt=False)
        cfg = IngestConfig(sources=[raw], out=root / "cache", dataset="rsna-ich",
                           preprocess=PreprocessConfig(size=32, windows=["brain"], channels=None), workers=1)
    elif name == "digits":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _trees import make_isic2019_digits_tree

        make_isic2019_digits_tree(root / "raw")
        cfg = IngestConfig(sources=[root / "raw"], out=root / "cache", dataset="isic",
                           preprocess=PreprocessConfig(size=16, channels=None), workers=1)
    else:
        raise SystemExit(f"unknown task {name!r} (ct, digits)")
    ingest(cfg)
    return root / "cache"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--patients", type=int, default=60, help="CT phantom patients (8 slices each)")
    ap.add_argument("--trials", type=int, default=64, help="full scoring budget")
    ap.add_argument("--tasks", default="ct,digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="keep data and runs here (default: a temporary folder)")
    args = ap.parse_args()

    import numpy as np

    from medclf.data.cache import open_cache
    from medclf.evaluation import classification_metrics
    from medclf.evaluation.evaluate import score_split
    from medclf.inference import load_scorer
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    work = args.work or Path(tempfile.mkdtemp(prefix="medclf-recipe-"))
    table: list[tuple] = []
    for task in args.tasks.split(","):
        cache = make_task(task, work / task, args.patients, seed=args.seed + 11)
        for recipe in RECIPES:
            out = work / task / f"run-{recipe}"
            t0 = time.perf_counter()
            if not (out / "model.safetensors").exists():
                finetune(cache, "diffusion-classifier", out,
                         {"arch": "unet", "model_size": "tiny", "trials": args.trials, "recipe": recipe},
                         TrainConfig(steps=args.steps, batch_size=32, lr=1e-3, warmup_steps=50,
                                     checkpoint_every=10**6, seed=args.seed))
            train_s = time.perf_counter() - t0
            for label, opts in SCORINGS:
                run, scorer, _ = load_scorer(out, "cpu", trials=args.trials, **opts)
                res = score_split(scorer, open_cache(cache), "test")
                m = classification_metrics(res["y"], res["probs"], run.classes, n_bootstrap=0, pred=res["pred"])
                row = (task, recipe, label, len(res["y"]), m["accuracy"], m["auroc_macro"], m["ece"],
                       float(np.mean(res["nfe"])), train_s)
                table.append(row)
                print("  ".join(str(round(v, 4)) if isinstance(v, float) else str(v) for v in row), flush=True)
    print(f"\n{'task':7s} {'recipe':7s} {'scoring':20s} {'n':>4s} {'acc':>6s} {'AUROC':>6s} {'ECE':>6s} {'NFE':>6s} {'train s':>8s}")
    for task, recipe, label, n, acc, auc, ece, nfe, ts in table:
        print(f"{task:7s} {recipe:7s} {label:20s} {n:4d} {acc:6.3f} {auc:6.3f} {ece:6.3f} {nfe:6.1f} {ts:8.0f}")
    best = {}
    for task in args.tasks.split(","):
        post = {r: acc for t, r, label, _, acc, *_ in table if t == task and label == "posterior, full"}
        best[task] = max(post, key=post.get)
        print(f"{task}: higher posterior accuracy with the {best[task]} recipe ({post})")
    winner = set(best.values())
    print("verdict:", f"{winner.pop()} recipe on every task" if len(winner) == 1 else "no recipe wins on every task")


if __name__ == "__main__":
    main()
