"""The one training loop every method uses.

Seeded and stateless per step (each step's randomness comes from a generator seeded by
(seed, rank, step), each epoch's order from DistributedSampler(seed, epoch)), so ``--resume``
continues bit-for-bit on CPU from model + EMA + optimizer state alone. AMP on CUDA, EMA (timm's
``ModelEmaV3``), gradient clipping, cosine LR with linear warm-up, atomic safetensors checkpoints,
``metrics.jsonl``; runs unchanged under ``torchrun`` (DDP, rank-0-only writes).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medclf.data.cache import to_unit_float
from medclf.errors import MedclfError
from medclf.io.weights import load_tensors, save_tensors
from medclf.methods.base import LossFn
from medclf.runs import CHECKPOINTS, METRICS, checkpoint_dirs, commit_checkpoint


@dataclass
class TrainConfig:
    steps: int = 1000  #: optimiser steps in total
    batch_size: int = 32  #: per process
    lr: float = 1e-4  #: peak learning rate (Favero et al.: Adam 1e-4)
    weight_decay: float = 0.0
    warmup_steps: int = 100  #: linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  #: max global grad norm (0: off)
    ema_decay: float = 0.999  #: EMA of weights used for inference: the decay it warms up to (see ``ema_warmup``)
    #: EMA decay rises as 1 - (1 + step)^-3/4 up to ``ema_decay`` (timm's warm-up; 0.99 at ~460 steps,
    #: 0.999 at ~10k). Without it a fixed 0.999 keeps 0.999^steps of the *random initial* weights: 74%
    #: after 300 steps, 45% after 800 -- the run's saved model was mostly untrained (issue #17).
    ema_warmup: bool = True
    checkpoint_every: int = 500  #: steps between resumable checkpoints
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  #: auto | cpu | cuda
    amp: str = "auto"  #: auto (bf16/fp16 on CUDA, off on CPU) | bf16 | fp16 | off
    num_workers: int = 0  #: DataLoader workers
    label_fraction: float = 1.0  #: train on this seeded, class-stratified share of the labelled train split


ProgressFn = Callable[[dict], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MedclfError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise MedclfError(f"unknown --device {name!r} (auto, cpu, cuda)")
    return torch.device(name)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def _collate(items: list[dict]) -> dict:
    from medclf.data.dataset import collate

    b = collate(items)
    return {"image": b["image"], "label": b["label"], "labels": b["labels"]}


def train(model: nn.Module, loss_fn: LossFn, dataset: Dataset, cfg: TrainConfig, run_dir: Path, resume: bool = False,
          progress: ProgressFn | None = None) -> dict:
    """Train ``model`` in place; return the EMA weights (a state dict) and write checkpoints to ``run_dir``.

    ``loss_fn(model, batch, generator)`` is the method's objective; every random draw inside it
    must use ``generator`` so the run is reproducible and resumable. ``batch["step"]`` is the global
    step (an int) for losses that change over training.
    """
    from timm.utils import ModelEmaV3

    rank, world, local_rank = distributed_env()
    device = resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    check_trainable(dataset, cfg)
    torch.manual_seed(cfg.seed)
    model.to(device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup, warmup_power=3 / 4)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start = 0
    run_dir = Path(run_dir)
    damaged: list[str] = []
    if resume:
        start, damaged = _resume_from(run_dir, model, ema.module, opt)
    elif checkpoint_dirs(run_dir):
        raise MedclfError("this run already has checkpoints: pass --resume to continue it, or choose a new --out", run_dir)
    if rank == 0:
        _truncate_metrics(run_dir / METRICS, start)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // cfg.batch_size
    if per_epoch == 0:
        raise MedclfError(f"batch size {cfg.batch_size} x {world} process(es) exceeds the training set ({len(dataset)})")
    step = start
    t_last, n_last = time.perf_counter(), 0
    model.train()
    while step < cfg.steps:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * cfg.batch_size : per_epoch * cfg.batch_size]
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.num_workers,
                            collate_fn=_collate, drop_last=True, pin_memory=device.type == "cuda")
        for batch in loader:
            if step >= cfg.steps:
                break
            # images travel as stored (int16) and are scaled to [0, 1] on the device
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch["image"] = to_unit_float(batch["image"])
            batch["step"] = step  # for schedules inside a loss (DiffMIC's DCG warm-up); resumes with the run
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(net, batch, gen)
            if not torch.isfinite(loss):
                raise MedclfError(f"loss became {loss.item()} at step {step}: lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            step += 1
            ema.update(model, step=step)  # step = updates so far: the first one copies the weights
            n_last += cfg.batch_size * world
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                now = time.perf_counter()
                rec = {"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                       "samples_per_s": n_last / max(now - t_last, 1e-9)}
                t_last, n_last = now, 0
                with open(run_dir / METRICS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                if progress:
                    progress(rec)
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                _save_checkpoint(run_dir, step, model, ema.module, opt, cfg)
    result = {"ema": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}, "world_size": world}
    if world > 1:
        # Both ranks must hold identical weights after DDP: compare a checksum across processes.
        s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().to(device)
        all_s = [torch.zeros_like(s) for _ in range(world)]
        dist.all_gather(all_s, s)
        result["rank_checksums"] = [float(x) for x in all_s]
        dist.barrier()
    result["rank"] = rank
    result["resumed_from"], result["damaged_checkpoints"] = (start if resume else None), damaged
    return result


def check_trainable(dataset: Dataset, cfg: TrainConfig, world: int | None = None) -> None:
    """What ``train`` would refuse, checked before a run folder is written (a refused command writes nothing)."""
    world = world or distributed_env()[1]
    if len(dataset) < cfg.batch_size:
        raise MedclfError(f"only {len(dataset)} training items, fewer than --batch-size {cfg.batch_size}")
    if len(dataset) // world < cfg.batch_size:
        raise MedclfError(f"batch size {cfg.batch_size} x {world} process(es) exceeds the training set ({len(dataset)})")


def _resume_from(run_dir: Path, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[str]]:
    """Load the newest intact checkpoint; a damaged one (truncated by a crash or a full disk) is skipped
    and reported, never mistaken for a foreign file. Returns (its step, the damaged ones with why)."""
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        raise MedclfError("nothing to resume: no checkpoint in this run", run_dir)
    damaged = []
    for ck in reversed(ckpts):
        try:
            state = json.loads((ck / "state.json").read_text())
            tensors = [load_tensors(ck / f) for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")]
            model.load_state_dict(tensors[0])
            ema.load_state_dict(tensors[1])
            _load_optimizer(opt, tensors[2], state["param_groups"])
            return int(state["step"]), damaged
        except (MedclfError, OSError, ValueError, KeyError, RuntimeError) as e:
            why = e.message.split(";")[0] if isinstance(e, MedclfError) else f"{type(e).__name__}: {e}"
            damaged.append(f"{ck.name}: damaged ({' '.join(why.split())[:120]})")
    raise MedclfError(f"every checkpoint of this run is damaged: {'; '.join(damaged)}", run_dir)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop curve points past the resumed step, so a resumed run's curve matches an uninterrupted one."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _save_checkpoint(run_dir: Path, step: int, model: nn.Module, ema: nn.Module, opt, cfg: TrainConfig) -> None:
    final = run_dir / CHECKPOINTS / f"step-{step:07d}"
    tmp = run_dir / CHECKPOINTS / f".tmp-step-{step:07d}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_tensors(tmp / "model.safetensors", model.state_dict())
    save_tensors(tmp / "ema.safetensors", ema.state_dict())
    tensors, groups = _optimizer_tensors(opt)
    save_tensors(tmp / "optimizer.safetensors", tensors)
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, "train": asdict(cfg)}))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    commit_checkpoint(tmp, final)
