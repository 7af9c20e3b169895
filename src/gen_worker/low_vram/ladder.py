"""Applying a ladder step to a pipeline, and escalating it one step after an OOM.

Each pipeline remembers where it stands: the step it was last moved to and which enablers
are really in force. The ladder only goes up during a pipeline's life: offload hooks are not
taken off again to step down, because the pipeline would then have to move back onto the GPU,
which is what ran out of memory. Applying a step that is already in force calls nothing.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

from gen_worker.errors import DefinitionError
from gen_worker.logs import log
from gen_worker.low_vram import probes
from gen_worker.low_vram.enablers import (
    ENABLERS,
    OFFLOAD_ENABLER,
    EnablerResult,
    has_group_offload,
    install_group_offload,
    install_model_offload,
    install_sequential_offload,
    make_disk_offload_dir,
    remove_accelerate_hooks,
    remove_group_offload,
    vae_step,
)
from gen_worker.low_vram.events import EmitFn, emit_event
from gen_worker.low_vram.probes import (
    cuda_memory,
    cuda_present,
    estimate_pipeline_bytes,
    is_cuda_device,
)
from gen_worker.low_vram.settings import (
    AUTO,
    MODES,
    LowVramSettings,
    disk_offload_wanted,
    load_low_vram_settings,
    mode_rank,
    select_mode,
)

__all__ = [
    "EVENT",
    "LoggerLike",
    "apply_low_vram_config",
    "current_mode",
    "escalate",
    "remember",
]

EVENT = "low_vram_mode_applied"
_VAE_ENABLERS = ("vae_slicing", "vae_tiling", "attention_slicing")
_STATE_ATTRIBUTE = "_gen_worker_low_vram_state"


class LoggerLike(Protocol):
    """What ``logger=`` needs: a ``logging.Logger`` or anything with ``info(msg, *args)``."""

    def info(self, msg: str, *args: Any) -> None: ...


@dataclass
class _State:
    step: str = "off"
    enablers: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(ENABLERS, False))
    device: str | None = None
    model_id: str | None = None
    size_bytes: int | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    def applied_mode(self) -> str:
        """The step really in force: the strongest offload that is on, else the VAE step."""
        for mode in ("sequential", "group_offload", "model_offload"):
            if self.enablers[OFFLOAD_ENABLER[mode]]:
                return mode
        return "vae_only" if mode_rank(self.step) >= 1 else "off"


_STATES: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _state_for(pipeline: Any) -> _State:
    with _STATES_LOCK:
        try:
            state = _STATES.get(pipeline)
            if state is None:
                state = _STATES[pipeline] = _State()
            return state
        except TypeError:  # not weak-referenceable or unhashable: keep the state on the object
            existing = getattr(pipeline, _STATE_ATTRIBUTE, None)
            if isinstance(existing, _State):
                return existing
            state = _State()
            try:
                setattr(pipeline, _STATE_ATTRIBUTE, state)
            except (AttributeError, TypeError):
                log(
                    "warning", "low-VRAM state cannot be kept on this object; each call starts over"
                )
            return state


def remember(
    pipeline: Any,
    *,
    device: str | None = None,
    model_id: str | None = None,
    size_bytes: int | None = None,
) -> None:
    """Record where a pipeline lives, its model id and size, for later applies and escalations."""
    state = _state_for(pipeline)
    with state.lock:
        if device is not None:
            state.device = device
        if model_id is not None:
            state.model_id = model_id
        if size_bytes is not None:
            state.size_bytes = size_bytes


def current_mode(pipeline: Any) -> str:
    """The ladder step in force on ``pipeline`` (``off`` for one never seen)."""
    state = _state_for(pipeline)
    with state.lock:
        return state.applied_mode()


def _resolve_device(state: _State, device: str | None) -> str | None:
    if device is not None:
        state.device = device
    elif state.device is None and cuda_present():
        state.device = "cuda"
    return state.device


def _to_group_offload(
    pipeline: Any, state: _State, settings: LowVramSettings, ram: int | None
) -> EnablerResult:
    if not has_group_offload(pipeline):
        # Checked before anything is taken off: the offload in force stays in force.
        return install_group_offload(pipeline, state.device or "cuda", None)
    on = state.enablers
    if on["model_cpu_offload"] or on["sequential_cpu_offload"]:
        remove_accelerate_hooks(pipeline)
        on["model_cpu_offload"] = on["sequential_cpu_offload"] = False
    disk_dir = None
    if disk_offload_wanted(settings, ram):
        try:
            disk_dir = make_disk_offload_dir(pipeline, settings.offload_dir, state.model_id)
        except OSError as exc:  # an unwritable COZY_OFFLOAD_DIR: offload into RAM instead
            log(
                "warning",
                "disk offload unavailable",
                offload_dir=settings.offload_dir,
                error=f"{type(exc).__name__}: {exc}",
            )
    result = install_group_offload(pipeline, state.device or "cuda", disk_dir)
    on["disk_offload"] = result.enabled and disk_dir is not None
    return result


def _to_sequential(pipeline: Any, state: _State) -> EnablerResult:
    on = state.enablers
    if on["group_offload"] and callable(getattr(pipeline, "enable_sequential_cpu_offload", None)):
        try:
            remove_group_offload(pipeline)
        except Exception as exc:  # sequential offload cannot be layered on group offload
            return EnablerResult(
                enabled=False, error=f"removing group offload: {type(exc).__name__}: {exc}"
            )
        on["group_offload"] = on["disk_offload"] = False
    result = install_sequential_offload(pipeline, state.device or "cuda")
    if result.enabled:
        on["model_cpu_offload"] = False  # diffusers removes the model-offload hooks itself
    return result


def _offload(
    pipeline: Any, state: _State, target: str, settings: LowVramSettings, ram: int | None
) -> EnablerResult:
    """Move from the offload in force (if any) to ``target``'s offload on the state's
    device, which the caller checked is a CUDA device."""
    if target == "model_offload":
        return install_model_offload(pipeline, state.device or "cuda")
    if target == "group_offload":
        return _to_group_offload(pipeline, state, settings, ram)
    return _to_sequential(pipeline, state)


def _move_to(
    pipeline: Any, state: _State, target: str, settings: LowVramSettings, ram: int | None
) -> tuple[str | None, list[str]]:
    """Turn on what ``target`` needs and is not on yet. Returns (why something was skipped,
    errors)."""
    skipped: list[str] = []
    errors: list[str] = []
    if mode_rank(target) < mode_rank(state.step):
        return f"{state.step} stays: the ladder does not step down", errors
    state.step = target
    if target == "off":
        return None, errors
    for name in _VAE_ENABLERS:
        if not state.enablers[name]:
            result = vae_step(pipeline, name)
            state.enablers[name] = result.enabled
            if result.error:
                errors.append(f"{name}: {result.error}")
    offload_name = OFFLOAD_ENABLER.get(target)
    if offload_name is not None and not state.enablers[offload_name]:
        if not is_cuda_device(state.device):
            skipped.append("no CUDA device")
        else:
            result = _offload(pipeline, state, target, settings, ram)
            state.enablers[offload_name] = result.enabled
            if result.skipped:
                skipped.append(result.skipped)
            if result.error:
                errors.append(f"{offload_name}: {result.error}")
    return ("; ".join(skipped) or None), errors


def _apply(
    pipeline: Any,
    state: _State,
    *,
    target: str | None,
    requested_mode: str,
    stage: str,
    settings: LowVramSettings,
    ram: int | None,
) -> dict[str, Any]:
    """Move to ``target`` (None: nothing to move to, the top was reached) and describe it."""
    previous = state.applied_mode()
    before = dict(state.enablers)
    if target is None:
        skipped: str | None = f"already at the top of the ladder ({state.step})"
        errors: list[str] = []
    else:
        skipped, errors = _move_to(pipeline, state, target, settings, ram)
    return {
        "model_id": state.model_id,
        "stage": stage,
        "requested_mode": requested_mode,
        "selected_mode": state.step if target is None else target,
        "applied_mode": state.applied_mode(),
        "previous_mode": previous,
        "changed": state.enablers != before,
        **state.enablers,
        "skipped": skipped,
        "error": "; ".join(errors) or None,
    }


def _report(payload: dict[str, Any], logger: LoggerLike | None, emit: EmitFn | None) -> None:
    if logger is not None:
        try:
            logger.info(
                "low-VRAM %s: %s (requested %s, previous %s, changed %s)",
                payload["stage"],
                payload["applied_mode"],
                payload["requested_mode"],
                payload["previous_mode"],
                payload["changed"],
            )
        except Exception as exc:  # the caller's logger must not break the ladder
            log("warning", "logger failed", error=f"{type(exc).__name__}: {exc}")
    emit_event(EVENT, payload, emit)


def apply_low_vram_config(
    pipeline: Any,
    mode: str = AUTO,
    logger: LoggerLike | None = None,
    *,
    model_id: str | None = None,
    stage: str = "baseline",
    emit: EmitFn | None = None,
    device: str | None = None,
    total_vram_bytes: int | None = None,
    available_ram_bytes: int | None = None,
) -> dict[str, Any]:
    """Put ``pipeline`` on a step of the low-VRAM ladder and return the event payload.

    ``mode`` is ``"auto"`` or one of ``off``, ``vae_only``, ``model_offload``,
    ``group_offload``, ``sequential``. An explicit mode is applied as asked; ``"auto"`` uses
    ``COZY_INFERENCE_MEMORY_MODE`` when it names a step, else picks from the device's total
    VRAM and the pipeline's size. Offload steps need a CUDA device (the pipeline's, from
    ``device`` or its placement); without one they are reported off with ``skipped``.
    ``total_vram_bytes`` and ``available_ram_bytes`` replace the host probes.
    """
    if mode != AUTO and mode not in MODES:
        raise DefinitionError(
            f"apply_low_vram_config: mode {mode!r} is not a ladder step; "
            f"use one of {', '.join((AUTO, *MODES))}"
        )
    settings = load_low_vram_settings()
    state = _state_for(pipeline)
    with state.lock:
        if model_id is not None:
            state.model_id = model_id
        placed_on = _resolve_device(state, device)
        target = mode
        if mode == AUTO:
            if total_vram_bytes is None:
                total_vram_bytes = cuda_memory(placed_on)[0] if is_cuda_device(placed_on) else 0
            if state.size_bytes is None:
                state.size_bytes = estimate_pipeline_bytes(pipeline)
            target = select_mode(total_vram_bytes, state.size_bytes, settings)
        ram = available_ram_bytes if available_ram_bytes is not None else _ram_if(target)
        payload = _apply(
            pipeline,
            state,
            target=target,
            requested_mode=mode,
            stage=stage,
            settings=settings,
            ram=ram,
        )
    _report(payload, logger, emit)
    return payload


def _ram_if(target: str | None) -> int | None:
    # Only group offload decides between RAM and disk; skip reading /proc otherwise.
    return probes.available_ram_bytes() if target == "group_offload" else None


def escalate(
    pipeline: Any,
    *,
    model_id: str | None = None,
    emit: EmitFn | None = None,
    logger: LoggerLike | None = None,
    stage: str = "oom_escalation",
    device: str | None = None,
    available_ram_bytes: int | None = None,
) -> dict[str, Any]:
    """Move ``pipeline`` one step up the ladder (off/vae_only → model_offload →
    group_offload → sequential) and return the event payload. At the top nothing changes and
    the payload says so (``changed`` False, ``skipped`` naming the reason)."""
    settings = load_low_vram_settings()
    state = _state_for(pipeline)
    with state.lock:
        if model_id is not None:
            state.model_id = model_id
        _resolve_device(state, device)
        rank = mode_rank(state.step)
        at_top = rank + 1 >= len(MODES)
        target = None if at_top else MODES[max(rank + 1, mode_rank("model_offload"))]
        ram = available_ram_bytes if available_ram_bytes is not None else _ram_if(target)
        payload = _apply(
            pipeline,
            state,
            target=target,
            requested_mode=state.step if target is None else target,
            stage=stage,
            settings=settings,
            ram=ram,
        )
    _report(payload, logger, emit)
    return payload
