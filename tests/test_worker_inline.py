"""The worker runs a job request in the task that read it (``Worker._execute``).

A run that ends without waiting is answered from that task, and the task reads on; a run that
waits has its outcomes flow as they come while a new task takes over the reading, and so does a
reader held up writing an answer. These tests drive a real worker through the MockScheduler (as
``test_worker_integration`` does) or over a stream whose writes can be made to hang, through
each path and through bursts where answers queue behind a write in flight, and pin the pieces
the fast path relies on: the outbox's quiet queueing and the mock's per-frame bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from test_worker_integration import PROJECT, Harness, harness, lock_path, pack, run, unpack

from gen_worker.discovery.endpoint import load_from_lock
from gen_worker.engine import Engine
from gen_worker.protocol import messages as m
from gen_worker.protocol.convert import worker_batch_to_pb, worker_messages_from_pb, worker_to_pb
from gen_worker.runtime import core_types as ct
from gen_worker.runtime.link import MAX_FRAME, Outbox
from gen_worker.runtime.worker import Identity, Worker
from gen_worker.testing.scheduler import MockScheduler, RequestRecord, WorkerConnection

__all__ = ["harness", "lock_path"]  # the fixtures, shared with the integration tests


def clean(record: RequestRecord) -> bool:
    return record.gaps() == [] and record.duplicates == 0 and record.extra_terminals == 0


def test_a_run_that_waits_streams_as_it_goes_while_other_requests_are_answered(
    harness: Harness,
) -> None:
    async def scenario() -> None:
        async with harness.serving() as s:
            slow = await s.sched.submit("drip", pack(n=4, delay_ms=150))
            await asyncio.wait_for(_until(lambda: len(slow.deltas) >= 1), 5)
            assert slow.terminal is None  # the first delta arrived while the run still runs
            quick = await s.sched.submit("acount", pack(n=2))
            await quick.wait(5)
            assert slow.terminal is None  # answered while the slow one still runs
            done = await slow.wait(5)
            assert isinstance(done, m.StreamDone) and done.delta_count == 4
            assert [unpack(d.data)["n"] for d in slow.deltas] == [0, 1, 2, 3]
            assert clean(slow) and clean(quick)

    run(scenario())


def test_a_burst_of_requests_is_answered_once_each_in_order(harness: Harness) -> None:
    """Some end at once (acount), some wait once (anap 0 ms); their answers queue behind
    writes in flight and go out with the writer. No heartbeat comes to wake a writer that was
    left asleep: a queued answer nobody writes would time the test out."""

    async def scenario() -> None:
        async with harness.serving(MockScheduler(heartbeat_interval_s=60)) as s:
            records = await asyncio.gather(
                *(
                    s.sched.submit(*(("acount", pack(n=1)) if i % 2 else ("anap", pack())))
                    for i in range(120)
                )
            )
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in records)), 5)
            for record in records:
                assert clean(record), record.job.request_id
                assert record.terminal is not None
                assert record.terminal.ref.seq == max(record.outcomes)
                types = [e.event_type for e in record.events]
                assert types[0] == "request.received" and "request.completed" in types

    run(scenario())


def test_an_answer_longer_than_a_frame_is_written_whole_at_once(harness: Harness) -> None:
    """A run that ends without waiting can hand over far more than one frame's worth
    (``acount`` yields without ever suspending). The reader writes the first frame itself; the
    writer must be woken for the rest, not left asleep until the next heartbeat (60 s here,
    far past the test's limit)."""

    async def scenario() -> None:
        async with harness.serving(MockScheduler(heartbeat_interval_s=60)) as s:
            count = 3 * MAX_FRAME + 7
            record = await s.sched.submit("acount", pack(n=count))
            done = await asyncio.wait_for(record.done.wait(), 5)
            assert done is True
            assert isinstance(record.terminal, m.StreamDone)
            assert record.terminal.delta_count == count
            assert [unpack(d.data)["n"] for d in record.deltas] == list(range(count))
            assert clean(record)

    run(scenario())


class GatedStream:
    """A stream whose writes wait at a gate while it is closed (a write in flight)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[m.SchedulerMessage] = asyncio.Queue()
        self.gate = asyncio.Event()
        self.gate.set()
        self.blocked = asyncio.Event()  # a write is waiting at the closed gate
        self.sent: list[m.WorkerMessage] = []

    async def read(self) -> m.SchedulerMessage:
        return await self.inbox.get()

    async def send_many(self, messages: list[m.WorkerMessage | bytes]) -> None:
        if not self.gate.is_set():
            self.blocked.set()
            await self.gate.wait()
        self.sent += worker_messages_from_pb(worker_batch_to_pb(
            [x if isinstance(x, bytes) else worker_to_pb(x) for x in messages]
        ))  # fmt: skip

    async def close(self) -> None:
        return None

    def has_event(self, request_id: str, word: str) -> bool:
        return any(
            isinstance(x, m.JobEvent) and x.ref.request_id == request_id and word in x.event_type
            for x in self.sent
        )

    def terminal_of(self, request_id: str) -> m.WorkerMessage | None:
        for message in self.sent:
            if isinstance(message, m.StreamDone | m.JobResult) and message.ref.request_id == (
                request_id
            ):
                return message
        return None


async def serve(stream: GatedStream, lock_path: Path) -> tuple[Worker, asyncio.Task[int]]:
    """A real worker (engine, core, shell) on the worker_scenarios project over ``stream``."""

    async def connect(address: str, **kwargs: object) -> GatedStream:
        return stream

    endpoint = load_from_lock(lock_path, PROJECT)
    engine = Engine(endpoint.functions, concurrency=4)
    config = ct.CoreConfig(addresses=("scheduler:1",))
    worker = Worker(config, Identity(worker_id="w"), endpoint, engine,
                    connect_stream=connect)  # type: ignore[arg-type]  # fmt: skip
    task = asyncio.create_task(worker.run())
    stream.inbox.put_nowait(m.RegistrationAck(heartbeat_interval_s=60))
    await asyncio.wait_for(_until(lambda: worker.core.registered), 5)
    return worker, task


async def shut(task: asyncio.Task[int]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_another_task_reads_while_the_readers_answer_write_hangs(lock_path: Path) -> None:
    """The reader runs a request that ends at once and writes its answer itself; that write
    hangs (the scheduler takes nothing). Past SLOW_WRITE_S another task must read on, so the
    next job request is started while the write still hangs."""

    async def scenario() -> None:
        stream = GatedStream()
        worker, task = await serve(stream, lock_path)
        try:
            stream.gate.clear()
            job = m.JobRequest(request_id="quick", function_name="acount", payload=pack(n=1))
            stream.inbox.put_nowait(job)
            await asyncio.wait_for(stream.blocked.wait(), 5)
            job = m.JobRequest(request_id="next", function_name="anap", payload=pack(delay_ms=5000))
            stream.inbox.put_nowait(job)
            await asyncio.wait_for(_until(lambda: "next" in worker.engine.active), 2)
            assert stream.terminal_of("quick") is None  # its write still hangs
            stream.gate.set()
            await asyncio.wait_for(_until(lambda: stream.terminal_of("quick") is not None), 2)
        finally:
            await shut(task)

    asyncio.run(scenario())


def test_an_answer_queued_behind_another_runs_write_is_written(lock_path: Path) -> None:
    """A run that waited writes its answer (the write hangs); meanwhile the reader runs a
    request that ends at once and queues its answer quietly, finds the write role taken and
    leaves the answer to the writer task, which must be woken for it: nothing else comes."""

    async def scenario() -> None:
        stream = GatedStream()
        worker, task = await serve(stream, lock_path)
        engine = worker.engine
        try:
            job = m.JobRequest(request_id="slow", function_name="anap", payload=pack(delay_ms=100))
            stream.inbox.put_nowait(job)
            await asyncio.wait_for(_until(lambda: stream.has_event("slow", "inference")), 5)
            assert stream.terminal_of("slow") is None
            stream.gate.clear()
            await asyncio.wait_for(stream.blocked.wait(), 5)  # its answer's write hangs
            job = m.JobRequest(request_id="quick", function_name="acount", payload=pack(n=1))
            stream.inbox.put_nowait(job)
            await asyncio.wait_for(_until(lambda: "quick" not in engine.active), 5)
            stream.gate.set()
            await asyncio.wait_for(_until(lambda: stream.terminal_of("quick") is not None), 2)
            assert isinstance(stream.terminal_of("slow"), m.JobResult)
        finally:
            await shut(task)

    asyncio.run(scenario())


async def _until(check: object) -> None:
    assert callable(check)
    while not check():
        await asyncio.sleep(0.005)


def test_quietly_queued_messages_wait_for_a_writer_that_takes_them() -> None:
    async def scenario() -> None:
        outbox = Outbox()
        waiting = asyncio.ensure_future(outbox.wait())
        await asyncio.sleep(0)
        outbox.extend(("a", "b"), wake=False)  # the caller writes them itself
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert outbox.take(10, close=False) == ["a", "b"]
        outbox.extend(("c",), wake=False)
        outbox.wake()  # it could not: the writer must
        await asyncio.wait_for(waiting, 1)
        assert outbox.take(10, close=False) == ["c"]

    asyncio.run(scenario())


def test_the_mock_records_a_mixed_frame_like_one_message_at_a_time() -> None:
    """Two requests' outcomes, a duplicate, a second terminal and an orphan in one frame."""

    async def scenario() -> None:
        sched = MockScheduler()
        registration = m.WorkerRegistration(worker_id="w")
        conn = WorkerConnection(worker_id="w", registration=registration)
        sched.workers["w"] = conn
        a = RequestRecord(job=m.JobRequest(request_id="a", function_name="f"), worker_id="w")
        b = RequestRecord(job=m.JobRequest(request_id="b", function_name="f"), worker_id="w")
        sched.records = {a.key: a, b.key: b}

        def ref(rid: str, seq: int) -> m.RequestRef:
            return m.RequestRef(request_id=rid, seq=seq)

        frame = [
            m.JobEvent(ref=ref("a", 0), event_type="x"),
            m.JobEvent(ref=ref("b", 0), event_type="y"),
            m.JobEvent(ref=ref("a", 1), event_type="z"),
            m.JobEvent(ref=ref("a", 1), event_type="z"),  # a resend
            m.JobResult(ref=ref("a", 2), success=True),
            m.JobEvent(ref=ref("nobody", 0), event_type="w"),
            m.JobResult(ref=ref("a", 3), success=False),  # a second terminal
            m.Heartbeat(running=1),
        ]
        sched._receive_all(conn, frame)
        assert a.received_count == 4 and a.duplicates == 1 and a.extra_terminals == 1
        assert a.terminal == frame[4] and a.done.is_set()
        assert b.received_count == 1 and not b.done.is_set()
        assert sched.orphans == [frame[5]]
        assert conn.heartbeats == [frame[7]]
        assert sched._dirty == {"w": {("a", 0), ("b", 0)}}

    asyncio.run(scenario())
