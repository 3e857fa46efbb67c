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

    A folder is read as ingest reads it: its DICOM files grouped into series by their headers
    (one result per series, never two merged), every other image file on its own. Each row names
    its input: a file's path; a series by its folder (plus ``#series-<number>-<modality>-<id>`` when
    the folder holds several series), with the slice's file.

    Exit status 0 if every input was classified, 3 if some file failed (each printed on stderr, one
    line naming the file), 1 on a bad model or argument, or when there is nothing to classify.
    """
    from medclf.errors import MedclfError
    from medclf.inference import expand_inputs, input_warnings, load_scorer, rows, score_inputs

    paths = expand_inputs(inputs)  # first: "no inputs" needs no model
    run, scorer, pre = load_scorer(model, device, **scorer_options(budget, adaptive, decision, sampler, diffusion_steps, samples))
    classes = run.classes
    failed = 0
    writer = None
    table_rows = []
    for res in score_inputs(paths, scorer, pre, batch_size=batch_size, run=run, notes=lambda m: warn([m])):
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
                    writer.writerow(["input", "slice", "prediction", *[f"p_{c}" for c in classes], *r["uncertainty"], "nfe",
                                     "series", "file", "volume"])
                writer.writerow([r["input"], r.get("slice", ""), _pred_text(r["prediction"]), *r["probabilities"].values(),
                                 *r["uncertainty"].values(), r["nfe"], r.get("series", ""), r.get("file", ""),
                                 r.get("volume", "")])
                sys.stdout.flush()
            else:
                table_rows.append(r)
    if table_rows:
        from pathlib import Path

        from rich.table import Table

        with_file = any("file" in r for r in table_rows)  # a series' rows: the slice's file
        with_volume = any("volume" in r for r in table_rows)  # a 4-D NIfTI's rows: the volume
        t = Table()
        for col in ["input", *(["volume"] if with_volume else []), "slice", *(["file"] if with_file else []),
                    "prediction", *classes, "uncertainty", "NFE"]:
            t.add_column(col, overflow="fold")
        for r in table_rows:
            file_cell = [Path(r["file"]).name if r.get("file") else ""] if with_file else []
            vol_cell = [str(r.get("volume", ""))] if with_volume else []
            t.add_row(r["input"], *vol_cell, str(r.get("slice", "")), *file_cell, _pred_text(r["prediction"]),
                      *[f"{v:.3f}" for v in r["probabilities"].values()], _headline(r["uncertainty"]), str(r["nfe"]))
        out.print(t)
    if failed:
        raise typer.Exit(int(ExitCode.PARTIAL))
