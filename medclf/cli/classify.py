"""``medclf classify``: one line per input (per slice for volumes); bad inputs reported, the rest go on."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import (Adaptive, Budget, CalledAET, Decision, Device, DiffusionSteps, ModelRun, Samples, Sampler,
                                SendTo, err, out, scorer_options, send_target, warn)
from medclf.cli._common import HeldOutput, NumParts, PartId, is_tty, item_progress, shard_share
from medclf.errors import ExitCode


def _pred_text(pred) -> str:
    """A class name, or a multi-label run's findings joined by ';' ('none' when no label is on)."""
    return pred if isinstance(pred, str) else (";".join(pred) or "none")


def _report_error(path: str, message: str, as_json: bool) -> None:
    """An input's error: a JSON error line with --json, and one line on stderr."""
    if as_json:
        print(json.dumps({"input": path, "error": message}), flush=True)
    err.print(f"error: {path}: {message}", highlight=False, soft_wrap=True)


def _headline(unc: dict) -> str:
    """The uncertainty shown in the table: the calibrated one (normalised entropy of the probabilities)."""
    for key in ("entropy", *unc):
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
    num_parts: NumParts = None,
    part_id: PartId = None,
    dicom_sr: Annotated[Optional[Path], typer.Option("--dicom-sr", metavar="DIR", help="Write one DICOM SR (TID 1500: class, "
                                                  "probabilities, uncertainty) per DICOM series or image into DIR.")] = None,
    send: SendTo = None,
    aet: CalledAET = None,
) -> None:
    """Classify scans with a trained run, applying the run's recorded preprocessing.

    A folder is read as ingest reads it: its DICOM files grouped into series by their headers
    (one result per series, never two merged), every other image file on its own. Each row names
    its input: a file's path; a series by its folder (plus ``#series-<number>-<modality>-<id>`` when
    the folder holds several series), with the slice's file.

    ``--dicom-sr DIR``: one Structured Report per DICOM series (the series' call as explain makes it:
    any slice positive) or image, referencing its source images; a non-DICOM input still gets its row
    but no SR (an error line). ``--send HOST:PORT --aet AET`` then C-STOREs the SRs written.

    Exit status 0 if every input was classified, 3 if some file failed (each printed on stderr, one
    line naming the file), 1 on a bad model or argument, or when there is nothing to classify.
    """
    from medclf.errors import MedclfError

    target = send_target(send, aet, dicom_sr is not None, "--dicom-sr DIR")  # a bad HOST:PORT before any work (and torch)
    from medclf.inference import expand_inputs, input_warnings, load_scorer, rows, score_inputs

    share = shard_share(num_parts, part_id)  # --num-parts/--part-id, and torchrun's rank (joins its group)
    paths = share.from_root(lambda: expand_inputs(inputs))  # first: "no inputs" needs no model; stdin reaches rank 0
    run, scorer, pre = load_scorer(model, device, **scorer_options(budget, adaptive, decision, sampler, diffusion_steps, samples))
    sr_writer = None
    if dicom_sr is not None:
        from medclf.export.dicom_sr import ReportContext, SRWriter

        sr_writer = SRWriter(dicom_sr, ReportContext.from_run(run, scorer))
    sr_written: list[Path] = []
    sr_refused: set[str] = set()  # inputs already refused (a 4-D NIfTI's volumes: one line for the file)
    classes = run.classes
    failed = 0
    writer = None
    table_rows = []
    held = HeldOutput(share)  # torchrun: rank 0 prints every rank's lines, in input order
    # a bar on a terminal, else a line every few seconds; rank 0 only (the ranks share one terminal)
    with item_progress("classify", fancy=is_tty() and share.root, every_s=5.0 if share.root else float("inf")) as progress:
        for res in score_inputs(paths, scorer, pre, batch_size=batch_size, run=run, share=share, progress=progress,
                                notes=(lambda m: warn([m])) if share.root else None):
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
                        stat_cols = [k for k, v in r.items() if isinstance(v, float)]  # the only scalar floats: vote statistics
                        writer.writerow(["input", "slice", "prediction", *[f"p_{c}" for c in classes], *r["uncertainty"],
                                         *stat_cols, "nfe", "series", "file", "volume"])
                    writer.writerow([r["input"], r.get("slice", ""), _pred_text(r["prediction"]), *r["probabilities"].values(),
                                     *r["uncertainty"].values(), *[r[k] for k in stat_cols], r["nfe"], r.get("series", ""),
                                     r.get("file", ""), r.get("volume", "")])
                    sys.stdout.flush()
                else:
                    table_rows.append(r)
            if sr_writer is not None and res.source not in sr_refused:
                try:
                    sr_written.append(sr_writer.write(res))
                except MedclfError as e:
                    failed += 1
                    sr_refused.add(res.source)
                    _report_error(e.path or res.source, e.message, as_json)
    table_rows = list(share.merged(table_rows))  # torchrun: every rank's rows, on rank 0
    if table_rows:
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
    sr_written = [Path(f) for f in share.merged([str(f) for f in sr_written])]  # torchrun: all ranks' SRs, on rank 0
    failed = share.failures(failed)  # torchrun: rank 0 exits with the whole batch's status, the others 0
    held.release(csv_header=as_csv)
    share.close()  # torchrun: leave the group now, not at interpreter exit (Share.close)
    if target is not None and share.root:  # one association, from the rank that prints
        from medclf.export.send import send_files

        host, port, called = target
        try:
            n = send_files(sr_written, host, port, called) if sr_written else 0
        except MedclfError as e:
            if as_json:
                print(json.dumps({"send": f"{host}:{port}", "error": str(e)}), flush=True)
            raise MedclfError(f"{e} (the SRs stay in {dicom_sr})") from None
        err.print(f"sent {n} DICOM SR(s) to {host}:{port} ({called})", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(int(ExitCode.PARTIAL))
