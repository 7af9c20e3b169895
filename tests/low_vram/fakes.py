"""Stand-in pipelines for the ladder's tests: they record every call the ladder makes."""

from __future__ import annotations

from typing import Any

import pytest


class FakeVae:
    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    def enable_slicing(self) -> None:
        self.calls.append("vae.enable_slicing")

    def enable_tiling(self) -> None:
        self.calls.append("vae.enable_tiling")


class BarePipeline:
    """Only ``.to`` and ``__call__``: no enabler at all. ``.to`` / ``__call__`` raise the
    errors queued in ``to_errors`` / ``call_errors`` first, one per call."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.to_errors: list[BaseException] = []
        self.call_errors: list[BaseException] = []

    def to(self, device: str) -> BarePipeline:
        self.calls.append(("to", device))
        if self.to_errors:
            raise self.to_errors.pop(0)
        return self

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("call", kwargs))
        if self.call_errors:
            raise self.call_errors.pop(0)
        return {"images": ["image"], "kwargs": kwargs}


class FakePipeline(BarePipeline):
    """A diffusers-shaped pipeline: a VAE with slicing/tiling, attention slicing and the
    three offload methods."""

    def __init__(self) -> None:
        super().__init__()
        self.vae = FakeVae(self.calls)

    def enable_attention_slicing(self, slice_size: str | int = "auto") -> None:
        self.calls.append("enable_attention_slicing")

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        self.calls.append(("enable_model_cpu_offload", device))

    def enable_group_offload(self, **options: Any) -> None:
        self.calls.append(("enable_group_offload", options))

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        self.calls.append(("enable_sequential_cpu_offload", device))

    def remove_all_hooks(self) -> None:
        self.calls.append("remove_all_hooks")


class LegacyPipeline(BarePipeline):
    """An older pipeline: VAE slicing/tiling on the pipeline itself, model offload only."""

    def enable_vae_slicing(self) -> None:
        self.calls.append("enable_vae_slicing")

    def enable_vae_tiling(self) -> None:
        self.calls.append("enable_vae_tiling")

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        self.calls.append(("enable_model_cpu_offload", device))


class BrokenPipeline(FakePipeline):
    """Its VAE tiling and model offload raise."""

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        raise RuntimeError("accelerate is too old")


class Events:
    """An ``emit`` callback that keeps every event."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event_type: str, payload: dict[str, Any]) -> None:
        self.items.append((event_type, payload))

    @property
    def types(self) -> list[str]:
        return [event_type for event_type, _ in self.items]


def payload(**overrides: Any) -> dict[str, Any]:
    """A ``low_vram_mode_applied`` payload: every enabler off unless overridden."""
    base: dict[str, Any] = {
        "model_id": None,
        "stage": "baseline",
        "requested_mode": "auto",
        "selected_mode": "off",
        "applied_mode": "off",
        "previous_mode": "off",
        "changed": False,
        "vae_slicing": False,
        "vae_tiling": False,
        "attention_slicing": False,
        "model_cpu_offload": False,
        "group_offload": False,
        "sequential_cpu_offload": False,
        "disk_offload": False,
        "skipped": None,
        "error": None,
    }
    unknown = set(overrides) - set(base)
    assert not unknown, unknown
    return {**base, **overrides}


VAE_ON = {"vae_slicing": True, "vae_tiling": True, "attention_slicing": True}
VAE_CALLS = ["vae.enable_slicing", "vae.enable_tiling", "enable_attention_slicing"]

COZY_VARIABLES = (
    "COZY_INFERENCE_MEMORY_MODE",
    "COZY_INFERENCE_VRAM_SAFETY_MARGIN_GB",
    "COZY_INFERENCE_VAE_SLICE_VRAM_GB",
    "COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB",
    "COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB",
    "COZY_INFERENCE_AUTO_DISK_OFFLOAD",
    "COZY_INFERENCE_DISK_OFFLOAD_RAM_GB",
    "COZY_OFFLOAD_DIR",
)


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No COZY_* variable from the developer's shell; disk offload off unless a test opts in."""
    for name in COZY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COZY_INFERENCE_AUTO_DISK_OFFLOAD", "0")
