"""How much VRAM the live-model cache may fill (SPEC 13.4).

The budget is, first found wins: the ``max_vram_gb`` argument, ``WORKER_MAX_VRAM_GB``, or the
card's total VRAM less a safety margin (the ``vram_safety_margin_gb`` argument,
``WORKER_VRAM_SAFETY_MARGIN_GB``, else 3.5 GB) kept free for activations. A host without CUDA
(or without torch) has 0 bytes of VRAM; with no explicit budget its models live in RAM and the
budget is unlimited (``None``).

Sizes are counted in whole bytes inside the cache (sums of ints never drift) and in GB
(``BYTES_PER_GB`` bytes, as torch and nvidia-smi count them) at its API.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable, Mapping

from gen_worker.config.parse import gigabytes, positive_gigabytes, read

__all__ = [
    "BYTES_PER_GB",
    "DEFAULT_SAFETY_MARGIN_GB",
    "MARGIN_VARIABLE",
    "MAX_VRAM_VARIABLE",
    "VramBudget",
    "cuda_total_vram_bytes",
    "gb_to_bytes",
]

BYTES_PER_GB = 1024**3
MAX_VRAM_VARIABLE = "WORKER_MAX_VRAM_GB"
MARGIN_VARIABLE = "WORKER_VRAM_SAFETY_MARGIN_GB"
DEFAULT_SAFETY_MARGIN_GB = 3.5


def gb_to_bytes(size_gb: float, what: str) -> int:
    """``size_gb`` in whole bytes; ``ValueError`` naming ``what`` unless finite and >= 0."""
    if isinstance(size_gb, bool) or not isinstance(size_gb, int | float):
        raise ValueError(f"{what} is {size_gb!r}; expected a number of GB >= 0, e.g. 8.0")
    if not math.isfinite(size_gb) or size_gb < 0:
        raise ValueError(f"{what} is {size_gb!r}; expected a finite number of GB >= 0, e.g. 8.0")
    return round(size_gb * BYTES_PER_GB)


def cuda_total_vram_bytes() -> int:
    """Total memory of CUDA device 0, or 0 without torch, without CUDA, or on any failure.

    torch is imported here, and only here, so that a worker without it imports the cache (by
    name, so type checking does not need torch installed either).
    """
    try:
        torch = importlib.import_module("torch")
    except Exception:  # absent, or an install broken in some other way: no GPU for us either
        return 0
    try:
        if not torch.cuda.is_available():
            return 0
        return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # a driver that fails on query leaves the worker usable on CPU
        return 0


def _positive_gb(value: float, what: str) -> int:
    size = gb_to_bytes(value, what)
    if size == 0:
        raise ValueError(f"{what} is {value!r}; expected a number of GB > 0, or None for auto")
    return size


class VramBudget:
    """The budget rules; the device is probed once, on first need, never at construction."""

    def __init__(
        self,
        max_vram_gb: float | None,
        safety_margin_gb: float | None,
        probe: Callable[[], int] | None,
        environ: Mapping[str, str],
    ) -> None:
        # Both variables are read now, so a malformed one fails at startup, not at first load.
        env_max = read(environ, MAX_VRAM_VARIABLE, positive_gigabytes)
        env_margin = read(environ, MARGIN_VARIABLE, gigabytes)
        self._explicit: int | None = None
        if max_vram_gb is not None:
            self._explicit = _positive_gb(max_vram_gb, "max_vram_gb")
        elif env_max is not None:
            self._explicit = gb_to_bytes(env_max, MAX_VRAM_VARIABLE)
        if safety_margin_gb is not None:
            self.margin_bytes = gb_to_bytes(safety_margin_gb, "vram_safety_margin_gb")
        elif env_margin is not None:
            self.margin_bytes = gb_to_bytes(env_margin, MARGIN_VARIABLE)
        else:
            self.margin_bytes = gb_to_bytes(DEFAULT_SAFETY_MARGIN_GB, "default safety margin")
        self._probe = probe or cuda_total_vram_bytes
        self._total: int | None = None
        self._probe_lock = threading.Lock()

    def total_bytes(self) -> int:
        """The device's total VRAM (0 on a CPU-only host), probed once."""
        with self._probe_lock:
            if self._total is None:
                total = self._probe()
                if isinstance(total, bool) or not isinstance(total, int) or total < 0:
                    raise ValueError(
                        f"the VRAM probe returned {total!r}; expected total bytes as an int >= 0"
                    )
                self._total = total
            return self._total

    def budget_bytes(self) -> int | None:
        """Bytes the cache may fill, or ``None`` for unlimited (no budget, no CUDA)."""
        if self._explicit is not None:
            return self._explicit
        total = self.total_bytes()
        if total == 0:
            return None
        return max(total - self.margin_bytes, 0)
