"""``medclf eval``: metrics, bootstrap CIs and plots for a run on a dataset split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import (Adaptive, Budget, DatasetName, Decision, Device, DiffusionSteps, ModelRun, Samples, Sampler, err,
                                is_tty, out, scorer_options)


def eval_cmd(
    model: ModelRun = None,
    dataset: Annotated[DatasetName, typer.Option(help="Dataset name (an ingest --dataset, or auto).")] = "auto",
    data: Annotated[Optional[Path], typer.Option(help="A cache, or a raw dataset root (default: $MEDCLF_DATA/NAME).")] = None,
    split: Annotated[str, typer.Option(help="train | val | test (--zero-shot: also joined, e.g. val+test).")] = "test",
    report: Annotated[Optional[Path], typer.Option(help="Folder for metrics.json and the PNG plots.")] = None,
    budget: Budget = None,
    adaptive: Adaptive = None,
    decision: Decision = None,
    sampler: Sampler = None,
    diffusion_steps: DiffusionSteps = None,
    samples: Samples = None,
    corrupt: Annotated[Optional[str], typer.Option(help="Score corrupted images: noise|blur|contrast[:SEVERITY] "
                                                         "(noise std 0.1, blur sigma 1 px, contrast x0.5 by default).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the 95% CIs.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass (label-diffusion methods draw "
                                                        "their noise per batch).")] = 64,
    num_parts: Annotated[Optional[int], typer.Option("--num-parts", min=1, show_default=False,
                                                     help="Refused: metrics need every score at once; spread eval over "
                                                          "processes with torchrun instead.")] = None,
    part_id: Annotated[Optional[int], typer.Option("--part-id", min=0, show_default=False,
                                                   help="Refused, as --num-parts.")] = None,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    zero_shot: Annotated[bool, typer.Option("--zero-shot", help="Evaluate the run's frozen encoder (no fine-tuning): "
                                                                 "classifiers fitted on the labelled train split.")] = False,
    protocol: Annotated[Optional[list[str]], typer.Option(help="--zero-shot: knn | prototype | kmeans (repeatable; default all).")] = None,
    baseline_encoder: Annotated[Optional[list[str]], typer.Option(help="--zero-shot: also evaluate [TIMM_NAME=]untrained|imagenet|PATH "
                                                                        "(repeatable), side by side.")] = None,
) -> None:
    """Evaluate a run: accuracy, balanced accuracy, macro-F1, AUROC, ECE, Brier, confusion matrix.

    Under torchrun (``torchrun --nproc-per-node N -m medclf eval ...``) the ranks score the split's
    batches between them and rank 0 prints the metrics, the same as one process's."""
    from medclf.errors import MedclfError
    from medclf.evaluation.evaluate import cache_for, data_root, evaluate_run
    from medclf.inference import load_scorer

    if num_parts is not None or part_id is not None:
        raise typer.BadParameter("eval computes metrics (AUROC, bootstrap CIs) over the whole split, so it is not cut "
                                 "into parts; spread it over processes with torchrun instead: torchrun --nproc-per-node "
                                 "N -m medclf eval ...", param_hint="--num-parts" if num_parts is not None else "--part-id")
    from medclf.cli._common import shard_share

    share = shard_share(None, None)  # torchrun's rank (joins its group); one process otherwise
    if zero_shot and share.distributed:
        raise MedclfError("eval --zero-shot runs in one process: start it without torchrun")
    if zero_shot:
        return _zero_shot(model, dataset.value, data, split, report, protocol, baseline_encoder, bootstrap, device, as_json)
    if protocol or baseline_encoder:
        raise MedclfError("--protocol and --baseline-encoder apply to --zero-shot evaluation only")
    run, scorer, _ = load_scorer(model, device, **scorer_options(budget, adaptive, decision, sampler, diffusion_steps, samples))
    # rank 0 ingests a raw dataset (once, into the shared cache folder); the others read the result
    cache = share.from_root(lambda: cache_for(run.config, dataset.value, data_root(dataset.value, data)))
    progress = None
    if is_tty() and not as_json and share.root:
        progress = lambda d, n: err.print(f"\reval: {d}/{n}", end="", highlight=False)  # noqa: E731
    m = evaluate_run(run, scorer, cache, split, bootstrap=bootstrap, corrupt=corrupt, report=report, progress=progress,
                     batch_size=batch_size, share=share)
    share.close()  # torchrun: leave the group now, not at interpreter exit (Share.close)
    if m is None:  # torchrun, rank > 0: rank 0 prints the metrics
        return
    if progress:
        err.print()
    if run.config.get("task") == "multilabel":
        return _print_multilabel(run, cache, split, m, report, as_json)
    for w in m["warnings"]:
        err.print(f"warning: {w}", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps(m, default=float))
        return
    from rich.table import Table

    ci = m.get("ci95", {})
    t = Table(title=f"{run.path.name} on {cache.path.name}/{split}  (n={m['n']})", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "ece", "brier", "nfe_per_image", "images_per_s"):
        v = m.get(key)
        lo_hi = ci.get(key)
        t.add_row(key, "n/a" if v is None else f"{v:.4f}", f"{lo_hi[0]:.4f}-{lo_hi[1]:.4f}" if lo_hi else "")
    out.print(t)
    out.print("confusion (rows true, cols predicted): " + json.dumps(m["confusion_matrix"]), highlight=False)
    if m.get("selective_accuracy"):
        out.print("accuracy on the most certain share (by calibrated entropy): " + ", ".join(
            f"{c['fraction']:.0%} {c['accuracy']:.3f}" for c in m["selective_accuracy"]), highlight=False)
    if report:
        out.print(f"report: {report}", highlight=False)


def _print_multilabel(run, cache, split, m, report, as_json) -> None:
    """A multi-label run's per-label metrics (CheXpert's observations): AUROC, accuracy/F1 at 0.5, ECE, Brier."""
    if as_json:
        out.print_json(json.dumps(m, default=float))
        return
    from rich.table import Table

    ci = (m.get("ci95") or {}).get("auroc_macro")
    macro = "n/a" if m["auroc_macro"] is None else f"{m['auroc_macro']:.4f}"
    t = Table(title=f"{run.path.name} on {cache.path.name}/{split}  (n={m['n']}, multi-label; macro AUROC {macro}"
                    + (f", 95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ")"), title_justify="left")
    for col in ("label", "n", "positives", "AUROC", "accuracy", "F1", "ECE", "Brier"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for name, e in m["per_label"].items():
        t.add_row(name, str(e["n"]), str(e["positives"]),
                  *("n/a" if e[k] is None else f"{e[k]:.4f}" for k in ("auroc", "accuracy", "f1", "ece", "brier")))
    out.print(t)
    if report:
        out.print(f"report: {report}", highlight=False)


def _zero_shot(model, dataset, data, split, report, protocols, baselines, bootstrap, device, as_json) -> None:
    """``eval --zero-shot``: the library embeds and classifies; this prints one row per (encoder, protocol)."""
    from medclf.atomic import atomic_write_text
    from medclf.evaluation.evaluate import cache_for, data_root
    from medclf.evaluation.zeroshot import PROTOCOLS, ZeroShotConfig, baseline_encoder, run_encoder, zero_shot
    from medclf.training.loop import resolve_device
    from medclf.runs import resolve_model

    dev = resolve_device(device)
    run, enc = run_encoder(resolve_model(model))
    cache = cache_for(run.config, dataset, data_root(dataset, data))
    encoders = [(f"{run.path.name} ({enc.name})", enc)] + [baseline_encoder(b, run.config) for b in baselines or []]
    rep = zero_shot(encoders, cache, split, protocols or PROTOCOLS, ZeroShotConfig(n_bootstrap=bootstrap), dev,
                    shape=run.config["shape"])
    rep["model"] = str(run.path)
    if report:
        report.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report / "zeroshot.json", json.dumps(rep, indent=1, default=float))
    if as_json:
        out.print_json(json.dumps(rep, default=float))
        return
    from rich.table import Table

    t = Table(title=f"zero-shot on {cache.path.name}/{split} (n={rep['n_eval']}; reference: "
                    f"{rep['reference_split']}, n={rep['n_reference']})", title_justify="left")
    for col in ("encoder", "protocol", "accuracy", "balanced acc", "macro-F1", "AUROC"):
        t.add_column(col, justify="left" if col in ("encoder", "protocol") else "right")
    for r in rep["results"]:
        t.add_row(r["encoder"], r["protocol"], *("n/a" if r[k] is None else f"{r[k]:.4f}"
                                                  for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro")))
    out.print(t)
    out.print(f"protocol: {rep['protocol']}", highlight=False, soft_wrap=True)
    if report:
        out.print(f"report: {report / 'zeroshot.json'}", highlight=False)
