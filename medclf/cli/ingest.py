"""``medclf ingest``: sources -> tensor cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import DatasetName, bad_argument_choice, err, given, is_tty, out
from medclf.errors import ExitCode


#: the only options ``--merge`` takes: everything else was fixed when the parts were planned
MERGE_OPTIONS = ("out_dir", "overwrite", "as_json", "merge")


def ingest_cmd(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Cache folder to write.")],
    sources: Annotated[Optional[list[Path]], typer.Argument(help="Dataset root(s), folders, files, a CSV or .npz "
                                                                 "(none with --merge).", show_default=False,
                                                            metavar="SOURCE")] = None,
    dataset: Annotated[DatasetName, typer.Option(parser=bad_argument_choice(DatasetName, "--dataset"),
                                                 help="Layout (auto: detected).")] = "auto",
    labels: Annotated[Optional[Path], typer.Option(help="CSV of path,label (or id,label) for generic folders.")] = None,
    size: Annotated[int, typer.Option(min=8, max=4096, help="Output side in pixels.")] = 256,
    window: Annotated[str, typer.Option(help="CT windows, one channel each: names (brain, subdural, soft, bone, "
                                              "bone2000, stroke, lung) or CENTRE/WIDTH.")] = "brain,subdural,soft",
    channels: Annotated[Optional[int], typer.Option(min=1, max=16, help="Channels to store (default: the data's own).")] = None,
    intensity: Annotated[str, typer.Option(help="auto | hu | percentile: how non-RGB intensities are scaled.")] = "auto",
    uncertain: Annotated[str, typer.Option(help="CheXpert uncertain (-1) policy: mixed | ones | zeros | ignore.")] = "mixed",
    seed: Annotated[int, typer.Option(help="Seed of the patient-grouped split.")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes (0: one per core).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted ingest.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a cache of other inputs in --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    num_parts: Annotated[Optional[int], typer.Option("--num-parts", min=1, help="Sharded ingest: split the whole plan's "
                                                     "shards into K parts (with --part-id; then --merge).")] = None,
    part_id: Annotated[Optional[int], typer.Option("--part-id", min=0, help="Sharded ingest: the part (0..K-1) this run "
                                                   "writes, into CACHE/parts/part-I-of-K.")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Merge the K parts in CACHE/parts into the cache (no SOURCE; "
                                        "only --out, --overwrite, --json).")] = False,
) -> None:
    """Read DICOM/NIfTI/PNG/JPEG data as archives ship it into a fingerprinted tensor cache.

    At scale: `--num-parts K --part-id I` for each part I, then `--merge --out CACHE`.

    Exit status: 0 all inputs cached; 3 cached, but some inputs failed (see CACHE/errors.jsonl);
    1 nothing done (bad argument, missing path, conflicting cache, missing or mismatched part);
    2 bad command line.
    """
    from medclf.errors import MedclfError

    if merge:
        typed = sorted(k for k in given(ctx, dict(ctx.params)) if k not in MERGE_OPTIONS)
        if sources or typed:
            names = {p.name: (p.opts[0] if p.opts else p.name) for p in ctx.command.params}
            what = "SOURCE" if sources else names.get(typed[0], typed[0])
            raise typer.BadParameter(f"does not go with {what}: the parts recorded their inputs and options "
                                     "(only --out, --overwrite, --json)", param_hint="--merge")
        from medclf.data.ingest import merge_parts

        result = merge_parts(out_dir, overwrite=overwrite)
        _report(result, as_json)
        return
    if not sources:
        raise typer.BadParameter("give the dataset root(s), files or CSV to ingest (or --merge)", param_hint="SOURCE...")
    if (num_parts is None) != (part_id is None):
        raise typer.BadParameter("--num-parts K and --part-id I go together", param_hint="--num-parts/--part-id")
    if num_parts is not None and part_id >= num_parts:
        raise typer.BadParameter(f"{part_id} is not a part of {num_parts} (0..{num_parts - 1})", param_hint="--part-id")
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig, parse_windows

    if intensity not in ("auto", "hu", "percentile"):
        raise MedclfError(f"unknown --intensity {intensity!r}; choose auto, hu or percentile")
    try:
        windows = parse_windows(window)
    except ValueError as e:
        raise MedclfError(str(e)) from None
    pre = PreprocessConfig(size=size, windows=windows, channels=channels, intensity=intensity)  # channels None: the data's own
    cfg = IngestConfig(sources=sources, out=out_dir, dataset=dataset, labels=labels, preprocess=pre, uncertain=uncertain,
                       seed=seed, workers=workers, resume=resume, overwrite=overwrite, num_parts=num_parts, part_id=part_id)
    result = _run_with_progress(cfg, ingest, fancy=is_tty() and not as_json)
    _report(result, as_json)


def _report(result, as_json: bool) -> None:
    """The summary on stdout; exit 3 when some inputs failed (a part: its own; a merge: all parts')."""
    if as_json:
        d = result.to_dict()
        d["errors"] = d["errors"][:100]
        out.print_json(json.dumps(d))
    else:
        _print_summary(result)
    if result.n_failed:
        raise typer.Exit(int(ExitCode.PARTIAL))


def _run_with_progress(cfg, ingest, fancy: bool):
    if not fancy:
        last = [-1]

        def plain(done: int, total: int) -> None:
            step = max(1, total // 10)
            if done == total or done // step != last[0]:
                last[0] = done // step
                err.print(f"ingest: {done}/{total} inputs", highlight=False)

        return ingest(cfg, progress=plain)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("ingest", total=None)

        def fancy_cb(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return ingest(cfg, progress=fancy_cb)


def _print_summary(r) -> None:
    from rich.table import Table

    # the path on a line of its own: a table title would wrap it (mid-path) to the table's width
    part = r.part if r.part and not r.part["merged"] else None
    what = f"part {part['part_id']} of {part['num_parts']}: {r.cache}" if part else f"cache {r.cache}"
    done = "  (up to date, nothing to do)" if r.up_to_date else f"  (merged from {r.merged_parts} parts)" if r.merged_parts else ""
    if r.part and r.part["merged"]:
        done = f"  (already merged: nothing left for part {r.part['part_id']} of {r.part['num_parts']})"
    out.print(what + done, highlight=False, soft_wrap=True)
    t = Table()
    t.add_column("split")
    classes = sorted({c for per in r.counts.values() for c in per})
    for c in classes:
        t.add_column(c, justify="right")
    t.add_column("total", justify="right")
    for split in sorted(r.counts, key=lambda s: ["train", "val", "test"].index(s) if s in ("train", "val", "test") else 9):
        per = r.counts[split]
        t.add_row(split, *[str(per.get(c, 0)) for c in classes], str(sum(per.values())))
    out.print(t)
    mb = r.size_bytes / 1e6
    speed = (f"checked in {r.seconds:.1f} s" if r.up_to_date else f"merged in {r.seconds:.1f} s" if r.merged_parts
             else f"{r.files_per_s or 0.0:.1f} files/s")
    out.print(f"dataset {r.dataset}  |  {r.n_units} inputs -> {r.n_items} items  |  failed {r.n_failed}  |  "
              f"{mb:.1f} MB  |  {speed}  |  fingerprint {r.fingerprint}", highlight=False, soft_wrap=True)
    for n in r.notes:
        out.print(f"note: {n}", highlight=False, soft_wrap=True)
    if r.n_failed:
        for e in r.errors[:5]:
            err.print(f"failed: {e['path']}: {e['reason']}", highlight=False, soft_wrap=True)
        more = f" ({r.n_failed - 5} more)" if r.n_failed > 5 else ""
        where = r.cache / ("shards/*.errors.jsonl (errors.jsonl of the cache once merged)" if part else "errors.jsonl")
        err.print(f"{r.n_failed} input(s) failed{more}: see {where}", highlight=False, soft_wrap=True)
