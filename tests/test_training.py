"""Shared training loop and run directory: resume equality, DDP agreement, safe loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medclf.errors import MedclfError
from medclf.io.weights import load_tensors, load_torch_weights
from medclf.runs import load_classifier as load_model
from medclf.runs import load_run, resolve_model
from medclf.training.finetune import finetune
from medclf.training.loop import TrainConfig, lr_at

REPO = Path(__file__).resolve().parents[1]
TINY = {"arch": "dit", "model_size": "tiny", "trials": 8}


def _cfg(steps: int, **kw) -> TrainConfig:
    base = dict(steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=5, log_every=1, seed=3, ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def _curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5, abs=0.01)
    assert lr_at(99, cfg) < 0.01


def test_resume_is_bit_for_bit(tiny_cache, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    finetune(tiny_cache, "diffusion-classifier", full, TINY, _cfg(12), calibrate=False)

    def crash(rec):  # the job dies at step 7, after the step-5 checkpoint
        if rec["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_cache, "diffusion-classifier", part, TINY, _cfg(12), progress=crash, calibrate=False)
    assert (part / "checkpoints" / "step-0000005").is_dir() and not (part / "model.safetensors").exists()
    finetune(tiny_cache, "diffusion-classifier", part, TINY, _cfg(12), resume=True, calibrate=False)
    assert _curve(full) == _curve(part)
    a, b = load_tensors(full / "model.safetensors"), load_tensors(part / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_sees_the_global_step_across_a_resume(tiny_cache, tmp_path):
    """``batch["step"]`` (what DiffMIC's DCG warm-up reads) counts from 0 and continues after --resume."""
    from medclf.data.dataset import CacheDataset
    from medclf.training.loop import train

    seen: list[int] = []
    model = torch.nn.Linear(1, 1)

    def loss(net, batch, g):
        seen.append(batch["step"])
        return net(batch["image"].mean((1, 2, 3))[:, None]).pow(2).mean()

    def crash(rec):  # dies after step 6, past the step-5 checkpoint
        if rec["step"] == 6:
            raise KeyboardInterrupt

    ds = CacheDataset(tiny_cache, split="train")
    with pytest.raises(KeyboardInterrupt):
        train(model, loss, ds, _cfg(8), tmp_path, progress=crash)
    train(model, loss, ds, _cfg(8), tmp_path, resume=True)
    assert seen == [0, 1, 2, 3, 4, 5] + [5, 6, 7]  # the step-5 checkpoint; the lost step 5 runs again


def test_new_run_refuses_existing_checkpoints(tiny_cache, tmp_path):
    finetune(tiny_cache, "diffusion-classifier", tmp_path / "r", TINY, _cfg(5), calibrate=False)
    with pytest.raises(MedclfError):
        finetune(tiny_cache, "diffusion-classifier", tmp_path / "r", TINY, _cfg(5), calibrate=False)


def test_run_records_what_reproduces_it(tiny_run):
    run = load_run(tiny_run)
    cfg = run.config
    for key in ("medclf_version", "cache_fingerprint", "classes", "preprocessing", "method_config", "train", "calibration"):
        assert key in cfg, key
    assert cfg["calibration"]["temperature"] > 0


def test_run_loading_refuses_pickles(tiny_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad)
    # A pickle disguised as the weights file: it must be refused, never unpickled.
    torch.save({"x": torch.zeros(1)}, bad / "model.safetensors")
    with pytest.raises(MedclfError, match="never unpickles"):
        load_model(bad)
    # A user-supplied .pt holding a code-executing object is refused by weights_only=True.
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(MedclfError, match="cannot load weights safely"):
        load_torch_weights(evil)


def test_newer_run_format_is_refused(tiny_run, tmp_path):
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(tiny_run, newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["run_format"] = 99
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MedclfError, match="newer"):
        load_run(newer)


def test_model_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDCLF_MODEL", raising=False)
    with pytest.raises(MedclfError, match="MEDCLF_MODEL"):
        resolve_model(None)
    monkeypatch.setenv("MEDCLF_MODEL", str(tmp_path))
    assert resolve_model(None) == tmp_path
    assert resolve_model("x") == Path("x")


@pytest.mark.slow
def test_two_process_gloo_ranks_agree(tiny_cache, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "medclf", "finetune", str(tiny_cache), "--out", str(run), "--arch", "dit", "--model-size", "tiny",
           "--steps", "6", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--checkpoint-every", "3",
           "--device", "cpu", "--seed", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    sums = cfg["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    # rank-0-only writes: one curve, each step once
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6
