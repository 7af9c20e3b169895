"""The execution engine on scenario functions (tests/fixtures/functions)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from fixtures.functions import (
    blocks_forever,
    raises_each_error,
    reports_progress,
    sleeps,
    stream_fails_midway,
    streams_many,
    strict_payload,
    wrong_return,
    wrong_yield,
)

from gen_worker.authoring import get_function_spec
from gen_worker.config import EngineSettings
from gen_worker.engine import (
    Codec,
    Delta,
    Engine,
    Event,
    Failure,
    InProcessModels,
    Log,
    Outcome,
    Progress,
    RequestMeta,
    Result,
)
from gen_worker.files import LocalOutputSink
from gen_worker.injection import CachedModels, SnapshotFinder
from gen_worker.model_cache import ModelCache

T = TypeVar("T")


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(factory(), timeout=30))


def engine_for(*fns: Any, **kwargs: Any) -> Engine:
    return Engine([get_function_spec(f) for f in fns], **kwargs)


async def collect(engine: Engine, fn: Any, payload: bytes, **meta: Any) -> list[Outcome]:
    spec = get_function_spec(fn)
    meta.setdefault("request_id", "r1")
    return [o async for o in engine.run(spec, payload, RequestMeta(**meta))]


def once(
    fn: Any, payload: bytes, *, engine_kwargs: dict[str, Any] | None = None, **meta: Any
) -> list[Outcome]:
    async def go() -> list[Outcome]:
        engine = engine_for(fn, **(engine_kwargs or {}))
        try:
            return await collect(engine, fn, payload, **meta)
        finally:
            await engine.shutdown(grace_s=1)

    return run_async(go)


def terminal(outcomes: list[Outcome]) -> Result | Failure:
    last = outcomes[-1]
    assert isinstance(last, Result | Failure)
    assert sum(isinstance(o, Result | Failure) for o in outcomes) == 1
    return last


def event_types(outcomes: list[Outcome]) -> list[str]:
    return [o.event_type for o in outcomes if isinstance(o, Event)]


# -- success, ordering, events -------------------------------------------------------------


def test_success_with_progress_log_and_events_in_order() -> None:
    outcomes = once(reports_progress.chatty, b'{"text": "hi"}')
    result = terminal(outcomes)
    assert isinstance(result, Result)
    assert msgspec.json.decode(result.output) == {"text": "HI"}
    assert [o.seq for o in outcomes] == list(range(len(outcomes)))
    mine = [
        o
        for o in outcomes
        if isinstance(o, Progress | Log) or (isinstance(o, Event) and o.event_type == "custom.note")
    ]
    assert mine == [
        Progress(mine[0].seq, 0.25, "load", {}),
        Log(mine[1].seq, "halfway", "info"),
        Event(mine[2].seq, "custom.note", {"k": "v"}),
        Progress(mine[3].seq, 1.0, None, {}),
    ]
    types = event_types(outcomes)
    for expected in [
        "request.received",
        "request.started",
        "metrics.compute.started",
        "request.inference.started",
        "request.inference.completed",
        "metrics.inference",
        "metrics.job",
        "metrics.compute.completed",
        "request.completed",
    ]:
        assert expected in types
    assert (
        types.index("request.received")
        < types.index("request.started")
        < types.index("request.completed")
    )
    job = next(o for o in outcomes if isinstance(o, Event) and o.event_type == "metrics.job")
    assert job.payload["schema_version"] == 1 and job.payload["function_name"] == "chatty"
    assert "inference_ms" in result.timing_ms and "total_ms" in result.timing_ms


def test_msgpack_codec() -> None:
    outcomes = once(
        reports_progress.chatty, msgspec.msgpack.encode({"text": "mp"}), codec=Codec.MSGPACK
    )
    result = terminal(outcomes)
    assert isinstance(result, Result)
    assert msgspec.msgpack.decode(result.output) == {"text": "MP"}


# -- decoding --------------------------------------------------------------------------------


def test_wrong_type_names_the_msgspec_path() -> None:
    failure = terminal(once(reports_progress.chatty, b'{"text": 5}'))
    assert isinstance(failure, Failure)
    assert failure.error_type == "validation" and not failure.retryable
    assert failure.safe_message == "invalid payload: Expected `str`, got `int` - at `$.text`"


def test_unknown_fields_follow_the_struct() -> None:
    failure = terminal(once(strict_payload.strict, b'{"prompt": "x", "extra": 1}'))
    assert isinstance(failure, Failure) and failure.error_type == "validation"
    assert "Object contains unknown field `extra`" in failure.safe_message
    ok = terminal(once(strict_payload.loose, b'{"prompt": "x", "extra": 1}'))
    assert isinstance(ok, Result)


def test_malformed_json_and_input_limit() -> None:
    failure = terminal(once(strict_payload.loose, b'{"prompt": '))
    assert isinstance(failure, Failure) and failure.error_type == "validation"
    assert failure.safe_message.startswith("payload is not valid json")
    big = b'{"prompt": "' + b"x" * 200 + b'"}'
    limited = {"settings": EngineSettings(max_input_bytes=100)}
    failure = terminal(once(strict_payload.loose, big, engine_kwargs=limited))
    assert isinstance(failure, Failure)
    assert (failure.error_type, failure.reason) == ("validation", "input_too_large")
    assert "above the limit of 100 bytes (WORKER_MAX_INPUT_BYTES)" in failure.safe_message


# -- the error table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error_type", "retryable", "safe"),
    [
        ("validation", "validation", False, "prompt is required"),
        ("retryable", "retryable", True, "upstream timed out; model acme/x:v1 busy"),
        ("resource", "resource", True, "out of memory after the low-VRAM ladder"),
        ("canceled", "canceled", False, "gave up"),
        ("auth", "auth", False, "token not allowed"),
        ("fatal", "fatal", False, "weights are corrupt"),
        ("output_too_large", "output_too_large", False, "output is 10 bytes"),
        ("value_error", "internal", False, "internal error in function 'fail'"),
    ],
)
def test_error_table(kind: str, error_type: str, retryable: bool, safe: str) -> None:
    outcomes = once(raises_each_error.fail, msgspec.json.encode({"text": kind}))
    failure = terminal(outcomes)
    assert isinstance(failure, Failure)
    assert (failure.error_type, failure.retryable) == (error_type, retryable)
    assert failure.safe_message.startswith(safe)
    assert "request.failed" in event_types(outcomes)
    assert "request.inference.failed" in event_types(outcomes)


def test_internal_error_detail_is_redacted() -> None:
    failure = terminal(once(raises_each_error.fail, b'{"text": "value_error"}'))
    assert isinstance(failure, Failure)
    assert "ValueError: bad value with Bearer [REDACTED] inside" in failure.error_message
    assert "abcdefghijklmnop123" not in failure.error_message + failure.safe_message


def test_wrong_return_and_wrong_yield_are_internal_and_named() -> None:
    failure = terminal(once(wrong_return.wrong, b"{}"))
    assert isinstance(failure, Failure) and failure.error_type == "internal"
    assert (
        "'fixtures.functions.wrong_return:wrong' returned dict, expected Text"
        in failure.error_message
    )
    outcomes = once(wrong_yield.wrong_items, b"{}")
    failure = terminal(outcomes)
    assert isinstance(failure, Failure) and failure.error_type == "internal"
    assert "yielded str, expected Text" in failure.error_message
    assert [msgspec.json.decode(o.data) for o in outcomes if isinstance(o, Delta)] == [
        {"text": "ok"}
    ]


def test_output_limit() -> None:
    limited = {"settings": EngineSettings(max_output_bytes=10)}
    failure = terminal(
        once(reports_progress.chatty, b'{"text": "a long enough text"}', engine_kwargs=limited)
    )
    assert isinstance(failure, Failure) and failure.error_type == "output_too_large"


# -- streaming ---------------------------------------------------------------------------------


def test_failure_after_two_deltas() -> None:
    outcomes = once(stream_fails_midway.two_then_fail, b"{}")
    deltas = [msgspec.json.decode(o.data) for o in outcomes if isinstance(o, Delta)]
    assert deltas == [{"text": "one"}, {"text": "two"}]
    failure = terminal(outcomes)
    assert isinstance(failure, Failure) and failure.error_type == "internal"
    assert "RuntimeError: the stream broke" in failure.error_message
    last_delta = max(o.seq for o in outcomes if isinstance(o, Delta))
    assert failure.seq > last_delta


def test_thread_exiting_mid_stream_is_a_failure_not_a_crash() -> None:
    outcomes = once(stream_fails_midway.two_then_exit, b"{}")
    failure = terminal(outcomes)
    assert isinstance(failure, Failure) and failure.error_type == "internal"
    assert "SystemExit" in failure.error_message
    assert sum(isinstance(o, Delta) for o in outcomes) == 2


@pytest.mark.parametrize("fn", [streams_many.count, streams_many.acount])
def test_ten_thousand_deltas_in_order(fn: Any) -> None:
    outcomes = once(fn, b'{"n": 10000}')
    deltas = [msgspec.json.decode(o.data)["n"] for o in outcomes if isinstance(o, Delta)]
    assert deltas == list(range(10000))
    assert isinstance(terminal(outcomes), Result)
    job = next(o for o in outcomes if isinstance(o, Event) and o.event_type == "metrics.job")
    assert job.payload["deltas"] == 10000


def test_deltas_arrive_before_the_function_returns() -> None:
    async def go() -> None:
        engine = engine_for(streams_many.count)
        spec = get_function_spec(streams_many.count)
        run = engine.start(spec, b'{"n": 3}', RequestMeta(request_id="s"))
        kinds = [type(o).__name__ async for o in run.channel]
        assert kinds.count("Delta") == 3 and kinds[-1] == "Result"
        await engine.shutdown(1)

    run_async(go)


# -- cancellation, deadlines, concurrency ----------------------------------------------------------


def test_cancel_sync_function_that_ignores_cancellation() -> None:
    blocks_forever.STOPPED.clear()
    blocks_forever.STARTED.clear()

    async def go() -> None:
        engine = engine_for(blocks_forever.spin, sleeps.nap, cancel_grace_s=0.2)
        spin = engine.start(
            get_function_spec(blocks_forever.spin), b"{}", RequestMeta(request_id="a")
        )
        second = engine.start(get_function_spec(sleeps.nap), b"{}", RequestMeta(request_id="b"))
        await asyncio.to_thread(blocks_forever.STARTED.wait, 5)
        start = time.monotonic()
        assert engine.cancel("a")
        outcome = [o async for o in spin.channel][-1]
        assert isinstance(outcome, Failure) and outcome.error_type == "canceled"
        assert time.monotonic() - start < 0.1  # reported at once
        # the slot is still held by the spinning thread: the second request waits
        assert engine.slots.in_use == 1 and engine.slots.waiting == 1
        assert not blocks_forever.STOPPED.is_set()
        result = [o async for o in second.channel][-1]
        assert isinstance(result, Result)
        assert blocks_forever.STOPPED.is_set()  # forced CanceledError stopped it first
        assert time.monotonic() - start >= 0.2
        assert not engine.cancel("a") and not engine.cancel("unknown")
        await engine.shutdown(1)

    run_async(go)


def test_cancel_async_function() -> None:
    async def go() -> None:
        engine = engine_for(blocks_forever.wait_forever)
        run = engine.start(
            get_function_spec(blocks_forever.wait_forever), b"{}", RequestMeta(request_id="x")
        )
        await asyncio.sleep(0.05)
        assert engine.cancel("x")
        outcomes = [o async for o in run.channel]
        assert isinstance(outcomes[-1], Failure) and outcomes[-1].error_type == "canceled"
        await asyncio.wait_for(run.stopped.wait(), 1)
        assert engine.slots.in_use == 0
        await engine.shutdown(1)

    run_async(go)


def test_deadline_from_request_timeout() -> None:
    start = time.monotonic()
    outcomes = once(blocks_forever.wait_forever, b"{}", timeout_ms=150)
    failure = terminal(outcomes)
    assert isinstance(failure, Failure)
    assert (failure.error_type, failure.retryable) == ("timeout", False)
    assert "deadline of 0.15 s" in failure.safe_message
    assert 0.14 < time.monotonic() - start < 2
    # A run that ends by its deadline still reports its metrics.job, before the terminal
    # outcome, with the phases it went through.
    types = event_types(outcomes)
    assert types[-2:] == ["metrics.job", "request.canceled"]
    job = next(o for o in outcomes if isinstance(o, Event) and o.event_type == "metrics.job")
    assert job.payload["error_type"] == "timeout"
    assert job.payload["function_name"] == "wait-forever"
    assert "queue_ms" in job.payload and "inference_ms" not in job.payload


def test_concurrency_limit_queues_in_order() -> None:
    sleeps.STARTED.clear()

    async def go() -> None:
        engine = engine_for(sleeps.nap, concurrency=2)
        spec = get_function_spec(sleeps.nap)
        runs = [
            engine.start(spec, b'{"delay_ms": 60}', RequestMeta(request_id=f"q{i}"))
            for i in range(6)
        ]
        await asyncio.sleep(0.02)
        assert engine.slots.in_use == 2 and engine.slots.waiting == 4
        finals = [[o async for o in r.channel][-1] for r in runs]
        assert all(isinstance(f, Result) for f in finals)
        assert [f"q{i}" for i in range(6)] == sleeps.STARTED
        queue_ms = [f.timing_ms["queue_ms"] for f in finals if isinstance(f, Result)]
        assert queue_ms[0] < 20 and queue_ms[-1] > 100
        await engine.shutdown(1)

    run_async(go)


def test_busy_beyond_the_queue_limit() -> None:
    async def go() -> None:
        engine = engine_for(sleeps.anap, concurrency=1, max_waiting=1)
        spec = get_function_spec(sleeps.anap)
        runs = [
            engine.start(spec, b'{"delay_ms": 50}', RequestMeta(request_id=f"b{i}"))
            for i in range(3)
        ]
        finals = [[o async for o in r.channel][-1] for r in runs]
        assert [type(f).__name__ for f in finals] == ["Result", "Result", "Failure"]
        busy = finals[2]
        assert isinstance(busy, Failure) and (busy.error_type, busy.retryable) == ("busy", True)
        await engine.shutdown(1)

    run_async(go)


def test_canceling_a_queued_request() -> None:
    async def go() -> None:
        engine = engine_for(sleeps.anap, concurrency=1)
        spec = get_function_spec(sleeps.anap)
        first = engine.start(spec, b'{"delay_ms": 100}', RequestMeta(request_id="c1"))
        queued = engine.start(spec, b'{"delay_ms": 1}', RequestMeta(request_id="c2"))
        await asyncio.sleep(0.02)
        assert engine.cancel("c2")
        assert isinstance([o async for o in queued.channel][-1], Failure)
        await asyncio.wait_for(queued.stopped.wait(), 1)
        assert engine.slots.waiting == 0
        assert isinstance([o async for o in first.channel][-1], Result)
        await engine.shutdown(1)

    run_async(go)


def test_duplicate_request_id_is_refused() -> None:
    async def go() -> None:
        engine = engine_for(sleeps.anap)
        spec = get_function_spec(sleeps.anap)
        engine.start(spec, b'{"delay_ms": 50}', RequestMeta(request_id="d"))
        with pytest.raises(Exception, match="already running"):
            engine.start(spec, b"{}", RequestMeta(request_id="d"))
        await engine.shutdown(1)

    run_async(go)


def test_stuck_warning_fires_once() -> None:
    settings = EngineSettings(warn_inference_s=0.05)
    outcomes = once(sleeps.nap, b'{"delay_ms": 200}', engine_kwargs={"settings": settings})
    assert event_types(outcomes).count("request.inference.stuck") == 1
    assert isinstance(terminal(outcomes), Result)


def test_shutdown_cancels_what_does_not_finish_in_time() -> None:
    async def go() -> None:
        engine = engine_for(blocks_forever.wait_forever, sleeps.anap)
        forever = engine.start(
            get_function_spec(blocks_forever.wait_forever), b"{}", RequestMeta(request_id="f")
        )
        engine2 = engine_for(sleeps.anap, concurrency=2)
        quick = engine2.start(
            get_function_spec(sleeps.anap), b'{"delay_ms": 30}', RequestMeta(request_id="q")
        )
        await asyncio.gather(engine.shutdown(grace_s=0.1), engine2.shutdown(grace_s=2))
        assert isinstance(forever.channel.terminal, Failure)
        assert isinstance(quick.channel.terminal, Result)

    run_async(go)


def test_outputs_go_to_the_sink(tmp_path: Path) -> None:
    from fixtures.functions import with_assets

    outcomes = once(
        with_assets.save_to,
        b'{"ref": "a/b.txt"}',
        engine_kwargs={"outputs": lambda meta: LocalOutputSink(tmp_path, meta.request_id)},
        request_id="out1",
    )
    result = terminal(outcomes)
    assert isinstance(result, Result)
    assert (tmp_path / "jobs/out1/outputs/a/b.txt").read_bytes() == b"data"
    assert msgspec.json.decode(result.output)["ref"] == "jobs/out1/outputs/a/b.txt"
    failure = terminal(
        once(
            with_assets.save_to,
            b'{"ref": "../escape.txt"}',
            engine_kwargs={"outputs": lambda meta: LocalOutputSink(tmp_path, meta.request_id)},
            request_id="out2",
        )
    )
    assert isinstance(failure, Failure) and failure.error_type == "validation"
    assert not (tmp_path / "escape.txt").exists()


# -- models --------------------------------------------------------------------------------------


def test_models_are_resolved_loaded_and_reported() -> None:
    from fixtures.functions import uses_models

    pipe, tok = object(), object()
    uses_models.SEEN.clear()
    models = InProcessModels(fixed={"tok": tok}, selectable={"paint": {"a": pipe, "b": object()}})
    outcomes = once(uses_models.paint, b'{"model": "a"}', engine_kwargs={"models": models})
    assert isinstance(terminal(outcomes), Result)
    assert uses_models.SEEN == [(tok, pipe)]
    types = event_types(outcomes)
    for phase in ("model_resolve", "model_load"):
        assert f"request.{phase}.started" in types and f"request.{phase}.completed" in types
    assert "metrics.gpu_load" in types
    job = next(o for o in outcomes if isinstance(o, Event) and o.event_type == "metrics.job")
    assert job.payload["cache_state"] == "hot_vram"
    assert job.payload["models"] == {"pipe": "paint:a", "tokenizer": "fixed:tok"}


def test_payload_model_outside_the_keyspace_is_a_validation_error() -> None:
    from fixtures.functions import uses_models

    models = InProcessModels(fixed={"tok": 1}, selectable={"paint": {"a": 2, "b": 3}})
    outcomes = once(
        uses_models.paint, b'{"model": "hf:evil/model"}', engine_kwargs={"models": models}
    )
    failure = terminal(outcomes)
    assert isinstance(failure, Failure) and failure.error_type == "validation"
    assert failure.safe_message == (
        "model='hf:evil/model' is not a model of function 'paint'; choose one of ['a', 'b']"
    )
    assert "request.model_resolve.failed" in event_types(outcomes)


def test_local_models_load_folders_by_ref(tmp_path: Path) -> None:
    from fixtures.functions import uses_models

    (tmp_path / "tok").mkdir()
    (tmp_path / "a").mkdir()
    folders = {"acme/tok:latest": tmp_path / "tok", "acme/a:latest": tmp_path / "a"}
    models = CachedModels(
        ModelCache(max_vram_gb=1.0),
        SnapshotFinder(None, folders=folders),
        declared={"tok": "acme/tok:latest"},
        keyspaces={"paint": {"a": "acme/a:latest", "b": "acme/b:latest"}},
    )
    uses_models.SEEN.clear()
    outcomes = once(uses_models.paint, b'{"model": "a"}', engine_kwargs={"models": models})
    assert isinstance(terminal(outcomes), Result)
    assert uses_models.SEEN == [(tmp_path / "tok", tmp_path / "a")]
    job = next(o for o in outcomes if isinstance(o, Event) and o.event_type == "metrics.job")
    assert job.payload["cache_state"] == "warm_disk"
    missing = terminal(once(uses_models.paint, b'{"model": "b"}', engine_kwargs={"models": models}))
    assert isinstance(missing, Failure) and missing.error_type == "fatal"
    assert missing.safe_message.startswith(
        "model acme/b:latest is not available: no model store is configured and no local "
        "folder was given for it (--model acme/b:latest=DIR)"
    )
    assert "request.model_load.failed" in event_types(
        once(uses_models.paint, b'{"model": "b"}', engine_kwargs={"models": models})
    )
