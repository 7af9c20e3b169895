"""The ladder's modes, its ``COZY_INFERENCE_*`` settings and the auto-selection rule.

Settings are read at call time (not at import), so a process that changes its environment, and
tests that monkeypatch it, see the new values on the next call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from gen_worker.config.parse import boolean, directory, gigabytes, read
from gen_worker.errors import ConfigError

__all__ = [
    "AUTO",
    "GIB",
    "MODES",
    "OFFLOAD_MODES",
    "LowVramSettings",
    "disk_offload_wanted",
    "load_low_vram_settings",
    "mode_rank",
    "select_mode",
]

#: Every size threshold is in GiB: an "8 GB" card reports about 8 GiB of total memory.
GIB = 1024**3

AUTO = "auto"
#: The ladder, least aggressive first; escalation moves one step to the right.
MODES = ("off", "vae_only", "model_offload", "group_offload", "sequential")
OFFLOAD_MODES = frozenset(MODES[2:])
_RANK = {mode: rank for rank, mode in enumerate(MODES)}
_MODE_CHOICES = ", ".join((AUTO, *MODES))


class LowVramSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The ladder's knobs; every default is the seed README's."""

    #: COZY_INFERENCE_MEMORY_MODE: ``auto`` or one of :data:`MODES` (forces that step).
    memory_mode: str = AUTO
    #: COZY_INFERENCE_VRAM_SAFETY_MARGIN_GB: headroom kept free for activations.
    vram_safety_margin_gb: float = 2.0
    #: COZY_INFERENCE_VAE_SLICE_VRAM_GB: total VRAM below which auto picks ``vae_only``.
    vae_slice_vram_gb: float = 10.0
    #: COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB: total VRAM below which auto picks ``model_offload``.
    model_offload_vram_gb: float = 8.0
    #: COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB: total VRAM below which auto picks ``group_offload``.
    group_offload_vram_gb: float = 6.0
    #: COZY_INFERENCE_AUTO_DISK_OFFLOAD: group offload may keep weights on disk.
    auto_disk_offload: bool = True
    #: COZY_INFERENCE_DISK_OFFLOAD_RAM_GB: available RAM below which weights go to disk.
    disk_offload_ram_gb: float = 16.0
    #: COZY_OFFLOAD_DIR: where group offload writes weights when they go to disk.
    offload_dir: str = "/tmp/cozy-offload"

    @property
    def vram_safety_margin_bytes(self) -> int:
        return int(self.vram_safety_margin_gb * GIB)


def _memory_mode(variable: str, text: str) -> str:
    mode = text.strip().lower()
    if mode != AUTO and mode not in _RANK:
        raise ConfigError(variable, f"{text.strip()!r} is not a mode; use one of {_MODE_CHOICES}")
    return mode


def load_low_vram_settings(environ: Mapping[str, str] | None = None) -> LowVramSettings:
    """Read the ladder's variables; a malformed one is a ConfigError naming it."""
    env = os.environ if environ is None else environ
    values = {
        "memory_mode": read(env, "COZY_INFERENCE_MEMORY_MODE", _memory_mode),
        "vram_safety_margin_gb": read(env, "COZY_INFERENCE_VRAM_SAFETY_MARGIN_GB", gigabytes),
        "vae_slice_vram_gb": read(env, "COZY_INFERENCE_VAE_SLICE_VRAM_GB", gigabytes),
        "model_offload_vram_gb": read(env, "COZY_INFERENCE_MODEL_OFFLOAD_VRAM_GB", gigabytes),
        "group_offload_vram_gb": read(env, "COZY_INFERENCE_GROUP_OFFLOAD_VRAM_GB", gigabytes),
        "auto_disk_offload": read(env, "COZY_INFERENCE_AUTO_DISK_OFFLOAD", boolean),
        "disk_offload_ram_gb": read(env, "COZY_INFERENCE_DISK_OFFLOAD_RAM_GB", gigabytes),
        "offload_dir": read(env, "COZY_OFFLOAD_DIR", directory),
    }
    given = {k: v for k, v in values.items() if v is not None}
    return msgspec.structs.replace(LowVramSettings(), **given)


def mode_rank(mode: str) -> int:
    """The position of ``mode`` on the ladder (``off`` is 0)."""
    return _RANK[mode]


def select_mode(
    total_vram_bytes: int,
    estimated_size_bytes: int | None = None,
    settings: LowVramSettings | None = None,
) -> str:
    """The ladder step ``auto`` means on a device with ``total_vram_bytes`` of memory.

    ``COZY_INFERENCE_MEMORY_MODE`` wins when it names a step. Otherwise the least aggressive
    step for the card's size, raised to at least ``model_offload`` when the pipeline
    (``estimated_size_bytes``) cannot fit in the card's memory minus the safety margin. No
    CUDA device (``total_vram_bytes`` 0) means ``off``: there is nothing to offload from.
    """
    chosen = settings if settings is not None else load_low_vram_settings()
    if chosen.memory_mode != AUTO:
        return chosen.memory_mode
    if total_vram_bytes <= 0:
        return "off"
    if total_vram_bytes < chosen.group_offload_vram_gb * GIB:
        mode = "group_offload"
    elif total_vram_bytes < chosen.model_offload_vram_gb * GIB:
        mode = "model_offload"
    elif total_vram_bytes < chosen.vae_slice_vram_gb * GIB:
        mode = "vae_only"
    else:
        mode = "off"
    usable = total_vram_bytes - chosen.vram_safety_margin_bytes
    if estimated_size_bytes is not None and estimated_size_bytes > usable:
        mode = max(mode, "model_offload", key=mode_rank)
    return mode


def disk_offload_wanted(settings: LowVramSettings, available_ram_bytes: int | None) -> bool:
    """Whether group offload should keep weights on disk instead of in CPU RAM.

    Unknown available RAM (``None``) keeps them in RAM: disk offload is much slower, so it is
    chosen only when RAM is known to be short.
    """
    if not settings.auto_disk_offload or available_ram_bytes is None:
        return False
    return available_ram_bytes < settings.disk_offload_ram_gb * GIB
