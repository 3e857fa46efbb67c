"""Multi-label training and evaluation (CheXpert's 14 observations) with the baseline, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medclf.cli import app
from medclf.cli._common import run_app
from medclf.errors import MedclfError
from tests._trees import make_chexpert_tree


@pytest.fixture(scope="module")
def cx_root(tmp_path_factory) -> Path:
    return make_chexpert_tree(tmp_path_factory.mktemp("cx"), n_patients=48)


@pytest.fixture(scope="module")
def chexpert_cache(cx_root, tmp_path_factory) -> Path:
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig

    root = cx_root
    out = tmp_path_factory.mktemp("cxcache") / "cache"
    ingest(IngestConfig(sources=[root], out=out, dataset="chexpert", preprocess=PreprocessConfig(size=32, channels=None),
                        workers=1))
    return out


@pytest.fixture(scope="module")
def multilabel_run(chexpert_cache, tmp_path_factory) -> Path:
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "cx"
    finetune(chexpert_cache, "baseline", out, {"backbone": "test_resnet"},
             TrainConfig(steps=120, batch_size=16, lr=1e-3, warmup_steps=10, ema_decay=0.95, checkpoint_every=120,
                         log_every=40, seed=0))
    return out


def test_multilabel_run_records_its_labels_and_learns_effusion(multilabel_run, chexpert_cache, capsys):
    from medclf.data.cache import open_cache

    cfg = json.loads((multilabel_run / "config.json").read_text())
    labels = open_cache(chexpert_cache).label_names
    assert cfg["task"] == "multilabel" and cfg["classes"] == labels and len(labels) == 14
    temps = cfg["calibration"]["temperatures"]
    assert len(temps) == 14 and all(t > 0 for t in temps)
    rc = run_app(app, ["eval", "--model", str(multilabel_run), "--data", str(chexpert_cache), "--split", "val",
                       "--json", "--bootstrap", "50"])
    m = json.loads(capsys.readouterr().out)
    assert rc == 0 and m["labels"] == labels
    # the look-alike images carry a visible blob exactly when 'Pleural Effusion' is 1 (and 'No Finding' 0)
    assert m["per_label"]["Pleural Effusion"]["auroc"] >= 0.8, m["per_label"]["Pleural Effusion"]
    assert m["per_label"]["No Finding"]["auroc"] >= 0.8
    assert m["per_label"]["Fracture"]["auroc"] is None  # never positive: undefined, not a number
    assert m["auroc_macro_labels"] == ["No Finding", "Pleural Effusion"] or "Edema" in m["auroc_macro_labels"]


def test_multilabel_classify_lists_findings_and_explain_refuses(multilabel_run, cx_root, tmp_path, capsys):
    img = next(cx_root.rglob("*.jpg"))
    rc = run_app(app, ["classify", "--model", str(multilabel_run), "--json", str(img)])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert rc == 0 and isinstance(row["prediction"], list) and len(row["probabilities"]) == 14
    assert all(c in row["probabilities"] for c in row["prediction"]) and "entropy" in row["uncertainty"]
    rc = run_app(app, ["explain", "--model", str(multilabel_run), "--out", str(tmp_path / "ex"), str(img)])
    assert rc == 1 and "multi-label" in capsys.readouterr().err


def test_single_label_methods_refuse_multilabel_data(chexpert_cache, tmp_path):
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    with pytest.raises(MedclfError, match="multi-label"):
        finetune(chexpert_cache, "didicm", tmp_path / "r", {"backbone": "test_resnet"}, TrainConfig(steps=1, batch_size=4))
    assert not (tmp_path / "r").exists()
