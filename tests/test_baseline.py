"""The discriminative baseline, backbones from timm, label-space scoring, and method options from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medclf.cli import app
from medclf.cli._common import run_app
from medclf.errors import MedclfError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
runner = CliRunner()


@pytest.fixture(scope="module")
def baseline_run(ct32_cache, tmp_path_factory) -> Path:
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "baseline"
    finetune(ct32_cache, "baseline", out, {"backbone": "test_resnet"},
             TrainConfig(steps=150, batch_size=32, lr=1e-3, warmup_steps=10, ema_decay=0.95, checkpoint_every=150,
                         log_every=50, seed=0))
    return out


def test_baseline_beats_chance_on_held_out_slices(baseline_run, ct32_cache):
    from medclf.data.cache import open_cache
    from medclf.evaluation.evaluate import score_split
    from medclf.evaluation.metrics import classification_metrics
    from medclf.inference import load_scorer

    run, scorer, _ = load_scorer(baseline_run, "cpu")
    res = score_split(scorer, open_cache(ct32_cache), "test")
    m = classification_metrics(res["y"], res["probs"], run.classes, n_bootstrap=0, pred=res["pred"])
    majority = max(np.bincount(res["y"])) / len(res["y"])
    assert m["auroc_macro"] >= 0.8, m
    assert m["balanced_accuracy"] > 0.55 and m["accuracy"] >= majority - 0.05, m
    assert (res["nfe"] == 1).all()
    assert set(res["uncertainty"]) >= {"entropy", "margin"}
    cal = json.loads((baseline_run / "config.json").read_text())["calibration"]
    assert cal["fitted_on"] > 0 and cal["temperature"] > 0


def test_label_scorer_explains_with_a_signed_evidence_map(baseline_run, ct32_cache):
    from medclf.data.dataset import CacheDataset
    from medclf.data.cache import open_cache
    from medclf.inference import load_scorer

    _, scorer, _ = load_scorer(baseline_run, "cpu")
    ds = CacheDataset(open_cache(ct32_cache), split="test", labelled_only=True)
    x = torch.stack([ds[i]["image"] for i in range(6)])
    p = scorer.predict(x, explain=True)
    ev = p.maps["evidence"]
    assert ev.shape == (6, 32, 32) and torch.isfinite(ev).all() and ev.abs().sum() > 0
    assert torch.allclose(p.probs.sum(1), torch.ones(6), atol=1e-5)
    # deterministic: the same call gives the same map (seeded SmoothGrad)
    assert torch.equal(scorer.predict(x, explain=True).maps["evidence"], ev)


def test_calibration_reweights_log_probabilities():
    from medclf.scoring.label import calibrated, margin

    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    assert torch.allclose(calibrated(p, {}), p)
    hot = calibrated(p, {"temperature": 0.5})
    assert hot[0, 0] > 0.9 and torch.allclose(hot[1], torch.tensor([0.5, 0.5]))
    assert calibrated(p, {"bias": [0.0, 10.0]})[1, 1] > 0.99
    assert torch.allclose(margin(p), torch.tensor([0.2, 1.0]))


def test_cli_baseline_finetune_classify_explain(ct32_cache, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["finetune", str(ct32_cache), "--method", "baseline", "--backbone", "test_resnet", "--out", str(run),
                            "--steps", "20", "--batch-size", "16", "--warmup-steps", "2", "--set", "label_smoothing=0.1",
                            "--json"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "baseline" and cfg["method_config"]["label_smoothing"] == 0.1
    assert cfg["method_config"]["backbone"] == "test_resnet"
    dcm = sorted((SAMPLE / "rsna" / "stage_2_train").glob("ID_*.dcm"))[0]
    r = runner.invoke(app, ["classify", "--model", str(run), "--json", str(dcm)])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout.strip().splitlines()[0])
    assert row["nfe"] == 1 and set(row["probabilities"]) == set(cfg["classes"]) and "entropy" in row["uncertainty"]
    r = runner.invoke(app, ["explain", "--model", str(run), "--out", str(tmp_path / "ex"), str(SAMPLE / "nifti" / "vol_003.nii.gz")])
    assert r.exit_code == 0, r.output
    d = tmp_path / "ex" / "vol_003"
    assert (d / "evidence.nii.gz").exists() and (d / "overlay.png").exists() and not list(d.glob("error_*"))


@pytest.mark.parametrize("args, message", [
    (["--arch", "dit"], "does not apply to --method baseline"),
    (["--set", "nonsense=1"], "expected KEY=VALUE"),
    (["--set", "dropout=lots"], "not a valid float"),
    (["--backbone", "no_such_net"], "unknown timm encoder"),
    (["--set", "global_pool=catavgmax"], "expected one of avg, max, avgmax"),
])
def test_cli_refuses_bad_method_options(ct32_cache, tmp_path, args, message, capsys):
    rc = run_app(app, ["finetune", str(ct32_cache), "--method", "baseline", "--out", str(tmp_path / "r"),
                       "--steps", "1", "--batch-size", "8", *args])
    msg = capsys.readouterr().err
    assert rc == 1 and message in " ".join(msg.split()) and "Traceback" not in msg
    assert not (tmp_path / "r").exists()


def test_global_pool_option_reaches_the_trunk():
    """``--set global_pool=max``: the head reads the spatial max of the trunk's feature map (the default
    its mean), so a finding of a few pixels is not divided by the map's area."""
    from medclf.methods import get_method

    x = torch.rand(2, 1, 64, 64)
    for pool, reduce in ((None, torch.mean), ("max", torch.amax)):
        net = get_method("baseline").from_options({"backbone": "test_resnet", "global_pool": pool}).build(1, 2, 64).eval()
        with torch.no_grad():
            assert torch.allclose(net.backbone(x), reduce(net.backbone.feature_map(x), dim=(2, 3)), atol=1e-6)


def test_decision_is_checked_by_the_method(tiny_run, capsys):
    rc = run_app(app, ["classify", "--model", str(tiny_run), "--decision", "coin",
                       str(next((SAMPLE / "rsna" / "stage_2_train").glob("*.dcm")))])
    assert rc == 1 and "unknown --decision" in capsys.readouterr().err


def test_encoder_weights_from_a_local_file_and_channel_adaptation(tmp_path):
    from safetensors.torch import save_file

    from medclf.models.backbone import create_encoder

    src = create_encoder("test_resnet", 3, 32)
    save_file({f"backbone.{k}": v for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    enc = create_encoder("test_resnet", 1, 32, weights=tmp_path / "w.safetensors")
    # RGB kernels summed into one input channel (timm's adapt_input_conv), everything else copied
    stem = next(k for k, v in src.net.state_dict().items() if v.ndim == 4)
    assert torch.allclose(enc.net.state_dict()[stem], src.net.state_dict()[stem].sum(1, keepdim=True))
    later = [k for k, v in src.net.state_dict().items() if v.ndim == 4][-1]
    assert torch.equal(enc.net.state_dict()[later], src.net.state_dict()[later])
    torch.save({"model": {"nothing": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(MedclfError, match="no tensor in this checkpoint fits"):
        create_encoder("test_resnet", 1, 32, weights=tmp_path / "bad.pth")


def test_vit_on_small_images_gets_a_smaller_patch(tmp_path):
    """A 16-px patch would leave a 32-px scan 2x2 tokens: the patch shrinks until the grid is >= 8 a side."""
    import timm

    from medclf.models.backbone import create_encoder, vit_patch_size

    assert vit_patch_size("test_vit", 32) == 4 and vit_patch_size("test_vit", 64) == 8
    assert vit_patch_size("test_vit", 128) is None  # 8x8 at its own patch 16: unchanged
    assert vit_patch_size("vit_small_patch16_224", 100) == 10  # the largest patch that tiles 100 px into >= 8
    assert vit_patch_size("vit_small_patch14_dinov2", 224) is None and vit_patch_size("test_resnet", 32) is None
    enc = create_encoder("test_vit", 1, 32)
    assert enc.patch_size == 4 and enc.feature_map(torch.rand(2, 1, 32, 32)).shape[-2:] == (8, 8)
    assert create_encoder("test_vit", 1, 32, patch_size=8).patch_size == 8  # an explicit choice wins
    assert create_encoder("test_resnet", 1, 32).patch_size is None
    # weights made for the model's own patch (16 px, RGB) load, patch embedding resampled by timm
    src = timm.create_model("test_vit", num_classes=0)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    enc = create_encoder("test_vit", 1, 32, weights=tmp_path / "vit.pth")
    assert enc.net.patch_embed.proj.weight.shape == (64, 1, 4, 4)
    assert torch.equal(enc.net.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)


def test_hub_weights_offline_fail_fast_with_a_hint(monkeypatch):
    from medclf.models.backbone import create_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedclfError, match="--encoder-weights PATH"):
        create_encoder("test_resnet", 1, 32, pretrained=True)


def test_eval_on_corrupted_images(baseline_run, ct32_cache, capsys):
    rc = run_app(app, ["eval", "--model", str(baseline_run), "--data", str(ct32_cache), "--json", "--bootstrap", "0"])
    clean = json.loads(capsys.readouterr().out)
    rc2 = run_app(app, ["eval", "--model", str(baseline_run), "--data", str(ct32_cache), "--json", "--bootstrap", "0",
                        "--corrupt", "noise:0.3"])
    noisy = json.loads(capsys.readouterr().out)
    assert rc == rc2 == 0 and noisy["corruption"] == "noise:0.3" and clean["corruption"] is None
    assert noisy["n"] == clean["n"] and noisy["ece"] != clean["ece"]
    assert run_app(app, ["eval", "--model", str(baseline_run), "--data", str(ct32_cache), "--corrupt", "fog"]) == 1
    assert "unknown corruption" in capsys.readouterr().err


def test_label_fraction_trains_on_a_stratified_share(ct32_cache):
    from medclf.data.dataset import CacheDataset
    from medclf.training.finetune import label_subset

    ds = CacheDataset(ct32_cache, split="train", labelled_only=True)
    sub = label_subset(ds, 0.1, seed=0)
    y = ds.targets[sub.indices]
    assert abs(len(sub) - 0.1 * len(ds)) <= 2 and set(y) == set(ds.targets)
    assert sub.indices == label_subset(ds, 0.1, seed=0).indices != label_subset(ds, 0.1, seed=1).indices
    with pytest.raises(MedclfError):
        label_subset(ds, 0.0, seed=0)
