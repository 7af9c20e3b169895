"""The wire protocol: every message survives protobuf, and the generated code is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from gen_worker.protocol import messages as m
from gen_worker.protocol.convert import (
    ProtocolError,
    scheduler_from_pb,
    scheduler_to_pb,
    worker_from_pb,
    worker_to_pb,
)

REF = m.RequestRef(request_id="r-1", item_id="i-2", attempt_epoch=3, seq=41)
MODEL = m.ResolvedModel(
    ref="acme/sdxl:v1",
    snapshot_digest="blake3:" + "ab" * 32,
    files=[
        m.ResolvedFile(
            path="unet/model.safetensors", size_bytes=10, blake3="cd" * 32, url="http://h/x"
        )
    ],
)
ASSIGN = [m.Assignment(request_id="r-1", item_id="i", attempt_epoch=2, sent_count=7)]

WORKER_EXAMPLES: list[Any] = [
    m.WorkerRegistration(
        worker_id="w-1",
        release_id="rel-9",
        endpoint_name="hello",
        functions=[
            m.FunctionInfo(
                name="f", python_name="p:f", streaming=True, capacity=2, resources_json=b'{"a":1}'
            )
        ],
        max_concurrency=4,
        host=m.HostInfo(
            cpu_count=2,
            gpus=[m.GpuInfo(index=0, name="H100", total_vram_bytes=80)],
            libraries={"torch": "2.13"},
        ),
        models=m.ModelInventory(hot=["a"], warm=["b"], downloading=["c"], loading=["d"]),
        draining=True,
        assignments=ASSIGN,
    ),
    m.Heartbeat(running=2, waiting=1, gpu_busy=True, assignments=ASSIGN),
    m.JobResult(
        ref=REF,
        success=False,
        error_type="validation",
        safe_message="bad",
        error_message="detail",
        timing_ms={"total_ms": 1.5},
    ),
    m.JobEvent(ref=REF, event_type="request.progress", payload_json=b'{"progress":0.5}'),
    m.JobDelta(ref=REF, data=b"\x81\xa1a\x01"),
    m.StreamDone(ref=REF, delta_count=10, timing_ms={"total_ms": 2.0}),
    m.StreamError(ref=REF, error_type="internal", safe_message="x", error_message="y"),
    m.LoadModelResult(model_id="a", ok=True),
    m.UnloadModelResult(model_id="a", ok=False, reason="in_use", error_message="busy"),
    m.ModelUrlRefreshRequest(model_ref="acme/x:v1", paths=["a", "b"], request_id="r"),
    m.RuntimeBatchingConfigResult(function_name="f", ok=True),
    m.FunctionAvailability(function_name="f", available=False, reason="disabled"),
    m.DrainResult(completed=3, canceled=1, undelivered=0, reason="drained"),
    m.BatchResult(
        batch_id="b",
        function_name="f",
        results=[m.JobResult(ref=REF, success=True, output=b"\x80")],
    ),
    m.WorkerEvent(event_type="worker.startup.phase", payload_json=b'{"phase":"boot"}'),
]

SCHEDULER_EXAMPLES: list[Any] = [
    m.RegistrationAck(
        heartbeat_interval_s=5.0,
        resume=[m.Received(request_id="r", attempt_epoch=1, received_count=9)],
        worker_id="w",
    ),
    m.Ack(received=[m.Received(request_id="r", received_count=3)]),
    m.JobRequest(
        request_id="r",
        function_name="f",
        payload=b"\x80",
        job_id="j",
        required_models=["a/b:c"],
        timeout_ms=5000,
        owner="o",
        invoker_id="i",
        file_base_url="http://files",
        file_token="tok",
        capability_token="cap",
        resolved_models=[MODEL],
        parent_request_id="p",
        child_request_id="c",
        item_id="it",
        item_index=2,
        attempt_epoch=1,
        resolved_compute_json=b"{}",
    ),
    m.BatchJobRequest(
        batch_id="b",
        function_name="f",
        items=[m.JobRequest(request_id="r1", function_name="f", item_id="1")],
    ),
    m.Interrupt(
        request_id="r", item_ids=["1"], queued_only=True, attempt_epoch=2, any_attempt=True
    ),
    m.LoadModel(model_id="a/b:c"),
    m.UnloadModel(model_id="a/b:c"),
    m.EndpointConfig(
        release_id="rel",
        resolved_models=[MODEL],
        required_models=["a/b:c"],
        keyspaces={"f": m.Keyspace(models={"small": "a/b:c"})},
        disabled_functions=["g"],
    ),
    m.ModelUrlRefreshResponse(model=MODEL, error_message=""),
    m.RuntimeBatchingConfig(
        function_name="f", preferred_batch_size=8, max_wait_ms=20, prefetch_depth=1
    ),
    m.Drain(reason="scale-down", deadline_s=30.0, terminate_after_deadline=True),
    m.SchedulerEvent(event_type="jwt.rotated", jwt="eyJ.secret.token"),
]


def test_every_message_kind_has_an_example() -> None:
    assert {type(x) for x in WORKER_EXAMPLES} == set(get_args(m.WorkerMessage))
    assert {type(x) for x in SCHEDULER_EXAMPLES} == set(get_args(m.SchedulerMessage))


@pytest.mark.parametrize("message", WORKER_EXAMPLES, ids=lambda x: type(x).__name__)
def test_worker_messages_round_trip(message: Any) -> None:
    assert worker_from_pb(worker_to_pb(message)) == message


@pytest.mark.parametrize("message", SCHEDULER_EXAMPLES, ids=lambda x: type(x).__name__)
def test_scheduler_messages_round_trip(message: Any) -> None:
    assert scheduler_from_pb(scheduler_to_pb(message)) == message


def test_defaults_round_trip_too() -> None:
    assert worker_from_pb(worker_to_pb(m.Heartbeat())) == m.Heartbeat()
    assert scheduler_from_pb(scheduler_to_pb(m.Drain())) == m.Drain()


def test_malformed_and_empty_envelopes() -> None:
    with pytest.raises(ProtocolError, match="malformed WorkerMessage"):
        worker_from_pb(b"\xff\xff\xff")
    with pytest.raises(ProtocolError, match="with no known message"):
        scheduler_from_pb(b"")
    with pytest.raises(ProtocolError, match="is not a WorkerMessage"):
        worker_to_pb(m.Drain())  # type: ignore[arg-type]


def test_secrets_stay_out_of_reprs() -> None:
    job = SCHEDULER_EXAMPLES[2]
    assert "tok" not in repr(job).replace("tokens", "") and "cap" not in repr(job)
    assert "secret" not in repr(SCHEDULER_EXAMPLES[-1])


def test_protocol_version_defaults() -> None:
    reg = m.WorkerRegistration(worker_id="w")
    assert (reg.protocol.major, reg.protocol.minor) == (m.PROTOCOL_MAJOR, m.PROTOCOL_MINOR)
    assert msgspec.structs.asdict(m.RegistrationAck().accepted) == {"major": 1, "minor": 0}


def test_generated_code_is_current(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    proto = src / "gen_worker" / "pb" / "worker.proto"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"--python_out={tmp_path}"),
            *(f"--pyi_out={tmp_path}", str(proto)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert not (proto.parent / "worker_pb2_grpc.py").exists()  # no stub: see worker.proto
    for name in ("worker_pb2.py", "worker_pb2.pyi"):
        fresh = (tmp_path / "gen_worker" / "pb" / name).read_text()
        committed = (proto.parent / name).read_text()
        assert fresh == committed, (
            f"{name} is stale: regenerate it (see the header of worker.proto)"
        )


def test_batch_frames_carry_several_messages_in_order() -> None:
    from gen_worker.protocol.convert import worker_batch_to_pb, worker_messages_from_pb

    messages = [
        m.JobDelta(ref=m.RequestRef(request_id="r", seq=i), data=bytes([i % 256]) * (i % 7))
        for i in range(300)
    ]
    frame = worker_batch_to_pb([worker_to_pb(x) for x in messages])
    assert worker_messages_from_pb(frame) == messages
    single = worker_to_pb(messages[5])
    assert worker_messages_from_pb(single) == [messages[5]]
    with pytest.raises(ProtocolError, match="malformed WorkerMessage"):
        worker_messages_from_pb(b"\xff\xff")


def test_fast_paths_round_trip_every_field() -> None:
    job = m.JobRequest(
        request_id="r", function_name="f", payload=b"\x80", job_id="j", required_models=["a/b:c"],
        timeout_ms=5, owner="o", invoker_id="i", file_base_url="u", file_token="t",
        capability_token="c", parent_request_id="p", child_request_id="ch", item_id="it",
        item_index=3, attempt_epoch=2, resolved_compute_json=b"{}",
    )  # fmt: skip
    assert scheduler_from_pb(scheduler_to_pb(job)) == job
    result = m.JobResult(ref=REF, success=True, output=b"\x81", timing_ms={"total_ms": 1.0})
    assert worker_from_pb(worker_to_pb(result)) == result
