"""``medclf pretrain``: representation-conditioned diffusion pretraining of an encoder on unlabeled scans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medclf.cli._common import err, is_tty, out


def pretrain_cmd(
    cache: Annotated[Path, typer.Argument(help="Cache written by `medclf ingest` (labels, if any, are ignored).", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")],
    encoder: Annotated[str, typer.Option(help="timm encoder (a ViT: vit_small_patch16_224, test_vit, ...).")] = "vit_small_patch16_224",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Start the encoder from timm's hub weights (online).")] = False,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Start the encoder from a local file (DINOv2/timm state dict, .safetensors/.pth).")] = None,
    model_size: Annotated[str, typer.Option(help="DiT denoiser: tiny | small | base.")] = "tiny",
    rep_dim: Annotated[int, typer.Option(min=1, help="Width of the representation bottleneck r.")] = 64,
    rep_dropout: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of samples denoised with the null r.")] = 0.1,
    min_crop: Annotated[float, typer.Option(min=0.1, max=1.0, help="Encoder view: random crop of this to 1 of the side (1 = off).")] = 0.7,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Encoder view: random left-right flip.")] = True,
    prediction: Annotated[str, typer.Option(help="v | eps: what the DiT predicts.")] = "v",
    split: Annotated[str, typer.Option(help="train | all: cache split(s) to pretrain on.")] = "train",
    steps: Annotated[int, typer.Option(min=1)] = 1000,
    batch_size: Annotated[int, typer.Option(min=2)] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 50,
    ema_decay: Annotated[float, typer.Option()] = 0.99,
    checkpoint_every: Annotated[int, typer.Option(min=1)] = 500,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    amp: Annotated[str, typer.Option(help="auto | bf16 | fp16 | off (CUDA only).")] = "auto",
    workers: Annotated[int, typer.Option(min=0, help="DataLoader workers.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue this run from its last checkpoint.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Pretrain an image encoder by denoising: a ViT's representation of the clean scan conditions a DiT.

    Writes RUN/config.json, model.safetensors, encoder.safetensors (for `finetune --init RUN`),
    metrics.jsonl, checkpoints/. Runs under `torchrun --nproc_per_node N` too.
    """
    from medclf.training.loop import TrainConfig, distributed_env
    from medclf.training.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(encoder=encoder, pretrained=pretrained, encoder_weights=str(encoder_weights) if encoder_weights else None,
                         model_size=model_size, rep_dim=rep_dim, rep_dropout=rep_dropout, min_crop=min_crop, flip=flip,
                         prediction=prediction, split=split)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay,
                       checkpoint_every=checkpoint_every, seed=seed, device=device, amp=amp, num_workers=workers)
    rank = distributed_env()[0]
    show = rank == 0 and not as_json
    every = max(1, steps // 20)

    def cb(r: dict) -> None:
        if show and (r["step"] % every < tcfg.log_every or r["step"] == steps):
            err.print(f"step {r['step']}/{steps}  loss {r['loss']:.4f}  {r['samples_per_s']:.0f} samples/s", highlight=False)

    if show and is_tty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task("train", total=steps, info="")
            summary = pretrain(cache, out_dir, cfg, tcfg, resume=resume,
                               progress=lambda r: bar.update(task, completed=r["step"],
                                                             info=f"loss {r['loss']:.4f}  {r['samples_per_s']:.0f} samples/s"))
    else:
        summary = pretrain(cache, out_dir, cfg, tcfg, resume=resume, progress=cb)
    if rank != 0:
        return
    if as_json:
        out.print_json(json.dumps(summary))
        return
    c = summary["collapse_check"]
    out.print(f"run written: {summary['run']}  ({summary['steps']} steps on {summary['n_train']} images; "
              f"r lowers the denoising error by {100 * c['relative_gain']:.1f}% on {c['on']} images, "
              f"feature spread {c['feature_spread']:.3g})", highlight=False, soft_wrap=True)
