"""``pretrain``: a cache's images (labels never read) + a pretraining method -> a run folder.

The method (``medclf.methods.repdiff``) owns the model, objective and checks; this picks the images
and runs the shared flow (``medclf.training.fit``). The run holds config.json (kind "pretrain":
encoder name/size/channels, preprocessing, cache fingerprint, seed, collapse check),
model.safetensors (EMA of the whole model) and the method's exports (encoder.safetensors).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from medclf.data.cache import open_cache
from medclf.data.dataset import CacheDataset
from medclf.errors import MedclfError
from medclf.methods.repdiff import PretrainConfig
from medclf.runs import data_record
from medclf.training.fit import finish, fit, method_for, resolve_resume, resumed
from medclf.training.loop import ProgressFn, TrainConfig, resolve_device


def pretrain(cache_path: str | Path, out: str | Path, cfg: PretrainConfig, train_cfg: TrainConfig,
             resume: bool | str = False, progress: ProgressFn | None = None, method_name: str = "repdiff",
             asked: dict | None = None, log: str | None = None) -> dict:
    """Pretrain on the cache's ``cfg.split`` images; check the result on held-out images; write the run.

    ``resume``/``asked``/``log`` as in ``finetune``."""
    out = Path(out)
    cache = open_cache(cache_path)
    options = asdict(cfg)
    saved: dict = {}
    resume, unfinished_ok = resolve_resume(out, resume)
    if resume:
        saved, train_cfg = resumed(out, cache, "pretrain", train_cfg, asked)
        method_name, options = saved["method"], saved["method_config"]
    method = method_for(method_name, options, "pretrain")
    split = method.config.split
    if split not in ("train", "all"):
        raise MedclfError(f"unknown --split {split!r} (train, all)")
    ds = CacheDataset(cache, split=None if split == "all" else "train")
    if len(ds) == 0:
        raise MedclfError(f"the cache has no {split} items to pretrain on", cache.path)
    record = {**data_record(cache), "classes": cache.classes}  # classes: informational, never read
    start = saved.get("start", (saved.get("encoder") or {}).get("start")) if resume else None
    done = fit(method, ds, 0, out, record, train_cfg, resume=resume, progress=progress, start=start,
               unfinished_ok=unfinished_ok, log=log)
    result = done.result
    summary = {"run": str(out), "steps": done.train_cfg.steps, "n_train": len(ds), "rank": result["rank"],
               "world_size": result["world_size"], "start": done.record.get("start"),
               "resumed_from": result.get("resumed_from"), "damaged_checkpoints": result.get("damaged_checkpoints", [])}
    if not done.is_writer:
        return summary
    check_ds = CacheDataset(cache, split="val")
    if len(check_ds) < 2 or split == "all":
        check_ds = ds  # nothing held out: check on training images (recorded as such)
    idx = torch.linspace(0, len(check_ds) - 1, min(len(check_ds), 128)).long().unique()
    images = torch.stack([check_ds[int(i)]["image"] for i in idx])
    checks = method.check(done.model, images, resolve_device(done.train_cfg.device), done.train_cfg.seed)
    for c in checks.values():
        c["on"] = "val" if check_ds is not ds else "train"
    finish(done, **checks)
    summary.update(checks)
    return summary
