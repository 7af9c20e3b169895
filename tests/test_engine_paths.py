"""The engine's fast paths: how a run is consumed, executed and cleaned up.

The outcome channel handed over in batches or pushed to a sink, a run executed in the caller's
task, the long-lived call threads, the shared stuck-phase timer, the lazy cancel event, and a
finished run freed by refcounting alone. Each must give exactly what the plain paths give.
"""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import pytest
from fixtures.functions import blocks_forever, reports_progress, sleeps, streams_many
from fixtures.functions.common import Text

from gen_worker import RequestContext, worker_function
from gen_worker.authoring import get_function_spec
from gen_worker.config import EngineSettings
from gen_worker.engine import Engine, Event, Failure, Outcome, RequestMeta, RequestRun, Result
from gen_worker.engine.cancel import CancelEvent
from gen_worker.engine.run import _now_rfc3339
from gen_worker.engine.threads import CallThreads
from gen_worker.engine.watch import StuckWatch

T = TypeVar("T")


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(factory(), timeout=30))


def engine_for(*fns: Any, **kwargs: Any) -> Engine:
    return Engine([get_function_spec(f) for f in fns], **kwargs)


def start(engine: Engine, fn: Any, payload: bytes, rid: str, **kw: Any) -> RequestRun:
    return engine.start(get_function_spec(fn), payload, RequestMeta(request_id=rid), **kw)


def kinds(outcomes: list[Outcome]) -> list[str]:
    return [o.event_type if isinstance(o, Event) else type(o).__name__ for o in outcomes]


@worker_function()
def stops_iterating(ctx: RequestContext, payload: Text) -> Text:
    raise StopIteration("a generator's signal, raised from a plain function")


@worker_function()
def which_thread(ctx: RequestContext, payload: Text) -> Text:
    time.sleep(0.002)  # long enough for the four of a round to overlap
    thread = threading.current_thread()
    return Text(text=f"{thread.name}#{thread.ident}")


# -- consuming a run: batches, a sink, the caller's own task --------------------------------


def test_batches_sink_and_iteration_give_the_same_outcomes() -> None:
    async def go() -> tuple[list[Outcome], list[list[Outcome]], list[list[Outcome]]]:
        engine = engine_for(reports_progress.chatty, concurrency=3)
        body = b'{"text": "hi"}'
        plain = [o async for o in start(engine, reports_progress.chatty, body, "a").channel]
        batched = [
            b async for b in start(engine, reports_progress.chatty, body, "b").channel.batches()
        ]
        pushed: list[list[Outcome]] = []
        done = asyncio.get_running_loop().create_future()
        run = start(engine, reports_progress.chatty, body, "c")

        def sink(batch: list[Outcome]) -> None:
            pushed.append(batch)
            if batch[-1] is run.channel.terminal:
                done.set_result(None)

        run.channel.attach(sink)
        await done
        await engine.shutdown(1)
        return plain, batched, pushed

    plain, batched, pushed = run_async(go)
    for batches in (batched, pushed):
        flat = [o for batch in batches for o in batch]
        assert kinds(flat) == kinds(plain) and [o.seq for o in flat] == list(range(len(flat)))
        assert isinstance(flat[-1], Result) and all(batch for batch in batches)
        assert msgspec.json.decode(flat[-1].output) == {"text": "HI"}


def test_a_stream_pushed_to_a_sink_arrives_whole_and_in_order() -> None:
    async def go() -> list[Outcome]:
        engine = engine_for(streams_many.count)
        run = start(engine, streams_many.count, b'{"n": 2000}', "s")
        got: list[Outcome] = []
        done = asyncio.get_running_loop().create_future()

        def sink(batch: list[Outcome]) -> None:
            got.extend(batch)
            if batch[-1] is run.channel.terminal:
                done.set_result(None)

        run.channel.attach(sink)
        await done
        await engine.shutdown(1)
        return got

    got = run_async(go)
    assert [o.seq for o in got] == list(range(len(got))) and isinstance(got[-1], Result)
    deltas = [msgspec.json.decode(o.data)["n"] for o in got if type(o).__name__ == "Delta"]
    assert deltas == list(range(2000))


def test_a_run_executed_in_the_callers_task() -> None:
    async def go() -> None:
        engine = engine_for(reports_progress.chatty, sleeps.nap)
        run = start(engine, reports_progress.chatty, b'{"text": "x"}', "d", own_task=False)
        await asyncio.sleep(0.01)
        assert run.channel.take_nowait() == []  # nothing runs until execute()
        await run.execute()
        outcomes = run.channel.take_nowait()
        assert isinstance(outcomes[-1], Result) and run.stopped.is_set()
        assert engine.get("d") is None
        with pytest.raises(RuntimeError, match="already runs in a task"):
            await run.execute()
        own = start(engine, sleeps.nap, b"{}", "own")
        with pytest.raises(RuntimeError, match="already runs in a task"):
            await own.execute()
        await engine.shutdown(1)

    run_async(go)


def test_canceling_a_run_in_the_callers_task_leaves_the_task_going() -> None:
    async def go() -> None:
        engine = engine_for(blocks_forever.wait_forever)
        run = start(engine, blocks_forever.wait_forever, b"{}", "e", own_task=False)
        asyncio.get_running_loop().call_later(0.05, run.cancel)
        await run.execute()  # returns: the cancel is absorbed, the answer is ready
        me = asyncio.current_task()
        assert me is not None and me.cancelling() == 0
        terminal = run.channel.terminal
        assert isinstance(terminal, Failure) and terminal.error_type == "canceled"
        await asyncio.sleep(0)  # the task is really not canceled any more
        await engine.shutdown(1)

    run_async(go)


def test_a_caller_canceled_from_outside_reports_canceled_and_ends() -> None:
    async def go() -> None:
        engine = engine_for(blocks_forever.wait_forever)
        run = start(engine, blocks_forever.wait_forever, b"{}", "f", own_task=False)
        caller = asyncio.create_task(run.execute())
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        terminal = run.channel.terminal
        assert isinstance(terminal, Failure) and terminal.error_type == "canceled"
        assert "request.canceled" in kinds(run.channel.take_nowait())
        await asyncio.wait_for(run.stopped.wait(), 1)
        await engine.shutdown(1)

    run_async(go)


@pytest.mark.parametrize("own_task", [True, False])
def test_a_run_canceled_before_it_began_stops_cleanly(own_task: bool) -> None:
    async def go() -> None:
        engine = engine_for(sleeps.anap)
        run = start(engine, sleeps.anap, b"{}", "g", own_task=own_task)
        assert run.cancel() and not run.cancel()
        if not own_task:
            await run.execute()
        await asyncio.wait_for(run.stopped.wait(), 1)
        assert kinds(run.channel.take_nowait()) == ["metrics.job", "request.canceled", "Failure"]
        assert engine.slots.in_use == 0 and engine.get("g") is None
        await engine.shutdown(1)

    run_async(go)


# -- sync functions: the call threads --------------------------------------------------------


def test_sync_calls_reuse_a_few_long_lived_threads() -> None:
    async def go() -> tuple[set[str], int]:
        engine = engine_for(which_thread, concurrency=4)
        threads: set[str] = set()
        for round_ in range(5):
            runs = [start(engine, which_thread, b"{}", f"t{round_}-{i}") for i in range(4)]
            for run in runs:
                result = [o async for o in run.channel][-1]
                assert isinstance(result, Result)
                threads.add(msgspec.json.decode(result.output)["text"])
        size = engine._threads().size
        await engine.shutdown(1)
        return threads, size

    threads, size = run_async(go)
    # Twenty calls, at most four at once: never more threads than slots, each one reused.
    assert 1 <= len(threads) <= size <= 4
    assert all(name.startswith("gen-worker-call-") for name in threads)


def test_stop_iteration_from_a_sync_function_is_a_failure_not_a_hang() -> None:
    async def go() -> Outcome:
        engine = engine_for(stops_iterating)
        outcomes = [o async for o in start(engine, stops_iterating, b"{}", "si").channel]
        await engine.shutdown(1)
        return outcomes[-1]

    terminal = run_async(go)
    assert isinstance(terminal, Failure) and terminal.error_type == "internal"
    assert "the function raised StopIteration" in terminal.error_message


def test_call_threads_run_jobs_and_end_when_shut_down() -> None:
    threads = CallThreads("test-call")
    done = threading.Event()
    seen: list[str] = []

    def job() -> None:
        seen.append(threading.current_thread().name)
        done.set()

    threads.submit(job)
    assert done.wait(5) and seen == ["test-call-0"]
    threads.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        threads.submit(lambda: None)


# -- stuck warnings, the cancel event, timestamps --------------------------------------------


def test_the_stuck_watch_fires_once_per_phase_still_running_in_due_order() -> None:
    async def go() -> list[tuple[str, float]]:
        watch = StuckWatch()
        fired: list[tuple[str, float]] = []
        watch.start("slow", 0.08, lambda s: fired.append(("slow", s)))
        watch.start("quick", 0.02, lambda s: fired.append(("quick", s)))
        watch.start("ended", 0.02, lambda s: fired.append(("ended", s)))
        watch.stop("ended", 0.02)
        await asyncio.sleep(0.15)
        watch.stop("slow", 0.08)  # after it fired: nothing more
        await asyncio.sleep(0.05)
        assert len(watch) == 0
        return fired

    fired = run_async(go)
    assert [name for name, _ in fired] == ["quick", "slow"]
    assert 0.02 <= fired[0][1] < 1.0 and 0.08 <= fired[1][1] < 1.0


def test_each_stuck_run_gets_its_warning_from_the_shared_timer() -> None:
    settings = EngineSettings(warn_inference_s=0.05)

    async def go() -> list[str]:
        engine = engine_for(sleeps.anap, settings=settings, concurrency=2)
        runs = [start(engine, sleeps.anap, b'{"delay_ms": 150}', f"w{i}") for i in range(2)]
        finals = [[o async for o in run.channel] for run in runs]
        await engine.shutdown(1)
        return [t for outcomes in finals for t in kinds(outcomes)]

    types = run_async(go)
    assert types.count("request.inference.stuck") == 2 and types.count("Result") == 2


def test_the_cancel_event_is_a_threading_event() -> None:
    event = CancelEvent()
    assert isinstance(event, threading.Event) and not event.is_set()
    assert event.wait(0.01) is False
    threading.Timer(0.05, event.set).start()
    start_s = time.monotonic()
    assert event.wait(5) is True and time.monotonic() - start_s < 2
    event.clear()
    assert not event.is_set()


def test_compute_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    stamp = _now_rfc3339()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    assert _now_rfc3339(lambda: 1_700_000_000.9999) == "2023-11-14T22:13:20.999Z"
    assert _now_rfc3339(lambda: 0.25) == "1970-01-01T00:00:00.250Z"
    # Cached by the millisecond: the text changes with the millisecond, the second, the date.
    for clock, text in [
        (1_700_000_000.0001, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.0009, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.0011, "2023-11-14T22:13:20.001Z"),
        (1_700_000_001.0011, "2023-11-14T22:13:21.001Z"),
        (1_700_086_401.0011, "2023-11-15T22:13:21.001Z"),
        (0.25, "1970-01-01T00:00:00.250Z"),
    ]:
        assert _now_rfc3339(lambda clock=clock: clock) == text


# -- memory: a finished run is freed by refcounting --------------------------------------------


def test_finished_runs_leave_no_reference_cycles() -> None:
    """A cycle per request made the collector run every few requests (and free ~30 objects)."""

    async def go() -> list[Any]:
        engine = engine_for(sleeps.anap, sleeps.nap, concurrency=2)
        for i in range(3):  # warm up: first-use caches and the call thread
            await start(engine, sleeps.anap, b"{}", f"warm{i}", own_task=False).execute()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(10):
                await start(engine, sleeps.anap, b"{}", f"x{i}", own_task=False).execute()
                [o async for o in start(engine, sleeps.nap, b"{}", f"y{i}").channel]
                run = start(engine, sleeps.anap, b"{}", f"z{i}")
                done = asyncio.get_running_loop().create_future()
                run.channel.attach(lambda b, d=done: d.done() or d.set_result(None))
                await done
                await run.stopped.wait()
            await asyncio.sleep(0.01)
            gc.collect()
            garbage = [o for o in gc.garbage if isinstance(o, RequestRun)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        await engine.shutdown(1)
        return garbage

    assert run_async(go) == []


def test_an_event_encodes_as_the_dev_runners_event_item() -> None:
    from gen_worker.devserver.responses import EventItem

    for payload in ({"k": [1, "v"]}, {}):
        event = Event(3, "custom.note", payload)
        assert msgspec.json.encode(event) == msgspec.json.encode(
            EventItem(3, "custom.note", payload)
        )
    assert msgspec.json.decode(msgspec.json.encode(Event(0, "a", {}))) == {"seq": 0, "type": "a"}
