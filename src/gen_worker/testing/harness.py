"""The helpers behind :mod:`gen_worker.testing`."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from gen_worker.authoring import (
    Asset,
    ContextHooks,
    FunctionSpec,
    InjectionSpec,
    RequestContext,
    get_function_spec,
)
from gen_worker.engine import (
    Delta,
    Engine,
    Failure,
    LoadRequest,
    Log,
    Outcome,
    Progress,
    RequestMeta,
    Result,
)
from gen_worker.errors import GenWorkerError
from gen_worker.files import AssetFetcher, LocalOutputSink

__all__ = ["CapturedContext", "FunctionRun", "arun_function", "make_context", "run_function"]


@dataclass
class CapturedContext:
    """A context plus what the function did with it."""

    context: RequestContext
    sink: LocalOutputSink
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def progress(self) -> list[float]:
        return [p["progress"] for t, p in self.events if t == "request.progress"]

    @property
    def outputs(self) -> list[Asset]:
        return self.sink.saved


def make_context(
    *,
    function_name: str = "test",
    request_id: str | None = None,
    outputs_dir: str | Path | None = None,
    timeout_ms: int | None = None,
    device: str = "cpu",
) -> CapturedContext:
    """A context that records events and saves outputs under ``outputs_dir`` (a temp folder)."""
    rid = request_id or f"test-{uuid.uuid4().hex[:12]}"
    root = Path(outputs_dir) if outputs_dir is not None else Path(tempfile.mkdtemp(prefix="gw-"))
    sink = LocalOutputSink(root, rid)
    events: list[tuple[str, dict[str, Any]]] = []
    hooks = ContextHooks(emit=lambda t, p: events.append((t, p)), outputs=sink)
    ctx = RequestContext(
        request_id=rid,
        function_name=function_name,
        timeout_ms=timeout_ms,
        device=device,
        hooks=hooks,
    )
    return CapturedContext(ctx, sink, events)


@dataclass
class FunctionRun:
    """What a caller would have received for one request."""

    outcomes: list[Outcome]
    output: Any = None
    deltas: list[Any] = field(default_factory=list)
    failure: Failure | None = None

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Every non-terminal outcome except deltas, as ``(event_type, payload)``."""
        out: list[tuple[str, dict[str, Any]]] = []
        for o in self.outcomes:
            if isinstance(o, Progress):
                out.append(
                    ("request.progress", {"progress": o.progress, "stage": o.stage, **o.detail})
                )
            elif isinstance(o, Log):
                out.append(("request.log", {"message": o.message, "level": o.level}))
            elif not isinstance(o, Delta | Result | Failure):
                out.append((o.event_type, o.payload))
        return out

    def raise_for_failure(self) -> None:
        if self.failure is not None:
            failure = self.failure
            raise GenWorkerError(
                f"{failure.error_type}: {failure.safe_message}\n{failure.error_message}"
            )


class _ModelsByParameter:
    """Injects the objects given per parameter name (tests need no endpoint.toml)."""

    def __init__(self, objects: Mapping[str, Any]) -> None:
        self._objects = dict(objects)

    async def resolve(
        self, spec: FunctionSpec, injection: InjectionSpec, payload: msgspec.Struct
    ) -> str:
        if injection.param not in self._objects:
            raise GenWorkerError(
                f"run_function(models=...) has no object for model parameter '{injection.param}'"
            )
        return injection.param

    async def load(self, request: LoadRequest) -> Any:
        return self._objects[request.model_id]


async def arun_function(
    fn: Any,
    payload: msgspec.Struct | Mapping[str, Any] | bytes,
    *,
    models: Mapping[str, Any] | None = None,
    outputs_dir: str | Path | None = None,
    timeout_ms: int | None = None,
    request_id: str | None = None,
) -> FunctionRun:
    """Async form of :func:`run_function`."""
    spec = get_function_spec(fn)
    root = Path(outputs_dir) if outputs_dir is not None else Path(tempfile.mkdtemp(prefix="gw-"))
    data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
    engine = Engine(
        [spec],
        models=_ModelsByParameter(models or {}),
        outputs=lambda meta: LocalOutputSink(root, meta.request_id),
        assets=AssetFetcher(root / ".inputs", allow_private_hosts=True, local_refs_root=root),
    )
    meta = RequestMeta(
        request_id=request_id or f"test-{uuid.uuid4().hex[:12]}", timeout_ms=timeout_ms
    )
    try:
        outcomes = [o async for o in engine.run(spec, data, meta)]
    finally:
        await engine.shutdown(grace_s=0)
    return _collect(spec, outcomes)


def _collect(spec: FunctionSpec, outcomes: list[Outcome]) -> FunctionRun:
    run = FunctionRun(outcomes=outcomes)
    decode = msgspec.json.Decoder(spec.output_type)
    for outcome in outcomes:
        if isinstance(outcome, Delta):
            run.deltas.append(decode.decode(outcome.data))
        elif isinstance(outcome, Result) and not spec.is_streaming:
            run.output = decode.decode(outcome.output)
        elif isinstance(outcome, Failure):
            run.failure = outcome
    return run


def run_function(
    fn: Any,
    payload: msgspec.Struct | Mapping[str, Any] | bytes,
    *,
    models: Mapping[str, Any] | None = None,
    outputs_dir: str | Path | None = None,
    timeout_ms: int | None = None,
    request_id: str | None = None,
) -> FunctionRun:
    """Run ``fn`` once through the real engine, as the worker and the dev runner would.

    ``payload`` is a Struct, a dict or JSON bytes (decoded strictly, as a caller's would be);
    ``models`` gives the object for each model parameter by name; outputs are written under
    ``outputs_dir`` (a temporary folder by default). Failures are returned, not raised: see
    ``FunctionRun.failure`` and ``raise_for_failure()``.
    """
    return asyncio.run(
        arun_function(
            fn,
            payload,
            models=models,
            outputs_dir=outputs_dir,
            timeout_ms=timeout_ms,
            request_id=request_id,
        )
    )
