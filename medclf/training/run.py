"""Run directories: config + weights written atomically, loaded without ever unpickling.

    RUN/config.json        method, its config, training config, cache fingerprint, classes,
                           preprocessing, medclf version, run format
    RUN/model.safetensors  inference weights (the EMA of the trained model)
    RUN/metrics.jsonl      training curve
    RUN/checkpoints/step-NNNNNNN/  model, ema, optimizer (safetensors) + state.json, for --resume
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from medclf import __version__
from medclf.atomic import atomic_write, atomic_write_text
from medclf.errors import MedclfError

RUN_FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors written atomically (never half a file)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_tensors(path: Path) -> dict:
    """Load a safetensors file; anything else (a pickle, a .pt) is refused, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise MedclfError("weights file not found", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MedclfError(f"not a safetensors file ({' '.join(str(e).split())[:80]}); medclf never unpickles "
                          "checkpoints: convert it with safetensors, or pass a .pt to an option that loads it "
                          "with weights_only=True", path) from None


def load_torch_weights(path: Path) -> dict:
    """A user-supplied .pt/.pth state dict, loaded with ``weights_only=True`` (no arbitrary code)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if not path.exists():
        raise MedclfError("weights file not found", path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MedclfError(f"cannot load weights safely ({type(e).__name__}: {' '.join(str(e).split())[:100]})", path) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise MedclfError("does not hold a state dict", path)
    return sd


@dataclass
class Run:
    path: Path
    config: dict

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    def weights(self) -> dict:
        return load_tensors(self.path / WEIGHTS)


def write_config(run_dir: Path, config: dict) -> None:
    config = {"run_format": RUN_FORMAT, "medclf_version": __version__, **config}
    atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=1, sort_keys=True, default=str))


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.exists():
        raise MedclfError("model run not found", path)
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
    if not (path / WEIGHTS).exists():
        raise MedclfError("run has no model.safetensors (training did not finish? resume it with --resume)", path)
    return Run(path=path, config=config)


def resolve_model(model: str | Path | None) -> Path:
    """--model, else $MEDCLF_MODEL, else an error that says how to get a model."""
    if model:
        return Path(model)
    env = os.environ.get("MEDCLF_MODEL")
    if env:
        return Path(env)
    raise MedclfError("no model given: pass --model RUN (a folder written by `medclf finetune`) or set MEDCLF_MODEL")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint folder appears only once fully written)."""
    d = run_dir / CHECKPOINTS
    return sorted(p for p in d.glob("step-*") if p.is_dir()) if d.exists() else []


def commit_checkpoint(tmp_dir: Path, final: Path, keep: int = 2) -> None:
    os.replace(tmp_dir, final)
    for old in checkpoint_dirs(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
