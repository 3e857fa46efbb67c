"""``medclf export RUN --out MODEL.zip``: one self-contained, pickle-free file for a run.

The package holds the run's ``config.json`` (configuration, preprocessing, calibration, scoring
settings), ``model.safetensors`` and any other ``*.safetensors`` of the run folder, an optional
``metrics.json`` (the run's own, or a report folder's) and a model card ``README.md``. Members are
written in a fixed order with a fixed timestamp, so the same run exports to the same bytes (and so
unpacks to the same content-addressed folder). ``classify``, ``eval`` and ``explain`` take it as
``--model MODEL.zip``: ``medclf.runs.load_run`` unpacks it (``medclf.io.package``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from medclf import __version__
from medclf.atomic import atomic_write
from medclf.errors import MedclfError
from medclf.export.onnx import scoring_note
from medclf.io.package import check_member_name, check_package, unpack_package
from medclf.runs import CONFIG, WEIGHTS, load_run

CARD = "README.md"
METRICS = "metrics.json"
_EPOCH = (1980, 1, 1, 0, 0, 0)


def open_package(path: str | Path) -> Path:
    """The run folder a package unpacks to (``$MEDCLF_CACHE/models/<sha256[:16]>``)."""
    return unpack_package(path)


def _metrics(run_path: Path, report: str | Path | None) -> dict | None:
    for cand in ([Path(report) / METRICS, Path(report)] if report else []) + [run_path / METRICS]:
        if cand.is_file():
            try:
                return json.loads(cand.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise MedclfError(f"unreadable metrics.json ({e})", cand) from None
    if report:
        raise MedclfError("no metrics.json in the report folder (write one with `medclf eval --report`)", report)
    return None


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "n/a" if v is None else str(v)


def _ci(ci) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]"
    if isinstance(ci, dict) and {"lo", "hi"} <= set(ci):
        return _ci([ci["lo"], ci["hi"]])
    return "not computed"


def model_card(config: dict, metrics: dict | None, name: str) -> str:
    """The package's ``README.md``: what the model is, what it was trained on, how well it did."""
    classes = config.get("classes") or []
    pre = config.get("preprocessing") or {}
    cal = config.get("calibration") or {}
    lines = [
        f"# medclf model: {name}",
        "",
        "**Not for diagnostic use.** A research model: it has not been validated for clinical use and must not "
        "inform the diagnosis or treatment of any patient.",
        "",
        "## Model",
        "",
        f"- method: `{config.get('method')}` ({config.get('kind', 'classifier')}, task {config.get('task', 'single')})",
        f"- classes ({len(classes)}): {', '.join(map(str, classes)) or 'none (a pretraining run)'}",
        f"- input shape (C, H, W): {config.get('shape')}",
        f"- preprocessing: `{json.dumps(pre, sort_keys=True)}`",
        f"- calibration: {('temperature ' + _fmt(cal.get('temperature'))) if 'temperature' in cal else 'none recorded'}",
        f"- licence: {config.get('licence') or config.get('license') or 'unspecified unless set'}",
        f"- trained with medclf {config.get('medclf_version', 'unknown')}; exported with medclf {__version__}",
        "",
        "## Training data",
        "",
        f"- dataset: {config.get('dataset', 'unknown')}",
        f"- cache fingerprint: `{config.get('cache_fingerprint', 'unknown')}`",
        f"- training images (n_train): {config.get('n_train', 'unknown')}",
        f"- split seed: {config.get('split_seed', 'unknown')}",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        ci = metrics.get("ci95") or {}
        lines += [f"On split `{metrics.get('split', '?')}` of cache `{metrics.get('cache_fingerprint', '?')}` "
                  f"(n={metrics.get('n', '?')}; 95% bootstrap intervals):", "",
                  "| metric | value | 95% CI |", "|---|---|---|"]
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "ece", "brier", "nll"):
            if key in metrics:
                lines.append(f"| {key} | {_fmt(metrics[key])} | {_ci(ci.get(key)) if key in ci else 'not computed'} |")
        lines += [""] + [f"- warning: {w}" for w in metrics.get("warnings") or []]
    else:
        lines.append("No evaluation was packaged (export with `--report DIR` from `medclf eval --report DIR`).")
    lines += [
        "",
        "## Intended use",
        "",
        "Research and education: benchmarking diffusion-model classifiers on data preprocessed as above. "
        "Inputs of another modality, preprocessing or population than the training data get confident, "
        "meaningless answers; `medclf` refuses the incompatible ones it can detect.",
        "",
        "## Loading",
        "",
        "`medclf classify SCAN --model THIS.zip` (also `eval`, `explain`). The package holds safetensors and "
        "JSON only: nothing in it is unpickled.",
        "",
        "## ONNX",
        "",
        f"`medclf export RUN --onnx` writes the network alone as an ONNX graph. {scoring_note(config)}",
        "",
    ]
    return "\n".join(lines)


def export_run(run_path: str | Path, out: str | Path, report: str | Path | None = None) -> Path:
    """Write ``out`` (a zip, atomically): the run's config, weights, optional metrics and a model card."""
    run = load_run(run_path)
    out = Path(out)
    if out.is_dir():
        raise MedclfError("is a folder: --out names the package file to write (MODEL.zip)", out)
    weights = sorted(p.name for p in run.path.glob("*.safetensors") if p.is_file())
    for name in weights:
        check_member_name(name, run.path)
    weights = [WEIGHTS] + [n for n in weights if n != WEIGHTS]
    metrics = _metrics(run.path, report)
    name = (run.package.stem if run.package else run.path.name) or "model"
    card = model_card(run.config, metrics, name)

    def entry(n: str, compress: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(n, date_time=_EPOCH)
        info.compress_type = compress
        info.external_attr = 0o644 << 16
        return info

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            zf.writestr(entry(CONFIG, zipfile.ZIP_DEFLATED), (run.path / CONFIG).read_bytes())
            for n in weights:
                with open(run.path / n, "rb") as src, zf.open(entry(n, zipfile.ZIP_STORED), "w", force_zip64=True) as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        dst.write(block)
            if metrics is not None:
                zf.writestr(entry(METRICS, zipfile.ZIP_DEFLATED), json.dumps(metrics, indent=1, sort_keys=True))
            zf.writestr(entry(CARD, zipfile.ZIP_DEFLATED), card.encode("utf-8"))

    atomic_write(out, write)
    check_package(out)  # the package we just wrote passes the checks every load makes
    return out
