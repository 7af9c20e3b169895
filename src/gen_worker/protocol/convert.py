"""Typed messages <-> protobuf: the only module that touches the generated code.

Conversion is driven by the field names, which are the same on both sides, so adding a field
to the .proto and to :mod:`gen_worker.protocol.messages` is all a protocol change needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, get_args

import msgspec
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as PbMessage

from gen_worker.errors import GenWorkerError
from gen_worker.pb import worker_pb2
from gen_worker.protocol.messages import (
    Ack,
    JobDelta,
    JobEvent,
    JobRequest,
    JobResult,
    Received,
    RequestRef,
    SchedulerMessage,
    WorkerMessage,
)
from gen_worker.protocol.wire import ack, frame, job_request, job_request_from

__all__ = [
    "ProtocolError",
    "scheduler_from_pb",
    "scheduler_to_pb",
    "worker_batch_to_pb",
    "worker_from_pb",
    "worker_messages_from_pb",
    "worker_to_pb",
]

S = TypeVar("S", bound=msgspec.Struct)

_TYPE_MESSAGE = FieldDescriptor.TYPE_MESSAGE


class ProtocolError(GenWorkerError):
    """A message that cannot be converted (unknown kind, malformed bytes)."""

    error_type = "fatal"


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_map(container: Any) -> bool:
    # Told by the field's container rather than by its entry type's ``map_entry`` option:
    # reading descriptor options imports descriptor_pb2, ~50 ms of the worker's cold start
    # (its registration goes through here).
    return isinstance(container, Mapping)


def _fill(pb: PbMessage, struct: msgspec.Struct) -> None:
    """Copy every set field of ``struct`` into ``pb`` (nested messages, lists and maps too)."""
    descriptor: Any = pb.DESCRIPTOR
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        if value is None:
            continue
        field = descriptor.fields_by_name[name]
        target: Any = getattr(pb, name)
        if _is_map(target):
            _fill_map(target, field, value)
        elif _is_repeated(field) and field.type == _TYPE_MESSAGE:
            for item in value:
                _fill(target.add(), item)
        elif _is_repeated(field):
            target.extend(value)
        elif field.type == _TYPE_MESSAGE:
            _fill(target, value)
        else:
            setattr(pb, name, value)


def _map_value(field: FieldDescriptor) -> FieldDescriptor:
    entry: Any = field.message_type
    value: FieldDescriptor = entry.fields_by_name["value"]
    return value


def _fill_map(target: Any, field: FieldDescriptor, value: dict[str, Any]) -> None:
    value_field = _map_value(field)
    if value_field.type == _TYPE_MESSAGE:
        for key, item in value.items():
            _fill(target[key], item)
    else:
        target.update(value)


def _plain(pb: PbMessage) -> dict[str, Any]:
    """``pb`` as builtins keyed by field name (what msgspec.convert builds structs from)."""
    out: dict[str, Any] = {}
    for field, value in pb.ListFields():
        if _is_map(value):
            if _map_value(field).type == _TYPE_MESSAGE:
                out[field.name] = {k: _plain(v) for k, v in value.items()}
            else:
                out[field.name] = dict(value)
        elif field.type == _TYPE_MESSAGE and _is_repeated(field):
            out[field.name] = [_plain(v) for v in value]
        elif field.type == _TYPE_MESSAGE:
            out[field.name] = _plain(value)
        elif _is_repeated(field):
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def _struct_types(union: Any) -> dict[str, type[msgspec.Struct]]:
    return {t.__struct_config__.tag: t for t in get_args(union)}


_WORKER_TYPES = _struct_types(WorkerMessage)
_SCHEDULER_TYPES = _struct_types(SchedulerMessage)


def _to_envelope(message: msgspec.Struct, envelope: type[PbMessage]) -> bytes:
    pb = envelope()
    tag = message.__struct_config__.tag
    if not isinstance(tag, str) or tag not in envelope.DESCRIPTOR.fields_by_name:
        raise ProtocolError(f"{type(message).__name__} is not a {envelope.DESCRIPTOR.name}")
    _fill(getattr(pb, tag), message)
    data: bytes = pb.SerializeToString()
    return data


def _from_envelope(data: bytes, envelope: type[PbMessage], types: dict[str, Any]) -> Any:
    pb = envelope()
    try:
        pb.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"malformed {envelope.DESCRIPTOR.name}: {exc}") from None
    kind = pb.WhichOneof("msg")
    if kind is None or kind not in types:
        raise ProtocolError(f"{envelope.DESCRIPTOR.name} with no known message ({kind!r})")
    try:
        return msgspec.convert(_plain(getattr(pb, kind)), types[kind])
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {kind}: {exc}") from None


def _set_ref(pb: Any, ref: RequestRef) -> None:
    pb.request_id = ref.request_id
    pb.item_id = ref.item_id
    pb.attempt_epoch = ref.attempt_epoch
    pb.seq = ref.seq


def _delta_to_pb(message: JobDelta) -> bytes:
    # The hot path of streaming (one per delta): written out instead of the generic walk.
    pb = worker_pb2.WorkerMessage()
    _set_ref(pb.job_delta.ref, message.ref)
    pb.job_delta.data = message.data
    data: bytes = pb.SerializeToString()
    return data


def _event_to_pb(message: JobEvent) -> bytes:
    pb = worker_pb2.WorkerMessage()
    _set_ref(pb.job_event.ref, message.ref)
    pb.job_event.event_type = message.event_type
    pb.job_event.payload_json = message.payload_json
    data: bytes = pb.SerializeToString()
    return data


def _result_to_pb(message: JobResult) -> bytes:
    pb = worker_pb2.WorkerMessage()
    r = pb.job_result
    _set_ref(r.ref, message.ref)
    r.success = message.success
    r.output = message.output
    r.error_type = message.error_type
    r.retryable = message.retryable
    r.safe_message = message.safe_message
    r.error_message = message.error_message
    r.timing_ms.update(message.timing_ms)
    data: bytes = pb.SerializeToString()
    return data


def worker_to_pb(message: WorkerMessage) -> bytes:
    """A worker message as the serialized ``WorkerMessage`` envelope."""
    kind = type(message)
    if kind is JobDelta:
        return _delta_to_pb(message)  # type: ignore[arg-type]  # narrowed by the type check
    if kind is JobEvent:
        return _event_to_pb(message)  # type: ignore[arg-type]  # narrowed by the type check
    if kind is JobResult:
        return _result_to_pb(message)  # type: ignore[arg-type]  # narrowed by the type check
    return _to_envelope(message, worker_pb2.WorkerMessage)


def _ref_from(pb: Any) -> RequestRef:
    return RequestRef(
        request_id=pb.request_id, item_id=pb.item_id, attempt_epoch=pb.attempt_epoch, seq=pb.seq
    )


# The per-outcome messages, built directly from the parsed protobuf (the generic walk costs
# ~20 us each; a scheduler reads ten of them per request), keyed by their oneof field.


def _event_from(e: Any) -> JobEvent:
    return JobEvent(ref=_ref_from(e.ref), event_type=e.event_type, payload_json=e.payload_json)


def _delta_from(d: Any) -> JobDelta:
    return JobDelta(ref=_ref_from(d.ref), data=d.data)


def _result_from(r: Any) -> JobResult:
    timing = r.timing_ms  # keys, then a lookup each: a third cheaper than dict(timing) here
    return JobResult(
        ref=_ref_from(r.ref), success=r.success, output=r.output, error_type=r.error_type,
        retryable=r.retryable, safe_message=r.safe_message, error_message=r.error_message,
        timing_ms={name: timing[name] for name in timing},
    )  # fmt: skip


_FAST_FROM: dict[str, Any] = {
    "job_event": _event_from,
    "job_delta": _delta_from,
    "job_result": _result_from,
}


def _worker_message(pb: Any, data: bytes | None = None) -> WorkerMessage:
    kind = pb.WhichOneof("msg")
    fast = _FAST_FROM.get(kind)
    if fast is not None:
        built: WorkerMessage = fast(getattr(pb, kind))
        return built
    if data is None:
        data = pb.SerializeToString()
    message: WorkerMessage = _from_envelope(data, worker_pb2.WorkerMessage, _WORKER_TYPES)
    return message


def worker_from_pb(data: bytes) -> WorkerMessage:
    pb = worker_pb2.WorkerMessage()
    try:
        pb.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"malformed WorkerMessage: {exc}") from None
    return _worker_message(pb, data)


def worker_batch_to_pb(encoded: list[bytes]) -> bytes:
    """One ``WorkerMessage`` frame holding several serialized ``WorkerMessage``s, in order.

    Built from the already serialized messages (field 16, the batch, of field-1 items) without
    parsing them again.
    """
    return frame(encoded)


def worker_messages_from_pb(data: bytes) -> list[WorkerMessage]:
    """The messages of one frame: a single message, or every item of a batch frame."""
    pb = worker_pb2.WorkerMessage()
    try:
        pb.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"malformed WorkerMessage: {exc}") from None
    if pb.WhichOneof("msg") != "batch":
        return [_worker_message(pb, data)]
    return [_worker_message(item) for item in pb.batch.items]


_JOB_SCALARS = (
    "request_id", "job_id", "function_name", "payload", "timeout_ms", "owner", "invoker_id",
    "file_base_url", "file_token", "capability_token", "parent_request_id", "child_request_id",
    "item_id", "item_index", "attempt_epoch", "resolved_compute_json",
)  # fmt: skip


def scheduler_to_pb(message: SchedulerMessage) -> bytes:
    if type(message) is JobRequest:
        # The hot path (one per request), encoded by hand unless it carries resolved models.
        data = job_request(message)
        if data is not None:
            return data
    elif type(message) is Ack:  # an entry per request acknowledged (generic: ~2.5 us each)
        data = ack(message.received)
        if data is not None:
            return data
    return _to_envelope(message, worker_pb2.SchedulerMessage)


def _job_from_pb(job: Any) -> JobRequest:
    fields = {name: getattr(job, name) for name in _JOB_SCALARS}
    return JobRequest(required_models=list(job.required_models), **fields)


def scheduler_from_pb(data: bytes) -> SchedulerMessage:
    job = job_request_from(data)  # the hot path (one per request), decoded by hand
    if job is not None:
        return job
    pb = worker_pb2.SchedulerMessage()
    try:
        pb.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"malformed SchedulerMessage: {exc}") from None
    kind = pb.WhichOneof("msg")
    if kind == "job_request" and not pb.job_request.resolved_models:
        return _job_from_pb(pb.job_request)
    if kind == "ack":  # built directly: the generic walk costs ~2 us an entry
        return Ack(received=[
            Received(request_id=r.request_id, attempt_epoch=r.attempt_epoch,
                     received_count=r.received_count)
            for r in pb.ack.received
        ])  # fmt: skip
    message: SchedulerMessage = _from_envelope(data, worker_pb2.SchedulerMessage, _SCHEDULER_TYPES)
    return message
