"""The hand-written encodings of the per-request messages are protobuf's own bytes.

``gen_worker.protocol.wire`` builds the worker's outcome messages and the scheduler's job
requests without protobuf objects, and decodes job requests by hand. Each is checked against
protobuf itself: the same bytes out, the same message back, and for bytes it does not handle
(malformed, or carrying resolved models) it steps aside and protobuf decides.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_worker.pb import worker_pb2
from gen_worker.protocol import messages as m
from gen_worker.protocol.convert import (
    ProtocolError,
    _to_envelope,
    scheduler_from_pb,
    scheduler_to_pb,
    worker_batch_to_pb,
    worker_messages_from_pb,
)
from gen_worker.protocol.wire import RequestWire, frame, job_request, job_request_from, varint
from gen_worker.transport.stream import WorkerStream

REFS = [
    m.RequestRef(request_id="r"),
    m.RequestRef(request_id=""),
    m.RequestRef(request_id="req-ü" * 40, item_id="item-7", attempt_epoch=300),
]
SEQS = [0, 1, 127, 128, 2**40]
TIMINGS: list[dict[str, float]] = [
    {},
    {"": -0.0},
    {"total_ms": 0.0},
    {"queue_ms": 0.004, "inference_ms": 0.06, "total_ms": 1.5},
]


def at(ref: m.RequestRef, seq: int) -> m.RequestRef:
    return m.RequestRef(
        request_id=ref.request_id, item_id=ref.item_id, attempt_epoch=ref.attempt_epoch, seq=seq
    )


def generic(message: Any) -> bytes:
    """protobuf's serialization through the generic field walk (no hand-written fast path)."""
    return _to_envelope(message, worker_pb2.WorkerMessage)


def test_varint_matches_the_known_encodings() -> None:
    assert [varint(n) for n in (0, 1, 127, 128, 300, 2**63)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80" * 9 + b"\x01"
    ]  # fmt: skip


@pytest.mark.parametrize(("ref", "seq"), list(itertools.product(REFS, SEQS)))
def test_events_and_deltas_are_protobufs_bytes(ref: m.RequestRef, seq: int) -> None:
    wire = RequestWire(ref)
    for event_type, payload in [
        ("request.received", b'{"a":1}'),
        ("", b""),
        ("x" * 200, b"y" * 300),
    ]:
        expected = m.JobEvent(ref=at(ref, seq), event_type=event_type, payload_json=payload)
        assert wire.event(seq, event_type, payload) == generic(expected)
    for data in [b"", b"\x81", b"z" * 1000]:
        assert wire.delta(seq, data) == generic(m.JobDelta(ref=at(ref, seq), data=data))


def same_message(hand: bytes, expected: Any) -> bool:
    """protobuf's own bytes; with a map of several entries, whose order protobuf leaves open
    (its serializer follows its hash table), the same message as protobuf reads them."""
    if len(getattr(expected, "timing_ms", {})) <= 1:
        return hand == generic(expected)
    parse = worker_pb2.WorkerMessage.FromString
    return bool(parse(hand) == parse(generic(expected)))


@pytest.mark.parametrize(("ref", "seq"), list(itertools.product(REFS, SEQS)))
def test_terminal_messages_are_protobufs_bytes(ref: m.RequestRef, seq: int) -> None:
    wire = RequestWire(ref)
    failure = {"error_type": "validation", "retryable": True, "safe_message": "bad ü",
               "error_message": "detail"}  # fmt: skip
    for timing in TIMINGS:
        ok = m.JobResult(ref=at(ref, seq), success=True, output=b"\x81\xa1x\x07", timing_ms=timing)
        hand = wire.result(seq, success=True, output=b"\x81\xa1x\x07", timing_ms=timing)
        assert same_message(hand, ok)
        failed = m.JobResult(ref=at(ref, seq), timing_ms=timing, **failure)
        assert same_message(wire.result(seq, success=False, timing_ms=timing, **failure), failed)
        done = m.StreamDone(ref=at(ref, seq), delta_count=5, timing_ms=timing)
        assert same_message(wire.stream_done(seq, 5, timing), done)
        error = m.StreamError(ref=at(ref, seq), timing_ms=timing, **failure)
        assert same_message(wire.stream_error(seq, timing_ms=timing, **failure), error)


@pytest.mark.parametrize("seq", [1, 5, 127])
def test_events_at_the_one_byte_length_boundary_are_protobufs_bytes(seq: int) -> None:
    # The usual case is written with every length as one byte; a message just past 127
    # bytes must take the general path, and both must be protobuf's bytes.
    ref = m.RequestRef(request_id="0123456789abcdef0123456789abcdef")
    wire = RequestWire(ref)
    for type_size, payload_size in itertools.product([1, 15, 60], range(0, 131, 3)):
        event_type, payload = "t" * type_size, b"p" * payload_size
        expected = m.JobEvent(ref=at(ref, seq), event_type=event_type, payload_json=payload)
        assert wire.event(seq, event_type, payload) == generic(expected), (type_size, payload)


@pytest.mark.parametrize(("ref", "seq"), list(itertools.product(REFS, SEQS)))
def test_a_success_is_the_same_bytes_as_a_result_with_success(ref: m.RequestRef, seq: int) -> None:
    wire = RequestWire(ref)
    for timing, output in itertools.product(TIMINGS, [b"", b"\x81\xa1x\x07", b"o" * 300]):
        expected = m.JobResult(ref=at(ref, seq), success=True, output=output, timing_ms=timing)
        hand = wire.success(seq, output, timing)
        assert hand == wire.result(seq, success=True, output=output, timing_ms=timing)
        assert same_message(hand, expected)


def test_a_frame_of_hand_encoded_messages_reads_back_in_order() -> None:
    wire = RequestWire(REFS[2])
    items = [wire.event(i, "request.progress", b'{"progress":0.5}') for i in range(200)]
    items[100] = wire.delta(100, b"d" * 300)  # an item of more than 127 bytes
    items.append(wire.result(200, success=True, output=b"\x80", timing_ms={"total_ms": 2.0}))
    assert frame(items) == worker_batch_to_pb(items)
    parsed = worker_pb2.WorkerMessage.FromString(frame(items))
    assert [item.SerializeToString() for item in parsed.batch.items] == items
    messages = worker_messages_from_pb(frame(items))
    assert [x.ref.seq for x in messages] == list(range(201))
    assert messages[100] == m.JobDelta(ref=at(REFS[2], 100), data=b"d" * 300)
    assert messages[-1] == m.JobResult(
        ref=at(REFS[2], 200), success=True, output=b"\x80", timing_ms={"total_ms": 2.0}
    )


# -- the job request ------------------------------------------------------------------------

texts = st.sampled_from(["", "a", "r-ü", "x" * 200, "\u2603\u2603"])
blobs = st.sampled_from([b"", b"\x80", bytes(range(256)), b"z" * 1000])
jobs = st.builds(
    m.JobRequest,
    request_id=texts, function_name=texts, payload=blobs, job_id=texts,
    required_models=st.lists(texts, max_size=3),
    timeout_ms=st.integers(-(2**63), 2**63 - 1), owner=texts, invoker_id=texts,
    file_base_url=texts, file_token=texts, capability_token=texts,
    parent_request_id=texts, child_request_id=texts, item_id=texts,
    item_index=st.integers(-(2**31), 2**31 - 1), attempt_epoch=st.integers(0, 2**32 - 1),
    resolved_compute_json=blobs,
)  # fmt: skip


def protobuf_job(data: bytes) -> Any:
    """What protobuf reads from ``data``: the job request's fields, or why there is none."""
    pb = worker_pb2.SchedulerMessage()
    try:
        pb.ParseFromString(data)
    except DecodeError:
        return "malformed"
    if pb.WhichOneof("msg") != "job_request" or pb.job_request.resolved_models:
        return "not a plain job request"
    job = pb.job_request
    fields = {f.name: getattr(job, f.name) for f in job.DESCRIPTOR.fields}
    fields["required_models"] = list(job.required_models)
    del fields["resolved_models"]
    return m.JobRequest(**fields)


@settings(max_examples=300, deadline=None)
@given(jobs)
def test_job_requests_encode_and_decode_like_protobuf(job: m.JobRequest) -> None:
    data = job_request(job)
    assert data == _to_envelope(job, worker_pb2.SchedulerMessage)
    assert job_request_from(data) == job == protobuf_job(data)
    assert scheduler_from_pb(scheduler_to_pb(job)) == job


@settings(max_examples=400, deadline=None)
@given(jobs, st.data())
def test_damaged_job_requests_are_decoded_like_protobuf_or_left_to_it(
    job: m.JobRequest, data: st.DataObject
) -> None:
    raw = bytearray(job_request(job) or b"")
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.integers(0, len(raw)))
        match data.draw(st.sampled_from(["flip", "cut", "insert"])):
            case "flip" if raw:
                raw[min(where, len(raw) - 1)] = data.draw(st.integers(0, 255))
            case "cut":
                del raw[where:]
            case _:
                raw.insert(where, data.draw(st.integers(0, 255)))
    decoded = job_request_from(bytes(raw))
    if decoded is not None:  # what it does decode, it decodes exactly as protobuf does
        assert decoded == protobuf_job(bytes(raw))


def test_job_requests_with_resolved_models_or_other_messages_go_to_protobuf() -> None:
    model = m.ResolvedModel(ref="acme/x:v1", files=[m.ResolvedFile(path="a", size_bytes=1)])
    job = m.JobRequest(request_id="r", function_name="f", resolved_models=[model])
    assert job_request(job) is None
    assert job_request_from(scheduler_to_pb(job)) is None
    assert scheduler_from_pb(scheduler_to_pb(job)) == job
    assert job_request_from(scheduler_to_pb(m.Drain(reason="x"))) is None
    with pytest.raises(ProtocolError, match="malformed SchedulerMessage"):
        scheduler_from_pb(b"\x1a\x05\x0a\x09")  # a job request cut short


received = st.builds(
    m.Received,
    request_id=texts,
    attempt_epoch=st.integers(0, 2**32 - 1),
    received_count=st.integers(-(2**63), 2**63 - 1),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(received, max_size=5))
def test_acknowledgements_encode_and_decode_like_protobuf(entries: list[m.Received]) -> None:
    ack = m.Ack(received=entries)
    expected = worker_pb2.SchedulerMessage()
    expected.ack.SetInParent()  # present even with no entry, so an empty one still decodes
    for e in entries:
        expected.ack.received.add(request_id=e.request_id, attempt_epoch=e.attempt_epoch,
                                  received_count=e.received_count)  # fmt: skip
    data = scheduler_to_pb(ack)
    assert data == expected.SerializeToString()
    assert scheduler_from_pb(data) == ack
    if entries:  # the generic walk writes the same bytes (it leaves an empty Ack out)
        assert data == _to_envelope(ack, worker_pb2.SchedulerMessage)


@pytest.mark.parametrize(
    "entry",
    [
        m.Received(request_id="r", attempt_epoch=-1),
        m.Received(request_id="r", attempt_epoch=2**32),
        m.Received(request_id="r", received_count=2**63),
    ],
)
def test_acknowledgements_out_of_range_fail_as_protobuf_does(entry: m.Received) -> None:
    with pytest.raises(ValueError, match="Value out of range"):
        scheduler_to_pb(m.Ack(received=[entry]))


class RecordingCall:
    """The grpc call under a WorkerStream: keeps what is written."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.frames.append(data)


def test_send_many_takes_messages_and_preencoded_bytes_alike() -> None:
    call = RecordingCall()
    stream = WorkerStream(channel=None, call=call)  # type: ignore[arg-type]  # never dialed
    wire = RequestWire(REFS[0])
    asyncio.run(
        stream.send_many([wire.event(0, "request.received", b"{}"), m.Heartbeat(running=1)])
    )
    asyncio.run(stream.send_many([wire.delta(1, b"\x81")]))
    assert worker_messages_from_pb(call.frames[0]) == [
        m.JobEvent(ref=REFS[0], event_type="request.received", payload_json=b"{}"),
        m.Heartbeat(running=1),
    ]
    assert call.frames[1] == generic(m.JobDelta(ref=at(REFS[0], 1), data=b"\x81"))  # unframed
