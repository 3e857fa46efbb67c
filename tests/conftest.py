"""Shared fixtures."""

from _model_fixtures import ct32_cache, rsna_cache, tiny_cache, tiny_run, trained_run  # noqa: F401
