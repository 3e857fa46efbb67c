"""classify's results as DICOM Structured Reports: one TID 1500 Comprehensive 3D SR per DICOM series or image.

A PACS or viewer can file, show and query an SR next to the images it describes, which it cannot do
with a JSON line. highdicom builds the document (``MeasurementReport`` -> ``MeasurementsAndQualitativeEvaluations``
-> ``QualitativeEvaluation`` / ``Measurement``, ``AlgorithmIdentification``); this module only decides
what goes in:

- one measurement group for the series (or image): the predicted class as a qualitative evaluation
  (concept "Finding"), each class probability, each uncertainty the row reports and the network
  evaluations spent, as unitless measurements; the source images it was read from;
- for a series stored one slice per file, one more group per slice, referencing that slice's image;
- the algorithm: name "medclf", its version, and parameters (method, run name, cache fingerprint,
  decision rule, budget, ...);
- Verification Flag UNVERIFIED, Completion Flag COMPLETE, Preliminary Flag PRELIMINARY: an
  algorithm's unreviewed output.

Identifiers. The source's Study, Series and SOP Instance UIDs are read again from the input files
(headers only) when a report is built and go into the report object only: never into a cache, a log,
a printed row, an error message or a file name (files are named by the series label, a pseudonym).
The report is a derived object in the source's study, so the DICOM standard requires the Patient and
General Study modules (patient name, ID, birth date, sex, study UID, date, accession number) to be
copied from the source: this is the one place medclf writes patient identifiers.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medclf import __version__
from medclf.atomic import atomic_write
from medclf.errors import MedclfError
from medclf.export.maps import _overall
from medclf.io.dicom import is_dicom, tolerated_warnings
from medclf.privacy import pseudonym

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from medclf.inference import Scored

__all__ = ["CODING_SCHEME", "predicted_class_code", "class_concept", "ReportContext", "SRWriter", "build_report", "dicom_sources", "scoring_settings"]

#: what highdicom warned about while building a report (a source value it doubts, which can be a patient's
#: name) goes here at DEBUG, quoted values masked, never raw to stderr
log = logging.getLogger("medclf.export.dicom_sr")

#: the private coding scheme of medclf's concepts (class names, probabilities, uncertainties): DICOM
#: reserves designators starting "99" for local schemes; it is identified in the CodingSchemeIdentificationSequence
CODING_SCHEME = "99MEDCLF"

#: what each uncertainty field of a row means (the SR's code meaning); other keys are named as they are
_UNCERTAINTY_MEANING = {
    "entropy": "Normalized entropy of class probabilities",
    "vote_entropy": "Normalized entropy of trial votes",
    "margin": "One minus probability margin",
    "vote_margin": "One minus vote margin",
}

#: Type 2 attributes of the Patient / General Study modules highdicom reads from the first source as
#: attributes (absent ones raise); a source without them gets them empty, as Type 2 allows
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


@dataclass
class ReportContext:
    """What every report of one classify invocation shares: the classes and how they were scored."""

    classes: list[str]
    method: str
    run_name: str
    cache_fingerprint: str
    scoring: dict[str, Any] = field(default_factory=dict)  #: decision rule, budget, ... (``scoring_settings``)

    @classmethod
    def from_run(cls, run, scorer) -> "ReportContext":
        """From a loaded run (``runs.Run``) and the scorer classify uses (its settings are what decided)."""
        if run.config.get("task") == "multilabel":
            raise MedclfError("--dicom-sr needs a single-label run (one predicted class per series, as explain "
                              "reports it); this run is multi-label", run.path)
        name = Path(run.package).stem if getattr(run, "package", None) else Path(run.path).name
        return cls(classes=list(run.classes), method=str(run.config.get("method", "")), run_name=name,
                   cache_fingerprint=str(run.config.get("cache_fingerprint", "")),
                   scoring=scoring_settings(scorer, run.config))

    def parameters(self) -> list[str]:
        """AlgorithmParameters: ``key=value`` text items, method and run first."""
        items = {"method": self.method, "run": self.run_name, "cache_fingerprint": self.cache_fingerprint, **self.scoring}
        return [f"{k}={_text(v)}" for k, v in items.items()]


def _text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def scoring_settings(scorer, run_config: dict) -> dict[str, Any]:
    """The scorer settings that decided each prediction: decision rule and budget.

    The diffusion classifier's scorer carries its ``ScoringConfig`` (the run's values with classify's
    options applied); the label-sampling methods' scorers take argmax of calibrated probabilities and
    spend the budget recorded in the run's method configuration."""
    inner = getattr(scorer, "inner", scorer)  # ResizedScorer wraps the method's scorer
    out: dict[str, Any] = {}
    cfg = getattr(inner, "cfg", None)
    if cfg is not None and hasattr(cfg, "decision"):
        out["decision"] = cfg.decision
        out["budget_trials"] = int(cfg.trials)
        out["adaptive"] = bool(cfg.adaptive)
        if cfg.adaptive:  # the pruning rule's settings, whichever this scorer version has
            out.update({k: getattr(cfg, k) for k in ("prune_alpha", "prune_z", "min_trials") if hasattr(cfg, k)})
        out["seed"] = int(cfg.seed)
    else:
        out["decision"] = "argmax of calibrated probabilities"
        mc = run_config.get("method_config") or {}
        for key in ("sampler", "diffusion_steps", "samples"):
            if key in mc:
                out[key] = mc[key]
    if getattr(scorer, "size", None) and scorer is not inner:
        out["resize"] = int(scorer.size)
    return out


def dicom_sources(scored: "Scored") -> list[str]:
    """The DICOM files a result was computed from (a series' files in slice order, or the one file).

    Raises MedclfError naming the input when it is not DICOM (NIfTI, PNG, ...): an SR describes DICOM images."""
    if scored.series is not None and scored.files:
        return list(scored.files)
    src = Path(scored.source)
    if src.is_file() and is_dicom(src):
        return [str(src)]
    raise MedclfError("no DICOM SR: the input is not DICOM (an SR references DICOM images by their UIDs)", scored.source)


def _headers(paths: list[str]) -> list["Dataset"]:
    """Each source's header, read again (no pixels) for the UIDs the report references."""
    from medclf.io.dicom import source_headers

    out = source_headers(paths, "SR")
    studies = {str(ds.StudyInstanceUID) for ds in out}
    if len(studies) > 1:  # never names the UIDs: they are identifiers
        raise MedclfError(f"no DICOM SR: the series' files belong to {len(studies)} studies", paths[0])
    return out


def _first_evidence(ds: "Dataset") -> "Dataset":
    """The first source's header with absent Type 2 patient/study attributes set empty (highdicom reads them).

    A source flagged PatientIdentityRemoved YES without the Type 1C method that flag requires (seen in
    public de-identified sets) would make the SR, which copies the Patient module, invalid: the method
    is then recorded as unknown rather than left out."""
    ds = ds.copy()
    for kw in _TYPE2:
        if kw not in ds:
            setattr(ds, kw, None)
    if (str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not ds.get("DeidentificationMethod")
            and not ds.get("DeidentificationMethodCodeSequence")):
        ds.DeidentificationMethod = "not recorded in the source"
    return ds


def predicted_class_code():
    """Concept name of the predicted-class evaluation."""
    return _concept("CLASS", "Predicted class")


def class_concept(name: str):
    """A class of the run as a coded concept of medclf's scheme: value and meaning are its name."""
    return _concept(name, name)


def _code_value(text: str) -> str:
    """A class or field name as a code value: highdicom stores values over 16 characters as LongCodeValue."""
    v = re.sub(r"\s+", "_", str(text).strip())
    return v or "_"


def _concept(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=_code_value(value)[:64], scheme_designator=CODING_SCHEME, meaning=str(meaning)[:64])


def _group(ctx: ReportContext, tracking: str, pred: str, probs: dict[str, float], uncertainty: dict[str, float],
           nfe: int | None, refs: list[tuple[str, str]]):
    """One measurement group: predicted class, probabilities, uncertainties (and NFE) over ``refs`` images."""
    from highdicom import UID
    from highdicom.sr import (AlgorithmIdentification, Measurement, MeasurementsAndQualitativeEvaluations,
                              QualitativeEvaluation, SourceImageForMeasurementGroup, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    algo = AlgorithmIdentification(name="medclf", version=__version__, parameters=ctx.parameters())
    one = codes.UCUM.NoUnits
    measurements = [Measurement(name=_concept(f"P-{c}", f"Probability of {c}"), value=float(p), unit=one,
                                algorithm_id=algo) for c, p in probs.items() if p is not None]
    measurements += [Measurement(name=_concept(f"U-{k}", _UNCERTAINTY_MEANING.get(k, f"Uncertainty {k}")), value=float(v),
                                 unit=one, algorithm_id=algo) for k, v in uncertainty.items()]
    if nfe is not None:
        measurements.append(Measurement(name=_concept("NFE", "Network function evaluations"), value=float(nfe),
                                        unit=one, algorithm_id=algo))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=UID(), identifier=tracking[:64]),
        algorithm_id=algo,
        # named by a medclf concept: TID 1501 reserves DCM "Finding" for the group's finding type
        qualitative_evaluations=[QualitativeEvaluation(name=predicted_class_code(), value=class_concept(pred))],
        measurements=measurements,
        source_images=[SourceImageForMeasurementGroup(referenced_sop_class_uid=cls, referenced_sop_instance_uid=uid)
                       for cls, uid in refs],
    )


def _series_uncertainty(unc: dict[str, np.ndarray], probs: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    """A series' uncertainty: that of the slice which drove ``_overall``'s call (the most probable slice
    predicted positive, else the slice most confidently negative); one slice: its own."""
    if len(pred) == 1:
        k = 0
    else:
        pos = np.flatnonzero(pred != 0)
        k = int(pos[np.argmax(probs[pos, pred[pos]])]) if len(pos) else int(np.argmax(probs[:, 0]))
    return {name: float(v[k]) for name, v in unc.items()}


def build_report(scored: "Scored", ctx: ReportContext, label: str):
    """The Comprehensive 3D SR (a ``highdicom.sr.Comprehensive3DSR``) of one classified DICOM series or image.

    ``label`` names the series in the report's text (its tracking identifiers): a pseudonym, never a UID."""
    from highdicom import UID
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from highdicom.sr import (Comprehensive3DSR, DeviceObserverIdentifyingAttributes, MeasurementReport,
                              ObservationContext, ObserverContext)
    from pydicom.sr.codedict import codes

    sources = dicom_sources(scored)
    headers = _headers(sources)
    p = scored.prediction
    probs = p.probs.detach().cpu().numpy().astype(np.float64)
    pred = p.pred.detach().cpu().numpy()
    if pred.ndim != 1:
        raise MedclfError("--dicom-sr needs single-label predictions (this run is multi-label)", scored.source)
    pred = pred.astype(np.int64)
    unc = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in p.uncertainty.items()}
    nfe = p.nfe.detach().cpu().numpy()
    classes = ctx.classes

    overall, overall_probs = _overall(probs, pred, classes)  # the series rule explain uses
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in headers]
    groups = [_group(ctx, f"{label} {'series' if len(sources) > 1 else 'image'}", overall, overall_probs,
                     _series_uncertainty(unc, probs, pred, classes), int(nfe.sum()), refs)]
    by_path = dict(zip(sources, refs))
    if len(pred) > 1 and scored.slice_files and len(scored.slice_files) == len(pred):
        # one file per slice: each slice's own result references its own image. (A multi-frame file's
        # slices are not listed: the reader's slice order need not be the file's frame order.)
        for s, f in enumerate(scored.slice_files):
            groups.append(_group(ctx, f"{label} slice {s}", classes[int(pred[s])],
                                 {c: float(probs[s, j]) for j, c in enumerate(classes)},
                                 {k: float(v[s]) for k, v in unc.items()}, int(nfe[s]), [by_path[f]]))

    device = ObserverContext(observer_type=codes.DCM.Device,
                             observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                                 uid=UID(), name="medclf", manufacturer_name="medclf", model_name=ctx.method[:64] or None))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=device),
                               procedure_reported=codes.LN.CTUnspecifiedBodyRegion
                               if str(headers[0].get("Modality", "")) == "CT" else _imaging_procedure(),
                               imaging_measurements=groups)
    scheme = CodingSchemeIdentificationItem(designator=CODING_SCHEME, name="medclf classes and model outputs",
                                            responsible_organization="medclf")
    evidence = [_first_evidence(headers[0]), *headers[1:]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = Comprehensive3DSR(
            evidence=evidence, content=report[0], series_instance_uid=UID(), series_number=9901, sop_instance_uid=UID(),
            instance_number=1, manufacturer="medclf", is_complete=True, is_final=False, is_verified=False,
            series_description="medclf classification (unverified)", manufacturer_model_name=ctx.method[:64] or "medclf",
            software_versions=f"medclf {__version__}", coding_schemes=[scheme])
    for w in caught:
        log.debug("%s: %s", label, _scrub(str(w.message)))
    return sr


def _imaging_procedure():
    from highdicom.sr import CodedConcept

    return CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging procedure")


def _file_label(scored: "Scored", sources: list[str]) -> str:
    """A series' label (``inference._series_label``: number, modality, pseudonym); a single file gets one
    the same way, plus a pseudonym of its instance (several images of one series must not collide)."""
    if scored.series is not None:
        return scored.series
    import pydicom

    from medclf.inference import _series_label

    with tolerated_warnings(sources[0]):
        ds = pydicom.dcmread(sources[0], stop_before_pixels=True,
                             specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
    base = _series_label(sources[0], pseudonym("series", str(ds.get("SeriesInstanceUID") or sources[0])))
    return f"{base}-{pseudonym('instance', str(ds.get('SOPInstanceUID') or sources[0]))[:8]}"


class SRWriter:
    """Writes one SR per result into ``out_dir`` (atomically), naming files by pseudonyms; returns the paths."""

    def __init__(self, out_dir: str | Path, ctx: ReportContext):
        self.out_dir = Path(out_dir)
        self.ctx = ctx
        self._used: set[str] = set()

    def _name(self, label: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", label) or "report"
        name, k = base, 1
        while name in self._used:
            k += 1
            name = f"{base}-{k}"
        self._used.add(name)
        return f"{name}.SR.dcm"

    def write(self, scored: "Scored") -> Path:
        """Build and write the SR of one result; raises MedclfError naming the input when it cannot."""
        sources = dicom_sources(scored)
        try:
            label = _file_label(scored, sources)
        except Exception as e:
            raise MedclfError(f"cannot re-read the DICOM header for the SR ({type(e).__name__})", sources[0]) from None
        try:
            sr = build_report(scored, self.ctx, label)
        except MedclfError:
            raise
        except Exception as e:  # highdicom's checks of a source's values: this input's SR only, the rest go on
            raise MedclfError(f"cannot build the DICOM SR ({type(e).__name__}: {_scrub(str(e))})", scored.source) from None
        path = self.out_dir / self._name(label)
        atomic_write(path, lambda tmp: sr.save_as(tmp, enforce_file_format=True))
        return path


def _scrub(msg: str) -> str:
    """An error text without UID-like values or quoted values (they can be identifiers), one line, short."""
    msg = re.sub(r"\b\d+(\.\d+){3,}\b", "<uid>", " ".join(msg.split()))
    return re.sub(r"\"[^\"]*\"|'[^']*'", "'…'", msg)[:160]
