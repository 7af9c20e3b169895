"""Engine outcomes as wire messages, and the worker's description of itself."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from gen_worker.discovery import EndpointLock
from gen_worker.engine import (
    Codec,
    Delta,
    Event,
    Failure,
    Log,
    Outcome,
    Progress,
    RequestMeta,
    Result,
)
from gen_worker.protocol import messages as m
from gen_worker.protocol.wire import RequestWire

__all__ = [
    "OutcomeEncoder",
    "failure_message",
    "function_infos",
    "heartbeat",
    "host_info",
    "job_failure",
    "model_unsupported",
    "outcome_message",
    "registration",
    "request_meta",
]

_encode = msgspec.json.Encoder().encode


class OutcomeEncoder:
    """One request's outcomes straight to serialized wire messages (bytes).

    The same messages as :func:`outcome_message` followed by protobuf serialization, without
    building a typed message and a protobuf object for each of them: the per-request path of
    the worker (about ten outcomes per request, one per delta when streaming).
    """

    __slots__ = ("_streaming", "_wire")

    def __init__(self, ref: m.RequestRef, *, streaming: bool) -> None:
        self._wire = RequestWire(ref)
        self._streaming = streaming

    def encode_batch(self, batch: list[Outcome], delta_count: int) -> tuple[tuple[int, bytes], ...]:
        """``(seq, message)`` for each outcome, in order (events, deltas, results inlined)."""
        wire = self._wire
        event = wire.event
        out: list[tuple[int, bytes]] = []
        append = out.append
        outcome: Any  # told apart by exact type below, the cheapest check
        for outcome in batch:
            kind = type(outcome)
            seq = outcome.seq
            if kind is Event:
                append((seq, event(seq, outcome.event_type, _encode(outcome.payload))))
            elif kind is Delta:
                append((seq, wire.delta(seq, outcome.data)))
            elif kind is Result and not self._streaming:
                append((seq, wire.success(seq, outcome.output, outcome.timing_ms)))
            else:
                append((seq, self.encode(outcome, delta_count)))
        return tuple(out)

    def encode(self, outcome: Outcome, delta_count: int = 0) -> bytes:
        # Exact type checks first: the two kinds that make up nearly all outcomes.
        if type(outcome) is Event:
            return self._wire.event(outcome.seq, outcome.event_type, _encode(outcome.payload))
        if type(outcome) is Delta:
            return self._wire.delta(outcome.seq, outcome.data)
        if isinstance(outcome, Progress | Log):
            message = _event_message(outcome, m.RequestRef(request_id=""))
            return self._wire.event(outcome.seq, message.event_type, message.payload_json)
        assert isinstance(outcome, Result | Failure)
        return self._terminal(outcome, delta_count)

    def _terminal(self, outcome: Result | Failure, delta_count: int) -> bytes:
        if isinstance(outcome, Result):
            if self._streaming:
                return self._wire.stream_done(outcome.seq, delta_count, outcome.timing_ms)
            return self._wire.result(
                outcome.seq, success=True, output=outcome.output, timing_ms=outcome.timing_ms
            )
        if self._streaming:
            return self._wire.stream_error(
                outcome.seq,
                error_type=outcome.error_type,
                retryable=outcome.retryable,
                safe_message=outcome.safe_message,
                error_message=outcome.error_message,
                timing_ms=outcome.timing_ms,
            )
        return self._wire.result(
            outcome.seq,
            success=False,
            error_type=outcome.error_type,
            retryable=outcome.retryable,
            safe_message=outcome.safe_message,
            error_message=outcome.error_message,
            timing_ms=outcome.timing_ms,
        )


def request_meta(job: m.JobRequest) -> RequestMeta:
    """What the engine needs to know about a job request besides its payload."""
    return RequestMeta(
        request_id=job.request_id, job_id=job.job_id or None, owner=job.owner or None,
        invoker_id=job.invoker_id or None, parent_request_id=job.parent_request_id or None,
        child_request_id=job.child_request_id or None, item_id=job.item_id or None,
        item_index=job.item_index if job.item_id else None,
        timeout_ms=job.timeout_ms or None, required_models=tuple(job.required_models),
        codec=Codec.MSGPACK, file_base_url=job.file_base_url or None,
        resolved_models={r.ref: r for r in job.resolved_models},
        file_token=job.file_token or None,
    )  # fmt: skip


def job_failure(ref: m.RequestRef, error_type: str, text: str) -> m.JobResult:
    """The result of a job request that failed before it ran (``retryable`` ones may go to
    another worker)."""
    retryable = error_type == "retryable"
    return m.JobResult(ref=ref, error_type=error_type, retryable=retryable, safe_message=text,
                       error_message=text)  # fmt: skip


def outcome_message(
    outcome: Outcome, ref: m.RequestRef, *, streaming: bool, delta_count: int = 0
) -> Any:
    """The wire message for one engine outcome of a request."""
    if isinstance(outcome, Delta):
        return m.JobDelta(ref=ref, data=outcome.data)
    if isinstance(outcome, Result | Failure):
        return _terminal_message(outcome, ref, streaming=streaming, delta_count=delta_count)
    return _event_message(outcome, ref)


def _event_message(outcome: Progress | Log | Event, ref: m.RequestRef) -> m.JobEvent:
    if isinstance(outcome, Progress):
        payload: dict[str, Any] = {"progress": outcome.progress, **outcome.detail}
        if outcome.stage is not None:
            payload["stage"] = outcome.stage
        return m.JobEvent(ref=ref, event_type="request.progress", payload_json=_encode(payload))
    if isinstance(outcome, Log):
        body = {"message": outcome.message, "level": outcome.level}
        return m.JobEvent(ref=ref, event_type="request.log", payload_json=_encode(body))
    return m.JobEvent(ref=ref, event_type=outcome.event_type, payload_json=_encode(outcome.payload))


def _terminal_message(
    outcome: Result | Failure, ref: m.RequestRef, *, streaming: bool, delta_count: int
) -> Any:
    if isinstance(outcome, Failure):
        return failure_message(outcome, ref, streaming=streaming)
    if streaming:
        return m.StreamDone(ref=ref, delta_count=delta_count, timing_ms=outcome.timing_ms)
    return m.JobResult(ref=ref, success=True, output=outcome.output, timing_ms=outcome.timing_ms)


def failure_message(failure: Failure, ref: m.RequestRef, *, streaming: bool) -> Any:
    kind = m.StreamError if streaming else m.JobResult
    return kind(
        ref=ref,
        error_type=failure.error_type,
        retryable=failure.retryable,
        safe_message=failure.safe_message,
        error_message=failure.error_message,
        timing_ms=failure.timing_ms,
    )


def function_infos(lock: EndpointLock, capacity: int) -> list[m.FunctionInfo]:
    return [
        m.FunctionInfo(
            name=f.name,
            python_name=f.python_name,
            streaming=f.streaming,
            is_async=f.is_async,
            input_schema=f.input_schema,
            output_schema=f.output_schema,
            delta_schema=f.delta_schema or "",
            input_schema_sha256=f.input_schema_sha256,
            output_schema_sha256=f.output_schema_sha256,
            capacity=capacity,
            batch_dimension=f.batch_dimension or "",
            resources_json=_encode(f.resources),
        )
        for f in lock.functions
    ]


_LIBRARIES = ("gen-worker", "msgspec", "grpcio", "protobuf", "torch", "diffusers", "transformers")


def _library_versions(names: Sequence[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _memory_bytes() -> tuple[int, int]:
    """(total, available) from /proc/meminfo; zeros where it does not exist."""
    values: dict[str, int] = {}
    try:
        with Path("/proc/meminfo").open(encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def _gpus() -> list[m.GpuInfo]:
    """GPU facts through NVML when nvidia-ml-py and a driver are present; none otherwise."""
    try:
        import pynvml  # type: ignore[import-not-found]  # noqa: PLC0415  # optional
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver on this machine: a CPU worker
        return []
    gpus = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        gpus.append(
            m.GpuInfo(
                index=index,
                name=str(pynvml.nvmlDeviceGetName(handle)),
                total_vram_bytes=memory.total,
                used_vram_bytes=memory.used,
                free_vram_bytes=memory.free,
                compute_capability=f"{major}.{minor}",
            )
        )
    return gpus


def host_info(image_digest: str, git_commit: str, build_time: str) -> m.HostInfo:
    total, available = _memory_bytes()
    return m.HostInfo(
        cpu_count=os.cpu_count() or 0,
        ram_total_bytes=total,
        ram_available_bytes=available,
        gpus=_gpus(),
        libraries=_library_versions(_LIBRARIES),
        image_digest=image_digest,
        git_commit=git_commit,
        build_time=build_time,
        python_version=platform.python_version(),
        hostname=socket.gethostname(),
    )


def registration(
    identity: Any,
    lock: EndpointLock,
    slots: Any,
    *,
    draining: bool,
    assignments: Iterable[tuple[str, int, int]],
    models: m.ModelInventory | None,
) -> m.WorkerRegistration:
    """The registration: who this worker is, what it runs, what it holds, what it was doing."""
    return m.WorkerRegistration(
        worker_id=identity.worker_id,
        release_id=identity.release_id,
        endpoint_name=lock.endpoint_name,
        functions=function_infos(lock, slots.limit),
        max_concurrency=slots.limit,
        host=host_info(identity.image_digest, identity.git_commit, identity.build_time),
        models=models or m.ModelInventory(),
        gpu_busy=slots.in_use > 0,
        draining=draining,
        assignments=[
            m.Assignment(request_id=rid, attempt_epoch=att, sent_count=seq + 1)
            for rid, att, seq in assignments
        ],
    )


def heartbeat(
    slots: Any, active: list[m.Assignment], *, draining: bool, models: m.ModelInventory | None
) -> m.Heartbeat:
    """A heartbeat: load (running, waiting), what runs here, and the models held."""
    return m.Heartbeat(
        running=slots.in_use,
        waiting=slots.waiting,
        gpu_busy=slots.in_use > 0,
        draining=draining,
        assignments=active,
        models=models or m.ModelInventory(),
    )


def model_unsupported(message: m.LoadModel | m.UnloadModel, model: str) -> Any:
    """The answer to a model command this worker version cannot carry out."""
    kind = m.LoadModelResult if isinstance(message, m.LoadModel) else m.UnloadModelResult
    text = "loading and unloading models is not supported by this worker version"
    return kind(model_id=model, ok=False, reason="not_supported", error_message=text)
