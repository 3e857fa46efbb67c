"""Applying a trained run to files as users have them: read, repeat the run's preprocessing, score."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from medclf.errors import MedclfError, ReadError
from medclf.io import ImageData, NiftiVolumes, is_dicom, is_nifti, read_dicom_series, read_image
from medclf.io.dicom import order_series, tolerated_warnings
from medclf.preprocessing import PreprocessConfig, preprocess
from medclf.scoring.base import Prediction

LIST_SUFFIXES = (".txt", ".lst", ".list")


def expand_inputs(inputs: list[str]) -> list[str]:
    """Inputs as given, with text files of paths (and ``-`` for stdin) expanded to their lines.

    Raises MedclfError when nothing is left (``-`` with empty stdin, empty list files): a pipeline
    whose ``find`` matched nothing must not look like a successful run."""
    out: list[str] = []
    empty: list[str] = []
    for s in inputs:
        if s == "-":
            got = [line.strip() for line in sys.stdin if line.strip() and not line.strip().startswith("#")]
            if not got:
                empty.append("stdin was empty")
            out += got
        elif Path(s).suffix.lower() in LIST_SUFFIXES and Path(s).is_file():
            base = Path(s).parent
            n = len(out)
            for line in Path(s).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line)
                    out.append(str(p if p.is_absolute() or p.exists() else base / p))
            if len(out) == n:
                empty.append(f"{s} lists no paths")
        else:
            out.append(s)
    if not out:
        raise MedclfError("no inputs: " + "; ".join(empty or ["none given"]))
    return out


@dataclass
class Planned:
    """One thing to score: a file, one volume of a 4-D NIfTI, or one DICOM series found in a folder."""

    name: str  #: the rows' ``input``: a file's path; a series: the folder given, or (several series) its folder + ``#label``
    paths: list[str]  #: the files to read
    series: str | None = None  #: a series' label (SeriesNumber, Modality, pseudonym of the UID); None for a file
    headers: dict = field(default_factory=dict)  #: path -> ``header_summary`` of a series' files (slice order)
    volume: int | None = None  #: a 4-D NIfTI's volume (index on its 4th axis); None for anything else
    volumes: _FileVolumes | None = field(default=None, repr=False, compare=False)  #: shared by a 4-D file's volumes


@dataclass(eq=False)
class _FileVolumes:
    """What the volumes of one 4-D NIfTI share: one reader (the file opened once, its volumes read in
    order) and the reasons already given (a reason every volume shares is said once per file)."""

    reader: NiftiVolumes
    n: int
    reported: set = field(default_factory=set)


def _plan_file(path: str) -> list[Planned]:
    """A file as what to score: a 4-D NIfTI as one item per volume (named by the file; rows add
    ``volume``), anything else as itself. A NIfTI whose header is refused is planned as itself:
    reading it gives the reason."""
    p = Path(path)
    if is_nifti(p) and p.is_file():
        reader = NiftiVolumes(p)
        try:
            n = reader.n_volumes
        except ReadError:
            return [Planned(name=path, paths=[path])]
        if n > 1:
            group = _FileVolumes(reader, n)
            return [Planned(name=path, paths=[path], volume=t, volumes=group) for t in range(n)]
    return [Planned(name=path, paths=[path])]


def _series_label(first: str, sid: str) -> str:
    """``series-<SeriesNumber>-<Modality>-<8 hex of the series pseudonym>``: what a viewer shows, never
    a patient's name or ID (the pseudonym keeps series with the same number apart)."""
    import pydicom

    parts = ["series"]
    try:
        with tolerated_warnings(first):
            ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesNumber", "Modality"])
            number, modality = ds.get("SeriesNumber"), ds.get("Modality")
            try:
                number = None if number is None or str(number).strip() == "" else int(float(number))
            except (TypeError, ValueError):
                number = None
    except Exception:  # the header was read once already (grouping): a failure here only costs the label
        number = modality = None
    if number is not None:
        parts.append(str(number))
    mod = re.sub(r"[^A-Za-z0-9]+", "", str(modality or ""))[:8]
    if mod:
        parts.append(mod)
    parts.append(sid[:8])
    return "-".join(parts)


def plan_folder(src: str) -> tuple[list[Planned], list[ReadError], list[str]]:
    """A folder's image files, planned as ``medclf ingest`` plans them: DICOM files grouped into
    series by their headers (``datasets.generic.dicom_units``: SeriesInstanceUID and image shape;
    different series are never merged), every other image file (PNG/JPEG/TIFF/NIfTI) on its own.

    Returns (what to score, one ReadError per file whose header could not be read, notes)."""
    from medclf.datasets.base import Plan
    from medclf.datasets.generic import dicom_units
    from medclf.io import is_image_file

    root = Path(src)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    dicomdirs = [p for p in files if p.name.upper() == "DICOMDIR"]  # its referenced files are found by the walk
    images = [p for p in files if p.name.upper() != "DICOMDIR" and is_image_file(p)]
    notes = []
    skipped = len(files) - len(images) - len(dicomdirs)
    if skipped:
        notes.append(f"{src}: skipped {skipped} non-image file(s)")
    headers: dict[str, object] = {}

    def mapper(fn, xs):  # sequential, keeping the header summaries for slice -> file
        res = [fn(x) for x in xs]
        headers.update(zip(xs, res))
        return res

    plan = Plan(dataset="classify", units=[])
    dicoms = [p for p in images if is_dicom(p)]
    units = dicom_units([(root, p, None) for p in dicoms], mapper, plan) if dicoms else []
    errors = [ReadError(reason, path) for path, reason in plan.errors]
    out: list[Planned] = []
    for u in units:
        if u.kind != "series":
            out.append(Planned(name=u.paths[0], paths=u.paths))
            continue
        hs = {p: headers[p] for p in u.paths}
        order = order_series([hs[p] for p in u.paths])
        out.append(Planned(name="", paths=u.paths, series=_series_label(u.paths[0], u.key),
                           headers={u.paths[i]: hs[u.paths[i]] for i in order}))
    out += [x for p in images if not is_dicom(p) for x in _plan_file(str(p))]
    out.sort(key=lambda x: x.paths[0])  # stable: a 4-D NIfTI's volumes stay in order
    series = [x for x in out if x.series]
    if len(series) == 1:
        series[0].name = src  # the folder's only series: named by the folder as given (files by their paths)
    else:
        used: set[str] = set()
        for x in series:
            rel = Path(x.paths[0]).parent.relative_to(root).as_posix()
            base = f"{src if rel == '.' else str(Path(src) / rel)}#{x.series}"
            name, k = base, 1
            while name in used:  # one series split by image shape (a localizer): still one name each
                k += 1
                name = f"{base}-{k}"
            used.add(name)
            x.name = name
    if not out and not errors:
        errors.append(ReadError("folder holds no image files (DICOM, NIfTI, PNG, JPEG or TIFF)", src))
    return out, errors, notes


def _read_planned(item: Planned) -> tuple[ImageData, list[ReadError], list[str] | None]:
    """(image, one ReadError per file of a series left out, the file of each slice or None)."""
    if item.series is None:
        if item.volumes is not None:  # one volume of a 4-D NIfTI (only its voxels are read)
            return item.volumes.reader.read(item.volume), [], None
        return read_image(Path(item.paths[0])), [], None
    paths = list(item.headers)  # anatomical order
    try:
        img, errors = read_dicom_series([Path(p) for p in paths])
    except ReadError:
        # no file of the series could be read: name each one with its own reason
        errs = []
        for p in paths:
            try:
                read_image(Path(p))
            except ReadError as e:
                errs.append(ReadError(e.message, e.path or p))
        if len(errs) == len(paths):
            raise _AllFailed(errs) from None
        raise
    if errors:  # the series was read without them: say so in every row and on stderr (never silent)
        img.meta["skipped_files"] = len(errors)
        img.meta["skipped_reasons"] = sorted({reason for _, reason in errors})[:3]
    failed = {p for p, _ in errors}
    kept = [p for p in paths if p not in failed]
    hs = [item.headers[p] for p in kept]
    # read_dicom_series orders the files it kept by the same ImagePositionPatient/Orientation values
    # (header_summary reads them alike), so slice k is kept[order[k]] when every file is one slice with
    # a position; otherwise (instance numbers, enhanced multi-frame) rows name the series' first file
    slice_files = None
    if len(kept) == img.n_slices and all(h.get("frames", 1) == 1 and h.get("ipp") and h.get("iop") for h in hs):
        slice_files = [kept[i] for i in order_series(hs)]
    return img, [ReadError(reason, p) for p, reason in errors], slice_files


class _AllFailed(Exception):
    def __init__(self, errors: list[ReadError]):
        self.errors = errors


def load_input(path: str | Path) -> ImageData:
    """A file of any supported kind, or a folder holding one DICOM series (refused if it holds more)."""
    p = Path(path)
    if p.is_dir():
        items, errors, _ = plan_folder(str(path))
        if not items:
            raise errors[0] if errors else ReadError("folder holds no image files", p)
        if len(items) > 1:
            raise ReadError(f"folder holds {len(items)} series/images; pass one series folder or one file", p)
        try:
            return _read_planned(items[0])[0]
        except _AllFailed as e:
            raise e.errors[0] from None
    return read_image(p)


@dataclass
class Scored:
    source: str
    image: ImageData
    scan: np.ndarray  #: (S, C, size, size) preprocessed
    prediction: Prediction
    series: str | None = None  #: a DICOM series' label (see ``_series_label``); None for a file
    files: list[str] | None = None  #: a series' files (the ones read)
    slice_files: list[str] | None = None  #: the file of each slice, when each file is one slice
    index: int | None = None  #: its item's position in the whole plan (names that agree across shards)


def prepare(img: ImageData, pre: PreprocessConfig, path: str, with_scaling: bool = False):
    """(S, C, size, size) in [0, 1] as the run's preprocessing makes it (and, asked, how it was scaled)."""
    try:
        x, how = preprocess(img, pre)
    except ReadError as e:
        raise ReadError(e.message, path) from None
    return (x, how) if with_scaling else x


def plan_inputs(inputs: list[str], notes: Callable[[str], None] | None = None) -> Iterator[Planned | ReadError]:
    """Each input as what to score: a file as itself, a folder as its series and image files
    (``plan_folder``), with a ReadError for each file of a folder that cannot be planned."""
    for src in inputs:
        if not Path(src).is_dir():
            yield from _plan_file(src)
            continue
        try:
            items, errors, folder_notes = plan_folder(src)
        except OSError as e:
            yield ReadError(f"folder cannot be listed ({e.strerror or type(e).__name__})", src)
            continue
        for n in folder_notes:
            if notes is not None:
                notes(n)
        yield from errors
        yield from items


def score_inputs(inputs: list[str], scorer, pre: PreprocessConfig, batch_size: int = 32,
                 explain: bool = False, run=None, notes: Callable[[str], None] | None = None, share=None,
                 planned: list[Planned | ReadError] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Iterator[Scored | ReadError]:
    """Yield a ``Scored`` per readable file, 4-D NIfTI volume or DICOM series and a ``ReadError`` per bad file;
    never stops early.

    A folder is planned as ingest plans it (``plan_folder``): one ``Scored`` per series (never two
    series merged) and per other image file, and a ReadError naming each file that could not be read,
    including files a series was read without (after that series' ``Scored``). With ``run``, each
    preprocessed input is checked against it (``runs.check_compatible``). ``notes`` receives what the
    user should know but is no failure (non-image files skipped in a folder).

    ``share`` (a ``medclf.sharding.Share``) scores only its contiguous block of the planned items: every
    process plans every input, so all agree on the blocks, and the shares' outputs in order are this
    function's output for the whole. ``planned`` is the plan when the caller made it already
    (``list(plan_inputs(...))``). Each ``Scored`` records its item's position in the plan (``index``).
    ``progress(done, total)`` is called after each planned item (the plan is then made up front)."""
    items: Iterable[Planned | ReadError] = plan_inputs(inputs, notes) if planned is None else planned
    lo = 0
    if share is not None and not share.whole:
        items = list(items)
        lo, hi = share.bounds(len(items))
        _said_before(items, lo, hi, pre, explain, run)
        items = items[lo:hi]
    if progress is not None:
        items = list(items)
    for i, item in enumerate(items, lo):
        if progress is not None and i > lo:
            progress(i - lo, len(items))
        if isinstance(item, ReadError):
            yield item
            continue
        for res in _score_item(item, scorer, pre, batch_size, explain, run):
            if isinstance(res, Scored):
                res.index = i
            elif item.volumes is not None:
                # one volume of a 4-D NIfTI: a reason its volumes share (a truncated file, an image too
                # small for the run) is given once for the file, not once per volume
                if res.message in item.volumes.reported:
                    continue
                item.volumes.reported.add(res.message)
            yield res
    if progress is not None and items:
        progress(len(items), len(items))


def _said_before(items: list[Planned | ReadError], lo: int, hi: int, pre: PreprocessConfig, explain: bool, run) -> None:
    """A share that starts inside a 4-D NIfTI: the reasons the file's earlier volumes give (in an earlier
    share) count as said, so a reason all volumes share is still said once per file over all shares.
    Those volumes are read and checked, not scored."""
    first = items[lo] if lo < hi else None
    if not isinstance(first, Planned) or first.volumes is None:
        return
    for prev in items[:lo]:
        if isinstance(prev, Planned) and prev.volumes is first.volumes:
            first.volumes.reported.update(e.message for e in _score_item(prev, None, pre, 1, explain, run)
                                          if isinstance(e, ReadError))


def _score_item(item: Planned, scorer, pre: PreprocessConfig, batch_size: int, explain: bool,
                run) -> Iterator[Scored | ReadError]:
    """``score_inputs`` for one planned input: its ``Scored`` (or errors), then the files it was read without.
    With ``scorer`` None only the errors: the input is read and checked, not scored (``_said_before``)."""
    from medclf.runs import DataSpec, check_compatible

    src = item.name
    if explain and item.volume is not None:
        yield ReadError(f"explain does not support 4-D NIfTI yet ({item.volumes.n} volumes; its maps are written on a "
                        "3-D source grid): pass one volume as a 3-D file (classify scores every volume)", src)
        return
    left_out: list[ReadError] = []
    try:
        img, left_out, slice_files = _read_planned(item)
        x, how = prepare(img, pre, src, with_scaling=True)
        if run is not None:
            check_compatible(run, DataSpec(shape=x.shape[1:], preprocessing=pre.to_dict(), path=src, intensity=how,
                                           modality=img.meta.get("modality")))
    except _AllFailed as e:
        yield from e.errors
        return
    except ReadError as e:
        yield e if e.path else ReadError(e.message, src)
        yield from left_out
        return
    except MedclfError as e:
        yield ReadError(e.message, src)
        yield from left_out
        return
    except Exception as e:  # a decoder bug on one input must not stop the rest (as in ingest)
        yield ReadError(f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:160]}", src)
        return
    if scorer is None:
        return
    preds = [scorer.predict(torch.from_numpy(x[i : i + batch_size]), explain=explain) for i in range(0, len(x), batch_size)]
    files = None
    if item.series is not None:
        failed = {e.path for e in left_out}
        files = [p for p in item.headers if p not in failed]
    yield Scored(source=src, image=img, scan=x, prediction=_concat(preds), series=item.series, files=files,
                 slice_files=slice_files)
    yield from left_out


def _concat(preds: list[Prediction]) -> Prediction:
    if len(preds) == 1:
        return preds[0]
    cat = lambda xs: torch.cat(xs)  # noqa: E731
    maps = None
    if preds[0].maps is not None:
        maps = {k: cat([p.maps[k] for p in preds]) for k in preds[0].maps}
    return Prediction(probs=cat([p.probs for p in preds]), pred=cat([p.pred for p in preds]),
                      uncertainty={k: cat([p.uncertainty[k] for p in preds]) for k in preds[0].uncertainty},
                      nfe=cat([p.nfe for p in preds]), extras={k: cat([p.extras[k] for p in preds]) for k in preds[0].extras},
                      stats={k: cat([p.stats[k] for p in preds]) for k in preds[0].stats},
                      maps=maps)


def input_warnings(scored: Scored) -> list[str]:
    """What the user must know about how an input was read (files of a series left out)."""
    n = scored.image.meta.get("skipped_files")
    if not n:
        return []
    why = "; ".join(scored.image.meta.get("skipped_reasons") or [])
    return [f"{scored.source}: {n} file(s) of the series could not be read and were left out ({why})"]


def rows(scored: Scored, classes: list[str]) -> list[dict]:
    """One output row per slice (one for a 2-D image). Multi-label runs predict a list of findings.

    ``input`` names the file, or the series (see ``Planned.name``); a series' rows add ``series``
    (its label), ``file`` (that slice's file, or the series' first when files hold several frames)
    and ``n_files``; a 4-D NIfTI's rows add ``volume`` (its index on the file's 4th axis). Methods that
    sample labels (DiffMIC) add ``interval``: per class [low, high], the 95% interval of the sampled
    label values (``medclf.methods.diffmic.label_interval``)."""
    p = scored.prediction
    out = []
    n = len(p.pred)
    for s in range(n):
        row = {"input": scored.source}
        if scored.image.meta.get("volume") is not None:  # one volume of a 4-D NIfTI
            row["volume"] = int(scored.image.meta["volume"])
        if n > 1:
            row["slice"] = s
        if scored.series is not None:  # a DICOM series: its label, the slice's own file (else its first) and size
            row["series"] = scored.series
            row["file"] = (scored.slice_files[s] if scored.slice_files and len(scored.slice_files) == n
                           else (scored.files or [""])[0])
            row["n_files"] = len(scored.files or [])
        if scored.image.meta.get("skipped_files"):
            row["skipped_files"] = int(scored.image.meta["skipped_files"])
        pred = ([c for c, on in zip(classes, p.pred[s].tolist()) if on] if p.pred.ndim == 2
                else classes[int(p.pred[s])])
        row.update({
            "prediction": pred,
            "probabilities": {c: round(float(p.probs[s, k]), 6) for k, c in enumerate(classes)},
            "uncertainty": {k: round(float(v[s]), 6) for k, v in p.uncertainty.items()},
            **{name: {c: round(float(v[s, k]), 6) for k, c in enumerate(classes)} for name, v in p.extras.items()
               if name not in ("interval_low", "interval_high")},
            **({"interval": {c: [round(float(p.extras["interval_low"][s, k]), 6), round(float(p.extras["interval_high"][s, k]), 6)]
                             for k, c in enumerate(classes)}} if "interval_low" in p.extras else {}),
            **{name: round(float(v[s]), 6) for name, v in p.stats.items()},
            "nfe": int(p.nfe[s]),
        })
        out.append(row)
    return out


def load_scorer(model: str | Path | None, device: str = "auto", **scorer_options):
    """(run, scorer, preprocessing) from --model / $MEDCLF_MODEL."""
    from medclf.runs import load_classifier, resolve_model
    from medclf.training.loop import distributed_env, resolve_device

    dev = resolve_device(device)
    _, world, local_rank = distributed_env()
    if dev.type == "cuda" and world > 1:  # torchrun: each rank on its LOCAL_RANK's GPU (shared when fewer)
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    run, method, net = load_classifier(resolve_model(model), dev)
    scorer = method.scorer(net, run.classes, run.config.get("calibration", {}), dev, **scorer_options)
    if run.config.get("resize"):  # trained at another size than its data: resize exactly as training did
        from medclf.scoring.resize import ResizedScorer

        scorer = ResizedScorer(scorer, run.config["resize"]["to"])
    return run, scorer, PreprocessConfig.from_dict(run.config["preprocessing"])
