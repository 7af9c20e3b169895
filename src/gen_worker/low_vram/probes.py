"""What the host has (VRAM, RAM), how big a pipeline is, and what an OOM looks like.

Nothing here imports torch at module import time; most probes do not import it at all unless
the process already did (a process that never imported torch has nothing on a GPU).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard

from gen_worker.logs import log

__all__ = [
    "available_ram_bytes",
    "cuda_memory",
    "cuda_present",
    "estimate_pipeline_bytes",
    "flush_memory",
    "is_cuda_device",
    "is_oom_error",
    "torch_modules",
]

_MEMINFO = Path("/proc/meminfo")


def is_oom_error(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError``, or a ``RuntimeError`` saying "out of memory".

    Torch is consulted only when it is already imported: a process without torch cannot have
    raised its error, and importing it here would cost seconds on a failure path.
    """
    torch = sys.modules.get("torch")
    oom_class = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if isinstance(oom_class, type) and isinstance(exc, oom_class):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def flush_memory() -> None:
    """Free what can be freed after an OOM: Python garbage, then torch's cached CUDA blocks."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception as exc:  # flushing is a courtesy; the retry decides what happens next
        log("warning", "could not empty the CUDA cache", error=f"{type(exc).__name__}: {exc}")


def is_cuda_device(device: str | None) -> TypeGuard[str]:
    """Whether a device string names a CUDA device (``cuda``, ``cuda:1``)."""
    return device is not None and device.strip().lower().split(":", 1)[0] == "cuda"


def cuda_present() -> bool:
    """Whether this process can use a CUDA device, judged without importing torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver is the same as no device for the ladder
        return False


def cuda_memory(device: str = "cuda") -> tuple[int, int]:
    """``(total, free)`` bytes of the CUDA device ``device``; ``(0, 0)`` when there is none."""
    try:
        import torch  # noqa: PLC0415  # heavy; asked only for a CUDA device
    except ImportError:
        return 0, 0
    try:
        if not torch.cuda.is_available():
            return 0, 0
        free, total = torch.cuda.mem_get_info(torch.device(device))
    except Exception:  # no such device index, or the driver refused: treat as no device
        return 0, 0
    return int(total), int(free)


def available_ram_bytes() -> int | None:
    """CPU memory available to new allocations, or None when the host does not say."""
    with contextlib.suppress(OSError, ValueError, IndexError):  # not Linux: ask sysconf
        for line in _MEMINFO.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def torch_modules(pipeline: Any) -> Iterator[tuple[str, Any]]:
    """``(name, module)`` for each torch module of a pipeline (or the object itself)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    module_class = torch.nn.Module
    if isinstance(pipeline, module_class):
        yield "", pipeline
        return
    components = getattr(pipeline, "components", None)
    if isinstance(components, dict):
        for name, component in components.items():
            if isinstance(component, module_class):
                yield str(name), component


def estimate_pipeline_bytes(pipeline: Any) -> int | None:
    """Bytes of the pipeline's weights and buffers, or None when it has no torch modules."""
    seen: set[int] = set()
    total = 0
    found = False
    for _, module in torch_modules(pipeline):
        found = True
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += int(tensor.numel()) * int(tensor.element_size())
    return total if found else None
