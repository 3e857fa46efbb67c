"""Applying a trained run to files as users have them: read, repeat the run's preprocessing, score."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from medclf.errors import MedclfError, ReadError
from medclf.io import ImageData, is_dicom, read_dicom_series, read_image
from medclf.preprocessing import PreprocessConfig, preprocess
from medclf.scoring.base import Prediction

LIST_SUFFIXES = (".txt", ".lst", ".list")


def expand_inputs(inputs: list[str]) -> list[str]:
    """Inputs as given, with text files of paths (and ``-`` for stdin) expanded to their lines."""
    out: list[str] = []
    for s in inputs:
        if s == "-":
            out += [line.strip() for line in sys.stdin if line.strip() and not line.startswith("#")]
        elif Path(s).suffix.lower() in LIST_SUFFIXES and Path(s).is_file():
            base = Path(s).parent
            for line in Path(s).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line)
                    out.append(str(p if p.is_absolute() or p.exists() else base / p))
        else:
            out.append(s)
    return out


def load_input(path: str | Path) -> ImageData:
    """A file of any supported kind, or a folder holding one DICOM series."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and is_dicom(f))
        if not files:
            raise ReadError("folder holds no DICOM files (pass image files, or a DICOM series folder)", p)
        img, errors = read_dicom_series(files)
        if errors:  # the series was read without them: say so in every row and on stderr (never silent)
            img.meta["skipped_files"] = len(errors)
            img.meta["skipped_reasons"] = sorted({reason for _, reason in errors})[:3]
        return img
    return read_image(p)


@dataclass
class Scored:
    source: str
    image: ImageData
    scan: np.ndarray  #: (S, C, size, size) preprocessed
    prediction: Prediction


def prepare(img: ImageData, pre: PreprocessConfig, path: str) -> np.ndarray:
    try:
        x, _ = preprocess(img, pre)
    except ReadError as e:
        raise ReadError(e.message, path) from None
    return x


def score_inputs(inputs: list[str], scorer, pre: PreprocessConfig, batch_size: int = 32,
                 explain: bool = False, run=None) -> Iterator[Scored | ReadError]:
    """Yield a ``Scored`` per readable input and a ``ReadError`` per bad one; never stops early.

    With ``run``, each preprocessed input is checked against it (``runs.check_compatible``)."""
    from medclf.runs import DataSpec, check_compatible

    for src in inputs:
        try:
            img = load_input(src)
            x = prepare(img, pre, src)
            if run is not None:
                check_compatible(run, DataSpec(shape=x.shape[1:], preprocessing=pre.to_dict(), path=src))
        except ReadError as e:
            yield e if e.path else ReadError(e.message, src)
            continue
        except MedclfError as e:
            yield ReadError(e.message, src)
            continue
        preds = [scorer.predict(torch.from_numpy(x[i : i + batch_size]), explain=explain) for i in range(0, len(x), batch_size)]
        yield Scored(source=src, image=img, scan=x, prediction=_concat(preds))


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
                      maps=maps)


def input_warnings(scored: Scored) -> list[str]:
    """What the user must know about how an input was read (files of a series left out)."""
    n = scored.image.meta.get("skipped_files")
    if not n:
        return []
    why = "; ".join(scored.image.meta.get("skipped_reasons") or [])
    return [f"{scored.source}: {n} file(s) of the series could not be read and were left out ({why})"]


def rows(scored: Scored, classes: list[str]) -> list[dict]:
    """One output row per slice (one for a 2-D image). Multi-label runs predict a list of findings."""
    p = scored.prediction
    out = []
    n = len(p.pred)
    for s in range(n):
        row = {"input": scored.source}
        if n > 1:
            row["slice"] = s
        if scored.image.meta.get("skipped_files"):
            row["skipped_files"] = int(scored.image.meta["skipped_files"])
        pred = ([c for c, on in zip(classes, p.pred[s].tolist()) if on] if p.pred.ndim == 2
                else classes[int(p.pred[s])])
        row.update({
            "prediction": pred,
            "probabilities": {c: round(float(p.probs[s, k]), 6) for k, c in enumerate(classes)},
            "uncertainty": {k: round(float(v[s]), 6) for k, v in p.uncertainty.items()},
            **{name: {c: round(float(v[s, k]), 6) for k, c in enumerate(classes)} for name, v in p.extras.items()},
            "nfe": int(p.nfe[s]),
        })
        out.append(row)
    return out


def load_scorer(model: str | Path | None, device: str = "auto", **scorer_options):
    """(run, scorer, preprocessing) from --model / $MEDCLF_MODEL."""
    from medclf.runs import load_classifier, resolve_model
    from medclf.training.loop import resolve_device

    dev = resolve_device(device)
    run, method, net = load_classifier(resolve_model(model), dev)
    scorer = method.scorer(net, run.classes, run.config.get("calibration", {}), dev, **scorer_options)
    return run, scorer, PreprocessConfig.from_dict(run.config["preprocessing"])
