"""``medclf finetune``: train a method on a cache's train split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import err, is_tty, out


def finetune_cmd(
    cache: Annotated[Path, typer.Argument(help="Cache written by `medclf ingest`.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")],
    method: Annotated[str, typer.Option(help="diffusion-classifier | diffmic | didicm | baseline.")] = "diffusion-classifier",
    arch: Annotated[Optional[str], typer.Option(help="diffusion-classifier denoiser: unet (MONAI DiffusionModelUNet, default) | dit (timm blocks).")] = None,
    model_size: Annotated[Optional[str], typer.Option(help="diffusion-classifier: tiny | small (default) | base.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="baseline/diffmic/didicm: timm encoder (default resnet18).")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained", help="Start the backbone from timm's hub weights (online).")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Start the backbone from a local weights file.")] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start the backbone from a `medclf pretrain` run's encoder (sets --backbone).")] = None,
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Any method option as KEY=VALUE (repeatable), e.g. --set mixup=0.2.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Must equal the cache's size (checked); kept for scripts.")] = None,
    steps: Annotated[int, typer.Option(min=1)] = 1000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 100,
    ema_decay: Annotated[float, typer.Option()] = 0.999,
    checkpoint_every: Annotated[int, typer.Option(min=1)] = 500,
    trials: Annotated[Optional[int], typer.Option(min=1, help="diffusion-classifier: default scoring trials recorded with the run.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    label_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Train on this seeded, class-stratified share of the train labels.")] = 1.0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    amp: Annotated[str, typer.Option(help="auto | bf16 | fp16 | off (CUDA only).")] = "auto",
    workers: Annotated[int, typer.Option(min=0, help="DataLoader workers.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue this run from its last checkpoint.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train a classifier (a run folder: config.json, model.safetensors, metrics.jsonl, checkpoints/).

    Runs unchanged under `torchrun --nproc_per_node N` (DDP; rank 0 writes).
    """
    from medclf.data.cache import open_cache
    from medclf.errors import MedclfError
    from medclf.methods import get_method
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig, distributed_env

    info = open_cache(cache)
    if image_size is not None and image_size != info.shape[1]:
        raise MedclfError(f"--image-size {image_size} differs from the cache's {info.shape[1]}: re-ingest with --size {image_size}", cache)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay,
                       checkpoint_every=checkpoint_every, seed=seed, device=device, amp=amp, num_workers=workers,
                       label_fraction=label_fraction)
    options = {"arch": arch, "model_size": model_size, "trials": trials, "backbone": backbone, "pretrained": pretrained,
               "encoder_weights": str(encoder_weights) if encoder_weights else None}
    options = get_method(method).parse_options({k: v for k, v in options.items() if v is not None}, sets or [])
    rank = distributed_env()[0]
    show = rank == 0 and not as_json
    if show and is_tty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task("train", total=steps, info="")
            summary = finetune(cache, method, out_dir, options, tcfg, resume=resume, init=init,
                               progress=lambda r: bar.update(task, completed=r["step"],
                                                             info=f"loss {r['loss']:.4f}  {r['samples_per_s']:.0f} samples/s"))
    else:
        every = max(1, steps // 20)  # plain lines (logs, pipes): about twenty per run

        def cb(r: dict) -> None:
            if show and (r["step"] % every < 10 or r["step"] == steps):
                err.print(f"step {r['step']}/{steps}  loss {r['loss']:.4f}  {r['samples_per_s']:.0f} samples/s", highlight=False)
        summary = finetune(cache, method, out_dir, options, tcfg, resume=resume, init=init, progress=cb)
    if rank != 0:
        return
    health = (summary.get("calibration") or {}).get("health") or {}
    for w in health.get("warnings", []):
        err.print(f"warning: {w}", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        cal = summary.get("calibration") or {}
        out.print(f"run written: {summary['run']}  ({summary['steps']} steps"
                  + (f", temperature {cal['temperature']:.3g} fitted on {cal['fitted_on']} val items" if cal else "")
                  + ")", highlight=False, soft_wrap=True)
