"""``medclf explain``: uncertainty and explanation maps (NIfTI on the source grid + PNG overlays)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import Adaptive, Budget, Decision, Device, DiffusionSteps, ModelRun, Samples, Sampler, err, out, scorer_options, warn
from medclf.cli._common import CalledAET, SendTo, send_target
from medclf.cli._common import HeldOutput, NumParts, PartId, shard_share
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


def _names(planned: list) -> list[str | None]:
    """Each planned input's sub-folder name (None for an input that failed planning), given over the
    whole input list in order: every --num-parts part and torchrun rank names an input alike, so
    parts writing into one --out never collide. A 4-D NIfTI's volumes share their file's name."""
    from medclf.errors import MedclfError

    used: set[str] = set()
    files: dict[int, str] = {}  # id of a 4-D file's shared volumes -> its name
    names: list[str | None] = []
    for x in planned:
        if isinstance(x, MedclfError):
            names.append(None)
        elif x.volumes is not None:
            if id(x.volumes) not in files:
                files[id(x.volumes)] = _name(x.name, used)
            names.append(files[id(x.volumes)])
        else:
            names.append(_name(x.name, used))
    return names


def explain_cmd(
    inputs: Annotated[list[str], typer.Argument(help="Scans as for `classify`.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for one sub-folder per input.")],
    model: ModelRun = None,
    budget: Budget = None,
    adaptive: Adaptive = None,
    decision: Decision = None,
    counterfactual: Annotated[Optional[str], typer.Option(
        help="diffusion-classifier: onestep (x0 estimate from t = 0.5; default) | guided (Favero et al.: DDIM "
             "from t = 0.5 with classifier-free guidance 4.5, 50 steps; 100 x K network evaluations per image).",
        show_default=False)] = None,
    sampler: Sampler = None,
    diffusion_steps: DiffusionSteps = None,
    samples: Samples = None,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print each summary as a JSON line.")] = False,
    num_parts: NumParts = None,
    part_id: PartId = None,
    dicom_dir: Annotated[Optional[Path], typer.Option(
        "--dicom", help="Also write each map as a DICOM Parametric Map (DICOM inputs) into this folder.",
        show_default=False)] = None,
    send: SendTo = None,
    aet: CalledAET = None,
) -> None:
    """Per input: the evidence map (what pushes toward the predicted class vs the runner-up), the
    method's own maps (diffusion classifier: per-class error maps and counterfactuals; DiffMIC: the
    saliency that chose its ROIs) and uncertainty, as NIfTI aligned to the source geometry, a PNG
    overlay and summary.json; with --dicom, DICOM Parametric Maps too. Exit 3 if some inputs failed.

    Parts (--num-parts/--part-id) and torchrun ranks write their inputs' sub-folders into one --out,
    named over the whole input list (scan, scan-2, ...), so that they never collide."""
    from medclf.errors import MedclfError
    from medclf.export import write_explanation
    from medclf.inference import expand_inputs, input_warnings, load_scorer, plan_inputs, score_inputs

    share = shard_share(num_parts, part_id)  # --num-parts/--part-id, and torchrun's rank (joins its group)
    target = send_target(send, aet, dicom_dir is not None, "--dicom DIR")  # a bad HOST:PORT before any work
    run, scorer, pre = load_scorer(model, device, **scorer_options(budget, adaptive, decision, sampler, diffusion_steps,
                                                                 samples, counterfactual))  # as classify: the same answer
    if run.config.get("task") == "multilabel":
        raise MedclfError("explain needs a single-label run (an evidence map contrasts the predicted class with the "
                          "runner-up); this run is multi-label", run.path)
    paths = share.from_root(lambda: expand_inputs(inputs))  # stdin reaches rank 0 only
    planned = list(plan_inputs(paths, (lambda m: warn([m])) if share.root else None))
    names = _names(planned)
    held = HeldOutput(share)  # torchrun: rank 0 prints every rank's lines, in input order
    failed = 0
    dicom_written: list[Path] = []
    for res in score_inputs(paths, scorer, pre, batch_size=8, explain=True, run=run, share=share, planned=planned):
        if isinstance(res, MedclfError):
            failed += 1
            err.print(f"error: {res.path}: {res.message}", highlight=False, soft_wrap=True)
            continue
        warn(input_warnings(res))
        p = res.prediction
        maps = {k: v.numpy() for k, v in p.maps.items()}
        grids: dict = {}
        name = names[res.index]
        summary = write_explanation(out_dir, name, Path(res.source), res.image, res.scan, maps,
                                    p.probs.numpy(), p.pred.numpy(), {k: v.numpy() for k, v in p.uncertainty.items()},
                                    run.classes, keep_aspect=pre.keep_aspect, grids=grids)
        if dicom_dir is not None:
            from medclf.export.parametric_map import parametric_map_sources, write_parametric_maps

            try:  # a refusal (not DICOM, ...) costs this input's DICOM output only: its NIfTI/PNG are written
                srcs = parametric_map_sources(res.source, res.series, res.slice_files, res.image.n_slices)
                dicom_written += write_parametric_maps(dicom_dir, name, srcs, grids, summary, notes=lambda m: warn([m]),
                                                       model=(run.method, Path(run.path).name))
            except MedclfError as e:
                failed += 1
                err.print(f"error: {e.path or res.source}: {e.message}", highlight=False, soft_wrap=True)
        if as_json:
            print(json.dumps(summary, default=str), flush=True)
        else:
            out.print(f"{res.source}: {summary.get('prediction', '')} -> {out_dir}", highlight=False, soft_wrap=True)
    failed = share.failures(failed)  # torchrun: rank 0 exits with the whole batch's status, the others 0
    held.release()
    share.close()  # torchrun: leave the group now, not at interpreter exit (Share.close)
    if target is not None:
        from medclf.export.send import send_files

        host, port, called = target
        try:  # a refused or absent peer: one line, exit 1; the maps stay written
            n = send_files(dicom_written, host, port, called) if dicom_written else 0
        except MedclfError as e:
            raise MedclfError(f"{e} (the Parametric Maps stay in {dicom_dir})") from None
        err.print(f"sent {n} Parametric Map(s) to {host}:{port} ({called})", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(int(ExitCode.PARTIAL))
