"""``medclf ingest``: sources -> tensor cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import DatasetName, bad_argument_choice, err, is_tty, out
from medclf.errors import ExitCode


def ingest_cmd(
    sources: Annotated[list[Path], typer.Argument(help="Dataset root(s), folders, files, a CSV or .npz.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Cache folder to write.")],
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
) -> None:
    """Read DICOM/NIfTI/PNG/JPEG data as archives ship it into a fingerprinted tensor cache.

    Exit status: 0 all inputs cached; 3 cached, but some inputs failed (see CACHE/errors.jsonl);
    1 nothing done (bad argument, missing path, conflicting cache); 2 bad command line.
    """
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.errors import MedclfError
    from medclf.preprocessing import PreprocessConfig, parse_windows

    if intensity not in ("auto", "hu", "percentile"):
        raise MedclfError(f"unknown --intensity {intensity!r}; choose auto, hu or percentile")
    try:
        windows = parse_windows(window)
    except ValueError as e:
        raise MedclfError(str(e)) from None
    pre = PreprocessConfig(size=size, windows=windows, channels=channels, intensity=intensity)  # channels None: the data's own
    cfg = IngestConfig(sources=sources, out=out_dir, dataset=dataset, labels=labels, preprocess=pre, uncertain=uncertain,
                       seed=seed, workers=workers, resume=resume, overwrite=overwrite)
    result = _run_with_progress(cfg, ingest, fancy=is_tty() and not as_json)
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
    out.print(f"cache {r.cache}" + ("  (up to date, nothing to do)" if r.up_to_date else ""), highlight=False,
              soft_wrap=True)
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
    speed = f"checked in {r.seconds:.1f} s" if r.up_to_date else f"{r.files_per_s or 0.0:.1f} files/s"
    out.print(f"dataset {r.dataset}  |  {r.n_units} inputs -> {r.n_items} items  |  failed {r.n_failed}  |  "
              f"{mb:.1f} MB  |  {speed}  |  fingerprint {r.fingerprint}", highlight=False, soft_wrap=True)
    for n in r.notes:
        out.print(f"note: {n}", highlight=False)
    if r.n_failed:
        for e in r.errors[:5]:
            err.print(f"failed: {e['path']}: {e['reason']}", highlight=False, soft_wrap=True)
        more = f" ({r.n_failed - 5} more)" if r.n_failed > 5 else ""
        err.print(f"{r.n_failed} input(s) failed{more}: see {r.cache / 'errors.jsonl'}", highlight=False)
