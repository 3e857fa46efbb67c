"""``medclf finetune``: train a method on a cache's train split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import (Amp, BatchSize, CheckpointEvery, ClassifierMethod, ClassifierSize, Device, EmaDecay,
                                LearningRate, Resume, RunFolder, Seed, Steps, SummaryJson, WarmupSteps, Workers,
                                out, given, resume_mode, ResumeAuto, TrackLog, train_options, train_progress, warn)


def finetune_cmd(
    ctx: typer.Context,
    cache: Annotated[Path, typer.Argument(help="Cache written by `medclf ingest`.", show_default=False)],
    out_dir: RunFolder,
    method: Annotated[ClassifierMethod, typer.Option(help="Method to train.")] = "diffusion-classifier",
    arch: Annotated[Optional[str], typer.Option(help="diffusion-classifier denoiser: unet (MONAI DiffusionModelUNet, default) | dit (timm blocks).")] = None,
    model_size: Annotated[Optional[ClassifierSize], typer.Option(help="diffusion-classifier: denoiser size (default small).")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="baseline/diffmic/didicm: timm encoder (default resnet18).")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained", help="Start the backbone from timm's hub weights (online).")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Start the backbone from a local weights file.")] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start the backbone from a `medclf pretrain` run's encoder (sets --backbone).")] = None,
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Any method option as KEY=VALUE (repeatable), e.g. --set mixup=0.2.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Method options for a kind of finding (fills what --set does not): "
                                                       "small-findings (diffusion classifier: max pooling of the error).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Train at this size from a cache of another: images are "
                                                           "resized on the device, and eval/classify/explain repeat it.")] = None,
    steps: Steps = 1000,
    batch_size: BatchSize = 32,
    lr: LearningRate = 1e-4,
    warmup_steps: WarmupSteps = 100,
    ema_decay: EmaDecay = 0.999,
    checkpoint_every: CheckpointEvery = 500,
    trials: Annotated[Optional[int], typer.Option(min=1, help="diffusion-classifier: default scoring trials recorded with the run.")] = None,
    seed: Seed = 0,
    label_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Train on this seeded, class-stratified share of the train labels.")] = 1.0,
    device: Device = "auto",
    amp: Amp = "auto",
    workers: Workers = 0,
    resume: Resume = False,
    resume_auto: ResumeAuto = False,
    as_json: SummaryJson = False,
    log: TrackLog = None,
) -> None:
    """Train a classifier (a run folder: config.json, model.safetensors, metrics.jsonl, checkpoints/).

    Runs unchanged under `torchrun --nproc_per_node N` (DDP; rank 0 writes); with `torchrun --max-restarts N`
    and `--resume auto` a restarted job continues from its last checkpoint.
    """
    from medclf.methods import get_method
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig, distributed_env

    tcfg = TrainConfig(**train_options(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                                       ema_decay=ema_decay, checkpoint_every=checkpoint_every, seed=seed, device=device,
                                       amp=amp, workers=workers), label_fraction=label_fraction)
    options = {"arch": arch, "model_size": None if model_size is None else model_size.value, "trials": trials,
               "backbone": backbone, "pretrained": pretrained,
               "encoder_weights": str(encoder_weights) if encoder_weights else None}
    from medclf.methods.presets import preset_sets

    # the preset first: a later --set of the same key wins
    options = get_method(method.value).parse_options({k: v for k, v in options.items() if v is not None},
                                                     preset_sets(preset, method.value) + (sets or []))
    rank = distributed_env()[0]
    with train_progress("finetune", steps, show=rank == 0 and not as_json, log_every=tcfg.log_every) as progress:
        summary = finetune(cache, method.value, out_dir, options, tcfg, resume=resume_mode(resume, resume_auto), init=init,
                           progress=progress, asked={**given(ctx, dict(ctx.params), {"workers": "num_workers"}), **options},
                           image_size=image_size, log=log.value if log else None)
    if rank != 0:
        return
    from medclf.runs import start_warnings

    health = (summary.get("calibration") or {}).get("health") or {}
    warn(start_warnings(summary.get("start")) + summary.get("damaged_checkpoints", []) + health.get("warnings", []))
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        cal = summary.get("calibration") or {}
        out.print(f"run written: {summary['run']}  ({summary['steps']} steps"
                  + (f", temperature {cal['temperature']:.3g} fitted on {cal['fitted_on']} val items" if cal else "")
                  + ")", highlight=False, soft_wrap=True)
