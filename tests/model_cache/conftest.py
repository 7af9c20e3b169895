"""Every test of the model cache starts from an environment without its budget variables, and
with ``TENSORHUB_CACHE_DIR`` pointing into the test's own temporary directory, so neither a
developer's shell nor their real model cache can change (or be changed by) a test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_model_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WORKER_MAX_VRAM_GB", raising=False)
    monkeypatch.delenv("WORKER_VRAM_SAFETY_MARGIN_GB", raising=False)
    monkeypatch.setenv("TENSORHUB_CACHE_DIR", str(tmp_path / "default-tensorhub-cache"))
