"""``eval``: a run scored on a cache split (or a raw dataset ingested with the run's preprocessing)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from medclf.data.cache import CacheInfo, open_cache, to_unit_float
from medclf.errors import MedclfError


#: presets read the folder of the dataset they are cut from
_PRESET_ROOTS = {"chexpert-effusion": "chexpert", "isic-melanoma": "isic"}


def data_root(dataset: str, data: str | Path | None) -> Path:
    """--data, else $MEDCLF_DATA/NAME (a preset's base dataset name), else a clear error."""
    if data:
        return Path(data)
    root = os.environ.get("MEDCLF_DATA")
    if not root:
        raise MedclfError(f"no data given: pass --data PATH (a cache or the {dataset} root) or set MEDCLF_DATA")
    return Path(root) / _PRESET_ROOTS.get(dataset, dataset)


def calibration_warnings(run_config: dict) -> list[str]:
    """The warnings ``finetune`` recorded when it calibrated the run (empty for runs from before them)."""
    cal = run_config.get("calibration") or {}
    health = cal.get("health") or {}
    return [f"at calibration: {w}" for w in health.get("warnings", [])]


def cache_for(run_config: dict, dataset: str, path: Path, workers: int = 0) -> CacheInfo:
    """``path`` itself if it is a cache, else ingest it with the run's preprocessing into a cache
    under ``$MEDCLF_CACHE`` (default ~/.cache/medclf) named by dataset + preprocessing, which the
    ingest fingerprint makes a no-op the second time. Either way the cache must fit the run
    (``runs.check_compatible``: shape, channels, preprocessing)."""
    from medclf.runs import check_compatible

    if (path / "manifest.json").exists():
        cache = open_cache(path)
        check_compatible(run_config, cache)
        return cache
    if not path.exists():
        raise MedclfError("data not found", path)
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig
    from medclf.privacy import pseudonym

    pre = PreprocessConfig.from_dict(run_config["preprocessing"])
    base = Path(os.environ.get("MEDCLF_CACHE", Path.home() / ".cache" / "medclf"))
    out = base / f"{dataset}-{pseudonym(str(path.resolve()), pre.fingerprint(), length=12)}"
    res = ingest(IngestConfig(sources=[path], out=out, dataset=dataset, preprocess=pre,
                              seed=run_config.get("split_seed", 0), workers=workers, overwrite=True))
    cache = open_cache(res.cache)
    check_compatible(run_config, cache)
    return cache


def score_split(scorer, cache: CacheInfo, split: str, batch_size: int = 64, progress=None, transform=None,
                share=None) -> dict | None:
    """Scores of every labelled item of a split: y, probs, pred, uncertainty, nfe, ids, seconds, and
    ``intervals`` ({"low", "high"}, each (N, K)) when the scorer gives per-class label intervals (DiffMIC).

    Multi-label scorers: y is (N, L) with NaN for unknown targets, pred (N, L) 0/1.

    ``transform`` maps a (B, C, H, W) float batch in [0, 1] to another (e.g. a corruption).

    ``share`` (a ``medclf.sharding.Share`` under torchrun): each rank scores its block of whole
    batches, exactly the batches one process would score (batch-dependent arithmetic and per-batch
    noise alike), and rank 0 gets every rank's scores in order; the other ranks get None.
    ``progress`` then counts this rank's block."""
    from medclf.data.dataset import CacheDataset

    multilabel = bool(getattr(scorer, "multilabel", False))
    ds = CacheDataset(cache, split=split, labelled_only=True, multilabel=multilabel)
    if len(ds) == 0:
        raise MedclfError(f"split {split!r} has no labelled items", cache.path)
    ys, probs, preds, nfe, ids = [], [], [], [], []
    unc: dict[str, list] = {}
    ivl: dict[str, list] = {}  # per-class label intervals, from samplers that give them
    t0 = time.perf_counter()
    lo, hi = (0, len(ds)) if share is None else share.bounds(len(ds), unit=batch_size)
    for s in range(lo, hi, batch_size):
        items = [ds[i] for i in range(s, min(s + batch_size, hi))]
        x = torch.stack([it["image"] for it in items])
        if transform is not None:
            x = transform(to_unit_float(x)).clamp(0, 1)
        p = scorer.predict(x)
        ys += [it["labels"].numpy() if multilabel else it["label"] for it in items]
        ids += [it["id"] for it in items]
        probs.append(p.probs.numpy())
        preds.append(p.pred.numpy())
        nfe.append(p.nfe.numpy())
        for k, v in p.uncertainty.items():
            unc.setdefault(k, []).append(v.numpy())
        for k in ("low", "high", "raw_low", "raw_high"):  # raw: before the conformal margin
            name = f"raw_interval_{k[4:]}" if k.startswith("raw") else f"interval_{k}"
            if name in p.extras:
                ivl.setdefault(k, []).append(p.extras[name].numpy())
        if progress:
            progress(min(s + batch_size, hi) - lo, hi - lo)
    if share is not None and share.distributed:
        parts = list(share.merged([(ys, ids, probs, preds, nfe, unc, ivl)]))  # rank order = batch order
        if not share.root:
            return None
        ys, ids = [y for p in parts for y in p[0]], [i for p in parts for i in p[1]]
        probs, preds, nfe = ([a for p in parts for a in p[k]] for k in (2, 3, 4))
        unc = {k: [a for p in parts for a in p[5].get(k, [])] for k in dict.fromkeys(k for p in parts for k in p[5])}
        ivl = {k: [a for p in parts for a in p[6].get(k, [])] for k in dict.fromkeys(k for p in parts for k in p[6])}
    out = {"y": np.array(ys), "probs": np.concatenate(probs), "pred": np.concatenate(preds),
           "uncertainty": {k: np.concatenate(v) for k, v in unc.items()}, "nfe": np.concatenate(nfe), "ids": ids,
           "seconds": time.perf_counter() - t0}
    if {"low", "high"} <= set(ivl):
        out["intervals"] = {k: np.concatenate(v) for k, v in ivl.items()}
    return out


def corruption_transform(spec: str | None):
    """``noise|blur|contrast[:SEVERITY]`` (``eval --corrupt``) -> a batch transform, or None for None."""
    if not spec:
        return None
    from medclf.evaluation.corruptions import corruption

    name, _, sev = spec.partition(":")
    try:
        severity = float(sev) if sev else None
    except ValueError:
        raise MedclfError(f"--corrupt {spec!r}: severity {sev!r} is not a number") from None
    return corruption(name, severity)


def evaluate_run(run, scorer, cache: CacheInfo, split: str, *, bootstrap: int = 1000, corrupt: str | None = None,
                 report: str | Path | None = None, progress=None, batch_size: int = 64, share=None) -> dict | None:
    """A run's metrics on a cache split (``medclf eval``), as one JSON-able dict.

    Single-label runs: ``classification_metrics`` (accuracy, balanced accuracy, macro-F1, AUROC, ECE,
    Brier, confusion matrix, bootstrap CIs), with the warnings ``finetune`` recorded at calibration
    ahead of the data's own. Multi-label runs: ``multilabel_metrics`` (per label, macro AUROC). Both
    add split, corruption, cache (path, fingerprint), model, NFE per image and timings.

    ``run``/``scorer`` come from ``medclf.inference.load_scorer``; ``corrupt`` is a
    ``corruption_transform`` spec applied to the images first; ``report`` a folder that receives
    metrics.json and the plots; ``progress(done, total)`` is called as batches are scored.

    ``share`` (torchrun's ranks, ``medclf.sharding.process_share``): the ranks score the split's
    batches between them and rank 0 computes the metrics on the gathered scores (the same as one
    process's) and writes the report; the other ranks return None. A ``--num-parts`` share is refused:
    metrics (AUROC, bootstrap CIs) need every score at once.
    """
    if share is not None and share.parts > 1:
        raise MedclfError("eval scores a whole split: metrics need every score at once; to spread eval over "
                          "processes, run it under torchrun (torchrun --nproc-per-node N -m medclf eval ...)")
    from medclf.evaluation.metrics import classification_metrics, multilabel_metrics
    from medclf.evaluation.report import write_multilabel_report, write_report

    multilabel = run.config.get("task") == "multilabel"
    data_classes = cache.label_names if multilabel else cache.classes
    if data_classes != run.classes:
        raise MedclfError(f"the data's {'labels' if multilabel else 'classes'} {data_classes} differ from the model's "
                          f"{run.classes}", cache.path)
    res = score_split(scorer, cache, split, batch_size=batch_size, progress=progress,
                      transform=corruption_transform(corrupt), share=share)
    if res is None:  # torchrun, rank > 0: rank 0 holds the scores
        return None
    about = {"split": split, "corruption": corrupt, "cache": str(cache.path), "cache_fingerprint": cache.fingerprint,
             "model": str(getattr(run, "package", None) or run.path), "nfe_per_image": float(res["nfe"].mean()), "seconds": res["seconds"]}
    title = f"{run.path.name} on {split}"
    if multilabel:
        m = multilabel_metrics(res["y"], res["probs"], run.classes, n_bootstrap=bootstrap)
        m.update(about)
        if report:
            write_multilabel_report(report, m, res["y"], res["probs"], run.classes, title=title)
        return m
    m = classification_metrics(res["y"], res["probs"], run.classes, n_bootstrap=bootstrap, pred=res["pred"])
    m.update(about)
    m["images_per_s"] = len(res["y"]) / max(res["seconds"], 1e-9)
    m["warnings"] = calibration_warnings(run.config) + m["warnings"]
    if "entropy" in res["uncertainty"]:  # the referral curve: is the calibrated uncertainty worth acting on?
        from medclf.evaluation.metrics import selective_accuracy

        m["selective_accuracy"] = selective_accuracy(res["y"], res["probs"], res["uncertainty"]["entropy"],
                                                     fractions=(1.0, 0.9, 0.75, 0.5), pred=res["pred"])
    if "intervals" in res:  # label samplers (DiffMIC): CARD's PICP of the per-class 95% label intervals
        from medclf.evaluation.metrics import picp

        samples = getattr(scorer, "samples", None)
        m["intervals"] = picp(res["y"], res["intervals"]["low"], res["intervals"]["high"], run.classes, samples=samples)
        m["picp"] = m["intervals"]["picp"]
        if "raw_low" in res["intervals"]:  # the samples' own percentiles, before the validation-fitted margin
            raw = picp(res["y"], res["intervals"]["raw_low"], res["intervals"]["raw_high"], run.classes, samples=samples)
            m["picp_raw"] = raw["picp"]
            m["intervals"]["margin"] = float((run.config.get("calibration") or {}).get("interval_margin", 0.0))
        m["warnings"] += m["intervals"]["warnings"]
    if report:
        write_report(report, m, res["y"], res["probs"], run.classes, title=title)
    return m
