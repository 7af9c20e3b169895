"""The model phases of a request (resolve, load) and the inference call's OOM retries.

Kept apart from :mod:`gen_worker.engine.run` because they only run for functions with model
parameters: the per-request path of a function without models never enters this module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from gen_worker.authoring import FunctionSpec
from gen_worker.engine.emitter import OutcomeChannel
from gen_worker.engine.models import LoadRequest, ModelProvider
from gen_worker.engine.watch import StuckWatch
from gen_worker.errors import GenWorkerError

if TYPE_CHECKING:
    from gen_worker.config import EngineSettings

__all__ = [
    "CACHE_ORDER",
    "MAX_OOM_RETRIES",
    "ModelsLoaded",
    "Phase",
    "call_with_oom_retry",
    "load_models",
    "release_models",
]

CACHE_ORDER = ["hot_vram", "warm_disk", "cold_remote"]

#: Retries of a single-output call after a CUDA out-of-memory error, one ladder step each.
MAX_OOM_RETRIES = 2

Emit = Callable[[str, dict[str, Any]], None]


class Phase:
    """``request.<name>.started/completed/failed`` plus a one-shot ``stuck`` warning."""

    __slots__ = ("_channel", "_detail", "_names", "_start", "_warn_s", "_watch")

    def __init__(
        self,
        channel: OutcomeChannel,
        watch: StuckWatch,
        name: str,
        warn_s: float,
        detail: dict[str, Any],
    ) -> None:
        self._channel = channel
        self._watch = watch
        self._names = _PHASE_EVENTS[name]
        self._warn_s = warn_s
        self._detail = detail
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.monotonic()
        self._channel.emit(self._names[0], self._detail)
        self._watch.start(self, self._warn_s, self._stuck)

    def _stuck(self, elapsed_s: float) -> None:
        self._channel.emit(self._names[3], {"elapsed_s": round(elapsed_s, 3)})

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        self._watch.stop(self, self._warn_s)
        ms = round((time.monotonic() - self._start) * 1000, 3)
        if exc is None:
            self._channel.emit(self._names[1], {"ms": ms})
        elif not isinstance(exc, asyncio.CancelledError):
            failed: dict[str, Any] = {"ms": ms, "error": type(exc).__name__}
            if isinstance(exc, GenWorkerError):
                # Our own errors say what was wrong (the ref and the loader for a failed
                # load) and carry no secret; anything else might, so it gets its class only.
                failed["error_message"] = str(exc)
                for name in ("ref", "loader"):
                    value = getattr(exc, name, None)
                    if isinstance(value, str):
                        failed[name] = value
            self._channel.emit(self._names[2], failed)


#: Event types per phase, built once: (started, completed, failed, stuck).
_PHASE_EVENTS = {
    name: tuple(f"request.{name}.{what}" for what in ("started", "completed", "failed", "stuck"))
    for name in ("model_resolve", "model_load", "inference")
}


def cache_state_of(models: ModelProvider, model_id: str) -> str | None:
    """Where the model was when asked for, if the provider knows (``hot_vram`` ...)."""
    probe = getattr(models, "cache_state", None)
    state = probe(model_id) if callable(probe) else None
    return state if state in CACHE_ORDER else None


class ModelsLoaded(msgspec.Struct):
    """What the model phases produced for one request (filled in as they go)."""

    kwargs: dict[str, Any] = {}
    ids: dict[str, str] = {}
    cache_states: dict[str, str | None] = {}


async def load_models(
    models: ModelProvider,
    spec: FunctionSpec,
    payload: msgspec.Struct,
    into: ModelsLoaded,
    *,
    holder: object,
    device: str,
    resolved: Mapping[str, Any],
    channel: OutcomeChannel,
    watch: StuckWatch,
    settings: EngineSettings,
) -> None:
    """Resolve every model parameter, then load each (and lock them, if the provider does).

    ``into`` fills in as the phases go, so a load that fails still leaves which models were
    chosen and how cold they were (the failed run's ``metrics.job`` reports them).
    """
    with Phase(channel, watch, "model_resolve", settings.warn_model_resolve_s, {}):
        ids = {i.param: await models.resolve(spec, i, payload) for i in spec.injections}
    into.ids = ids
    into.cache_states = {m: cache_state_of(models, m) for m in ids.values()}
    detail = {"models": sorted(ids.values())}
    emit = channel.hook
    with Phase(channel, watch, "model_load", settings.warn_model_load_s, detail):
        kwargs = into.kwargs
        for injection in spec.injections:
            request = LoadRequest(
                model_id=ids[injection.param],
                injection=injection,
                device=device,
                function_name=spec.name,
                holder=holder,
                resolved=resolved,
                emit=emit,
            )
            kwargs[injection.param] = await models.load(request)
        lock = getattr(models, "lock", None)
        if lock is not None:
            await lock(holder, sorted(set(ids.values())))


def release_models(models: ModelProvider | None, holder: object) -> None:
    """Give back what ``holder``'s loads pinned and locked (once its function has stopped)."""
    release = getattr(models, "release", None)
    if release is not None:
        release(holder)


async def call_with_oom_retry(
    call: Callable[[], Awaitable[Any]],
    *,
    models: ModelProvider,
    loaded: Mapping[str, Any],
    emit: Emit,
    function_name: str,
) -> Any:
    """Run ``call``; after a CUDA OOM, move each injected pipeline one ladder step and retry.

    At most :data:`MAX_OOM_RETRIES` retries, and only when a step changed something: retrying
    with the same placement would only run out of memory again.
    """
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            from gen_worker.low_vram import is_oom_error  # noqa: PLC0415  # failures only

            escalate = getattr(models, "escalate", None)
            if attempt >= MAX_OOM_RETRIES or escalate is None or not is_oom_error(exc):
                raise
            changed = [await escalate(obj, emit) for obj in loaded.values()]
            if not any(changed):
                raise  # each step said it changed nothing (low_vram_mode_applied)
            attempt += 1
            emit("inference.oom_retry", {"function_name": function_name, "attempt": attempt})
