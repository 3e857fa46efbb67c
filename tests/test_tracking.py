"""``finetune`` / ``pretrain --log tensorboard|mlflow``: what the trackers hold, read back with the
trackers' own readers (TensorBoard's EventAccumulator, MLflow's client), offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from medclf.errors import MedclfError

STEPS, LOG_EVERY = 6, 2


def _tcfg(**kw):
    from medclf.training.loop import TrainConfig

    return TrainConfig(**{"steps": STEPS, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": STEPS,
                          "log_every": LOG_EVERY, "seed": 0, "device": "cpu", **kw})


def _curve(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_tensorboard_holds_the_curve_params_and_calibration(tiny_cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from medclf.training.finetune import finetune

    run = tmp_path / "run"
    summary = finetune(tiny_cache, "baseline", run, {"backbone": "test_resnet"}, _tcfg(), log="tensorboard")
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    curve = _curve(run)
    assert [r["step"] for r in curve] == [2, 4, 6]
    for tag in ("loss", "lr", "samples_per_s"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in curve], tag
        assert [e.value for e in events] == pytest.approx([r[tag] for r in curve], rel=1e-6), tag  # float32 in TB
    # the post-training check (calibration on the val split), at the last step
    temp = acc.Scalars("calibration.temperature")
    assert [e.step for e in temp] == [STEPS]
    assert temp[0].value == pytest.approx(summary["calibration"]["temperature"], rel=1e-6)
    assert "calibration.health.val_balanced_accuracy" in acc.Tags()["scalars"]
    # params as hparams: the cache fingerprint and the training config
    config = json.loads((run / "config.json").read_text())
    raw = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info.hparams
    assert hp["cache_fingerprint"].string_value == config["cache_fingerprint"]
    assert hp["method"].string_value == "baseline" and hp["train.lr"].number_value == pytest.approx(1e-3)
    assert hp["method_config.backbone"].string_value == "test_resnet"


def test_tensorboard_resume_drops_the_points_past_the_checkpoint(tiny_cache, tmp_path):
    """A crash after step 6 was logged but before its checkpoint: the resumed run logs step 6 again,
    and TensorBoard shows it once (``purge_step``), as metrics.jsonl holds it once."""
    pytest.importorskip("tensorboard")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medclf.training.finetune import finetune

    run = tmp_path / "run"
    finetune(tiny_cache, "baseline", run, {"backbone": "test_resnet"}, _tcfg(checkpoint_every=4), log="tensorboard")
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:07d}")  # the last checkpoint never made it to disk
    summary = finetune(tiny_cache, "baseline", run, {}, _tcfg(checkpoint_every=4), resume=True, log="tensorboard")
    assert summary["resumed_from"] == 4
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in _curve(run)] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("calibration.temperature")] == [STEPS]


def test_mlflow_file_store_holds_params_and_metrics(tiny_cache, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from medclf.methods.repdiff import PretrainConfig
    from medclf.training.pretrain import pretrain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run = tmp_path / "pre"
    summary = pretrain(tiny_cache, run, PretrainConfig(encoder="test_vit", model_size="tiny"), _tcfg(), log="mlflow")
    assert (run / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("medclf")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    config = json.loads((run / "config.json").read_text())
    assert r.data.params["cache_fingerprint"] == config["cache_fingerprint"]
    assert r.data.params["method"] == "repdiff" and r.data.params["method_config.encoder"] == "test_vit"
    assert r.data.params["train.steps"] == str(STEPS)
    assert r.data.tags["medclf.run"] == str(run.resolve()) and r.info.status == "FINISHED"
    curve = _curve(run)
    for key in ("loss", "lr", "samples_per_s"):
        hist = sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in hist] == [(c["step"], pytest.approx(c[key])) for c in curve], key
    gain = client.get_metric_history(r.info.run_id, "collapse_check.relative_gain")
    assert [m.step for m in gain] == [STEPS]
    assert gain[0].value == pytest.approx(summary["collapse_check"]["relative_gain"])


def test_mlflow_uses_the_tracking_uri_when_set(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from medclf.training.tracking import make_tracker

    store = tmp_path / "central"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ct-study")
    t = make_tracker("mlflow", tmp_path / "run", rank=0)
    t.log_params({"cache_fingerprint": "abc123", "train.lr": 0.5})
    t.log_metrics({"loss": 1.5}, 3)
    t.close(failed=True)
    assert not (tmp_path / "run" / "mlruns").exists()
    client = MlflowClient(tracking_uri=store.as_uri())
    (r,) = client.search_runs([client.get_experiment_by_name("ct-study").experiment_id])
    assert r.data.params == {"cache_fingerprint": "abc123", "train.lr": "0.5"}
    assert [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")] == [(3, 1.5)]
    assert r.info.status == "FAILED"


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_only_rank_zero_logs(kind, tmp_path, monkeypatch):
    pytest.importorskip(kind)
    from medclf.training.tracking import NullTracker, make_tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for rank in (1, 3):
        t = make_tracker(kind, tmp_path, rank=rank)
        assert isinstance(t, NullTracker)
        t.log_params({"cache_fingerprint": "x"})
        t.log_metrics({"loss": 1.0}, 1)
        t.close()
    assert list(tmp_path.iterdir()) == []
    t = make_tracker(kind, tmp_path, rank=0)  # the same call on rank 0 does log (the check above can fail)
    t.log_params({"cache_fingerprint": "x"})
    t.log_metrics({"loss": 1.0}, 1)
    t.close()
    assert [p.name for p in tmp_path.iterdir()] == ["tensorboard" if kind == "tensorboard" else "mlruns"]


@pytest.mark.parametrize("kind, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_missing_tracking_package_is_one_line_before_anything_is_written(kind, module, tiny_cache, tmp_path,
                                                                         monkeypatch, capsys):
    from medclf.cli import app
    from medclf.cli._common import run_app
    from medclf.training.tracking import make_tracker

    monkeypatch.setitem(sys.modules, module, None)  # ``import module`` raises ImportError, as when not installed
    for rank in (0, 1):  # every rank stops alike (no peer is left waiting)
        with pytest.raises(MedclfError, match=r"pip install 'medclf\[track\]'"):
            make_tracker(kind, tmp_path / "x", rank=rank)
    run = tmp_path / "run"
    rc = run_app(app, ["finetune", str(tiny_cache), "--method", "baseline", "--backbone", "test_resnet", "--out", str(run),
                       "--steps", "2", "--batch-size", "8", "--device", "cpu", "--log", kind])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and f"--log {kind} needs {module}" in err, err
    assert "pip install 'medclf[track]'" in err, err  # printed as typed (not eaten as console markup)
    assert not run.exists()  # refused before the run folder was created


def test_unknown_tracker_is_refused():
    from medclf.cli import app
    from medclf.cli._common import run_app
    from medclf.training.tracking import make_tracker

    with pytest.raises(MedclfError, match="unknown --log 'wandb'"):
        make_tracker("wandb", Path("."))
    assert run_app(app, ["finetune", ".", "--out", "x", "--log", "wandb"]) == 2  # a usage error, before any work


def test_params_flatten_the_config_to_scalars():
    from medclf.training.tracking import numeric, run_params

    record = {"method": "didicm", "cache_fingerprint": "f" * 16, "train": {"lr": 1e-3, "steps": 10},
              "classes": ["normal", "bleed"], "start": {"missing": ["a"] * 1000}, "resize": None}
    p = run_params(record)
    assert p == {"method": "didicm", "cache_fingerprint": "f" * 16, "train.lr": 1e-3, "train.steps": 10,
                 "classes": '["normal", "bleed"]', "resize": "None"}
    assert numeric({"calibration": {"temperature": 2.0, "health": {"ok": True, "val_auroc": None, "warnings": ["w"]}},
                    "rank_checksums": [1.0, 2.0], "nan": float("nan")}) == {"calibration.temperature": 2.0,
                                                                             "calibration.health.ok": 1.0}
