"""``medclf explain``: uncertainty and explanation maps (NIfTI on the source grid + PNG overlays)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from medclf.cli._common import Budget, Device, DiffusionSteps, ModelRun, Samples, Sampler, err, out, scorer_options, warn
from medclf.errors import ExitCode


def _name(src: str, used: set[str]) -> str:
    p = Path(src)
    stem = p.name[:-7] if p.name.endswith(".nii.gz") else p.stem if p.is_file() else p.name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "input"
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}-{k}"
    used.add(name)
    return name


def explain_cmd(
    inputs: Annotated[list[str], typer.Argument(help="Scans as for `classify`.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for one sub-folder per input.")],
    model: ModelRun = None,
    budget: Budget = None,
    sampler: Sampler = None,
    diffusion_steps: DiffusionSteps = None,
    samples: Samples = None,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print each summary as a JSON line.")] = False,
) -> None:
    """Per input: the evidence map (what pushes toward the predicted class vs the runner-up), the
    method's own maps (diffusion classifier: per-class error maps and counterfactuals; DiffMIC: the
    saliency that chose its ROIs) and uncertainty, as NIfTI aligned to the source geometry, a PNG
    overlay and summary.json. Exit 3 if some inputs failed."""
    from medclf.errors import MedclfError
    from medclf.export import write_explanation
    from medclf.inference import expand_inputs, input_warnings, load_scorer, score_inputs

    run, scorer, pre = load_scorer(model, device, **scorer_options(budget=budget, adaptive=False, sampler=sampler,
                                                                 diffusion_steps=diffusion_steps, samples=samples))
    if run.config.get("task") == "multilabel":
        raise MedclfError("explain needs a single-label run (an evidence map contrasts the predicted class with the "
                          "runner-up); this run is multi-label", run.path)
    used: set[str] = set()
    failed = 0
    for res in score_inputs(expand_inputs(inputs), scorer, pre, batch_size=8, explain=True, run=run,
                            notes=lambda m: warn([m])):
        if isinstance(res, MedclfError):
            failed += 1
            err.print(f"error: {res.path}: {res.message}", highlight=False, soft_wrap=True)
            continue
        warn(input_warnings(res))
        p = res.prediction
        maps = {k: v.numpy() for k, v in p.maps.items()}
        summary = write_explanation(out_dir, _name(res.source, used), Path(res.source), res.image, res.scan, maps,
                                    p.probs.numpy(), p.pred.numpy(), {k: v.numpy() for k, v in p.uncertainty.items()},
                                    run.classes, keep_aspect=pre.keep_aspect)
        if as_json:
            print(json.dumps(summary, default=str), flush=True)
        else:
            out.print(f"{res.source}: {summary.get('prediction', '')} -> {out_dir}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(int(ExitCode.PARTIAL))
