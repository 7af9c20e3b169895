"""Hand-written protobuf encoding of the per-outcome worker messages.

A no-op request sends ten messages (nine events and its result), a stream one per delta.
Building each as a protobuf object (envelope, sub-message, reference, fields) and serializing it
cost about 4.5 us a message on a small machine. These messages are small and flat, and every
outcome of one request shares its ``RequestRef`` except for ``seq``, so :class:`RequestWire`
encodes the reference once and each message with a few byte joins (about 1.2 us).

The scheduler's job request (one per request, both ways) is encoded by hand too, and decoded
by hand when it is a plain one; anything else (resolved models, unknown fields, bad bytes) is
left to protobuf, which also raises the errors.

The bytes are exactly what protobuf's own serializer produces for the same message (fields in
number order, proto3 defaults left out, the reference always present), which the tests check
against protobuf's generic serialization; the one place protobuf leaves the order open, map
entries, is written in the dict's order. Field numbers are those of ``pb/worker.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from gen_worker.protocol.messages import JobRequest, RequestRef

__all__ = ["RequestWire", "frame", "job_request", "job_request_from", "varint"]

_SMALL = [bytes((n,)) for n in range(0x80)]
_DOUBLE = struct.Struct("<d").pack


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint."""
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _length_delimited(key: bytes, data: bytes) -> bytes:
    size = len(data)
    return key + (_SMALL[size] if size < 0x80 else varint(size)) + data


# Keys (field number and wire type) of the fields written here.
_F1_LEN, _F2_LEN, _F3_LEN = _key(1, 2), _key(2, 2), _key(3, 2)
_F4_LEN, _F5_LEN, _F6_LEN, _F7_LEN, _F8_LEN = (_key(n, 2) for n in (4, 5, 6, 7, 8))
_F2_VARINT, _F3_VARINT, _F4_VARINT, _F5_VARINT = (_key(n, 0) for n in (2, 3, 4, 5))
_F2_DOUBLE = _key(2, 1)
_TRUE = varint(1)

# WorkerMessage's oneof fields.
_JOB_RESULT, _JOB_EVENT, _JOB_DELTA = _key(3, 2), _key(4, 2), _key(5, 2)
_STREAM_DONE, _STREAM_ERROR = _key(6, 2), _key(7, 2)
# WorkerMessage.batch (16) holding WorkerMessages.items (1).
_BATCH, _ITEM = _key(16, 2), _key(1, 2)


def _string(key: bytes, text: str) -> bytes:
    return _length_delimited(key, text.encode()) if text else b""


def _bytes(key: bytes, data: bytes) -> bytes:
    return _length_delimited(key, data) if data else b""


def _uint(key: bytes, value: int) -> bytes:
    return key + varint(value) if value else b""


def _timing(key: bytes, timing_ms: Mapping[str, float]) -> bytes:
    """A ``map<string, double>``: one entry message (key 1, value 2) per item.

    protobuf writes both fields of a map entry, even an empty key or a zero value.
    """
    parts = []
    for name, value in timing_ms.items():
        entry = _length_delimited(_F1_LEN, name.encode()) + _F2_DOUBLE + _DOUBLE(value)
        parts.append(_length_delimited(key, entry))
    return b"".join(parts)


#: JobEvent.event_type fields already encoded, by event type.
_EVENT_TYPES: dict[str, bytes] = {}


class RequestWire:
    """Serialized ``WorkerMessage`` envelopes for the outcomes of one request."""

    __slots__ = ("_ref_head", "_ref_seq0")

    def __init__(self, ref: RequestRef) -> None:
        # RequestRef without seq: request_id (1), item_id (2), attempt_epoch (3); then seq (4).
        head = (
            _string(_F1_LEN, ref.request_id)
            + _string(_F2_LEN, ref.item_id)
            + _uint(_F3_VARINT, ref.attempt_epoch)
        )
        self._ref_head = head + _F4_VARINT
        self._ref_seq0 = _length_delimited(_F1_LEN, head)  # seq 0 is not written

    # The varints below are inlined for the one-byte case (lengths and seqs under 128): at a
    # few per message, the function calls were most of the cost.

    def _ref(self, seq: int) -> bytes:
        if not seq:
            return self._ref_seq0
        body = self._ref_head + (_SMALL[seq] if seq < 0x80 else varint(seq))
        size = len(body)
        return _F1_LEN + (_SMALL[size] if size < 0x80 else varint(size)) + body

    def event(self, seq: int, event_type: str, payload_json: bytes) -> bytes:
        """``WorkerMessage{job_event: JobEvent{ref, event_type, payload_json}}``."""
        encoded_type = _EVENT_TYPES.get(event_type)
        if encoded_type is None:
            encoded_type = _string(_F2_LEN, event_type)
            if len(_EVENT_TYPES) < 256:  # the lifecycle types repeat; bound custom ones
                _EVENT_TYPES[event_type] = encoded_type
        if seq:  # the reference, as in _ref (inlined: the hottest call of the worker)
            ref = self._ref_head + (_SMALL[seq] if seq < 0x80 else varint(seq))
            size = len(ref)
            ref = _F1_LEN + (_SMALL[size] if size < 0x80 else varint(size)) + ref
        else:
            ref = self._ref_seq0
        size = len(payload_json)
        if size:
            body = b"".join(
                (
                    ref,
                    encoded_type,
                    _F3_LEN,
                    _SMALL[size] if size < 0x80 else varint(size),
                    payload_json,
                )
            )
        else:
            body = ref + encoded_type
        size = len(body)
        return _JOB_EVENT + (_SMALL[size] if size < 0x80 else varint(size)) + body

    def delta(self, seq: int, data: bytes) -> bytes:
        """``WorkerMessage{job_delta: JobDelta{ref, data}}``."""
        size = len(data)
        if size:
            size_bytes = _SMALL[size] if size < 0x80 else varint(size)
            body = b"".join((self._ref(seq), _F2_LEN, size_bytes, data))
        else:
            body = self._ref(seq)
        size = len(body)
        return _JOB_DELTA + (_SMALL[size] if size < 0x80 else varint(size)) + body

    def result(
        self,
        seq: int,
        *,
        success: bool,
        output: bytes = b"",
        error_type: str = "",
        retryable: bool = False,
        safe_message: str = "",
        error_message: str = "",
        timing_ms: Mapping[str, float],
    ) -> bytes:
        """``WorkerMessage{job_result: JobResult{...}}``."""
        body = b"".join(
            (
                self._ref(seq),
                _F2_VARINT + _TRUE if success else b"",
                _bytes(_F3_LEN, output),
                _string(_F4_LEN, error_type),
                _F5_VARINT + _TRUE if retryable else b"",
                _string(_F6_LEN, safe_message),
                _string(_F7_LEN, error_message),
                _timing(_F8_LEN, timing_ms),
            )
        )
        return _JOB_RESULT + varint(len(body)) + body

    def stream_done(self, seq: int, delta_count: int, timing_ms: Mapping[str, float]) -> bytes:
        """``WorkerMessage{stream_done: StreamDone{ref, delta_count, timing_ms}}``."""
        body = self._ref(seq) + _uint(_F2_VARINT, delta_count) + _timing(_F3_LEN, timing_ms)
        return _STREAM_DONE + varint(len(body)) + body

    def stream_error(
        self,
        seq: int,
        *,
        error_type: str,
        retryable: bool,
        safe_message: str,
        error_message: str,
        timing_ms: Mapping[str, float],
    ) -> bytes:
        """``WorkerMessage{stream_error: StreamError{...}}``."""
        body = b"".join(
            (
                self._ref(seq),
                _string(_F2_LEN, error_type),
                _F3_VARINT + _TRUE if retryable else b"",
                _string(_F4_LEN, safe_message),
                _string(_F5_LEN, error_message),
                _timing(_F6_LEN, timing_ms),
            )
        )
        return _STREAM_ERROR + varint(len(body)) + body


def frame(encoded: list[bytes]) -> bytes:
    """One ``WorkerMessage`` frame holding several serialized ``WorkerMessage``s, in order."""
    inner = b"".join([_ITEM + varint(len(item)) + item for item in encoded])
    return _BATCH + varint(len(inner)) + inner


# -- the job request (scheduler -> worker), one per request ----------------------------------

_STR, _BYTES, _REPEATED_STR, _INT64, _INT32, _UINT32 = range(6)

#: JobRequest's fields by number, except resolved_models (12), a nested message: a job request
#: carrying one is left to protobuf.
_JOB_FIELDS: dict[int, tuple[str, int]] = {
    1: ("request_id", _STR),
    2: ("job_id", _STR),
    3: ("function_name", _STR),
    4: ("payload", _BYTES),
    5: ("required_models", _REPEATED_STR),
    6: ("timeout_ms", _INT64),
    7: ("owner", _STR),
    8: ("invoker_id", _STR),
    9: ("file_base_url", _STR),
    10: ("file_token", _STR),
    11: ("capability_token", _STR),
    13: ("parent_request_id", _STR),
    14: ("child_request_id", _STR),
    15: ("item_id", _STR),
    16: ("item_index", _INT32),
    17: ("attempt_epoch", _UINT32),
    18: ("resolved_compute_json", _BYTES),
}
_JOB_KEYS = {
    name: (_key(number, 0 if kind >= _INT64 else 2), kind)
    for number, (name, kind) in _JOB_FIELDS.items()
}
_JOB_REQUEST = _key(3, 2)  # SchedulerMessage.job_request
_U64 = (1 << 64) - 1


def job_request(job: JobRequest) -> bytes | None:
    """``SchedulerMessage{job_request: ...}``; None when it carries resolved models."""
    if job.resolved_models:
        return None
    parts = []
    for name, (key, kind) in _JOB_KEYS.items():
        value = getattr(job, name)
        if not value:
            continue  # proto3 leaves defaults out
        if kind == _STR:
            parts.append(_length_delimited(key, value.encode()))
        elif kind == _BYTES:
            parts.append(_length_delimited(key, value))
        elif kind == _REPEATED_STR:
            parts.extend(_length_delimited(key, item.encode()) for item in value)
        elif kind == _UINT32:
            parts.append(key + varint(value & 0xFFFFFFFF))
        else:  # int64 and int32: negatives as 64-bit two's complement, as protobuf does
            parts.append(key + varint(value & _U64))
    body = b"".join(parts)
    return _JOB_REQUEST + varint(len(body)) + body


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def _as_int(value: int, kind: int) -> int:
    if kind == _UINT32:
        return value & 0xFFFFFFFF
    if kind == _INT32:
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value >= 1 << 31 else value
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


class _Unhandled(Exception):
    """Bytes this decoder leaves to protobuf."""


def job_request_from(data: bytes) -> JobRequest | None:
    """The JobRequest of a serialized ``SchedulerMessage``, decoded by hand.

    None for anything it does not handle (another message, resolved models, an unknown
    field, malformed bytes): the caller then asks protobuf, which also raises the errors.
    """
    try:
        if data[:1] != _JOB_REQUEST:
            raise _Unhandled
        size, pos = _read_varint(data, 1)
        if pos + size != len(data):
            raise _Unhandled  # more than the job request in the envelope
        fields: dict[str, object] = {"request_id": "", "function_name": ""}
        models: list[str] = []
        while pos < len(data):
            pos = _read_job_field(data, pos, fields, models)
    except (_Unhandled, IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return JobRequest(required_models=models, **fields)  # type: ignore[arg-type]  # by table


def _read_job_field(data: bytes, pos: int, fields: dict[str, object], models: list[str]) -> int:
    key, pos = _read_varint(data, pos)
    field = _JOB_FIELDS.get(key >> 3)
    if field is None:
        raise _Unhandled
    name, kind = field
    if kind >= _INT64:
        if key & 7 != 0:
            raise _Unhandled
        value, pos = _read_varint(data, pos)
        fields[name] = _as_int(value, kind)
        return pos
    if key & 7 != 2:
        raise _Unhandled
    size, pos = _read_varint(data, pos)
    raw = data[pos : pos + size]
    if len(raw) != size:
        raise _Unhandled
    if kind == _BYTES:
        fields[name] = raw
    elif kind == _STR:
        fields[name] = raw.decode()
    else:
        models.append(raw.decode())
    return pos + size
