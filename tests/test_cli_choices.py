"""Options whose values come from a registry (methods, datasets, model sizes): a typo is a usage error
(exit 2) that names the registered choices, before any work starts."""

from __future__ import annotations

import pytest
from conftest import run_cli


def _classifier_methods() -> tuple[list[str], list[str]]:
    from medclf.methods import METHODS

    kinds = {n: getattr(cls, "kind", "classifier") for n, cls in METHODS.items()}
    return [n for n, k in kinds.items() if k == "classifier"], [n for n, k in kinds.items() if k != "classifier"]


def _datasets() -> list[str]:
    from medclf.datasets import DATASETS

    return ["auto", *DATASETS]


def _sizes(which: str) -> list[str]:
    if which == "unet":
        from medclf.methods.diffusion_classifier import UNET_SIZES

        return list(UNET_SIZES)
    from medclf.models.dit import DIT_SIZES

    return list(DIT_SIZES)


@pytest.mark.parametrize("argv,option,choices", [
    (["finetune", "{tmp}/cache", "--out", "{tmp}/run", "--method", "difusion-classifier"], "--method",
     lambda: _classifier_methods()[0]),
    (["eval", "--model", "{tmp}/run", "--dataset", "imagenet", "--data", "{tmp}/cache"], "--dataset", _datasets),
    (["finetune", "{tmp}/cache", "--out", "{tmp}/run", "--model-size", "huge"], "--model-size", lambda: _sizes("unet")),
    (["pretrain", "{tmp}/cache", "--out", "{tmp}/run", "--model-size", "huge"], "--model-size", lambda: _sizes("dit")),
], ids=["finetune-method", "eval-dataset", "finetune-model-size", "pretrain-model-size"])
def test_unknown_registry_value_is_a_usage_error_listing_the_choices(tmp_path, argv, option, choices):
    p = run_cli(*[a.format(tmp=tmp_path) for a in argv])
    text = " ".join(p.stderr.split())  # however the console wrapped it
    assert p.returncode == 2, p.stderr
    assert "Usage:" in text and option in text and "Traceback" not in text, p.stderr
    expected = choices()
    assert expected and all(f"'{c}'" in text for c in expected), (expected, p.stderr)
    if option == "--method":  # pretraining methods (kind "pretrain") are not finetune choices
        assert not any(f"'{n}'" in text for n in _classifier_methods()[1]), p.stderr
    assert not (tmp_path / "run").exists()
