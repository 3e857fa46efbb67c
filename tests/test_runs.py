"""One home for a run (medclf.runs): compatibility checks where a run meets data, no silent partial loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, write_ct
from medclf.errors import MedclfError
from medclf.preprocessing import PreprocessConfig
from medclf.runs import DataSpec, check_compatible

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def _config(**pre) -> dict:
    p = PreprocessConfig(size=16, windows=["brain"], channels=1, **pre)
    return {"shape": [1, 16, 16], "preprocessing": p.to_dict()}


def test_check_compatible_names_what_differs():
    cfg = _config()
    check_compatible(cfg, DataSpec((1, 16, 16), cfg["preprocessing"], "d"))  # the run's own data
    with pytest.raises(MedclfError, match=r"\[3, 16, 16\].*trained on \[1, 16, 16\].*--window / --channels"):
        check_compatible(cfg, DataSpec((3, 16, 16), cfg["preprocessing"], "d"))
    with pytest.raises(MedclfError, match=r"\[1, 32, 32\].*--size"):
        check_compatible(cfg, DataSpec((1, 32, 32), cfg["preprocessing"], "d"))
    other = PreprocessConfig(size=16, windows=["subdural"], channels=1).to_dict()
    with pytest.raises(MedclfError, match=r"preprocessed differently.*windows \['subdural'\] vs \['brain'\]"):
        check_compatible(cfg, DataSpec((1, 16, 16), other, "d"))
    with pytest.raises(MedclfError, match="pretrained on"):
        check_compatible({**cfg, "kind": "pretrain"}, DataSpec((3, 16, 16), cfg["preprocessing"], "d"))


def test_eval_refuses_a_cache_preprocessed_differently(tiny_run, tmp_path):
    """Same shape and channels, other CT window: scored silently before; now a one-line refusal."""
    cache = tmp_path / "subdural"
    run_cli("ingest", SAMPLE / "rsna", "--out", cache, "--size", "16", "--window", "subdural", check_rc=3)  # the sample holds one bad file on purpose
    r = run_cli("eval", "--model", tiny_run, "--data", cache, "--bootstrap", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "preprocessed differently" in r.stderr and "subdural" in r.stderr and str(cache) in r.stderr


def test_partial_encoder_weights_are_recorded_and_shown(tmp_path, tiny_cache):
    """A weights file that fits only part of the encoder: the run records which keys stayed random, the CLI warns."""
    from safetensors.torch import save_file

    from medclf.models.backbone import create_encoder
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    sd = create_encoder("test_resnet", 1, 16).net.state_dict()
    keep = dict(list(sd.items())[: len(sd) // 2])
    save_file(keep, str(tmp_path / "half.safetensors"))
    s = finetune(tiny_cache, "baseline", tmp_path / "lib", {"backbone": "test_resnet", "encoder_weights": str(tmp_path / "half.safetensors")},
                 TrainConfig(steps=1, batch_size=8, checkpoint_every=1), calibrate=False)
    start = json.loads((tmp_path / "lib" / "config.json").read_text())["start"]
    assert start == s["start"] and start["init"] == "file" and start["loaded"] == len(keep)
    assert set(start["missing"]) == set(sd) - set(keep) and start["unexpected"] == []
    r = run_cli("finetune", tiny_cache, "--out", tmp_path / "cli", "--method", "baseline", "--backbone", "test_resnet",
                "--encoder-weights", tmp_path / "half.safetensors", "--steps", "1", "--batch-size", "8", check_rc=0)
    assert f"{len(sd) - len(keep)} encoder tensor(s)" in r.stderr and "warning:" in r.stderr, r.stderr


def test_classify_says_when_a_series_was_read_without_some_files(tmp_path, tiny_run):
    series = tmp_path / "series"
    uid = "1.2.826.0.1.3680043.8.498.77"
    for k in range(3):
        write_ct(series / f"s{k}.dcm", np.full((16, 16), 1024 + 40 * k, np.int16), ipp=(0.0, 0.0, float(k)),
                 instance=k + 1, series_uid=uid)
    (series / "s3.dcm").write_bytes((series / "s0.dcm").read_bytes()[:300])  # truncated: same series, unreadable
    r = run_cli("classify", series, "--model", tiny_run, "--json", check_rc=0)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 3 and all(row["skipped_files"] == 1 for row in rows)
    assert "1 file(s) of the series could not be read" in r.stderr and "warning:" in r.stderr, r.stderr
