"""Experiment tracking for ``finetune`` / ``pretrain --log tensorboard|mlflow``: one small interface.

The loop and the fit flow call ``log_params`` (the run's config and cache fingerprint, once),
``begin(step)`` (the step training starts or resumes at), ``log_metrics(metrics, step)`` (loss, lr,
samples/s every ``log_every`` steps; the post-training checks at the last step) and ``close``; they
never know which tracker is behind it. ``metrics.jsonl``
stays the run's own record: a tracker is a view for dashboards, never read back by medclf.

Only rank 0 logs (``make_tracker`` hands other ranks a ``NullTracker``), but every rank checks that
the package is installed, so a missing one stops all ranks alike instead of leaving peers waiting.
The packages are imported on demand, and nothing is written before the first call: a command
refused before training (an existing run, bad data) leaves no ``tensorboard/`` or ``mlruns/`` behind.

* TensorBoard: ``RUN/tensorboard/`` event files (scalars; the params as hparams and as a text
  summary). On resume from step s the writer's ``purge_step`` is s + 1: TensorBoard drops the points
  an interrupted run logged past its last checkpoint, as ``metrics.jsonl`` is truncated to step <= s.
* MLflow: ``$MLFLOW_TRACKING_URI`` if set, else a file store under ``RUN/mlruns`` (experiment
  ``$MLFLOW_EXPERIMENT_NAME`` or "medclf"); one MLflow run per command, tagged with the run folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from medclf.errors import MedclfError

TRACKERS = ("tensorboard", "mlflow")
EXTRA = "pip install 'medclf[track]'"
TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
_MAX_PARAM = 500  #: longest param value kept (MLflow's limit is 6,000; a class list can be long)


class Tracker(Protocol):
    """What the training loop and the fit flow call."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def begin(self, step: int) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class NullTracker:
    """No ``--log``, or a rank other than 0: logs nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def begin(self, step: int) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b": leaf}; lists become JSON text (trackers take scalars only)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def numeric(d: dict) -> dict[str, float]:
    """The finite numbers (bools as 0/1) among ``flatten(d)``'s leaves: what a tracker can plot."""
    return {k: float(v) for k, v in flatten(d).items()
            if isinstance(v, (int, float)) and not isinstance(v, str) and math.isfinite(float(v))}


def run_params(record: dict) -> dict[str, str | int | float | bool]:
    """A run's config as tracker params: method, method and training options, data (cache fingerprint,
    preprocessing, shape, classes), seed; values that are not scalars as (truncated) text."""
    keep = {k: v for k, v in record.items() if k not in ("start", "intensities", "modalities", "cache")}
    out: dict[str, str | int | float | bool] = {}
    for k, v in flatten(keep).items():
        if v is None or not isinstance(v, (str, int, float, bool)):
            v = str(v)
        out[k] = v[:_MAX_PARAM] if isinstance(v, str) else v
    return out


class TensorBoardTracker:
    """Scalars and hparams in ``RUN/tensorboard/`` (``torch.utils.tensorboard``, needs the tensorboard package)."""

    def __init__(self, run_dir: Path):
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = None
        self._params: dict | None = None
        self._purge: int | None = None

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides points >= it from earlier event files (a resumed run's stale tail)
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge)
            if self._params is not None:
                self._write_params(self._params)
        return self._writer

    def _write_params(self, params: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        w = self._writer
        # in this run's own event file (SummaryWriter.add_hparams would start a sub-run per call)
        for summary in hparams(params, {"loss": 0.0, "lr": 0.0, "samples_per_s": 0.0}):
            w.file_writer.add_summary(summary)
        w.add_text("config", "```\n" + json.dumps(params, indent=1, sort_keys=True, default=str) + "\n```")
        w.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        self._params = dict(params)
        if self._writer is not None:
            self._write_params(self._params)

    def begin(self, step: int) -> None:
        self._purge = step + 1 if step > 0 else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        w = self._open()
        for k, v in metrics.items():
            w.add_scalar(k, float(v), global_step=step)
        w.flush()  # a crash later loses nothing already logged

    def close(self, failed: bool = False) -> None:
        if self._writer is None and self._params is not None and not failed:
            self._open()  # a run with nothing to log still records its params; a failed start writes nothing
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MlflowTracker:
    """Params, metrics and tags of one MLflow run (``MlflowClient``: no global active run is touched)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # mlflow >= 3.x refuses its file store unless opted in; medclf's default is that store (offline, no
            # database package needed). An explicit MLFLOW_ALLOW_FILE_STORE=false is respected.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (self.run_dir / MLRUNS_DIR).resolve().as_uri()
        self.uri = uri
        self.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "medclf"
        self._client = None
        self.run_id: str | None = None

    def _run(self) -> str:
        if self.run_id is None:
            from mlflow.tracking import MlflowClient

            try:
                self._client = MlflowClient(tracking_uri=self.uri)
                exp = self._client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else self._client.create_experiment(self.experiment)
                run = self._client.create_run(exp_id, run_name=self.run_dir.name,
                                              tags={"medclf.run": str(self.run_dir.resolve())})
            except Exception as e:  # an unreachable server, a refused store: one line, not mlflow's traceback
                raise MedclfError(f"MLflow tracking at {self.uri} failed ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:160]})") from None
            self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = self._run()
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(run_id, params=items[i : i + 100])

    def begin(self, step: int) -> None:
        run_id = self._run()
        self._client.set_tag(run_id, "medclf.start_step", str(step))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        run_id = self._run()
        now = int(time.time() * 1000)
        self._client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def close(self, failed: bool = False) -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _require(kind: str) -> None:
    """Import the tracker's package now (on every rank), or say in one line what to install."""
    try:
        if kind == "tensorboard":
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        else:
            import mlflow  # noqa: F401  (mlflow-skinny provides it)
            from mlflow.tracking import MlflowClient  # noqa: F401
    except ImportError as e:
        raise MedclfError(f"--log {kind} needs {e.name or kind}: {EXTRA}") from None


def make_tracker(kind: str | None, run_dir: str | Path, rank: int = 0) -> Tracker:
    """The tracker for ``--log KIND`` (None: no tracking); ranks other than 0 get a ``NullTracker``."""
    if kind is None:
        return NullTracker()
    if kind not in TRACKERS:
        raise MedclfError(f"unknown --log {kind!r} ({', '.join(TRACKERS)})")
    _require(kind)
    if rank != 0:
        return NullTracker()
    return TensorBoardTracker(Path(run_dir)) if kind == "tensorboard" else MlflowTracker(Path(run_dir))
