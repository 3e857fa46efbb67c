"""What a run is: one folder, written atomically, loaded without ever unpickling.

    RUN/config.json        kind, method, its config, training config, cache fingerprint, classes,
                           preprocessing, shape, how the weights started, medclf version, run format
    RUN/model.safetensors  inference weights (the EMA of the trained model)
    RUN/<extra>.safetensors  what a method exports beside it (a pretraining run's encoder)
    RUN/metrics.jsonl      training curve
    RUN/checkpoints/step-NNNNNNN/  model, ema, optimizer (safetensors) + state.json, for --resume

A model package (``medclf export RUN --out MODEL.zip``) loads as the run it holds: ``load_run``
unpacks it once (``medclf.io.package``, safetensors and JSON only) and reads that folder.

Every command that reads or writes a run goes through this module: finetune and pretrain share
its write/resume steps, and finetune --init, eval, zero-shot and classify share
``check_compatible`` and the loaders. It sits above ``methods`` (a run is rebuilt by its method)
and below ``training`` (which writes runs).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from medclf import __version__
from medclf.atomic import atomic_write_text
from medclf.errors import MedclfError
from medclf.io.package import is_package, unpack_package
from medclf.io.weights import load_tensors, save_tensors
from medclf.methods import Method, get_method

RUN_FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


@dataclass
class Run:
    path: Path
    config: dict
    package: Path | None = None  #: the model package (``medclf export``) this run was unpacked from

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def kind(self) -> str:
        return self.config.get("kind", "classifier")

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    def weights(self, name: str = WEIGHTS) -> dict:
        return load_tensors(self.path / name)


def write_config(run_dir: Path, config: dict) -> None:
    config = {"run_format": RUN_FORMAT, "medclf_version": __version__, **config}
    atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=1, sort_keys=True, default=str))


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG
    if not cfg_path.exists():
        raise MedclfError("not a medclf run (no config.json); train one with `medclf finetune`", path)
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MedclfError(f"unreadable config.json ({e})", path) from None
    if int(config.get("run_format", 0)) > RUN_FORMAT:
        raise MedclfError(f"this run was written by medclf {config.get('medclf_version')} (run format "
                          f"{config.get('run_format')}), newer than this medclf {__version__}: upgrade medclf", path)
    return config


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.exists():
        raise MedclfError("model run not found", path)
    package = path if is_package(path) else None  # MODEL.zip: unpacked once, then loaded as its run folder
    if package:
        path = unpack_package(package)
    config = read_config(path)
    if not (path / WEIGHTS).exists():
        raise MedclfError("run has no model.safetensors (training did not finish? resume it with --resume)", path)
    return Run(path=path, config=config, package=package)


def resolve_model(model: str | Path | None) -> Path:
    """--model, else $MEDCLF_MODEL, else an error that says how to get a model."""
    if model:
        return Path(model)
    env = os.environ.get("MEDCLF_MODEL")
    if env:
        return Path(env)
    raise MedclfError("no model given: pass --model RUN (a folder written by `medclf finetune`) or set MEDCLF_MODEL")


# --- compatibility: one check for every place a run meets data -------------------------------------------


@dataclass
class DataSpec:
    """What ``check_compatible`` reads of data: a ``CacheInfo`` has the same three attributes."""

    shape: tuple
    preprocessing: dict
    path: Path | str | None = None
    intensity: str | None = None  #: how this input was scaled ("windows:brain", "rgb/255", "percentile:...")
    modality: str | None = None  #: DICOM Modality of this input (CT, MR, ...), when it has one


def intensity_family(how: str) -> str:
    """"rgb/255" (a colour photograph) or "grey" (CT in HU windows, or another greyscale scan by percentiles).

    Only colour vs greyscale is refused: a CT slice exported to PNG is still the same anatomy, but a
    dermoscopy photograph through a head-CT model (or the reverse) can only get a meaningless answer."""
    return "rgb/255" if how.startswith("rgb") else "grey"


_FAMILY_WORDS = {"grey": "greyscale scans", "rgb/255": "colour photographs"}


def check_compatible(run: Run | dict, data, what: str = "the model") -> None:
    """Refuse data the run was not built for: channels and image shape, then the preprocessing
    fingerprint (windows, intensity scaling, resize rules). ``run``: a Run or its config;
    ``data``: a ``CacheInfo`` or a ``DataSpec`` (classify's preprocessed inputs)."""
    from medclf.preprocessing import PreprocessConfig

    config = run.config if isinstance(run, Run) else run
    # a run trained with on-the-fly resize takes data of its cache's size (``data_shape``), not its model's
    want, got = list(config.get("data_shape") or config["shape"]), list(data.shape)
    verb = "pretrained" if config.get("kind") == "pretrain" else "trained"
    if want != got:
        fix = "--window / --channels" if want[0] != got[0] else "--size"
        raise MedclfError(f"the data's images are {got} (C, H, W), {what} was {verb} on {want}: ingest with the "
                          f"run's {fix}", data.path)
    seen, how = config.get("intensities"), getattr(data, "intensity", None)
    if seen and how and intensity_family(how) not in {intensity_family(h) for h in seen}:
        want_words = " / ".join(sorted({_FAMILY_WORDS.get(intensity_family(h), h) for h in seen}))
        raise MedclfError(f"this input reads as {_FAMILY_WORDS.get(intensity_family(how), how)} ({how}), but {what} "
                          f"was {verb} on {want_words} ({', '.join(seen)}): it would get a confident, meaningless "
                          "answer", data.path)
    trained_on, modality = config.get("modalities"), getattr(data, "modality", None)
    if trained_on and modality not in (None, "unknown") and modality not in trained_on:  # unknown: PNG/NIfTI
        raise MedclfError(f"this input is {modality}, but {what} was {verb} on {' / '.join(trained_on)} images only",
                          data.path)
    mine, theirs = config.get("preprocessing"), data.preprocessing
    if mine and theirs:
        a, b = PreprocessConfig.from_dict(mine), PreprocessConfig.from_dict(theirs)
        if a.fingerprint() != b.fingerprint():
            da, db = a.to_dict(), b.to_dict()
            diff = ", ".join(f"{k} {db.get(k)} vs {v}" for k, v in sorted(da.items()) if db.get(k) != v and k != "window_values")
            raise MedclfError(f"the data was preprocessed differently from what {what} was {verb} on ({diff}); "
                              "ingest it with the run's settings, or pass the raw folder so medclf ingests it so",
                              data.path)


# --- loading ---------------------------------------------------------------------------------------------


def build_from_run(run: Run) -> tuple[Method, torch.nn.Module]:
    """(method, model with the run's weights) rebuilt from its config; weights via safetensors only."""
    method = get_method(run.method).from_options(run.config["method_config"])
    method.task = run.config.get("task", "single")
    C, H, _ = run.config["shape"]
    model = method.build(C, len(run.config.get("classes") or []), H)
    try:
        model.load_state_dict(run.weights())
    except RuntimeError as e:
        raise MedclfError(f"weights do not fit the recorded model ({' '.join(str(e).split())[:120]})", run.path) from None
    return method, model


def load_classifier(run_path: str | Path, device: torch.device | None = None):
    """(run, method, model on device, eval mode) for a finished classifier run."""
    run = load_run(run_path)
    if run.kind != "classifier":
        raise MedclfError("a pretraining run holds an encoder, not a classifier: use `medclf eval --zero-shot`, "
                          "`medclf sample` or `medclf finetune --init RUN`", run.path)
    method, model = build_from_run(run)
    return run, method, model.to(device or torch.device("cpu")).eval()


def load_pretraining(run_path: str | Path, device: torch.device | None = None):
    """(run, method, model on device, eval mode) for a finished pretraining run."""
    run = load_run(run_path)
    if run.kind != "pretrain":
        raise MedclfError("not a pretraining run (written by `medclf pretrain`)", run.path)
    method, model = build_from_run(run)
    return run, method, model.to(device or torch.device("cpu")).eval()


def load_encoder(run_path: str | Path):
    """(run, Encoder) of a run: a pretraining run's encoder, or ``model.backbone`` of a classifier with one."""
    run = load_run(run_path)
    method, model = build_from_run(run)
    enc = method.encoder_of(model)
    if enc is None:
        raise MedclfError(f"method {run.method!r} has no image encoder to evaluate zero-shot", run.path)
    return run, enc.eval()


def load_init_encoder(init: str | Path) -> tuple[str, dict, Run]:
    """(encoder name, Encoder state dict, run) of a pretraining run: what ``finetune --init`` loads."""
    run = load_run(init)
    if run.kind != "pretrain":
        raise MedclfError("--init expects a run written by `medclf pretrain`", run.path)
    enc = run.config["encoder"]
    return enc["name"], run.weights(enc["weights"]), run


def start_warnings(start: dict | None) -> list[str]:
    """What a user must hear about how a run's weights started: a partial load is never silent."""
    if not start or not start.get("missing") and not start.get("unexpected"):
        return []
    src = start.get("file", "the starting weights")
    out = []
    if start.get("missing"):
        m = start["missing"]
        out.append(f"{len(m)} encoder tensor(s) were not in {src} and start from the random init "
                   f"(e.g. {', '.join(m[:3])}); all are listed under start.missing in config.json")
    if start.get("unexpected"):
        u = start["unexpected"]
        out.append(f"{len(u)} tensor(s) of {src} fit no encoder parameter and were ignored (e.g. {', '.join(u[:3])})")
    return out


# --- writing: the steps finetune and pretrain share ------------------------------------------------------


#: options ``--resume`` may change; every other one continues as recorded (asking for another value is refused)
RESUME_MAY_CHANGE = ("steps", "device", "num_workers")


def resumed_record(out: Path, cache, kind: str, asked: dict | None = None) -> dict:
    """The config of the run to ``--resume``; refuses a missing run, another kind, other data, or
    ``asked`` options (given explicitly: {config key: value}) that differ from the recorded ones."""
    if not (out / CONFIG).exists():
        raise MedclfError("nothing to resume: no config.json", out)
    saved = read_config(out)
    if saved.get("kind", "classifier") != kind:
        raise MedclfError(f"not a {kind} run: resume it with the command that wrote it", out)
    if saved["cache_fingerprint"] != cache.fingerprint:
        raise MedclfError(f"this run was trained on cache {saved['cache_fingerprint']}, not {cache.fingerprint}", out)
    recorded = {**saved.get("method_config", {}), **saved.get("train", {})}
    changed = [f"--{k.replace('_', '-')} {v} (recorded: {recorded[k]})" for k, v in (asked or {}).items()
               if k not in RESUME_MAY_CHANGE and k in recorded and _differs(v, recorded[k])]
    if changed:
        raise MedclfError(f"--resume continues with the recorded configuration; these options would change it: "
                          f"{', '.join(changed)} (only --steps, --device and --workers may change)", out)
    return saved


def _differs(asked, recorded) -> bool:
    if isinstance(asked, float) or isinstance(recorded, float):
        try:
            return abs(float(asked) - float(recorded)) > 1e-12 * max(1.0, abs(float(recorded)))
        except (TypeError, ValueError):
            return True
    return str(asked) != str(recorded)


def data_record(cache) -> dict:
    """What a run records of the data it was trained on (enough for ``check_compatible``)."""
    return {"cache": str(cache.path), "cache_fingerprint": cache.fingerprint, "shape": list(cache.shape),
            "preprocessing": cache.manifest["preprocessing"], "dataset": cache.manifest["dataset"],
            "split_seed": cache.manifest.get("seed", 0),
            # how the training images were scaled: classify refuses inputs of another kind (RGB through a CT model)
            "intensities": sorted({it["intensity"] for it in cache.items if it.get("intensity")})[:16],
            # and their DICOM modalities (none for PNG/JPEG/NIfTI): classify refuses an MR scan through a CT model
            "modalities": sorted({it["modality"] for it in cache.items if it.get("modality") not in (None, "unknown")})[:16]}


def refuse_existing(out: Path, unfinished_ok: bool = False) -> None:
    """A new run never lands on an old one: a refused command must leave the old run as it was.
    ``unfinished_ok`` (``--resume auto`` with no checkpoint yet): a config without a checkpoint may be replaced."""
    if (out / WEIGHTS).exists():
        raise MedclfError("already holds a trained model; choose a new --out (or --resume to train longer)", out)
    if checkpoint_dirs(out) or ((out / CONFIG).exists() and not unfinished_ok):
        raise MedclfError("holds an unfinished run: pass --resume to continue it (--resume auto starts it if there "
                          "is nothing to resume), or choose a new --out", out)


def should_resume(out: Path, resume: bool | str) -> bool:
    """``--resume auto``: continue when the run has a checkpoint, start when it has none (elastic restarts)."""
    if resume == "auto":
        return bool(checkpoint_dirs(out)) and (out / CONFIG).exists()
    return bool(resume)


def open_run(out: Path, record: dict, resume: bool, unfinished_ok: bool = False) -> None:
    """Create the run folder and write its config before the first step (refuses to overwrite a run)."""
    if not resume:
        refuse_existing(out, unfinished_ok)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, record)


def save_weights(out: Path, method: Method, ema: dict) -> None:
    """The inference weights, then whatever the method exports beside them (each file atomic)."""
    save_tensors(out / WEIGHTS, ema, metadata={"method": method.name})
    for name, (tensors, meta) in method.exports(ema).items():
        save_tensors(out / name, tensors, metadata=meta)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint folder appears only once fully written)."""
    d = run_dir / CHECKPOINTS
    return sorted(p for p in d.glob("step-*") if p.is_dir()) if d.exists() else []


def commit_checkpoint(tmp_dir: Path, final: Path, keep: int = 2) -> None:
    os.replace(tmp_dir, final)
    for old in checkpoint_dirs(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
