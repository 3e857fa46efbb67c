"""``medclf pretrain``: representation-conditioned diffusion pretraining of an encoder on unlabeled scans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import (Amp, CheckpointEvery, Device, DitSize, EmaDecay, LearningRate, PairedBatchSize, Resume,
                                ResumeAuto, RunFolder, Seed, Steps, SummaryJson, WarmupSteps, Workers, given, out,
                                resume_mode, TrackLog, train_options, train_progress, warn)


def pretrain_cmd(
    ctx: typer.Context,
    cache: Annotated[Path, typer.Argument(help="Cache written by `medclf ingest` (labels, if any, are ignored).", show_default=False)],
    out_dir: RunFolder,
    encoder: Annotated[str, typer.Option(help="timm encoder (a ViT: vit_small_patch16_224, test_vit, ...).")] = "vit_small_patch16_224",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Start the encoder from timm's hub weights (online).")] = False,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Start the encoder from a local file (DINOv2/timm state dict, .safetensors/.pth).")] = None,
    model_size: Annotated[DitSize, typer.Option(help="DiT denoiser size.")] = "tiny",
    rep_dim: Annotated[int, typer.Option(min=1, help="Width of the representation bottleneck r.")] = 64,
    rep_dropout: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of samples denoised with the null r.")] = 0.1,
    min_crop: Annotated[float, typer.Option(min=0.1, max=1.0, help="Encoder view: random crop of this to 1 of the side (1 = off).")] = 0.7,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Encoder view: random left-right flip.")] = True,
    prediction: Annotated[str, typer.Option(help="v | eps: what the DiT predicts.")] = "v",
    split: Annotated[str, typer.Option(help="train | all: cache split(s) to pretrain on.")] = "train",
    steps: Steps = 1000,
    batch_size: PairedBatchSize = 32,
    lr: LearningRate = 1e-3,
    warmup_steps: WarmupSteps = 50,
    ema_decay: EmaDecay = 0.99,
    checkpoint_every: CheckpointEvery = 500,
    seed: Seed = 0,
    device: Device = "auto",
    amp: Amp = "auto",
    workers: Workers = 0,
    resume: Resume = False,
    resume_auto: ResumeAuto = False,
    as_json: SummaryJson = False,
    log: TrackLog = None,
) -> None:
    """Pretrain an image encoder by denoising: a ViT's representation of the clean scan conditions a DiT.

    Writes RUN/config.json, model.safetensors, encoder.safetensors (for `finetune --init RUN`),
    metrics.jsonl, checkpoints/. Runs under `torchrun --nproc_per_node N` too.
    """
    from medclf.training.loop import TrainConfig, distributed_env
    from medclf.methods.repdiff import PretrainConfig
    from medclf.training.pretrain import pretrain

    cfg = PretrainConfig(encoder=encoder, pretrained=pretrained, encoder_weights=str(encoder_weights) if encoder_weights else None,
                         model_size=model_size.value, rep_dim=rep_dim, rep_dropout=rep_dropout, min_crop=min_crop, flip=flip,
                         prediction=prediction, split=split)
    tcfg = TrainConfig(**train_options(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                                       ema_decay=ema_decay, checkpoint_every=checkpoint_every, seed=seed, device=device,
                                       amp=amp, workers=workers))
    rank = distributed_env()[0]
    with train_progress("pretrain", steps, show=rank == 0 and not as_json, log_every=tcfg.log_every) as progress:
        summary = pretrain(cache, out_dir, cfg, tcfg, resume=resume_mode(resume, resume_auto), progress=progress,
                           asked=given(ctx, dict(ctx.params), {"workers": "num_workers"}), log=log.value if log else None)
    if rank != 0:
        return
    from medclf.runs import start_warnings

    warn(start_warnings(summary.get("start")) + summary.get("damaged_checkpoints", []))
    if as_json:
        out.print_json(json.dumps(summary))
        return
    c = summary["collapse_check"]
    out.print(f"run written: {summary['run']}  ({summary['steps']} steps on {summary['n_train']} images; "
              f"r lowers the denoising error by {100 * c['relative_gain']:.1f}% on {c['on']} images, "
              f"feature spread {c['feature_spread']:.3g})", highlight=False, soft_wrap=True)
