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

from msgspec.structs import astuple

from gen_worker.protocol.messages import JobRequest, Received, RequestRef

__all__ = ["RequestWire", "ack", "frame", "job_request", "job_request_from", "varint"]

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

    protobuf writes both fields of a map entry, even an empty key or a zero value. Each
    name's part of its entry (key, length, text, the value's key) is encoded once.
    """
    parts: list[bytes] = []
    for name, value in timing_ms.items():
        named = _TIMING_NAMES.get(name)
        if named is None:
            named = _timing_name(name)
        size = len(named) + 8  # the double
        parts += (key, _SMALL[size] if size < 0x80 else varint(size), named, _DOUBLE(value))
    return b"".join(parts)


#: The name part of a timing entry (key 1, length, UTF-8 text, then value 2's key), by name.
_TIMING_NAMES: dict[str, bytes] = {}


def _timing_name(name: str) -> bytes:
    named = _length_delimited(_F1_LEN, name.encode()) + _F2_DOUBLE
    if len(_TIMING_NAMES) < 256:  # the engine's few names repeat; bound anything else
        _TIMING_NAMES[name] = named
    return named


#: JobEvent.event_type fields already encoded, by event type.
_EVENT_TYPES: dict[str, bytes] = {}


def _event_type(event_type: str) -> bytes:
    encoded = _string(_F2_LEN, event_type)
    if len(_EVENT_TYPES) < 256:  # the lifecycle types repeat; bound custom ones
        _EVENT_TYPES[event_type] = encoded
    return encoded


class RequestWire:
    """Serialized ``WorkerMessage`` envelopes for the outcomes of one request."""

    __slots__ = ("_ref_head", "_ref_seq0", "_ref_short", "_ref_short_size")

    def __init__(self, ref: RequestRef) -> None:
        # RequestRef without seq: request_id (1), item_id (2), attempt_epoch (3); then seq (4).
        head = (
            _string(_F1_LEN, ref.request_id)
            + _string(_F2_LEN, ref.item_id)
            + _uint(_F3_VARINT, ref.attempt_epoch)
        )
        self._ref_head = head + _F4_VARINT
        self._ref_seq0 = _length_delimited(_F1_LEN, head)  # seq 0 is not written
        # A seq of 1 to 127 (nearly every outcome) is one byte: the reference is this prefix
        # (its length already counts that byte) followed by the seq.
        self._ref_short = _F1_LEN + varint(len(head) + 2) + self._ref_head
        self._ref_short_size = len(self._ref_short) + 1

    def _ref(self, seq: int) -> bytes:
        if 0 < seq < 0x80:
            return self._ref_short + _SMALL[seq]
        if not seq:
            return self._ref_seq0
        body = self._ref_head + varint(seq)
        return _F1_LEN + varint(len(body)) + body

    def event(self, seq: int, event_type: str, payload_json: bytes) -> bytes:
        """``WorkerMessage{job_event: JobEvent{ref, event_type, payload_json}}``."""
        encoded_type = _EVENT_TYPES.get(event_type)
        if encoded_type is None:
            encoded_type = _event_type(event_type)
        size = len(payload_json)
        if 0 < seq < 0x80 and size < 0x80:
            # The usual case, written as one join with the lengths added up here: every
            # length is one byte (the hottest call of the worker: nine per request).
            body = self._ref_short_size + len(encoded_type) + (size + 2 if size else 0)
            if body < 0x80:
                ref = self._ref_short
                if size:
                    return b"".join((_JOB_EVENT, _SMALL[body], ref, _SMALL[seq], encoded_type,
                                     _F3_LEN, _SMALL[size], payload_json))  # fmt: skip
                return b"".join((_JOB_EVENT, _SMALL[body], ref, _SMALL[seq], encoded_type))
        data = self._ref(seq) + encoded_type
        if size:
            data += _length_delimited(_F3_LEN, payload_json)
        return _length_delimited(_JOB_EVENT, data)

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

    def success(self, seq: int, output: bytes, timing_ms: Mapping[str, float]) -> bytes:
        """``result(seq, success=True, output=output, timing_ms=timing_ms)``, the usual one."""
        output_field = _bytes(_F3_LEN, output)
        timing = _timing(_F8_LEN, timing_ms)
        body = b"".join((self._ref(seq), _F2_VARINT, _TRUE, output_field, timing))
        return _JOB_RESULT + varint(len(body)) + body

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


#: An item's key and one-byte length, by length (nearly every outcome is under 128 bytes).
_ITEM_HEADS = [_ITEM + _SMALL[size] for size in range(0x80)]


def frame(encoded: list[bytes]) -> bytes:
    """One ``WorkerMessage`` frame holding several serialized ``WorkerMessage``s, in order."""
    parts: list[bytes] = []
    for item in encoded:
        size = len(item)
        parts += (_ITEM_HEADS[size] if size < 0x80 else _ITEM + varint(size), item)
    inner = b"".join(parts)
    return _BATCH + varint(len(inner)) + inner


# -- the scheduler's acknowledgements (a few a second, one entry per request) ------------------

_ACK = _key(2, 2)  # SchedulerMessage.ack


def ack(received: list[Received]) -> bytes | None:
    """``SchedulerMessage{ack: Ack{received}}``; None when a number is out of its field's range
    (protobuf raises for those)."""
    parts = []
    for r in received:
        attempt, count = r.attempt_epoch, r.received_count
        if not (0 <= attempt <= 0xFFFFFFFF and -(1 << 63) <= count < 1 << 63):
            return None
        body = _string(_F1_LEN, r.request_id) + _uint(_F2_VARINT, attempt)
        if count:
            body += _F3_VARINT + varint(count & _U64)
        parts.append(_length_delimited(_F1_LEN, body))
    inner = b"".join(parts)
    return _ACK + varint(len(inner)) + inner


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
#: (position in JobRequest's fields, key, kind) in field number order, for the encoder.
_JOB_PLAN = [
    (JobRequest.__struct_fields__.index(name), key, kind) for name, (key, kind) in _JOB_KEYS.items()
]
_RESOLVED_MODELS = JobRequest.__struct_fields__.index("resolved_models")
#: (name, kind) by the whole key (field number and the wire type its kind is written with).
_JOB_BY_KEY = {
    (number << 3) | (0 if kind >= _INT64 else 2): (name, kind)
    for number, (name, kind) in _JOB_FIELDS.items()
}
_JOB_REQUEST = _key(3, 2)  # SchedulerMessage.job_request
_U64 = (1 << 64) - 1


def job_request(job: JobRequest) -> bytes | None:
    """``SchedulerMessage{job_request: ...}``; None when it carries resolved models."""
    values = astuple(job)  # every field at once, in declaration order
    if values[_RESOLVED_MODELS]:
        return None
    parts = []
    for index, key, kind in _JOB_PLAN:
        value = values[index]
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


def job_request_from(data: bytes) -> JobRequest | None:
    """The JobRequest of a serialized ``SchedulerMessage``, decoded by hand.

    None for anything it does not handle (another message, resolved models, an unknown
    field, malformed bytes): the caller then asks protobuf, which also raises the errors.
    """
    try:
        if data[:1] != _JOB_REQUEST:
            return None
        size, pos = _read_varint(data, 1)
        end = len(data)
        if pos + size != end:
            return None  # more than the job request in the envelope
        fields: dict[str, object] = {"request_id": "", "function_name": ""}
        models: list[str] = []
        while pos < end:
            pos = _read_job_field(data, pos, end, fields, models)
    except (LookupError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return JobRequest(required_models=models, **fields)  # type: ignore[arg-type]  # by table


def _read_job_field(
    data: bytes, pos: int, end: int, fields: dict[str, object], models: list[str]
) -> int:
    """Read the field at ``pos`` into ``fields`` (or ``models``); where the next one starts.

    One-byte keys, lengths and numbers (nearly all of them) are read inline.
    """
    key = data[pos]
    if key < 0x80:
        pos += 1
    else:
        key, pos = _read_varint(data, pos)
    # By the whole key: an unknown field, resolved models or a wrong wire type is not there.
    name, kind = _JOB_BY_KEY[key]  # KeyError: the caller steps aside, as for IndexError
    value = data[pos]
    if value < 0x80:
        pos += 1
    else:
        value, pos = _read_varint(data, pos)
    if kind >= _INT64:
        fields[name] = _as_int(value, kind)  # a varint field: that was its value
        return pos
    stop = pos + value  # a length-delimited field: that was its length
    if stop > end:
        raise ValueError("a field runs past the end of the message")
    if kind == _BYTES:
        fields[name] = data[pos:stop]
    elif kind == _STR:
        fields[name] = data[pos:stop].decode()
    else:
        models.append(data[pos:stop].decode())
    return stop
