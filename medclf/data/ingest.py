"""``ingest``: sources as archives ship them -> a fingerprinted, memory-mappable tensor cache.

Pipeline: adapter plan (CSV/listing only) -> fingerprint -> shards of work units processed by a
process pool (each worker reads, preprocesses and streams its shard to disk, so pixels never cross
process boundaries) -> split assignment and manifest, written last and atomically.

At scale the shards are spread over machines: ``num_parts``/``part_id`` make one ingest process only
its part of the whole plan's shards (into ``CACHE/parts/``, see ``shards.py``) and ``merge_parts``
renames them into place and runs the same last step, so the result equals a single-machine ingest.
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
from medclf.data import shards as parts_
from medclf.data.cache import (DTYPE, ERRORS, SCALE, FORMAT_VERSION, ITEMS, MANIFEST, PARTS, SHARDS, STATE,
                               atomic_write_text, read_jsonl, write_jsonl)
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
    #: a sharded ingest: process only part ``part_id`` (0..num_parts-1) of the whole plan's shards, into
    #: ``out/parts/part-I-of-K``; ``merge_parts(out)`` then makes the cache. None, None: the whole cache here
    num_parts: int | None = None
    part_id: int | None = None


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
    #: a part of a sharded ingest: part_id, num_parts, shards (indices in the whole plan), merged (the
    #: cache they belong to is complete already); None for a whole cache
    part: dict | None = None
    merged_parts: int | None = None  #: ``merge_parts``: how many parts the cache was merged from

    @property
    def files_per_s(self) -> float | None:
        """Inputs processed per second; None for an up-to-date cache or a merge (no file was read)."""
        if self.up_to_date or self.merged_parts:
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


def _check_out(out: Path, fp: str, cfg: IngestConfig, mark: str = MANIFEST) -> bool:
    """Decide what to do with ``out`` (a cache, or a part's folder when ``mark`` is the part record);
    True when a complete one with this fingerprint is there."""
    what = "cache" if mark == MANIFEST else "part"
    mf = out / mark
    if mf.exists():
        old = json.loads(mf.read_text(encoding="utf-8")).get("fingerprint")
        if old == fp and not cfg.overwrite:
            return True
        if not cfg.overwrite:
            raise MedclfError(f"holds a {what} of different inputs/preprocessing (fingerprint {old}); "
                              "choose another --out or pass --overwrite", out)
        _remove_cache_files(out, mark)
        return False
    state = out / STATE / "plan.json"
    if state.exists():
        old = json.loads(state.read_text(encoding="utf-8")).get("fingerprint")
        if cfg.resume and old != fp:
            raise MedclfError(f"the interrupted ingest here had other inputs/preprocessing (fingerprint {old}); "
                              "re-run it with its own arguments, or without --resume to start over", out)
        if not cfg.resume:
            _remove_cache_files(out, mark)
        return False
    if mark == MANIFEST and (out / PARTS).exists():
        if not cfg.overwrite:
            raise MedclfError(f"holds the parts of a sharded ingest ({PARTS}/): merge them with medclf ingest --merge "
                              f"--out {out}, or pass --overwrite to replace them", out)
        _remove_cache_files(out, mark)
    if out.exists() and any(out.iterdir()):
        raise MedclfError(f"exists and is not a medclf {what}; refusing to write into it", out)
    return False


def _remove_cache_files(out: Path, mark: str = MANIFEST, keep_parts: bool = False) -> None:
    """Remove only what ingest itself writes (never anything else a user keeps there): a cache's files
    (and its parts unless ``keep_parts``), or a part's."""
    for name in (mark, ITEMS, ERRORS):
        (out / name).unlink(missing_ok=True)
    for d in (SHARDS, STATE) if keep_parts or mark != MANIFEST else (SHARDS, STATE, PARTS):
        shutil.rmtree(out / d, ignore_errors=True)


def _check_cache_of_part(out: Path, fp: str, cfg: IngestConfig) -> bool:
    """Before writing a part: True when ``out`` already holds the merged cache of these inputs; refuse a
    cache of other inputs (unless --overwrite: the merge will replace it) and a folder that is no cache."""
    mf = out / MANIFEST
    if mf.exists():
        old = json.loads(mf.read_text(encoding="utf-8")).get("fingerprint")
        if old == fp and not cfg.overwrite:
            return True
        if not cfg.overwrite:
            raise MedclfError(f"holds a cache of different inputs/preprocessing (fingerprint {old}); choose another "
                              "--out or pass --overwrite (to every part and to --merge)", out)
        return False
    ours = {MANIFEST, ITEMS, ERRORS, SHARDS, STATE, PARTS}
    if out.exists() and any(p.name not in ours for p in out.iterdir()):
        raise MedclfError("exists and is not a medclf cache; refusing to write into it", out)
    return False


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def result_from_manifest(out: Path, manifest: dict, up_to_date: bool, seconds: float) -> IngestResult:
    return IngestResult(cache=out, fingerprint=manifest["fingerprint"], up_to_date=up_to_date,
                        dataset=manifest["dataset"], n_units=manifest["n_units"], n_items=manifest["n_items"],
                        n_failed=manifest["n_failed"], counts=manifest["counts"], errors=read_jsonl(out / ERRORS),
                        size_bytes=_dir_size(out), seconds=seconds, notes=manifest.get("notes", []))


def _part_result(folder: Path, rec: dict, up_to_date: bool, seconds: float) -> IngestResult:
    """A finished part's summary: its own shards' items and failures (part 0 also lists the planning
    failures, so the parts' counts add up to the merged cache's). Splits wait for the merge."""
    plan_errors = rec["header"]["plan_errors"] if rec["part_id"] == 0 else []
    items, errors = [], [{"path": p, "reason": r} for p, r in plan_errors]
    for k in rec["shards"]:
        items += read_jsonl(parts_.shard_file(folder, k, ".jsonl"))
        errors += read_jsonl(parts_.shard_file(folder, k, ".errors.jsonl"))
    h = rec["header"]
    counts = _counts(items, h["classes"], h["label_names"], unassigned="unassigned")
    n_units = rec["n_units_part"]
    label = f"part {rec['part_id']} of {rec['num_parts']}"
    mine = (f"shards {_ranges(rec['shards'])} of the plan's {rec['n_shards']}" if rec["shards"] else
            f"no shard (the plan has {rec['n_shards']}, fewer than the parts)")
    notes = [*h["notes"], f"{label}: {mine}; splits are assigned by medclf ingest --merge --out "
             f"{folder.parent.parent} once all {rec['num_parts']} parts are done"]
    return IngestResult(cache=folder, fingerprint=rec["fingerprint"], up_to_date=up_to_date, dataset=h["dataset"],
                        n_units=n_units, n_items=len(items), n_failed=len(errors), counts=counts, errors=errors,
                        size_bytes=_dir_size(folder), seconds=seconds, notes=notes,
                        part={"part_id": rec["part_id"], "num_parts": rec["num_parts"], "shards": rec["shards"],
                              "merged": False})


def _ranges(ks: list[int]) -> str:
    return ", ".join(map(str, ks)) if len(ks) <= 6 else f"{', '.join(map(str, ks[:3]))}, ..., {ks[-1]} ({len(ks)})"


def ingest(cfg: IngestConfig, progress: ProgressFn | None = None) -> IngestResult:
    """Run (or resume, or skip as up to date) an ingest, or with ``cfg.num_parts`` one part of a sharded
    one (then ``merge_parts``); raise MedclfError on unusable arguments."""
    t0 = time.perf_counter()
    parts_.check_part_args(cfg.num_parts, cfg.part_id)
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
        units = [_unit_dict(u) for u in plan.units]
        size = _shard_size(len(units))
        # the whole plan's shards: a part processes some of exactly these, so its files are a single ingest's
        shards = [units[i : i + size] for i in range(0, len(units), size)]
        if cfg.num_parts is None:
            dest, mine = out, list(range(len(shards)))
            if _check_out(out, fp, cfg):
                manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
                return result_from_manifest(out, manifest, True, time.perf_counter() - t0)
        else:
            dest = parts_.part_dir(out, cfg.part_id, cfg.num_parts)
            mine = parts_.part_shards(len(shards), cfg.part_id, cfg.num_parts)
            if _check_cache_of_part(out, fp, cfg):  # merged already: nothing left for this part to do
                manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
                res = result_from_manifest(out, manifest, True, time.perf_counter() - t0)
                res.part = {"part_id": cfg.part_id, "num_parts": cfg.num_parts, "shards": mine, "merged": True}
                return res
            if _check_out(dest, fp, cfg, mark=parts_.PART_RECORD):
                return _part_result(dest, parts_.read_record(dest), True, time.perf_counter() - t0)
        n_mine = sum(len(shards[k]) for k in mine)
        # plan.json first: from then on the folder reads as an interrupted ingest (resumable), never as a stranger's
        atomic_write_text(dest / STATE / "plan.json", json.dumps({"fingerprint": fp, "n_units": n_mine}))
        (dest / SHARDS).mkdir(parents=True, exist_ok=True)
        done_units = 0
        todo = []
        for k in mine:
            if cfg.resume and (dest / SHARDS / f"{k:05d}.bin").exists():
                done_units += len(shards[k])
            else:
                todo.append(k)
        if progress:
            progress(done_units, n_mine)
        pre_d = pre.to_dict()
        if pool is None:
            for k in todo:
                process_shard(str(dest), k, shards[k], pre_d)
                done_units += len(shards[k])
                if progress:
                    progress(done_units, n_mine)
        else:
            pending = {pool.submit(process_shard, str(dest), k, shards[k], pre_d) for k in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    _, n_u, _, _ = fut.result()
                    done_units += n_u
                    if progress:
                        progress(done_units, n_mine)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    header = _header(plan, cfg, pre)
    if cfg.num_parts is None:
        manifest = _finalize(out, header, fp, len(shards), len(units))
        return result_from_manifest(out, manifest, False, time.perf_counter() - t0)
    rec = _finish_part(dest, cfg.part_id, cfg.num_parts, fp, header, len(units), len(shards), n_mine)
    return _part_result(dest, rec, False, time.perf_counter() - t0)


def _header(plan: Plan, cfg: IngestConfig, pre: PreprocessConfig) -> dict:
    """What the manifest records of the plan and the options (JSON-able): a part keeps it in its record,
    so the merge writes the manifest a single ingest writes."""
    return {"dataset": plan.dataset, "options": plan.options, "seed": cfg.seed, "preprocessing": pre.to_dict(),
            "preprocessing_fingerprint": pre.fingerprint(), "shape": [pre.channels, pre.size, pre.size],
            "classes": plan.classes, "label_names": plan.label_names, "notes": plan.notes,
            "split_fractions": list(plan.split_fractions), "plan_errors": [[p, r] for p, r in plan.errors]}


def _finish_part(folder: Path, part_id: int, num_parts: int, fp: str, header: dict, n_units: int, n_shards: int,
                 n_mine: int) -> dict:
    """Write the part's record last (atomically: its presence marks the part complete) and drop its state."""
    mine = parts_.part_shards(n_shards, part_id, num_parts)
    for k in mine:  # shards are written unsynced; a part's wait on disk (maybe a shared one) for the merge
        for suffix in parts_.SHARD_SUFFIXES:
            with open(parts_.shard_file(folder, k, suffix), "rb") as f:
                os.fsync(f.fileno())
    n_items = sum(len(read_jsonl(parts_.shard_file(folder, k, ".jsonl"))) for k in mine)
    n_failed = sum(len(read_jsonl(parts_.shard_file(folder, k, ".errors.jsonl"))) for k in mine)
    rec = parts_.record(part_id, num_parts, fp, n_units, n_shards, json.loads(json.dumps(header)), n_mine, n_items,
                        n_failed, __version__)
    atomic_write_text(folder / parts_.PART_RECORD, json.dumps(rec, indent=1, sort_keys=True))
    shutil.rmtree(folder / STATE, ignore_errors=True)
    return rec


def merge_parts(out: Path, overwrite: bool = False) -> IngestResult:
    """Merge the K parts in ``out/parts`` (all present, complete, planned alike) into one cache: the
    shards are renamed into place and the manifest is written as a single ingest writes it, so the
    cache is that ingest's, byte for byte. An interrupted merge is continued by running it again."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedclfError("--out exists and is not a folder", out)
    if not out.exists():
        raise MedclfError("cache folder not found: nothing to merge", out)
    mf = out / MANIFEST
    if mf.exists() and not (out / PARTS).exists():  # merged before (the parts are removed last)
        return result_from_manifest(out, json.loads(mf.read_text(encoding="utf-8")), True, time.perf_counter() - t0)
    found = parts_.find_parts(out)
    ref = found[0].record
    fp = ref["fingerprint"]
    if mf.exists():
        old = json.loads(mf.read_text(encoding="utf-8")).get("fingerprint")
        if old == fp:  # merged (the same bytes whatever --overwrite says), then stopped before removing the parts
            shutil.rmtree(out / PARTS)
            return result_from_manifest(out, json.loads(mf.read_text(encoding="utf-8")), True, time.perf_counter() - t0)
        if not overwrite:
            raise MedclfError(f"holds a cache of different inputs/preprocessing (fingerprint {old}) than its parts "
                              f"({fp}); pass --overwrite to replace it with the merged parts", out)
    state = out / STATE / "plan.json"
    # continuing an interrupted merge of these parts: the shards it moved already count as there
    was = json.loads(state.read_text(encoding="utf-8")) if state.exists() and not mf.exists() else {}
    resumed = was.get("fingerprint") == fp and was.get("merging") == ref["num_parts"]
    parts_.check_shard_files(found, out, moved_ok=resumed)  # before anything is removed: a refusal changes nothing
    if not resumed:
        _remove_cache_files(out, keep_parts=True)  # another ingest's leftovers: shards that are not these
    atomic_write_text(state, json.dumps({"fingerprint": fp, "n_units": ref["n_units"], "merging": ref["num_parts"]}))
    for p in found:
        parts_.move_shards(p, out)
    manifest = _finalize(out, ref["header"], fp, ref["n_shards"], ref["n_units"], version=ref["medclf_version"])
    shutil.rmtree(out / PARTS)
    res = result_from_manifest(out, manifest, False, time.perf_counter() - t0)
    res.merged_parts = ref["num_parts"]
    return res


def _counts(items: list[dict], classes: list[str], label_names: list[str], unassigned: str | None = None) -> dict:
    """split -> class -> items (``unassigned``: the split key of items not split yet, in a part)."""
    counts: dict[str, dict[str, int]] = {}
    for it in items:
        cls = classes[it["label"]] if it["label"] is not None and classes else "unlabeled" if not label_names else "multi-label"
        split = it["split"] if it["split"] is not None else unassigned
        counts.setdefault(split, {}).setdefault(cls, 0)
        counts[split][cls] += 1
    return counts


def _finalize(out: Path, header: dict, fp: str, n_shards: int, n_units: int, version: str = __version__) -> dict:
    """Split assignment over all items (the whole plan's, so a sharded ingest splits as a single one), the
    records and the manifest, written last; then the per-shard records and the state go."""
    items, errors, shard_info = [], [{"path": p, "reason": r} for p, r in header["plan_errors"]], []
    for k in range(n_shards):
        base = out / SHARDS / f"{k:05d}"
        rows = read_jsonl(base.with_suffix(".jsonl"))
        items += rows
        errors += read_jsonl(base.with_suffix(".errors.jsonl"))
        shard_info.append({"file": f"{SHARDS}/{k:05d}.bin", "n": len(rows)})
    # Seeded, group-aware split for items without an official one (stratified by primary label).
    free = [it for it in items if it["split"] is None]
    if free:
        assign = group_split([it["group"] for it in free], [-1 if it["label"] is None else it["label"] for it in free],
                             header["seed"], tuple(header["split_fractions"]))
        for it in free:
            it["split"] = assign[it["group"]]
    counts = _counts(items, header["classes"], header["label_names"])
    write_jsonl(out / ITEMS, items)
    write_jsonl(out / ERRORS, errors)
    manifest = {
        "format": FORMAT_VERSION,
        "medclf_version": version,
        "fingerprint": fp,
        "dataset": header["dataset"],
        "options": header["options"],
        "seed": header["seed"],
        "preprocessing": header["preprocessing"],
        "preprocessing_fingerprint": header["preprocessing_fingerprint"],
        "shape": header["shape"],
        "dtype": DTYPE,
        "classes": header["classes"],
        "label_names": header["label_names"],
        "task": "multiclass" if header["classes"] else "multilabel" if header["label_names"] else "unlabeled",
        "n_units": n_units,
        "n_items": len(items),
        "n_failed": len(errors),
        "counts": counts,
        "shards": shard_info,
        "notes": header["notes"],
        "split_policy": "official where shipped; else seeded by patient/lesion group, stratified by label",
        "split_fractions": list(header["split_fractions"]),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    # Per-shard records only go once the manifest (the completeness mark) is in place.
    for k in range(n_shards):
        for suffix in (".jsonl", ".errors.jsonl"):
            (out / SHARDS / f"{k:05d}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(out / STATE, ignore_errors=True)
    return manifest
