"""``medclf classify``: one line per input (per slice for volumes); bad inputs reported, the rest go on."""

from __future__ import annotations

import csv
import json
import sys
from typing import Annotated

import typer

from medclf.cli._common import (Adaptive, Budget, Decision, Device, DiffusionSteps, ModelRun, Samples, Sampler, err, out,
                                scorer_options, warn)
from medclf.errors import ExitCode


def _pred_text(pred) -> str:
    """A class name, or a multi-label run's findings joined by ';' ('none' when no label is on)."""
    return pred if isinstance(pred, str) else (";".join(pred) or "none")


def _headline(unc: dict) -> str:
    """The uncertainty shown in the table: vote entropy for the diffusion classifier, else entropy."""
    for key in ("vote_entropy", "entropy"):
        if key in unc:
            return f"{unc[key]:.3f}"
    return ""


def classify_cmd(
    inputs: Annotated[list[str], typer.Argument(help="DICOM files, DICOM series folders, NIfTI, PNG/JPEG, or a .txt "
                                                      "list of paths ('-' reads paths from stdin).", show_default=False)],
    model: ModelRun = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.")] = False,
    budget: Budget = None,
    adaptive: Adaptive = None,
    decision: Decision = None,
    sampler: Sampler = None,
    diffusion_steps: DiffusionSteps = None,
    samples: Samples = None,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
) -> None:
    """Classify scans with a trained run, applying the run's recorded preprocessing.

    Exit status 0 if every input was classified, 3 if some failed (each printed on stderr), 1 on a
    bad model or argument.
    """
    from medclf.errors import MedclfError
    from medclf.inference import expand_inputs, input_warnings, load_scorer, rows, score_inputs

    run, scorer, pre = load_scorer(model, device, **scorer_options(budget, adaptive, decision, sampler, diffusion_steps, samples))
    classes = run.classes
    failed = 0
    writer = None
    table_rows = []
    for res in score_inputs(expand_inputs(inputs), scorer, pre, batch_size=batch_size, run=run):
        if isinstance(res, MedclfError):
            failed += 1
            if as_json:
                print(json.dumps({"input": res.path, "error": res.message}), flush=True)
            err.print(f"error: {res.path}: {res.message}", highlight=False, soft_wrap=True)
            continue
        warn(input_warnings(res))
        for r in rows(res, classes):
            if as_json:
                print(json.dumps(r), flush=True)
            elif as_csv:
                if writer is None:
                    writer = csv.writer(sys.stdout)
                    writer.writerow(["input", "slice", "prediction", *[f"p_{c}" for c in classes], *r["uncertainty"], "nfe"])
                writer.writerow([r["input"], r.get("slice", ""), _pred_text(r["prediction"]), *r["probabilities"].values(),
                                 *r["uncertainty"].values(), r["nfe"]])
                sys.stdout.flush()
            else:
                table_rows.append(r)
    if table_rows:
        from rich.table import Table

        t = Table()
        for col in ["input", "slice", "prediction", *classes, "uncertainty", "NFE"]:
            t.add_column(col, overflow="fold")
        for r in table_rows:
            t.add_row(r["input"], str(r.get("slice", "")), _pred_text(r["prediction"]), *[f"{v:.3f}" for v in r["probabilities"].values()],
                      _headline(r["uncertainty"]), str(r["nfe"]))
        out.print(t)
    if failed:
        raise typer.Exit(int(ExitCode.PARTIAL))
