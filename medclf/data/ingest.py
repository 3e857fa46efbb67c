"""``ingest``: sources as archives ship them -> a fingerprinted, memory-mappable tensor cache.

Pipeline: adapter plan (CSV/listing only) -> fingerprint -> shards of work units processed by a
process pool (each worker reads, preprocesses and streams its shard to disk, so pixels never cross
process boundaries) -> split assignment and manifest, written last and atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from medclf import __version__
from medclf.data.cache import (DTYPE, ERRORS, SCALE, FORMAT_VERSION, ITEMS, MANIFEST, SHARDS, STATE, atomic_write_text,
                               read_jsonl, write_jsonl)
from medclf.datasets import AdapterOptions, Plan, Unit, get_adapter
from medclf.datasets.splits import group_split
from medclf.errors import MedclfError, ReadError
from medclf.io import ImageData, read_dicom_series, read_volumes
from medclf.preprocessing import PreprocessConfig, preprocess


@dataclass
class IngestConfig:
    sources: list[Path]
    out: Path
    dataset: str = "auto"  #: adapter name, or auto-detect from the layout
    labels: Path | None = None  #: extra path,label CSV for generic folders
    #: how images become tensors, recorded whole in the manifest; ``channels=None`` (the default
    #: here): the dataset's own (CT: one per window), decided from the data
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(channels=None))
    uncertain: str = "mixed"  #: CheXpert -1 policy
    seed: int = 0  #: split seed
    workers: int = 0  #: 0: one per core (at most 8); 1: in-process
    resume: bool = False
    overwrite: bool = False


@dataclass
class IngestResult:
    cache: Path
    fingerprint: str
    up_to_date: bool
    dataset: str
    n_units: int
    n_items: int
    n_failed: int
    counts: dict  #: split -> class name -> items
    errors: list[dict]
    size_bytes: int
    seconds: float
    notes: list[str]

    @property
    def files_per_s(self) -> float | None:
        """Inputs processed per second; None for an up-to-date cache (nothing was processed)."""
        if self.up_to_date:
            return None
        return self.n_units / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cache"] = str(self.cache)
        d["files_per_s"] = self.files_per_s
        return d


ProgressFn = Callable[[int, int], None]


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------ worker side
_NPZ_CACHE: dict[str, object] = {}


Decoded = tuple[str, ImageData, "int | None", "list | None"]


def _read_unit(u: dict) -> tuple[Iterable[Decoded], list[tuple[str, str]]]:
    """A unit -> [(item id, image, label, labels)] and the per-file errors it survived.

    A NIfTI's images come lazily, one 3-D volume at a time (a 4-D file: one per volume, item id
    ``<key>/v<volume>``), so a long fMRI series is never in memory whole.
    Readers' warnings (pydicom's tolerated invalid values, converted lazily) go to the log, not stderr."""
    from medclf.io.dicom import tolerated_warnings

    with tolerated_warnings(u["paths"][0]):
        return _read_unit_inner(u)


def _read_unit_inner(u: dict) -> tuple[Iterable[Decoded], list[tuple[str, str]]]:
    if u["kind"] == "file":
        images = read_volumes(Path(u["paths"][0]))
        if isinstance(images, list):  # every file but a NIfTI: its one image, read now
            return [(u["key"], images[0], u["label"], u["labels"])], []
        return _lazy_volumes(u, images), []
    if u["kind"] == "series":
        img, errs = read_dicom_series([Path(p) for p in u["paths"]])
        return [(u["key"], img, u["label"], u["labels"])], errs
    if u["kind"] == "npz":
        path, ex = u["paths"][0], u["extra"]
        npz = _NPZ_CACHE.get(path)
        if npz is None:
            _NPZ_CACHE.clear()
            npz = _NPZ_CACHE[path] = np.load(path)
        arr = npz[ex["key"]][ex["start"]:ex["stop"]]
        out = []
        multilabel = len(ex["item_labels"][0]) > 1 if ex["item_labels"] else False
        for k, a in enumerate(arr):
            lab = ex["item_labels"][k]
            if a.ndim == 2:
                img = ImageData(a[None, :, :, None].astype(np.float32), "mono", {"original_shape": [1, *a.shape]})
            elif a.ndim == 3 and a.shape[-1] == 3:
                img = ImageData(a[None].astype(np.float32), "rgb", {"original_shape": [1, *a.shape[:2]]})
            else:  # a 3-D MedMNIST volume (D, H, W): slices become items
                img = ImageData(a[..., None].astype(np.float32), "mono", {"original_shape": list(a.shape)})
            item_id = f"{ex['ids_prefix']}-{ex['start'] + k:06d}"
            out.append((item_id, img, None if multilabel else int(lab[0]), [float(v) for v in lab] if multilabel else None))
        return out, []
    raise ReadError(f"unknown unit kind {u['kind']}")


def _lazy_volumes(u: dict, images: Iterable[ImageData]) -> Iterator[Decoded]:
    """A NIfTI's volumes as items, read one at a time as they are asked for (warnings to the log)."""
    from medclf.io.dicom import tolerated_warnings

    it = iter(images)
    while True:
        with tolerated_warnings(u["paths"][0]):
            img = next(it, None)
        if img is None:
            return
        v = img.meta.get("volume")
        yield (u["key"] if v is None else f"{u['key']}/v{v:04d}"), img, u["label"], u["labels"]


def process_shard(out: str, idx: int, units: list[dict], pre: dict) -> tuple[int, int, int, int]:
    """Read, preprocess and stream one shard to disk; files are renamed into place only when done.

    Returns (shard index, units, items, failures). The .bin is renamed last: its presence marks the
    shard complete for ``--resume``.
    """
    cfg = PreprocessConfig.from_dict(pre)
    base = Path(out) / SHARDS / f"{idx:05d}"
    tmp = base.with_suffix(".bin.tmp")
    items, errors = [], []
    offset = 0
    with open(tmp, "wb") as f:
        for u in units:
            # each image's slices are written as soon as it is preprocessed (a 4-D NIfTI: volume by
            # volume); a unit that fails part-way is cut off again, so it leaves no item behind
            start, recs = f.tell(), []
            try:
                decoded, survived = _read_unit(u)
                for item_id, img, label, labels in decoded:
                    x, how = preprocess(img, cfg)
                    for s in range(x.shape[0]):
                        f.write((x[s] * SCALE + 0.5).astype(DTYPE).tobytes())  # x is in [0, 1]
                        rec = _item_record(u, item_id, img, label, labels, s, x.shape[0], how)
                        rec.update(shard=idx, offset=offset + len(recs))
                        recs.append(rec)
            except Exception as e:
                f.seek(start)
                f.truncate()
                if isinstance(e, ReadError):
                    errors.append({"path": e.path or u["paths"][0], "reason": e.message})
                else:  # a decoder bug on one file must not stop the batch
                    errors.append({"path": u["paths"][0], "reason": f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:160]}"})
                continue
            errors += [{"path": p, "reason": r} for p, r in survived]
            offset += len(recs)
            items += recs
    # per-shard records skip fsync (the manifest, written last, is synced; a lost shard is redone)
    write_jsonl(base.with_suffix(".jsonl"), items, fsync=False)
    write_jsonl(base.with_suffix(".errors.jsonl"), errors, fsync=False)
    os.replace(tmp, base.with_suffix(".bin"))
    return idx, len(units), len(items), len(errors)


def _item_record(u: dict, item_id: str, img: ImageData, label, labels, s: int, n_slices: int, how: str) -> dict:
    rec = {
        "id": item_id if n_slices == 1 else f"{item_id}/s{s:04d}",
        "unit": u["key"],
        "source": u["source"],
        "label": label,
        "labels": labels,
        "split": u["split"],
        "group": u["group"] or img.group or u["key"],
        "original_shape": img.meta.get("original_shape"),
        "spacing": img.meta.get("spacing"),
        "orientation": img.meta.get("orientation"),
        "modality": img.meta.get("modality"),
        "intensity": how,
    }
    if img.meta.get("volume") is not None:  # one volume of a 4-D NIfTI: same unit, source and group as the file's
        rec["volume"] = img.meta["volume"]
        rec["n_volumes"] = img.meta["n_volumes"]
    if n_slices > 1:
        rec["slice"] = s
    if img.meta.get("nonfinite_voxels"):  # set to background by the reader (see io/nifti.py)
        rec["nonfinite_voxels"] = img.meta["nonfinite_voxels"]
    if img.affine is not None:
        rec["affine"] = np.round(img.affine, 6).tolist()
    if u["extra"].get("attrs"):
        rec["attrs"] = u["extra"]["attrs"]
    return rec


def _init_worker() -> None:
    # One thread per process: the pool provides the parallelism.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------------------------ main side
def _shard_size(n_units: int) -> int:
    """Units per shard: enough shards for parallelism and progress, few enough to stay cheap."""
    return int(min(512, max(64, math.ceil(n_units / 32))))


def fingerprint(plan: Plan, cfg: IngestConfig, pre: PreprocessConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "dataset": plan.dataset, "options": plan.options, "seed": cfg.seed,
                         "preprocessing": pre.to_dict()}, sort_keys=True).encode())
    for p in sorted(str(p) for p in plan.inputs):
        st = os.stat(p)
        h.update(f"\x00{p}\x00{st.st_size}\x00{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _decide_channels(plan: Plan, cfg: IngestConfig) -> int:
    pre = cfg.preprocess
    if pre.channels:
        return pre.channels
    if plan.channels:
        return plan.channels
    for u in plan.units[:20]:  # peek at the first readable unit
        try:
            decoded, _ = _read_unit(_unit_dict(u))
        except (ReadError, Exception):
            continue
        kind = next(iter(decoded))[1].kind
        use_hu = (kind == "hu" and pre.intensity == "auto") or (pre.intensity == "hu" and kind != "rgb")
        return len(pre.windows) if use_hu else 3 if kind == "rgb" else 1
    return 1


def _unit_dict(u: Unit) -> dict:
    return asdict(u)


def _check_out(out: Path, fp: str, cfg: IngestConfig) -> bool:
    """Decide what to do with ``out``; True when a complete cache with this fingerprint is there."""
    mf = out / MANIFEST
    if mf.exists():
        old = json.loads(mf.read_text(encoding="utf-8")).get("fingerprint")
        if old == fp and not cfg.overwrite:
            return True
        if not cfg.overwrite:
            raise MedclfError(f"holds a cache of different inputs/preprocessing (fingerprint {old}); "
                              "choose another --out or pass --overwrite", out)
        _remove_cache_files(out)
        return False
    state = out / STATE / "plan.json"
    if state.exists():
        old = json.loads(state.read_text(encoding="utf-8")).get("fingerprint")
        if cfg.resume and old != fp:
            raise MedclfError(f"the interrupted ingest here had other inputs/preprocessing (fingerprint {old}); "
                              "re-run it with its own arguments, or without --resume to start over", out)
        if not cfg.resume:
            _remove_cache_files(out)
        return False
    if out.exists() and any(out.iterdir()):
        raise MedclfError("exists and is not a medclf cache; refusing to write into it", out)
    return False


def _remove_cache_files(out: Path) -> None:
    """Remove only what ingest itself writes (never anything else a user keeps there)."""
    for name in (MANIFEST, ITEMS, ERRORS):
        (out / name).unlink(missing_ok=True)
    for d in (SHARDS, STATE):
        shutil.rmtree(out / d, ignore_errors=True)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def result_from_manifest(out: Path, manifest: dict, up_to_date: bool, seconds: float) -> IngestResult:
    return IngestResult(cache=out, fingerprint=manifest["fingerprint"], up_to_date=up_to_date,
                        dataset=manifest["dataset"], n_units=manifest["n_units"], n_items=manifest["n_items"],
                        n_failed=manifest["n_failed"], counts=manifest["counts"], errors=read_jsonl(out / ERRORS),
                        size_bytes=_dir_size(out), seconds=seconds, notes=manifest.get("notes", []))


def ingest(cfg: IngestConfig, progress: ProgressFn | None = None) -> IngestResult:
    """Run (or resume, or skip as up to date) an ingest; raise MedclfError on unusable arguments."""
    t0 = time.perf_counter()
    sources = [Path(s) for s in cfg.sources]
    for s in sources:
        if not s.exists():
            raise MedclfError("source not found", s)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MedclfError("--out exists and is not a folder", out)
    workers = cfg.workers or default_workers()
    opts = AdapterOptions(labels=cfg.labels, uncertain=cfg.uncertain, seed=cfg.seed)
    adapter = get_adapter(cfg.dataset, sources)
    if workers > 1:
        # Import the readers once here: forked workers inherit them instead of each paying the import.
        import PIL.Image  # noqa: F401
        import pydicom  # noqa: F401
        import pydicom.pixels  # noqa: F401
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) if workers > 1 else None
    try:
        def mapper(fn, xs):
            return list(pool.map(fn, xs, chunksize=max(1, len(xs) // (workers * 8) or 1))) if pool else [fn(x) for x in xs]

        plan = adapter.plan(sources, opts, mapper)
        if cfg.uncertain != "mixed" and "uncertain" not in plan.options:
            plan.notes.append(f"--uncertain {cfg.uncertain} has no effect on {plan.dataset} (only CheXpert has uncertain labels)")
        # a copy (the caller's config is left as given), with the channel count settled
        pre = replace(cfg.preprocess, windows=list(cfg.preprocess.windows), channels=_decide_channels(plan, cfg))
        fp = fingerprint(plan, cfg, pre)
        if _check_out(out, fp, cfg):
            manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
            return result_from_manifest(out, manifest, True, time.perf_counter() - t0)
        units = [_unit_dict(u) for u in plan.units]
        # plan.json first: from then on the folder reads as an interrupted ingest (resumable), never as a stranger's
        atomic_write_text(out / STATE / "plan.json", json.dumps({"fingerprint": fp, "n_units": len(units)}))
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        size = _shard_size(len(units))
        shards = [units[i : i + size] for i in range(0, len(units), size)]
        done_units = 0
        todo = []
        for k, chunk in enumerate(shards):
            if cfg.resume and (out / SHARDS / f"{k:05d}.bin").exists():
                done_units += len(chunk)
            else:
                todo.append(k)
        if progress:
            progress(done_units, len(units))
        pre_d = pre.to_dict()
        if pool is None:
            for k in todo:
                process_shard(str(out), k, shards[k], pre_d)
                done_units += len(shards[k])
                if progress:
                    progress(done_units, len(units))
        else:
            pending = {pool.submit(process_shard, str(out), k, shards[k], pre_d) for k in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    _, n_u, _, _ = fut.result()
                    done_units += n_u
                    if progress:
                        progress(done_units, len(units))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    manifest = _finalize(out, plan, cfg, pre, fp, len(shards), len(units))
    return result_from_manifest(out, manifest, False, time.perf_counter() - t0)


def _finalize(out: Path, plan: Plan, cfg: IngestConfig, pre: PreprocessConfig, fp: str, n_shards: int, n_units: int) -> dict:
    items, errors, shard_info = [], [{"path": p, "reason": r} for p, r in plan.errors], []
    for k in range(n_shards):
        base = out / SHARDS / f"{k:05d}"
        rows = read_jsonl(base.with_suffix(".jsonl"))
        items += rows
        errors += read_jsonl(base.with_suffix(".errors.jsonl"))
        shard_info.append({"file": f"{SHARDS}/{k:05d}.bin", "n": len(rows)})
    # Seeded, group-aware split for items without an official one (stratified by primary label).
    free = [it for it in items if it["split"] is None]
    if free:
        assign = group_split([it["group"] for it in free], [-1 if it["label"] is None else it["label"] for it in free], cfg.seed,
                             plan.split_fractions)
        for it in free:
            it["split"] = assign[it["group"]]
    names = plan.classes
    counts: dict[str, dict[str, int]] = {}
    for it in items:
        cls = names[it["label"]] if it["label"] is not None and names else "unlabeled" if not plan.label_names else "multi-label"
        counts.setdefault(it["split"], {}).setdefault(cls, 0)
        counts[it["split"]][cls] += 1
    write_jsonl(out / ITEMS, items)
    write_jsonl(out / ERRORS, errors)
    manifest = {
        "format": FORMAT_VERSION,
        "medclf_version": __version__,
        "fingerprint": fp,
        "dataset": plan.dataset,
        "options": plan.options,
        "seed": cfg.seed,
        "preprocessing": pre.to_dict(),
        "preprocessing_fingerprint": pre.fingerprint(),
        "shape": [pre.channels, pre.size, pre.size],
        "dtype": DTYPE,
        "classes": plan.classes,
        "label_names": plan.label_names,
        "task": "multiclass" if plan.classes else "multilabel" if plan.label_names else "unlabeled",
        "n_units": n_units,
        "n_items": len(items),
        "n_failed": len(errors),
        "counts": counts,
        "shards": shard_info,
        "notes": plan.notes,
        "split_policy": "official where shipped; else seeded by patient/lesion group, stratified by label",
        "split_fractions": list(plan.split_fractions),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    # Per-shard records only go once the manifest (the completeness mark) is in place.
    for k in range(n_shards):
        for suffix in (".jsonl", ".errors.jsonl"):
            (out / SHARDS / f"{k:05d}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(out / STATE, ignore_errors=True)
    return manifest
