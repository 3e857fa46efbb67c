"""Named bundles of method options for a kind of finding (``finetune --preset NAME``).

A preset only fills options the user did not set (``--set`` and the named options win), and the run
records the values it trained with, so a preset never hides what a run is. Each entry says what it
was measured on; methods without an entry train with their defaults.
"""

from __future__ import annotations

#: preset -> method -> options (as ``--set KEY=VALUE`` strings, typed by the method's config)
PRESETS: dict[str, dict[str, dict[str, str]]] = {
    # Findings of a few pixels at the ingest size (issue #16; benchmarks/subtle.py, 6 mm bleeds at +20 HU,
    # 64 px): pool the evidence with a spatial max instead of a whole-image mean, so the lesion is not
    # averaged into the rest of the slice. Diffusion classifier: AUROC 0.760 with pool=max vs 0.679 with
    # the mean (the same trained denoiser). Non-mean pools score every class at full budget (no pruning).
    # The baseline has no entry: global_pool=max measured 0.815 vs 0.826 with timm's average, no gain.
    "small-findings": {
        "diffusion-classifier": {"pool": "max", "pool_kernel": "3"},
    },
}


def preset_sets(name: str | None, method: str) -> list[str]:
    """The preset's options for ``method`` as KEY=VALUE strings, to be put before the user's ``--set``."""
    if name is None:
        return []
    if name not in PRESETS:
        from medclf.errors import MedclfError

        raise MedclfError(f"unknown --preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return [f"{k}={v}" for k, v in PRESETS[name].get(method, {}).items()]
