"""``finetune``: a cache + a method -> a run directory (config, EMA weights, calibration, curve)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from medclf.data.cache import open_cache
from medclf.errors import MedclfError
from medclf.training.loop import ProgressFn, TrainConfig, distributed_env, resolve_device, train
from medclf.training.run import CONFIG, WEIGHTS, load_run, save_tensors, write_config


def _val_tensors(cache, max_items: int = 512, multilabel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation images and targets: (N,) class indices, or (N, L) with NaN for unknown multi-label targets."""
    from medclf.data.dataset import CacheDataset

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
             resume: bool = False, progress: ProgressFn | None = None, calibrate: bool = True,
             init: str | Path | None = None) -> dict:
    """Train ``method_name`` on the cache's train split; calibrate on its val split; write the run.

    With ``resume`` the run's own recorded configuration is used (``--steps`` may extend it).
    ``init``: a ``medclf pretrain`` run whose encoder starts ``model.backbone`` (sets ``backbone``).
    Returns a summary (run path, steps, final loss, calibration, DDP rank checksums).
    """
    from medclf.data.dataset import CacheDataset
    from medclf.methods import get_method

    out = Path(out)
    cache = open_cache(cache_path)
    # single-label classes, else independent binary labels (CheXpert's observations), else nothing to learn
    task = "single" if cache.classes else "multilabel" if cache.label_names else None
    if task is None:
        raise MedclfError("this cache has no labels to train on (ingested without labels?)", cache.path)
    classes = cache.classes if task == "single" else cache.label_names
    if resume:
        cfg_path = out / CONFIG
        if not cfg_path.exists():
            raise MedclfError("nothing to resume: no config.json", out)
        saved = json.loads(cfg_path.read_text())
        if saved["cache_fingerprint"] != cache.fingerprint:
            raise MedclfError(f"this run was trained on cache {saved['cache_fingerprint']}, not {cache.fingerprint}", out)
        method_name, method_options = saved["method"], saved["method_config"]
        steps = train_cfg.steps
        train_cfg = TrainConfig(**{**saved["train"], "steps": max(steps, saved["train"]["steps"]),
                                   "device": train_cfg.device, "num_workers": train_cfg.num_workers})
    init_info, init_weights = (saved.get("init") if resume else None), None
    if init is not None and not resume:
        method_options, init_weights, init_info = _init_options(init, method_name, method_options, cache)
    method = get_method(method_name).from_options(method_options)
    if task == "multilabel" and not method.supports_multilabel:
        raise MedclfError(f"--method {method.name} learns one class per image, but this cache is multi-label "
                          f"({len(classes)} labels): train --method baseline on it, or ingest a single-label preset "
                          "(e.g. --dataset chexpert-effusion)", cache.path)
    method.task = task
    rank, world, _ = distributed_env()
    train_ds = CacheDataset(cache, split="train", labelled_only=True, multilabel=task == "multilabel")
    if len(train_ds) == 0:
        raise MedclfError("the cache's train split has no labelled items", cache.path)
    if train_cfg.label_fraction < 1.0:
        train_ds = label_subset(train_ds, train_cfg.label_fraction, train_cfg.seed)
    C, H, W = cache.shape
    torch.manual_seed(train_cfg.seed)
    model = method.build(C, len(classes), H)
    if not resume:
        method.prepare(model, C, H)
        if init_weights is not None:
            model.backbone.load_state_dict(init_weights)  # the pretrained encoder, exactly (strict)
    base_config = {
        "method": method.name,
        "method_config": method.config_dict(),
        "train": asdict(train_cfg),
        "cache": str(cache.path),
        "cache_fingerprint": cache.fingerprint,
        "task": task,
        "classes": classes,
        "shape": [C, H, W],
        "preprocessing": cache.manifest["preprocessing"],
        "dataset": cache.manifest["dataset"],
        "split_seed": cache.manifest.get("seed", 0),
        "n_train": len(train_ds),
        "seed": train_cfg.seed,
        **({"init": init_info} if init_info else {}),
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (out / WEIGHTS).exists():
            raise MedclfError("already holds a trained model; choose a new --out (or --resume to train longer)", out)
        write_config(out, base_config)
    result = train(model, method.loss_fn(len(classes)), train_ds, train_cfg, out, resume=resume, progress=progress)
    summary = {"run": str(out), "steps": train_cfg.steps, "rank": result["rank"], "world_size": result["world_size"],
               "rank_checksums": result.get("rank_checksums")}
    if rank != 0:
        return summary
    ema = result["ema"]
    save_tensors(out / WEIGHTS, ema, metadata={"method": method.name})
    calibration: dict = {}
    if calibrate:
        device = resolve_device(train_cfg.device)
        model.load_state_dict(ema)
        images, labels = _val_tensors(cache, multilabel=task == "multilabel")
        if len(labels) >= 2:
            calibration = method.calibrate(model, classes, images, labels, device)
    write_config(out, {**base_config, "calibration": calibration, "world_size": result["world_size"],
                       "rank_checksums": result.get("rank_checksums")})
    summary["calibration"] = calibration
    load_run(out)  # the run we just wrote must load
    return summary


def _init_options(init: str | Path, method_name: str, options: dict, cache) -> tuple[dict, dict, dict]:
    """``--init RUN``: (options with ``backbone`` = the pretrained encoder's name, its weights, what to record)."""
    from dataclasses import fields

    from medclf.methods import get_method
    from medclf.training.pretrain import load_pretrained_encoder

    name, weights, run = load_pretrained_encoder(init)
    if "backbone" not in {f.name for f in fields(get_method(method_name).Config)}:
        raise MedclfError(f"--init needs a method with an image encoder (backbone); --method {method_name} has none")
    if options.get("backbone") not in (None, name):
        raise MedclfError(f"--backbone {options['backbone']} differs from the --init run's encoder {name}", run.path)
    if options.get("pretrained") or options.get("encoder_weights"):
        raise MedclfError("--init already sets the encoder's weights: drop --pretrained / --encoder-weights", run.path)
    if list(run.config["shape"]) != list(cache.shape):
        raise MedclfError(f"the --init run was pretrained on {run.config['shape']} (C, H, W) images, this cache holds "
                          f"{list(cache.shape)}", run.path)
    return {**options, "backbone": name}, weights, {"run": str(run.path), "encoder": name,
                                                   "cache_fingerprint": run.config.get("cache_fingerprint")}


def load_model(run_path: str | Path, device: torch.device | None = None):
    """(run, method, model on device) for a finished run; weights via safetensors only."""
    from medclf.methods import get_method

    run = load_run(run_path)
    if run.config.get("kind") == "pretrain":
        raise MedclfError("a pretraining run holds an encoder, not a classifier: use `medclf eval --zero-shot`, "
                          "`medclf sample` or `medclf finetune --init RUN`", run.path)
    method = get_method(run.method).from_options(run.config["method_config"])
    method.task = run.config.get("task", "single")
    C, H, _ = run.config["shape"]
    model = method.build(C, len(run.classes), H)
    try:
        model.load_state_dict(run.weights())
    except RuntimeError as e:
        raise MedclfError(f"weights do not fit the recorded model ({' '.join(str(e).split())[:120]})", run.path) from None
    device = device or torch.device("cpu")
    return run, method, model.to(device).eval()
