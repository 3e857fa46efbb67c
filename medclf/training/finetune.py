"""``finetune``: a cache + a classifier method -> a run directory (config, EMA weights, calibration, curve)."""

from __future__ import annotations

from pathlib import Path

import torch

from medclf.data.cache import open_cache
from medclf.data.dataset import CacheDataset
from medclf.errors import MedclfError
from medclf.runs import check_compatible, data_record, load_init_encoder
from medclf.training.fit import finish, fit, method_for, resolve_resume, resumed
from medclf.training.loop import ProgressFn, TrainConfig, resolve_device


def _val_tensors(cache, max_items: int = 512, multilabel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation images and targets: (N,) class indices, or (N, L) with NaN for unknown multi-label targets."""
    ds = CacheDataset(cache, split="val", labelled_only=True, multilabel=multilabel)
    n = min(len(ds), max_items)
    if n == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    items = [ds[i] for i in range(n)]
    y = torch.stack([it["labels"] for it in items]) if multilabel else torch.tensor([it["label"] for it in items])
    return torch.stack([it["image"] for it in items]), y


def label_subset(ds, fraction: float, seed: int):
    """A seeded, class-stratified share of a labelled dataset (at least one item per class): label-scarce studies."""
    import numpy as np
    from torch.utils.data import Subset

    if not 0 < fraction <= 1:
        raise MedclfError(f"--label-fraction {fraction} must be in (0, 1]")
    y = ds.targets
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep += rng.permutation(idx)[: max(1, int(round(fraction * len(idx))))].tolist()
    return Subset(ds, sorted(keep))


def finetune(cache_path: str | Path, method_name: str, out: str | Path, method_options: dict, train_cfg: TrainConfig,
             resume: bool | str = False, progress: ProgressFn | None = None, calibrate: bool = True,
             init: str | Path | None = None, asked: dict | None = None, image_size: int | None = None,
             log: str | None = None) -> dict:
    """Train ``method_name`` on the cache's train split; calibrate on its val split; write the run.

    With ``resume`` the run's own recorded configuration is used (``--steps`` may extend it; ``asked``,
    the options given explicitly, must agree with it); ``resume="auto"`` starts when there is nothing to resume.
    ``init``: a ``medclf pretrain`` run whose encoder starts ``model.backbone`` (sets ``backbone``).
    ``image_size``: train at this size from a cache of another (resized on the device; recorded, and
    repeated by calibration, eval, classify and explain).
    ``log``: ``tensorboard`` | ``mlflow`` tracking of the curve, config and calibration (``medclf.training.tracking``).
    Returns a summary (run path, steps, how the weights started, calibration, DDP rank checksums).
    """
    out = Path(out)
    cache = open_cache(cache_path)
    # single-label classes, else independent binary labels (CheXpert's observations), else nothing to learn
    task = "single" if cache.classes else "multilabel" if cache.label_names else None
    if task is None:
        raise MedclfError("this cache has no labels to train on (ingested without labels?)", cache.path)
    classes = cache.classes if task == "single" else cache.label_names
    saved: dict = {}
    resume, unfinished_ok = resolve_resume(out, resume)
    if resume:
        saved, train_cfg = resumed(out, cache, "classifier", train_cfg, asked)
        method_name, method_options = saved["method"], saved["method_config"]
    init_info, load_start = saved.get("init"), None
    if init is not None and not resume:
        method_options, load_start, init_info = _init_options(init, method_name, method_options, cache)
    method = method_for(method_name, method_options, "classifier")
    if task == "multilabel" and not method.supports_multilabel:
        raise MedclfError(f"--method {method.name} learns one class per image, but this cache is multi-label "
                          f"({len(classes)} labels): train --method baseline on it, or ingest a single-label preset "
                          "(e.g. --dataset chexpert-effusion)", cache.path)
    method.task = task
    train_ds = CacheDataset(cache, split="train", labelled_only=True, multilabel=task == "multilabel")
    if len(train_ds) == 0:
        raise MedclfError("the cache's train split has no labelled items", cache.path)
    if train_cfg.label_fraction < 1.0:
        train_ds = label_subset(train_ds, train_cfg.label_fraction, train_cfg.seed)
    record = {**data_record(cache), "task": task, "classes": classes, **({"init": init_info} if init_info else {}),
              **_resize_record(cache, saved if resume else None, image_size, init)}
    done = fit(method, train_ds, len(classes), out, record, train_cfg, resume=resume, progress=progress,
               start=saved.get("start"), load_start=load_start, unfinished_ok=unfinished_ok, log=log)
    result = done.result
    summary = {"run": str(out), "steps": done.train_cfg.steps, "rank": result["rank"], "world_size": result["world_size"],
               "rank_checksums": result.get("rank_checksums"), "start": done.record.get("start"),
               "resumed_from": result.get("resumed_from"), "damaged_checkpoints": result.get("damaged_checkpoints", [])}
    if not done.is_writer:
        return summary
    calibration: dict = {}
    if calibrate:
        images, labels = _val_tensors(cache, multilabel=task == "multilabel")
        if len(labels) >= 2:
            if "resize" in record:
                from medclf.scoring.resize import resize_images

                images = resize_images(images, record["resize"]["to"])
            calibration = method.calibrate(done.model, classes, images, labels, resolve_device(done.train_cfg.device))
    finish(done, calibration=calibration, rank_checksums=result.get("rank_checksums"))
    summary["calibration"] = calibration
    return summary


def _resize_record(cache, saved: dict | None, image_size: int | None, init) -> dict:
    """The run's model shape when it differs from the cache's: {"shape", "data_shape", "resize"} or {}."""
    from medclf.scoring.resize import RESIZE_MODE

    C, H, W = cache.shape
    if saved is not None:  # resume: the recorded size stands
        if image_size and image_size != saved["shape"][1]:
            raise MedclfError(f"--resume continues with the recorded configuration; --image-size {image_size} would "
                              f"change it (recorded: {saved['shape'][1]})")
        return {k: saved[k] for k in ("shape", "data_shape", "resize") if k in saved}
    if not image_size or image_size == H:
        return {}
    if image_size < 8:
        raise MedclfError(f"--image-size {image_size} is too small (8 px at least)")
    if init is not None:
        raise MedclfError("--init with an --image-size other than the cache's is not supported: ingest a cache at the "
                          "pretraining run's size")
    return {"shape": [C, image_size, image_size], "data_shape": [C, H, W], "resize": {"to": image_size, "mode": RESIZE_MODE}}


def _init_options(init: str | Path, method_name: str, options: dict, cache):
    """``--init RUN``: (options with ``backbone`` = the pretrained encoder's name, a loader of its
    weights into ``model.backbone`` (strict: exactly the encoder), what to record)."""
    from dataclasses import fields

    from medclf.methods import get_method

    name, weights, run = load_init_encoder(init)
    if "backbone" not in {f.name for f in fields(get_method(method_name).Config)}:
        raise MedclfError(f"--init needs a method with an image encoder (backbone); --method {method_name} has none")
    if options.get("backbone") not in (None, name):
        raise MedclfError(f"--backbone {options['backbone']} differs from the --init run's encoder {name}", run.path)
    if options.get("pretrained") or options.get("encoder_weights"):
        raise MedclfError("--init already sets the encoder's weights: drop --pretrained / --encoder-weights", run.path)
    check_compatible(run, cache, what="the --init run")

    def load_start(model: torch.nn.Module) -> dict:
        model.backbone.load_state_dict(weights)  # the pretrained encoder, exactly (strict)
        return {"init": "run", "file": str(run.path), "loaded": len(weights), "missing": [], "unexpected": []}

    return {**options, "backbone": name}, load_start, {"run": str(run.path), "encoder": name,
                                                       "cache_fingerprint": run.config.get("cache_fingerprint")}
