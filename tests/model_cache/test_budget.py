"""The VRAM budget: arguments, environment, the device probe, CPU-only hosts, refusals."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from gen_worker.errors import ConfigError
from gen_worker.model_cache import BYTES_PER_GB, ModelCache, cuda_total_vram_bytes

GB = BYTES_PER_GB


def probe_of(total_gb: float) -> Any:
    calls: list[int] = []

    def probe() -> int:
        calls.append(1)
        return round(total_gb * GB)

    probe.calls = calls  # type: ignore[attr-defined]
    return probe


@pytest.mark.parametrize(
    ("kwargs", "env", "total_gb", "budget_gb"),
    [
        ({"max_vram_gb": 20.0}, {}, 80, 20.0),  # the argument, whatever the card
        ({"max_vram_gb": 20.0}, {"WORKER_MAX_VRAM_GB": "12"}, 80, 20.0),  # argument beats env
        ({}, {"WORKER_MAX_VRAM_GB": "12.5"}, 80, 12.5),
        ({}, {"WORKER_MAX_VRAM_GB": " 7 "}, 0, 7.0),  # explicit: a budget even without CUDA
        ({}, {}, 24, 20.5),  # total less the default margin of 3.5
        ({"vram_safety_margin_gb": 2.0}, {}, 24, 22.0),
        ({}, {"WORKER_VRAM_SAFETY_MARGIN_GB": "1"}, 24, 23.0),
        ({"vram_safety_margin_gb": 0.0}, {"WORKER_VRAM_SAFETY_MARGIN_GB": "1"}, 24, 24.0),
        ({}, {"WORKER_VRAM_SAFETY_MARGIN_GB": "0"}, 16, 16.0),
        ({}, {"WORKER_MAX_VRAM_GB": "", "WORKER_VRAM_SAFETY_MARGIN_GB": "  "}, 24, 20.5),
        ({}, {}, 2, 0.0),  # a card smaller than the margin leaves nothing for the cache
        ({}, {}, 0, None),  # CPU-only host, nothing explicit: unlimited
        ({"vram_safety_margin_gb": 1.0}, {}, 0, None),
    ],
)
def test_budget_rules(
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any],
    env: dict[str, str],
    total_gb: float,
    budget_gb: float | None,
) -> None:
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    cache = ModelCache(**kwargs, vram_probe=probe_of(total_gb))
    stats = cache.get_stats()
    assert stats["budget_gb"] == budget_gb
    assert stats["total_vram_gb"] == total_gb
    assert cache.free_vram_gb() == budget_gb


def test_a_cpu_host_is_unlimited_and_never_evicts() -> None:
    evicted: list[str] = []
    cache = ModelCache(vram_probe=lambda: 0, on_evict=lambda m, _: evicted.append(m))
    for i in range(5):
        assert cache.mark_loaded_to_vram(f"m{i}", object(), size_gb=500.0) == []
    assert cache.can_fit_in_vram(10_000.0)
    assert cache.make_room(10_000.0) == []
    stats = cache.get_stats()
    assert (stats["budget_gb"], stats["free_vram_gb"], stats["over_budget"]) == (None, None, False)
    assert stats["used_vram_gb"] == 2500.0
    assert cache.get_vram_models() == ["m0", "m1", "m2", "m3", "m4"]
    assert evicted == []


def test_a_card_smaller_than_the_margin_keeps_only_what_is_needed() -> None:
    cache = ModelCache(vram_probe=lambda: 2 * GB)  # budget max(2 - 3.5, 0) = 0
    cache.mark_loaded_to_vram("a", object(), size_gb=1.0)
    assert cache.get_stats()["over_budget"] is True  # the newest is never evicted by its load
    assert cache.mark_loaded_to_vram("b", object(), size_gb=1.0) == ["a"]
    assert not cache.can_fit_in_vram(0.5)
    assert cache.can_fit_in_vram(0.0)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "WORKER_MAX_VRAM_GB",
            "lots",
            "WORKER_MAX_VRAM_GB: 'lots' is not a number; use a number of GB > 0, e.g. 20 or 3.5",
        ),
        (
            "WORKER_MAX_VRAM_GB",
            "0",
            "WORKER_MAX_VRAM_GB: '0' is not valid; use a finite number of GB > 0",
        ),
        (
            "WORKER_MAX_VRAM_GB",
            "-4",
            "WORKER_MAX_VRAM_GB: '-4' is not valid; use a finite number of GB > 0",
        ),
        (
            "WORKER_MAX_VRAM_GB",
            "nan",
            "WORKER_MAX_VRAM_GB: 'nan' is not valid; use a finite number of GB > 0",
        ),
        (
            "WORKER_MAX_VRAM_GB",
            "inf",
            "WORKER_MAX_VRAM_GB: 'inf' is not valid; use a finite number of GB > 0",
        ),
        (
            "WORKER_MAX_VRAM_GB",
            "20GB",
            "WORKER_MAX_VRAM_GB: '20GB' is not a number; use a number of GB > 0, e.g. 20 or 3.5",
        ),
        (
            "WORKER_VRAM_SAFETY_MARGIN_GB",
            "-1",
            "WORKER_VRAM_SAFETY_MARGIN_GB: '-1' is not valid; use a finite number of GB >= 0",
        ),
        (
            "WORKER_VRAM_SAFETY_MARGIN_GB",
            "a bit",
            "WORKER_VRAM_SAFETY_MARGIN_GB: 'a bit' is not a number; use a number of GB >= 0, "
            "e.g. 20 or 3.5",
        ),
    ],
)
def test_malformed_environment_fails_at_construction_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        ModelCache(max_vram_gb=8.0 if variable.endswith("MARGIN_GB") else None)
    assert str(caught.value) == message
    assert caught.value.variable == variable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_vram_gb": 0.0}, "max_vram_gb is 0.0; expected a number of GB > 0, or None for auto"),
        (
            {"max_vram_gb": -1.0},
            "max_vram_gb is -1.0; expected a finite number of GB >= 0, e.g. 8.0",
        ),
        (
            {"max_vram_gb": float("nan")},
            "max_vram_gb is nan; expected a finite number of GB >= 0, e.g. 8.0",
        ),
        ({"max_vram_gb": "20"}, "max_vram_gb is '20'; expected a number of GB >= 0, e.g. 8.0"),
        (
            {"vram_safety_margin_gb": -0.5},
            "vram_safety_margin_gb is -0.5; expected a finite number of GB >= 0, e.g. 8.0",
        ),
    ],
)
def test_bad_arguments_are_value_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        ModelCache(**kwargs)
    assert str(caught.value) == message


def test_the_probe_runs_once_and_only_when_needed() -> None:
    probe = probe_of(24)
    cache = ModelCache(vram_probe=probe)
    assert probe.calls == []  # construction probes nothing
    cache.mark_loaded_to_vram("a", object(), size_gb=1.0)
    cache.can_fit_in_vram(1.0)
    cache.get_stats()
    assert probe.calls == [1]

    explicit = probe_of(24)
    cache = ModelCache(max_vram_gb=4.0, vram_probe=explicit)
    cache.mark_loaded_to_vram("a", object(), size_gb=1.0)
    assert explicit.calls == []  # an explicit budget needs no device
    assert cache.get_stats()["total_vram_gb"] == 24.0
    assert explicit.calls == [1]


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_a_probe_answering_nonsense_is_refused(bad: Any) -> None:
    cache = ModelCache(vram_probe=lambda: bad)
    with pytest.raises(ValueError) as caught:
        cache.can_fit_in_vram(1.0)
    assert str(caught.value) == (
        f"the VRAM probe returned {bad!r}; expected total bytes as an int >= 0"
    )


# -- the default probe ---------------------------------------------------------------------------


def fake_torch(available: bool, total: int | Exception) -> types.ModuleType:
    def properties(index: int) -> Any:
        assert index == 0
        if isinstance(total, Exception):
            raise total
        return types.SimpleNamespace(total_memory=total)

    module = types.ModuleType("torch")
    module.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        is_available=lambda: available, get_device_properties=properties
    )
    return module


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (None, 0),  # torch not installed
        (fake_torch(False, 0), 0),  # torch without CUDA
        (fake_torch(True, 80 * GB), 80 * GB),
        (fake_torch(True, RuntimeError("CUDA driver initialization failed")), 0),
    ],
)
def test_default_probe(
    monkeypatch: pytest.MonkeyPatch, module: types.ModuleType | None, expected: int
) -> None:
    monkeypatch.setitem(sys.modules, "torch", module)
    assert cuda_total_vram_bytes() == expected
    assert ModelCache().get_stats()["total_vram_gb"] * GB == expected


def test_default_probe_with_the_real_torch() -> None:
    torch = pytest.importorskip("torch")
    expected = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    assert cuda_total_vram_bytes() == expected


def test_importing_and_using_the_cache_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from gen_worker.model_cache import ModelCache\n"
        f"cache = ModelCache(max_vram_gb=20.0, model_cache_dir={str(tmp_path / 'c')!r})\n"
        "cache.mark_loaded_to_vram('model-a', object(), size_gb=8.0)\n"
        "cache.inventory()\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout == "False\n"
    assert not (tmp_path / "c").exists()
