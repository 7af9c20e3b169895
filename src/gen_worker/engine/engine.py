"""The execution engine: one per process, shared by every transport.

Give it the endpoint's functions once; then ``start`` a request (payload bytes + metadata) and
iterate its outcomes, ``cancel`` it by id, and ``shutdown`` in order. It knows nothing about
HTTP or gRPC: the dev runner and the worker are thin transports over the same engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from gen_worker.authoring import FunctionSpec, OutputSink
from gen_worker.config import EngineSettings
from gen_worker.engine.codec import FunctionCodec
from gen_worker.engine.models import ModelProvider
from gen_worker.engine.outcomes import Outcome
from gen_worker.engine.request import RequestMeta
from gen_worker.engine.run import RequestRun, RunDeps
from gen_worker.engine.slots import FifoSlots
from gen_worker.engine.threads import CallThreads
from gen_worker.engine.watch import StuckWatch
from gen_worker.errors import ValidationError
from gen_worker.files import AssetFetcher

__all__ = ["DEFAULT_CANCEL_GRACE_S", "Engine", "resolve_concurrency"]

#: How long a canceled sync function may keep running before CanceledError is raised in it.
DEFAULT_CANCEL_GRACE_S = 2.0


def resolve_concurrency(settings: EngineSettings, max_inflight_requests: int | None) -> int:
    """WORKER_MAX_CONCURRENCY, else the endpoint's ``max_inflight_requests``, else 1."""
    return settings.max_concurrency or max_inflight_requests or 1


class Engine:
    """Runs requests of a fixed set of functions under one concurrency limit."""

    def __init__(
        self,
        functions: Sequence[FunctionSpec],
        *,
        settings: EngineSettings | None = None,
        concurrency: int = 1,
        max_waiting: int | None = None,
        models: ModelProvider | None = None,
        outputs: Callable[[RequestMeta], OutputSink] | None = None,
        assets: AssetFetcher | None = None,
        cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
        device: str = "cpu",
    ) -> None:
        self.settings = settings or EngineSettings()
        self._functions: dict[str, FunctionSpec] = {}
        for spec in functions:
            self._functions[spec.name] = spec
            self._functions.setdefault(spec.func.__name__, spec)
        self._codecs = {id(spec): FunctionCodec(spec) for spec in functions}
        self.slots = FifoSlots(concurrency, max_waiting=max_waiting)
        self._threads_pool: CallThreads | None = None
        self._batch_sizes: dict[str, int] = {}
        self._deps = RunDeps(
            settings=self.settings,
            slots=self.slots,
            call_threads=self._threads,
            models=models,
            outputs=outputs,
            assets=assets,
            cancel_grace_s=cancel_grace_s,
            device=device,
            preferred_batch_size=self.preferred_batch_size,
            watch=StuckWatch(),
        )
        self._runs: dict[str, RequestRun] = {}

    # -- functions ------------------------------------------------------------------------------

    @property
    def functions(self) -> list[FunctionSpec]:
        return sorted({id(s): s for s in self._functions.values()}.values(), key=lambda s: s.name)

    def find(self, name: str) -> FunctionSpec | None:
        """A function by slug or Python name."""
        return self._functions.get(name)

    def preferred_batch_size(self, function: str) -> int:
        spec = self._functions.get(function)
        default = (spec.resources.batch_size_target if spec else None) or 1
        return self._batch_sizes.get(function, default)

    def set_preferred_batch_size(self, function: str, size: int) -> None:
        self._batch_sizes[function] = size

    # -- requests -------------------------------------------------------------------------------

    def _threads(self) -> CallThreads:
        # Started on first use (an endpoint of async functions never needs one); it grows to
        # at most one thread per slot, as a slot is held until its thread has returned.
        if self._threads_pool is None:
            self._threads_pool = CallThreads("gen-worker-call")
        return self._threads_pool

    def start(
        self, spec: FunctionSpec, payload: bytes, meta: RequestMeta, *, own_task: bool = True
    ) -> RequestRun:
        """Start a request on the running loop; iterate ``run.channel`` for its outcomes.

        With ``own_task=False`` nothing runs until the caller awaits ``run.execute()``.
        """
        if meta.request_id in self._runs:
            raise ValidationError(f"request {meta.request_id} is already running")
        run = RequestRun(self._deps, spec, self._codecs[id(spec)], payload, meta, own_task=own_task)
        self._runs[meta.request_id] = run
        run.stopped_callback = lambda: self._runs.pop(meta.request_id, None)
        return run

    async def run(
        self, spec: FunctionSpec, payload: bytes, meta: RequestMeta
    ) -> AsyncIterator[Outcome]:
        """Start a request and yield its outcomes; leaving early cancels it."""
        run = self.start(spec, payload, meta)
        try:
            async for outcome in run.channel:
                yield outcome
        finally:
            run.cancel()

    def get(self, request_id: str) -> RequestRun | None:
        return self._runs.get(request_id)

    def cancel(self, request_id: str) -> bool:
        """Cancel a request; unknown or finished requests are a no-op (False)."""
        run = self._runs.get(request_id)
        return run.cancel() if run is not None else False

    @property
    def active(self) -> Mapping[str, RequestRun]:
        return dict(self._runs)

    async def shutdown(self, grace_s: float) -> None:
        """Let running requests finish within ``grace_s``, cancel the rest, wait until stopped."""
        runs = list(self._runs.values())
        if runs:
            waits = [asyncio.ensure_future(r.stopped.wait()) for r in runs]
            await asyncio.wait(waits, timeout=grace_s)
            for run in runs:
                run.cancel()
            await asyncio.wait(waits, timeout=grace_s + 2 * self._deps.cancel_grace_s)
            for wait in waits:
                wait.cancel()
        if self._threads_pool is not None:
            self._threads_pool.shutdown()
            self._threads_pool = None
