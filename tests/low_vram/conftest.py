from __future__ import annotations

import pytest

from .fakes import clean_env


@pytest.fixture(autouse=True)
def _cozy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch)
