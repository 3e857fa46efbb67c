"""Label-space diffusion (DiffMIC, DiDiCM) beside the discriminative baseline, clean and corrupted.

    python benchmarks/label_diffusion.py [--patients 120] [--size 32] [--backbone resnet10t] [--steps 300]

Generates a head-CT phantom set (medclf.synthetic, RSNA layout, --patients x 8 slices, a fresh seed
so it is not the bundled sample), ingests it at --size px (brain window), trains every method with
the same backbone, steps and seed on 100% and on 10% of the training labels, and scores the test
split clean and under three corruptions (Gaussian noise, blur, contrast change; medclf.evaluation.
corruptions). Rows: baseline, DiffMIC, DiDiCM-CP at 1/2/5/10 steps, DiDiCM-CL (10 chains x 8 steps).
Columns: NFE per image, images/s (clean), and accuracy / macro-F1 / ECE per condition. Everything is
measured in this one run on this machine; methods not registered in this checkout are listed as such.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

CONDITIONS = ("clean", "noise", "blur", "contrast")


def scorer_rows(registered: set[str]) -> list[tuple[str, str, dict]]:
    """(row name, method, scorer options)."""
    rows = [("baseline", "baseline", {})]
    if "diffmic" in registered:
        rows.append(("DiffMIC (10 DDIM steps)", "diffmic", {"diffusion_steps": 10}))
    if "didicm" in registered:
        rows += [(f"DiDiCM-CP {k} step{'s' * (k > 1)}", "didicm", {"sampler": "cp", "diffusion_steps": k}) for k in (1, 2, 5, 10)]
        rows.append(("DiDiCM-CL 10 chains x 8", "didicm", {"sampler": "cl", "diffusion_steps": 8, "samples": 10}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=120, help="phantom patients (8 slices each)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--backbone", default="resnet10t", help="timm backbone shared by every method")
    ap.add_argument("--steps", type=int, default=300, help="training steps per method (full labels)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-fractions", default="1.0,0.1")
    ap.add_argument("--work", type=Path, help="keep data and runs here (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    from medclf import __version__
    from medclf.data.cache import open_cache
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.evaluation.corruptions import corruption
    from medclf.evaluation.evaluate import score_split
    from medclf.evaluation.metrics import classification_metrics
    from medclf.inference import load_scorer
    from medclf.methods import METHODS
    from medclf.preprocessing import PreprocessConfig
    from medclf.synthetic import make_rsna_tree
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = args.work or Path(tempfile.mkdtemp(prefix="medclf-labeldiff-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "rsna"
    if not (src / "stage_2_train.csv").exists():
        make_rsna_tree(src, n_patients=args.patients, slices_per_series=8, size=64, seed=7, corrupt=False)
    cache_path = work / f"cache{args.size}"
    ingest(IngestConfig(sources=[src], out=cache_path, dataset="rsna-ich",
                        preprocess=PreprocessConfig(size=args.size, windows=["brain"], channels=None), workers=2))
    cache = open_cache(cache_path)
    counts = {s: sum(1 for it in cache.items if it.get("split") == s) for s in ("train", "val", "test")}
    registered = set(METHODS)
    rows = scorer_rows(registered)
    fractions = [float(f) for f in args.label_fractions.split(",")]
    print(f"medclf {__version__} label-space diffusion benchmark: {args.patients} phantom patients x 8 slices at "
          f"{args.size} px, splits {counts}, classes {cache.classes}; backbone {args.backbone}, {args.steps} steps, "
          f"batch {args.batch_size}, lr {args.lr}, seed {args.seed}, {torch.get_num_threads()} CPU threads")
    missing = [m for m in ("diffmic", "didicm") if m not in registered]
    if missing:
        print(f"not in this checkout: {', '.join(missing)}")
    print("corruptions: noise = Gaussian std 0.1; blur = Gaussian sigma 1 px; contrast = deviations from the mean x 0.5")
    transforms = {c: None if c == "clean" else corruption(c, seed=args.seed) for c in CONDITIONS}

    results = []
    for frac in fractions:
        for method in dict.fromkeys(m for _, m, _ in rows):
            run = work / f"run-{method}-{frac:g}"
            steps = args.steps if frac == 1.0 else max(50, args.steps // 2)
            bs = min(args.batch_size, max(4, int(counts["train"] * frac) // 2))
            t0 = time.perf_counter()
            if not (run / "model.safetensors").exists():
                finetune(cache_path, method, run, {"backbone": args.backbone},
                         TrainConfig(steps=steps, batch_size=bs, lr=args.lr, warmup_steps=min(20, steps // 10),
                                     ema_decay=0.99 if steps >= 300 else 0.95, checkpoint_every=steps, log_every=50,
                                     seed=args.seed, label_fraction=frac, device="cpu"))
            train_s = time.perf_counter() - t0
            for name, m, opts in rows:
                if m != method:
                    continue
                _, scorer, _ = load_scorer(run, "cpu", seed=args.seed, **opts)
                rec = {"labels": f"{frac:.0%}", "row": name, "train_s": train_s}
                for cond in CONDITIONS:
                    res = score_split(scorer, cache, "test", transform=transforms[cond])
                    met = classification_metrics(res["y"], res["probs"], cache.classes, n_bootstrap=0, pred=res["pred"])
                    rec[cond] = (met["accuracy"], met["macro_f1"], met["ece"])
                    if cond == "clean":
                        rec["nfe"] = float(np.mean(res["nfe"]))
                        rec["img_s"] = len(res["y"]) / max(res["seconds"], 1e-9)
                results.append(rec)
                print(f"  done: {rec['labels']:>4} labels  {name}", flush=True)

    head = f"{'labels':>6}  {'method':<26}{'NFE':>6}{'img/s':>8}" + "".join(f"  {c + ' acc/F1/ECE':>20}" for c in CONDITIONS)
    print()
    print(head)
    print("-" * len(head))
    for r in results:
        cells = "".join(f"  {r[c][0]:>6.3f}/{r[c][1]:.3f}/{r[c][2]:.3f}" for c in CONDITIONS)
        print(f"{r['labels']:>6}  {r['row']:<26}{r['nfe']:>6.0f}{r['img_s']:>8.0f}{cells}")
    print(f"\n(test split n={counts['test']}; majority-class accuracy "
          f"{max(np.bincount([it['label'] for it in cache.items if it.get('split') == 'test'])) / counts['test']:.3f}; "
          "ECE with 15 bins; images/s on clean test images, batch 64)")


if __name__ == "__main__":
    main()
