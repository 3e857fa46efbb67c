"""The one training loop every method uses.

Seeded and stateless per step (each step's randomness comes from a generator seeded by
(seed, rank, step), each epoch's order from DistributedSampler(seed, epoch)), so ``--resume``
continues bit-for-bit on CPU from model + EMA + optimizer state alone. AMP on CUDA, EMA (timm's
``ModelEmaV3``), gradient clipping, cosine LR with linear warm-up, atomic safetensors checkpoints,
``metrics.jsonl``; runs unchanged under ``torchrun`` (DDP, rank-0-only writes). Under
``torchrun --max-restarts N`` with ``--resume auto`` a restarted job continues from its last
checkpoint: rank 0 writes it (temp folder + rename) while the others wait at a barrier, and on
restart rank 0 picks the checkpoint every rank loads.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medclf.atomic import atomic_write_text
from medclf.data.cache import to_unit_float
from medclf.errors import MedclfError
from medclf.io.weights import load_tensors, save_tensors
from medclf.methods.base import LossFn
from medclf.runs import CHECKPOINTS, METRICS, checkpoint_dirs, commit_checkpoint
from medclf.training.tracking import Tracker


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


def init_distributed() -> None:
    """Join torchrun's process group once (from torchrun's env: MASTER_ADDR/PORT, RANK, WORLD_SIZE).

    Gloo carries CPU tensors and NCCL CUDA ones, so the resume decision (a CPU broadcast made before
    the training device is known) and DDP on either device share one group."""
    rank, world, _ = distributed_env()
    if world == 1 or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend)  # env://: rank 0 hosts a store of its own
        return
    from datetime import timedelta

    wait = timedelta(minutes=30)  # torch's own default for joining a process group
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=wait)
    session = _fresh_session(store, rank, world, wait.total_seconds())
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"medclf/{session}/", store), rank=rank,
                            world_size=world, timeout=wait)


def _fresh_session(store: Any, rank: int, world: int, timeout_s: float) -> str:
    """A store namespace no earlier attempt used, agreed by every rank of this one.

    torchrun's agent keeps one store for all restarts (torch >= 2.5, pytorch#135712): joining the
    group in it directly, a restarted rank reads the addresses its killed predecessors left there
    and gloo/NCCL fail to connect ("Connection refused"). Rank 0 draws a session id and gives it to
    each rank that echoes the fresh nonce it just posted, so no rank can take a stale answer."""
    import secrets

    mine, deadline = secrets.token_hex(8), time.monotonic() + timeout_s
    hello, answer, joined = "medclf/hello/{}", "medclf/session/{}", "medclf/joined/{}"
    if rank != 0:
        store.set(hello.format(rank), mine)
    waiting = set(range(1, world)) if rank == 0 else {0}
    while waiting:
        for r in sorted(waiting):
            if rank == 0 and store.check([hello.format(r)]):
                store.set(answer.format(r), f"{store.get(hello.format(r)).decode()}:{mine}")
                if store.check([joined.format(r)]) and store.get(joined.format(r)).decode() == mine:
                    waiting.discard(r)
            elif rank != 0 and store.check([answer.format(rank)]):
                nonce, _, session = store.get(answer.format(rank)).decode().partition(":")
                if nonce == mine:
                    store.set(joined.format(rank), session)
                    return session
        if time.monotonic() > deadline:
            who = f"ranks {sorted(waiting)} did not join" if rank == 0 else "rank 0 did not answer"
            raise MedclfError(f"rank {rank}: {who} within {timeout_s:.0f} s (torchrun's store at "
                              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})")
        time.sleep(0.02)
    return mine


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself outside torchrun): one decision about the
    run folder, never one per rank that could differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
          progress: ProgressFn | None = None, tracker: Tracker | None = None) -> dict:
    """Train ``model`` in place; return the EMA weights (a state dict) and write checkpoints to ``run_dir``.

    ``tracker`` (``medclf.training.tracking``, any kind) gets what ``metrics.jsonl`` gets, from rank 0.

    ``loss_fn(model, batch, generator)`` is the method's objective; every random draw inside it
    must use ``generator`` so the run is reproducible and resumable. ``batch["step"]`` is the global
    step (an int) for losses that change over training.
    """
    from timm.utils import ModelEmaV3

    rank, world, local_rank = distributed_env()
    device = resolve_device(cfg.device)
    init_distributed()
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
        start, damaged = _resume_from(run_dir, model, ema.module, opt, rank)
    elif from_rank0(bool(checkpoint_dirs(run_dir))):
        raise MedclfError("this run already has checkpoints: pass --resume to continue it, or choose a new --out", run_dir)
    if rank == 0:
        _truncate_metrics(run_dir / METRICS, start)
    if tracker is not None:
        tracker.begin(start)  # a resumed run's tracker drops what an interrupted one logged past ``start``
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
                if tracker is not None:
                    tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(run_dir, step, model, ema.module, opt, cfg, rank, world)
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


_LOAD_ERRORS = (MedclfError, OSError, ValueError, KeyError, RuntimeError)


def _why(e: Exception) -> str:
    why = e.message.split(";")[0] if isinstance(e, MedclfError) else f"{type(e).__name__}: {e}"
    return " ".join(why.split())[:120]


def _load_checkpoint(ck: Path, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Model, EMA and optimizer state of one checkpoint folder; returns its step."""
    state = json.loads((ck / "state.json").read_text())
    tensors = [load_tensors(ck / f) for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")]
    model.load_state_dict(tensors[0])
    ema.load_state_dict(tensors[1])
    _load_optimizer(opt, tensors[2], state["param_groups"])
    return int(state["step"])


def _newest_intact(run_dir: Path, model: nn.Module, ema: nn.Module,
                   opt: torch.optim.Optimizer) -> tuple[str, int, list[str]]:
    """Load the newest intact checkpoint; a damaged one (truncated by a crash or a full disk) is skipped
    and reported, never mistaken for a foreign file. Returns (its name, its step, the damaged ones with why)."""
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        raise MedclfError("nothing to resume: no checkpoint in this run", run_dir)
    damaged = []
    for ck in reversed(ckpts):
        try:
            return ck.name, _load_checkpoint(ck, model, ema, opt), damaged
        except _LOAD_ERRORS as e:
            damaged.append(f"{ck.name}: damaged ({_why(e)})")
    raise MedclfError(f"every checkpoint of this run is damaged: {'; '.join(damaged)}", run_dir)


def _resume_from(run_dir: Path, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
                 rank: int = 0) -> tuple[int, list[str]]:
    """Rank 0 picks the newest intact checkpoint and every other rank loads that same one (by name,
    broadcast), so after a torchrun restart all ranks continue from one step. Returns (step, damaged)."""
    picked: dict = {}
    if rank == 0:
        try:
            name, step, damaged = _newest_intact(run_dir, model, ema, opt)
            picked = {"name": name, "step": step, "damaged": damaged}
        except MedclfError as e:
            picked = {"error": e.message}  # every rank raises it, none waits for a partner that left
    picked = from_rank0(picked)
    if "error" in picked:
        raise MedclfError(picked["error"], run_dir)
    if rank != 0:
        ck = run_dir / CHECKPOINTS / picked["name"]
        try:
            step = _load_checkpoint(ck, model, ema, opt)
        except _LOAD_ERRORS as e:
            raise MedclfError(f"rank {rank} cannot read {picked['name']}, the checkpoint rank 0 resumes from "
                              f"({_why(e)}): every node must see the same run folder (a shared file system)",
                              run_dir) from None
        if step != picked["step"]:
            raise MedclfError(f"rank {rank} reads step {step} in {picked['name']}, rank 0 step {picked['step']}: every "
                              "node must see the same run folder (a shared file system)", run_dir)
    return picked["step"], picked["damaged"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop curve points past the resumed step (and a line torn by a killed writer), so a resumed run's
    curve matches an uninterrupted one."""
    if not path.exists():
        return

    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    keep = [line for line in path.read_text(errors="replace").splitlines() if line.strip() and kept(line)]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _checkpoint(run_dir: Path, step: int, model: nn.Module, ema: nn.Module, opt, cfg: TrainConfig, rank: int,
                world: int) -> None:
    """Rank 0 writes checkpoint ``step`` (a temp folder, then a rename); every rank waits at a barrier
    until it is complete, so a worker that dies past this point costs at most the steps since it."""
    if rank == 0:
        _save_checkpoint(run_dir, step, model, ema, opt, cfg)
    if world > 1:
        dist.barrier()


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
