"""One home for a run (medclf.runs): compatibility checks where a run meets data, no silent partial loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
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


def test_classify_names_an_unreadable_file_next_to_a_series(tmp_path, tiny_run):
    """A truncated file beside a series: its own error line (it has no readable header), the series' rows, exit 3."""
    series = tmp_path / "series"
    uid = "1.2.826.0.1.3680043.8.498.77"
    for k in range(3):
        write_ct(series / f"s{k}.dcm", np.full((16, 16), 1024 + 40 * k, np.int16), ipp=(0.0, 0.0, float(k)),
                 instance=k + 1, series_uid=uid)
    (series / "s3.dcm").write_bytes((series / "s0.dcm").read_bytes()[:300])  # truncated: no header left to group by
    r = run_cli("classify", series, "--model", tiny_run, "--json", check_rc=3)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len([row for row in rows if "prediction" in row]) == 3
    assert [row["input"] for row in rows if "error" in row] == [str(series / "s3.dcm")]
    assert "s3.dcm" in r.stderr and "truncated" in r.stderr, r.stderr


# ------------------------------------------------------------------ a refused command never damages a run

def _tc(**kw):
    from medclf.training.loop import TrainConfig

    return TrainConfig(**{"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, **kw})


def _interrupted(tiny_cache, out: Path) -> Path:
    """A baseline run stopped after its step-2 checkpoint (final weights removed, as a crash leaves it)."""
    from medclf.training.finetune import finetune

    finetune(tiny_cache, "baseline", out, {"backbone": "test_resnet"}, _tc(), calibrate=False)
    (out / "model.safetensors").unlink()
    return out


def test_refused_finetune_leaves_an_interrupted_run_as_it_was(tmp_path, tiny_cache):
    out = _interrupted(tiny_cache, tmp_path / "run")
    before = (out / "config.json").read_bytes()
    r = run_cli("finetune", tiny_cache, "--out", out, "--method", "baseline", "--backbone", "test_resnet", "--lr", "0.5")
    assert r.returncode == 1 and "unfinished run" in r.stderr and "--resume" in r.stderr, r.stderr
    assert (out / "config.json").read_bytes() == before
    # --resume with another --lr: refused, naming it; nothing written either
    r = run_cli("finetune", tiny_cache, "--out", out, "--resume", "--lr", "0.5", "--batch-size", "8")
    assert r.returncode == 1 and "--lr 0.5 (recorded: 0.001)" in r.stderr and "--batch-size" not in r.stderr, r.stderr
    assert (out / "config.json").read_bytes() == before
    # --resume with more --steps (safe to change) continues with the recorded lr
    r = run_cli("finetune", tiny_cache, "--out", out, "--resume", "--steps", "6", "--json", check_rc=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["steps"] == 6 and json.loads(r.stdout)["resumed_from"] == 4


def test_refused_pretrain_writes_nothing(tmp_path, tiny_cache):
    out = tmp_path / "pre"
    r = run_cli("pretrain", tiny_cache, "--out", out, "--encoder", "test_vit", "--batch-size", "100000", "--steps", "1")
    assert r.returncode == 1 and "fewer than --batch-size" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, tiny_cache):
    from medclf.training.finetune import finetune

    out = _interrupted(tiny_cache, tmp_path / "run")
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    f = newest / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # a crash or a full disk mid-write
    s = finetune(tiny_cache, "baseline", out, {}, _tc(), resume=True, calibrate=False)
    assert s["resumed_from"] == 2 and len(s["damaged_checkpoints"]) == 1
    assert newest.name in s["damaged_checkpoints"][0] and "damaged" in s["damaged_checkpoints"][0]
    assert "pickle" not in s["damaged_checkpoints"][0] and (out / "model.safetensors").exists()


def test_resume_auto_starts_or_continues(tmp_path, tiny_cache):
    from medclf.training.finetune import finetune

    fresh = finetune(tiny_cache, "baseline", tmp_path / "new", {"backbone": "test_resnet"}, _tc(), resume="auto",
                     calibrate=False)
    assert fresh["resumed_from"] is None and (tmp_path / "new" / "model.safetensors").exists()
    out = _interrupted(tiny_cache, tmp_path / "run")
    cont = finetune(tiny_cache, "baseline", out, {"backbone": "test_resnet"}, _tc(), resume="auto", calibrate=False)
    assert cont["resumed_from"] == 4
    r = run_cli("finetune", tiny_cache, "--out", tmp_path / "cli", "--method", "baseline", "--backbone", "test_resnet",
                "--steps", "2", "--batch-size", "8", "--resume", "auto", "--json", check_rc=0)
    assert json.loads(r.stdout)["resumed_from"] is None


def test_labels_that_are_a_folder_get_a_clear_error(tmp_path):
    from PIL import Image

    (tmp_path / "raw").mkdir()
    for k in range(3):
        Image.fromarray(np.full((40, 40), 60 * k, np.uint8)).save(tmp_path / "raw" / f"{k}.png")
    r = run_cli("ingest", tmp_path / "raw", "--out", tmp_path / "c", "--labels", tmp_path)
    assert r.returncode == 1 and "is a folder, not a CSV file" in r.stderr and "unexpected" not in r.stderr, r.stderr


def test_classify_refuses_an_input_of_another_kind_than_the_training_data(tmp_path, tiny_run):
    """An RGB dermoscopy JPEG through the head-CT model: one line naming the file and both kinds, exit 3; CT goes on."""
    jpeg = sorted((SAMPLE / "isic" / "ISIC_2019_Training_Input").glob("*.jpg"))[0]
    ct = sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[0]
    r = run_cli("classify", jpeg, ct, "--model", tiny_run, "--json", check_rc=3)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["input"] for row in rows if "prediction" in row] == [str(ct)]
    (bad,) = [row for row in rows if "error" in row]
    assert bad["input"] == str(jpeg) and "colour photographs" in bad["error"] and "greyscale scans" in bad["error"]
    assert json.loads((tiny_run / "config.json").read_text())["intensities"] == ["windows:brain"]


def test_check_compatible_on_intensity_kinds():
    cfg = {**_config(), "intensities": ["rgb/255"]}
    check_compatible(cfg, DataSpec((1, 16, 16), cfg["preprocessing"], "d", intensity="rgb/255"))
    with pytest.raises(MedclfError, match="reads as greyscale scans.*colour photographs"):
        check_compatible(cfg, DataSpec((1, 16, 16), cfg["preprocessing"], "d", intensity="windows:brain"))
    check_compatible(_config(), DataSpec((1, 16, 16), _config()["preprocessing"], "d", intensity="rgb/255"))  # old runs
    grey = {**_config(), "intensities": ["windows:brain"]}  # a CT slice exported as a grey PNG still fits a CT run
    check_compatible(grey, DataSpec((1, 16, 16), grey["preprocessing"], "d", intensity="percentile:0.5-99.5"))


# ------------------------------------------------------------------ on-the-fly resize (finetune --image-size)

def test_finetune_at_another_size_than_the_cache_resizes_everywhere(tmp_path, ct32_cache):
    """One 32-px cache, a model trained at 16 px: recorded, learned, and eval / classify / explain repeat it."""
    from medclf.data.cache import open_cache
    from medclf.data.dataset import CacheDataset
    from medclf.evaluation.evaluate import score_split
    from medclf.evaluation.metrics import classification_metrics
    from medclf.inference import load_scorer
    from medclf.scoring.resize import resize_images

    out = tmp_path / "r16"
    r = run_cli("finetune", ct32_cache, "--out", out, "--method", "baseline", "--backbone", "test_resnet", "--image-size",
                "16", "--steps", "150", "--batch-size", "32", "--lr", "1e-3", "--warmup-steps", "10", "--ema-decay", "0.95",
                "--json", check_rc=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shape"] == [1, 16, 16] and cfg["data_shape"] == [1, 32, 32] and cfg["resize"]["to"] == 16
    run, scorer, _ = load_scorer(out, "cpu")
    cache = open_cache(ct32_cache)
    res = score_split(scorer, cache, "test")
    m = classification_metrics(res["y"], res["probs"], run.classes, n_bootstrap=0, pred=res["pred"])
    assert m["auroc_macro"] >= 0.65, m  # learned at 16 px (measured 0.718; the same at 32 px: >= 0.8), held-out images
    # exactly the training pixels: the scorer on 32-px images == the unwrapped scorer on resized ones
    x = torch.stack([CacheDataset(cache, split="test")[i]["image"] for i in range(4)])
    assert torch.equal(scorer.predict(x).probs, scorer.inner.predict(resize_images(x, 16)).probs)
    p = scorer.predict(x, explain=True)
    assert p.maps["evidence"].shape[-2:] == (32, 32)  # maps at the input's size: they land on the scan
    ev = run_cli("eval", "--model", out, "--data", ct32_cache, "--json", "--bootstrap", "0", check_rc=0)
    assert abs(json.loads(ev.stdout)["auroc_macro"] - m["auroc_macro"]) < 1e-9
    ct = sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[0]
    c = run_cli("classify", ct, "--model", out, "--json", check_rc=0)
    assert json.loads(c.stdout.splitlines()[0])["prediction"] in run.classes
    r = run_cli("finetune", ct32_cache, "--out", out, "--resume", "--image-size", "24")
    assert r.returncode == 1 and "--image-size 24 would change it (recorded: 16)" in r.stderr, r.stderr


def test_classify_refuses_a_modality_the_run_never_saw(tmp_path, tiny_run):
    """An MR slice through the head-CT model: refused with both modalities named; a CT slice beside it goes on."""
    mr = write_ct(tmp_path / "mr.dcm", np.full((16, 16), 300, np.int16), modality="MR", intercept=None, slope=None,
                  series_uid="1.2.826.0.1.3680043.8.498.91")
    ct = sorted((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm"))[0]
    r = run_cli("classify", mr, ct, "--model", tiny_run, "--json", check_rc=3)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    (bad,) = [row for row in rows if "error" in row]
    assert bad["input"] == str(mr) and "this input is MR" in bad["error"] and "CT" in bad["error"], bad
    assert [row["input"] for row in rows if "prediction" in row] == [str(ct)]
    assert json.loads((tiny_run / "config.json").read_text())["modalities"] == ["CT"]
