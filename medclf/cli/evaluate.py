"""``medclf eval``: metrics, bootstrap CIs and plots for a run on a dataset split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import Adaptive, Budget, Decision, DiffusionSteps, Samples, Sampler, err, is_tty, out, scorer_options


def eval_cmd(
    model: Annotated[Optional[str], typer.Option(help="Run folder (default: $MEDCLF_MODEL).")] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name (an ingest --dataset, or auto).")] = "auto",
    data: Annotated[Optional[Path], typer.Option(help="A cache, or a raw dataset root (default: $MEDCLF_DATA/NAME).")] = None,
    split: Annotated[str, typer.Option(help="train | val | test.")] = "test",
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
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
) -> None:
    """Evaluate a run: accuracy, balanced accuracy, macro-F1, AUROC, ECE, Brier, confusion matrix."""
    from medclf.errors import MedclfError
    from medclf.evaluation import classification_metrics, write_report
    from medclf.evaluation.evaluate import cache_for, data_root, score_split
    from medclf.inference import load_scorer

    run, scorer, _ = load_scorer(model, device, **scorer_options(budget, adaptive, decision, sampler, diffusion_steps, samples))
    cache = cache_for(run.config, dataset, data_root(dataset, data))
    if cache.classes != run.classes:
        raise MedclfError(f"the data's classes {cache.classes} differ from the model's {run.classes}", cache.path)
    progress = None
    if is_tty() and not as_json:
        progress = lambda d, n: err.print(f"\reval: {d}/{n}", end="", highlight=False)  # noqa: E731
    transform = None
    if corrupt:
        from medclf.evaluation.corruptions import corruption

        name, _, sev = corrupt.partition(":")
        try:
            severity = float(sev) if sev else None
        except ValueError:
            raise MedclfError(f"--corrupt {corrupt!r}: severity {sev!r} is not a number") from None
        transform = corruption(name, severity)
    res = score_split(scorer, cache, split, progress=progress, transform=transform)
    if progress:
        err.print()
    m = classification_metrics(res["y"], res["probs"], run.classes, n_bootstrap=bootstrap, pred=res["pred"])
    m.update({"split": split, "corruption": corrupt, "cache": str(cache.path), "cache_fingerprint": cache.fingerprint, "model": str(run.path),
              "nfe_per_image": float(res["nfe"].mean()), "seconds": res["seconds"],
              "images_per_s": len(res["y"]) / max(res["seconds"], 1e-9)})
    if report:
        write_report(report, m, res["y"], res["probs"], run.classes, title=f"{run.path.name} on {split}")
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
    if report:
        out.print(f"report: {report}", highlight=False)
