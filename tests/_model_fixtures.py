"""Session fixtures (imported by conftest.py): small caches of the sample data and runs trained once."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def _cache(factory, name: str, **pre) -> Path:
    from medclf.data.ingest import IngestConfig, ingest
    from medclf.preprocessing import PreprocessConfig

    out = factory.mktemp(name) / "cache"
    ingest(IngestConfig(sources=[SAMPLE / "rsna"], out=out, workers=1, preprocess=PreprocessConfig(channels=None, **pre)))
    return out


def _run(cache: Path, factory, name: str, options: dict, **train) -> Path:
    from medclf.training.finetune import finetune
    from medclf.training.loop import TrainConfig

    out = factory.mktemp("runs") / name
    finetune(cache, "diffusion-classifier", out, options, TrainConfig(**train))
    return out


@pytest.fixture(scope="session")
def rsna_cache(tmp_path_factory) -> Path:
    """sample_data/rsna at 16 px, default windows (3 channels)."""
    return _cache(tmp_path_factory, "rsna", size=16)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """sample_data/rsna at 16 px, brain window only: fast enough for loop tests."""
    return _cache(tmp_path_factory, "tiny", size=16, windows=["brain"])


@pytest.fixture(scope="session")
def ct32_cache(tmp_path_factory) -> Path:
    """sample_data/rsna at 32 px, brain window (the demo's setting)."""
    return _cache(tmp_path_factory, "ct32", size=32, windows=["brain"])


@pytest.fixture(scope="session")
def tiny_run(tiny_cache, tmp_path_factory) -> Path:
    """A tiny DiT diffusion classifier, trained briefly (not accurate: for plumbing tests)."""
    return _run(tiny_cache, tmp_path_factory, "tiny", {"arch": "dit", "model_size": "tiny", "trials": 8},
                steps=30, batch_size=16, lr=1e-3, warmup_steps=5, checkpoint_every=30, log_every=10, seed=0)


@pytest.fixture(scope="session")
def trained_run(ct32_cache, tmp_path_factory) -> Path:
    """The acceptance model: the demo's tiny MONAI-UNet diffusion classifier, ~2-3 minutes on CPU."""
    return _run(ct32_cache, tmp_path_factory, "trained", {"arch": "unet", "model_size": "tiny", "trials": 32},
                steps=800, batch_size=32, lr=1e-3, warmup_steps=50, checkpoint_every=800, log_every=100, seed=0,
                ema_decay=0.99)
