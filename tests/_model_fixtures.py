"""Fixtures for model tests (imported by conftest.py): tiny caches and runs trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """sample_data/rsna at 16 px, brain window only: fast enough for loop tests."""
    from medclf.data.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("tiny") / "cache"
    ingest(IngestConfig(sources=[SAMPLE / "rsna"], out=out, size=16, windows=["brain"], workers=1))
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_cache, tmp_path_factory) -> Path:
    """A tiny DiT diffusion classifier, trained briefly (not accurate: for plumbing tests)."""
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "tiny"
    finetune(tiny_cache, "diffusion-classifier", out, {"arch": "dit", "model_size": "tiny", "trials": 8},
             TrainConfig(steps=30, batch_size=16, lr=1e-3, warmup_steps=5, checkpoint_every=30, log_every=10, seed=0))
    return out


@pytest.fixture(scope="session")
def ct32_cache(tmp_path_factory) -> Path:
    """sample_data/rsna at 32 px, brain window (the demo's setting)."""
    from medclf.data.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("ct32") / "cache"
    ingest(IngestConfig(sources=[SAMPLE / "rsna"], out=out, size=32, windows=["brain"], workers=1))
    return out


@pytest.fixture(scope="session")
def trained_run(ct32_cache, tmp_path_factory) -> Path:
    """The acceptance model: a tiny MONAI-UNet diffusion classifier trained on CPU for ~2-3 minutes."""
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "trained"
    finetune(ct32_cache, "diffusion-classifier", out, {"arch": "unet", "model_size": "tiny", "trials": 32},
             TrainConfig(steps=800, batch_size=32, lr=1e-3, warmup_steps=50, checkpoint_every=800, log_every=100,
                         seed=0, ema_decay=0.99))
    return out


@pytest.fixture(scope="session")
def rsna_cache(tmp_path_factory) -> Path:
    """sample_data/rsna at 16 px, default windows (3 channels)."""
    from medclf.data.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("rsna") / "cache"
    ingest(IngestConfig(sources=[SAMPLE / "rsna"], out=out, size=16, workers=1))
    return out
