"""Representation-conditioned diffusion pretraining: throughput and zero-shot accuracy/F1 vs baselines.

    python benchmarks/pretrain.py [--cache CACHE] [--encoder test_vit] [--steps 400] [--seeds 0 1 2] [--split test]
                                  [--unlabeled-patients N] [--baseline PATH ...] [--threads N]

Without --cache it ingests sample_data/rsna at 32 px (brain window), pretrains the encoder for
--steps on the train split's images once per seed (labels unused; about a minute per seed on
2 CPU cores with the default tiny encoder) and reports, per seed and averaged:
  pretraining   samples/s (mean over the logged steps), wall time, collapse check
  zero-shot     accuracy / macro-F1 / balanced accuracy of k-NN, nearest prototype and k-means
                (README "zero-shot protocol") for the pretrained encoder and each baseline:
                untrained (the same ViT at the random init pretraining started from), imagenet
                (timm hub weights: 'unavailable' offline or when timm has none), and --baseline files;
                plus a reference the zero-shot encoders are not: the same ViT trained *with* the train
                labels (``finetune --method baseline``, same steps), i.e. what this architecture can
                learn from this data at all.
With --unlabeled-patients N the encoder is pretrained instead on a separately generated, unlabeled
pool of N phantom patients x 8 slices (``medclf.synthetic``, another seed), ingested the same way:
more unlabeled scans, as a hospital archive would give; the evaluation data stay the same.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--encoder", default="test_vit", help="timm encoder (default: timm's tiny test ViT, CPU-friendly)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pretraining run per seed")
    ap.add_argument("--split", default="test", help="evaluated split(s), e.g. test or val+test")
    ap.add_argument("--unlabeled-patients", type=int, default=0, help="pretrain on a generated unlabeled pool this big")
    ap.add_argument("--baseline", action="append", default=[], help="extra baseline: [TIMM_NAME=]PATH (repeatable)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from medclf.data import open_cache
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.errors import MedclfError
    from medclf.evaluation.zeroshot import ZeroShotConfig, baseline_encoder, run_encoder, zero_shot
    from medclf.preprocessing import PreprocessConfig
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig, resolve_device
    from medclf.methods.repdiff import PretrainConfig
    from medclf.training.pretrain import pretrain

    tmp = Path(tempfile.mkdtemp(prefix="medclf-bench-pretrain-"))
    cache = args.cache
    if cache is None:
        cache = tmp / "cache"
        ingest(IngestConfig(sources=[REPO / "sample_data" / "rsna"], out=cache,
                            preprocess=PreprocessConfig(size=32, windows=["brain"], channels=None), workers=1))
    pool = cache  # what the encoder is pretrained on
    own_pool = bool(args.unlabeled_patients)
    if own_pool:
        from medclf.synthetic import make_rsna_tree

        src = make_rsna_tree(tmp / "pool-src", n_patients=args.unlabeled_patients, size=64, seed=1000, corrupt=False)
        pool = tmp / "pool"
        ingest(IngestConfig(sources=[src / "stage_2_train"], out=pool, dataset="folder",
                            preprocess=PreprocessConfig(size=32, windows=["brain"], channels=None), workers=1))
    dev = resolve_device(args.device)
    rows: dict[tuple[str, str], list[dict]] = {}
    unavailable: dict[str, str] = {}
    speed = []
    for seed in args.seeds:
        run_dir = tmp / f"run-{seed}"
        t0 = time.perf_counter()
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=20,
                           checkpoint_every=args.steps, log_every=10, ema_decay=0.99, seed=seed, device=args.device)
        summary = pretrain(pool, run_dir, PretrainConfig(encoder=args.encoder, split="all" if own_pool else "train"), tcfg)
        wall = time.perf_counter() - t0
        curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        check = summary["collapse_check"]
        speed.append((seed, sum(r["samples_per_s"] for r in curve) / len(curve), wall, check))
        run, enc = run_encoder(run_dir)
        encoders = [("pretrained", enc)]
        for spec in ["untrained", "imagenet", *args.baseline]:
            try:
                encoders.append(baseline_encoder(spec, run.config))
            except MedclfError as e:
                unavailable[spec] = str(e)
        sup_dir = tmp / f"supervised-{seed}"
        finetune(cache, "baseline", sup_dir, {"backbone": args.encoder}, tcfg, calibrate=False)
        encoders.append(("supervised (reference)", run_encoder(sup_dir)[1]))
        rep = zero_shot(encoders, open_cache(cache), args.split, cfg=ZeroShotConfig(n_bootstrap=0, seed=seed), device=dev)
        for r in rep["results"]:
            rows.setdefault((r["encoder"], r["protocol"]), []).append(r)

    patch = run.config["encoder"].get("patch_size")
    where = f"an unlabeled pool of {summary['n_train']} images" if own_pool else f"{summary['n_train']} train images"
    print(f"\npretraining: {args.encoder}{f' (patch {patch})' if patch else ''} + DiT-tiny, {where} at {run.config['shape']}, "
          f"{args.steps} steps x batch {args.batch_size} on {dev.type}, torch threads {torch.get_num_threads()}")
    print(f"{'seed':>4}{'samples/s':>11}{'wall s':>8}{'err with r':>12}{'null r':>9}{'gain':>8}{'spread':>9}")
    for seed, sps, wall, c in speed:
        print(f"{seed:>4}{sps:>11.0f}{wall:>8.0f}{c['mse_with_r']:>12.4f}{c['mse_null_r']:>9.4f}"
              f"{100 * c['relative_gain']:>7.1f}%{c['feature_spread']:>9.3f}")
    print(f"\nzero-shot on {args.split} (n={rep['n_eval']}), reference {rep['reference_split']} (n={rep['n_reference']}); "
          f"per seed, then the mean")
    print(f"{'encoder':<24}{'protocol':<11}{'accuracy':>9}{'macro-F1':>10}{'bal.acc':>9}   per-seed acc / F1")
    for (name, proto), rs in rows.items():
        acc, f1, bal = (sum(r[k] for r in rs) / len(rs) for k in ("accuracy", "macro_f1", "balanced_accuracy"))
        per = "  ".join(f"{r['accuracy']:.3f}/{r['macro_f1']:.3f}" for r in rs)
        print(f"{name:<24}{proto:<11}{acc:>9.3f}{f1:>10.3f}{bal:>9.3f}   {per}")
    for spec, why in unavailable.items():
        print(f"{spec:<24}{'all':<11}{'unavailable':>9}  ({why[:100]})")
    pre, base = rows[("pretrained", "knn")], rows[("untrained", "knn")]
    wins = [(p["accuracy"] > b["accuracy"], p["macro_f1"] > b["macro_f1"]) for p, b in zip(pre, base)]
    print(f"\nk-NN, pretrained beats untrained (issue #5): accuracy in {sum(a for a, _ in wins)}/{len(wins)} seeds, "
          f"macro-F1 in {sum(f for _, f in wins)}/{len(wins)} seeds, both in {sum(a and f for a, f in wins)}/{len(wins)}")


if __name__ == "__main__":
    main()
