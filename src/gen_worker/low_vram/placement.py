"""Placing a freshly loaded pipeline on its device, and retrying calls that ran out of memory.

Placement on a CUDA device: a preflight (does the pipeline fit in free VRAM minus the safety
margin? if not, offload instead of moving), then ``.to(device)`` in up to three attempts with
an escalation after each OOM, then the baseline ``auto`` pass. Once an escalation has
installed an offload step, the offload hooks own the placement: calling ``.to(device)`` again
would pull every weight back onto the GPU (diffusers refuses it for sequential offload), so
``.to`` is retried only while no offload is in force.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from gen_worker.low_vram.events import EmitFn, emit_event
from gen_worker.low_vram.ladder import (
    LoggerLike,
    apply_low_vram_config,
    current_mode,
    escalate,
    remember,
)
from gen_worker.low_vram.probes import (
    cuda_memory,
    estimate_pipeline_bytes,
    flush_memory,
    is_cuda_device,
    is_oom_error,
)
from gen_worker.low_vram.settings import (
    AUTO,
    GIB,
    OFFLOAD_MODES,
    LowVramSettings,
    load_low_vram_settings,
    select_mode,
)

__all__ = ["OOM_RETRY_EVENT", "PLACEMENT_ATTEMPTS", "place_pipeline", "with_oom_retry"]

OOM_RETRY_EVENT = "inference.oom_retry"
#: ``.to(device)`` attempts while placing; the last OOM is raised.
PLACEMENT_ATTEMPTS = 3

T = TypeVar("T")


def _move(pipeline: Any, device: str) -> None:
    move = getattr(pipeline, "to", None)
    if callable(move):
        move(device)


def _place_with_escalation(
    pipeline: Any, device: str, emit: EmitFn | None, logger: LoggerLike | None
) -> None:
    for attempt in range(1, PLACEMENT_ATTEMPTS + 1):
        try:
            _move(pipeline, device)
            return
        except Exception as exc:
            if not is_oom_error(exc) or attempt == PLACEMENT_ATTEMPTS:
                raise
        # Outside the except block: the OOM's traceback (and the tensors its frames hold) is
        # gone, so the flush can actually free them.
        flush_memory()
        escalate(pipeline, emit=emit, logger=logger, stage="oom_escalation")
        if current_mode(pipeline) in OFFLOAD_MODES:
            return


def _preflight_mode(
    settings: LowVramSettings, total: int, free: int, size: int | None
) -> str | None:
    """The offload step to install instead of moving, or None when the pipeline fits (or
    when the device's memory could not be measured: then the OOM path is the safety net)."""
    if total <= 0 or size is None or size <= free - settings.vram_safety_margin_bytes:
        return None
    if total < settings.group_offload_vram_gb * GIB:
        return "group_offload"
    return "model_offload"


def place_pipeline(
    pipeline: Any,
    device: str,
    *,
    model_id: str,
    size_bytes: int | None = None,
    emit: EmitFn | None = None,
    total_vram_bytes: int | None = None,
    free_vram_bytes: int | None = None,
    available_ram_bytes: int | None = None,
    logger: LoggerLike | None = None,
) -> dict[str, Any]:
    """Put a freshly loaded pipeline on ``device`` and return the baseline event payload.

    On CUDA: the preflight (``preflight`` event when the pipeline does not fit), ``.to``
    with up to two escalations (``oom_escalation`` events; the third OOM is raised), and
    the baseline ``auto`` pass (``baseline`` event). When the baseline will install an
    offload step anyway (a small card, or ``COZY_INFERENCE_MEMORY_MODE``), the pipeline is
    not moved first. On any other device: ``.to(device)`` and the baseline pass.
    ``size_bytes`` defaults to the size of the pipeline's weights; ``total_vram_bytes`` /
    ``free_vram_bytes`` / ``available_ram_bytes`` replace the host probes.
    """
    settings = load_low_vram_settings()
    if size_bytes is None:
        size_bytes = estimate_pipeline_bytes(pipeline)
    remember(pipeline, device=device, model_id=model_id, size_bytes=size_bytes)
    total = 0
    if not is_cuda_device(device):
        _move(pipeline, device)
    else:
        if total_vram_bytes is None or free_vram_bytes is None:
            probed_total, probed_free = cuda_memory(device)
            total = probed_total if total_vram_bytes is None else total_vram_bytes
            free = probed_free if free_vram_bytes is None else free_vram_bytes
        else:
            total, free = total_vram_bytes, free_vram_bytes
        preflight = _preflight_mode(settings, total, free, size_bytes)
        if preflight is not None:
            apply_low_vram_config(
                pipeline,
                preflight,
                logger,
                model_id=model_id,
                stage="preflight",
                emit=emit,
                available_ram_bytes=available_ram_bytes,
            )
        elif select_mode(total, size_bytes, settings) not in OFFLOAD_MODES:
            _place_with_escalation(pipeline, device, emit, logger)
    return apply_low_vram_config(
        pipeline,
        AUTO,
        logger,
        model_id=model_id,
        stage="baseline",
        emit=emit,
        total_vram_bytes=total,
        available_ram_bytes=available_ram_bytes,
    )


def _callable_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else type(fn).__name__


def with_oom_retry(
    fn: Callable[..., T],
    *args: Any,
    pipelines: Iterable[Any] = (),
    retries: int = 2,
    function_name: str | None = None,
    emit: EmitFn | None = None,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, retried up to ``retries`` times after an out-of-memory error.

    Before each retry: free memory, move each of ``pipelines`` one step up the ladder
    (``low_vram_mode_applied`` events, stage ``oom_escalation``) and emit
    ``inference.oom_retry`` ``{function_name, attempt}``. The last OOM is raised; any other
    error is raised at once.
    """
    targets = list(pipelines)
    name = function_name or _callable_name(fn)
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_oom_error(exc) or attempt >= retries:
                raise
        attempt += 1
        flush_memory()
        for pipeline in targets:
            escalate(pipeline, emit=emit, stage="oom_escalation")
        emit_event(OOM_RETRY_EVENT, {"function_name": name, "attempt": attempt}, emit)
