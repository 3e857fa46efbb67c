"""The one run flow ``finetune`` and ``pretrain`` share: resume or start, train, save, check, record.

    resume?  -> the run's own recorded method and training config (``--steps`` may extend it)
    build    -> seeded model; on a new run the method's starting weights (recorded, never silent)
    open     -> run folder + config.json before the first step (rank 0 only)
    train    -> the shared loop (checkpoints, metrics.jsonl)
    save     -> EMA weights + the method's exports, atomically
    finish   -> the caller's post-training step (calibration / collapse check) into config.json
    verify   -> the run just written must load
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from medclf import __version__
from medclf.methods import Method, get_method
from medclf.runs import build_from_run, load_run, open_run, resumed_record, save_weights, should_resume, write_config
from medclf.training.loop import (ProgressFn, TrainConfig, check_trainable, distributed_env, from_rank0,
                                  init_distributed, train)
from medclf.training.tracking import NullTracker, Tracker, make_tracker, numeric, run_params


@dataclass
class Fit:
    """What a finished (or, on ranks > 0, joined) fit hands back to its command."""

    run: Path
    method: Method
    model: nn.Module
    record: dict
    train_cfg: TrainConfig
    result: dict = field(default_factory=dict)
    tracker: Tracker = field(default_factory=NullTracker)  #: ``--log``: gets the post-training checks in ``finish``

    @property
    def is_writer(self) -> bool:
        return self.result.get("rank", 0) == 0


def resumed(out: Path, cache, kind: str, train_cfg: TrainConfig, asked: dict | None = None) -> tuple[dict, TrainConfig]:
    """(saved config, its training config with ``steps`` at least the asked-for and this machine's device/workers).

    ``asked``: the options given explicitly (the CLI's); without ``steps`` there, the recorded steps stand."""
    saved = resumed_record(out, cache, kind, asked)
    steps = saved["train"]["steps"] if asked is not None and "steps" not in asked else train_cfg.steps
    cfg = TrainConfig(**{**saved["train"], "steps": max(steps, saved["train"]["steps"]),
                         "device": train_cfg.device, "num_workers": train_cfg.num_workers})
    return saved, cfg


def fit(method: Method, dataset: Dataset, n_classes: int, out: Path, record: dict, train_cfg: TrainConfig, *,
        resume: bool, progress: ProgressFn | None = None, start: dict | None = None,
        load_start: Callable[[nn.Module], dict] | None = None, unfinished_ok: bool = False,
        log: str | None = None) -> Fit:
    """Build, (start,) open, train and save a run; returns the EMA model for the caller's checks.

    ``log``: ``--log tensorboard|mlflow`` (``medclf.training.tracking``; rank 0 logs, ``finish`` closes it).

    ``record``: the config.json entries the caller knows (data, classes, ...); ``start`` on resume is
    the recorded start; ``load_start(model)`` replaces ``method.prepare`` (``finetune --init``).
    """
    C, H, W = record["shape"]
    rank, world, _ = distributed_env()
    check_trainable(dataset, train_cfg, world)  # before anything is written
    tracker = make_tracker(log, out, rank)  # so is a missing tracking package (it writes on first use)
    torch.manual_seed(train_cfg.seed)  # the random init is the seed's ("untrained" zero-shot baseline = it)
    model = method.build(C, n_classes, H)
    if not resume:
        start = load_start(model) if load_start else method.prepare(model, C, H)
    record = {"kind": method.kind, "method": method.name, "method_config": method.config_dict(),
              "train": asdict(train_cfg), "n_train": len(dataset), "seed": train_cfg.seed, "start": start,
              **method.record(model, C, H, start), **record}
    if rank == 0:
        open_run(out, record, resume, unfinished_ok)
    loss = method.loss_fn(n_classes)
    if record.get("resize"):
        loss = _resized_loss(loss, record["resize"]["to"])
    tracker.log_params({**run_params(record), "medclf_version": __version__})
    try:
        result = train(model, loss, dataset, train_cfg, out, resume=resume, progress=progress, tracker=tracker)
    except BaseException:
        tracker.close(failed=True)
        raise
    done = Fit(run=out, method=method, model=model, record=record, train_cfg=train_cfg, result=result, tracker=tracker)
    if rank == 0:
        save_weights(out, method, result["ema"])
        model.load_state_dict(result["ema"])
    return done


def _resized_loss(loss, size: int):
    """The method's loss on images resized to the model's size on the device (``finetune --image-size``)."""
    from medclf.scoring.resize import resize_images

    def resized(model: nn.Module, batch: dict, g: torch.Generator) -> torch.Tensor:
        return loss(model, {**batch, "image": resize_images(batch["image"], size)}, g)

    return resized


def finish(done: Fit, **entries: Any) -> dict:
    """Write the final config.json (the checks' results added) and make sure the run loads."""
    record = {**done.record, **entries, "world_size": done.result["world_size"]}
    write_config(done.run, record)
    build_from_run(load_run(done.run))  # the run we just wrote must load
    done.tracker.log_metrics(numeric(entries), done.train_cfg.steps)  # calibration / collapse check, at the last step
    done.tracker.close()
    return record


def resolve_resume(out: Path, resume: bool | str) -> tuple[bool, bool]:
    """(resume?, may a config without checkpoints be replaced?) for ``resume`` = True, False or "auto".

    Under torchrun rank 0 decides and every rank gets its answer: after a restart all ranks resume
    (or all start) together, whatever each one would have seen of the run folder."""
    if resume not in (True, False, "auto"):
        from medclf.errors import MedclfError

        raise MedclfError(f"--resume {resume!r}: expected no value (resume) or 'auto'")
    init_distributed()
    return from_rank0(should_resume(out, resume)), resume == "auto"


def method_for(name: str, options: dict, kind: str) -> Method:
    """A registered method of ``kind`` (a pretraining method cannot be fine-tuned, and the reverse)."""
    from medclf.errors import MedclfError

    cls = get_method(name)
    if cls.kind != kind:
        cmd = "medclf pretrain" if cls.kind == "pretrain" else "medclf finetune"
        raise MedclfError(f"--method {name} is a {cls.kind} method: run it with `{cmd}`")
    return cls.from_options(options)
