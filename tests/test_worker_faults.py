"""Exactly-once delivery while the scheduler keeps dying (SPEC sections 9 and 10).

A real worker (``python -m gen_worker.entrypoint`` in a subprocess) serves 200 requests in
flight, a mix of short async naps and streams of 20-50 deltas that span several outages, while
the mock scheduler is stopped and started again on the same port at short random intervals.
At the end every request has exactly one terminal outcome, no sequence gap, every delta exactly
once and in order, events in order, and the worker never crashed: it drains and exits 0.

The schedule is drawn from a seeded ``random.Random``; set ``GEN_WORKER_FAULT_SEED`` to replay
a failing run (the seed is in every failure message). Two small tests at the end drive the mock
by hand over the real transport to pin what the fault test relies on from it: concurrent sends
on one stream all arrive, and an outcome resent after a lost ack is acknowledged again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from gen_worker.discovery import discover, encode_lock
from gen_worker.protocol import messages as m
from gen_worker.testing.scheduler import MockScheduler, RequestRecord, WorkerConnection
from gen_worker.transport.stream import StreamClosed, WorkerStream, connect

SEED = int(os.environ.get("GEN_WORKER_FAULT_SEED", "20240611"))
REQUESTS = 200
STREAM_SHARE = 0.4  # the rest are single-output naps
MIN_RESTARTS = 20  # restarts that must cut a registered stream with requests in flight
RESTART_GAP_S = (0.05, 0.15)  # up time between two restarts
OUTAGE_SHARE = 0.25  # the other restarts reopen the port at once
OUTAGE_S = (0.02, 0.06)  # how long the port stays closed when it does not
# The other restarts may come while the worker is still reconnecting (a cut mid-handshake);
# those do not count towards MIN_RESTARTS, so most wait for it to have registered again.
SETTLE_SHARE = 0.7
WORKER_ID = "fault-worker"
TEST_BUDGET_S = 55.0  # the whole scenario, worker start and drain included

ENDPOINT_TOML = 'schema_version = 1\nname = "faults"\nmain = "faults_fns"\n'

FUNCTIONS = '''\
"""Functions for tests/test_worker_faults.py."""

import asyncio
from collections.abc import AsyncIterator

import msgspec

from gen_worker import RequestContext, worker_function


class Nap(msgspec.Struct):
    tag: int = 0
    delay_ms: int = 0


class Ticks(msgspec.Struct):
    n: int = 0
    delay_ms: int = 0


class Tick(msgspec.Struct):
    i: int


@worker_function()
async def nap(ctx: RequestContext, payload: Nap) -> Nap:
    await asyncio.sleep(payload.delay_ms / 1000)
    return payload


@worker_function()
async def ticks(ctx: RequestContext, payload: Ticks) -> AsyncIterator[Tick]:
    for i in range(payload.n):
        if i % 5 == 0:
            ctx.emit("tick.mark", {"i": i})
        await asyncio.sleep(payload.delay_ms / 1000)
        yield Tick(i=i)
'''


class Nap(msgspec.Struct):
    tag: int = 0
    delay_ms: int = 0


class Ticks(msgspec.Struct):
    n: int = 0
    delay_ms: int = 0


class Tick(msgspec.Struct):
    i: int


class Mark(msgspec.Struct):
    i: int


@dataclass
class Planned:
    """One request of the workload, drawn before anything runs."""

    function: str
    payload: Nap | Ticks


@dataclass
class Chaos:
    """What the restart loop did."""

    restarts: int = 0
    hits: int = 0  # restarts that cut a registered stream with requests unfinished
    crashed_at: int | None = None  # the restart after which the worker was found dead
    log: list[str] = field(default_factory=list)


# -- the endpoint and the worker process ------------------------------------------------------


def write_endpoint(root: Path) -> tuple[Path, Path]:
    project = root / "project"
    project.mkdir()
    (project / "endpoint.toml").write_text(ENDPOINT_TOML)
    (project / "faults_fns.py").write_text(FUNCTIONS)
    lock = root / "endpoint.lock"
    lock.write_bytes(encode_lock(discover(project, isolated=False).lock))
    return project, lock


def worker_env(root: Path, project: Path, lock: Path, address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "GEN_WORKER_"))}
    env.update(
        GEN_WORKER_MANIFEST_PATH=str(lock),
        GEN_WORKER_ENDPOINT_ROOT=str(project),
        PUBLIC_ORCHESTRATOR_GRPC_ADDR=address,
        WORKER_JWT="fault-test-token",
        WORKER_ID=WORKER_ID,
        TENSORHUB_CACHE_DIR=str(root / "cache"),
        WORKER_LOCAL_MODEL_CACHE_DIR=str(root / "models"),
        RECONNECT_DELAY="0.02",
        RECONNECT_MAX_DELAY="0.2",
        RECONNECT_JITTER_SECONDS="0.02",
        WORKER_MAX_CONCURRENCY="16",
        WORKER_DRAIN_TIMEOUT_SECONDS="10",
        PYTHONUNBUFFERED="1",
    )
    return env


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no worker log)"
    return "\n".join(text.splitlines()[-lines:])


# -- the workload -------------------------------------------------------------------------------


def plan(rng: random.Random) -> list[Planned]:
    work = []
    for tag in range(REQUESTS):
        if rng.random() < STREAM_SHARE:
            ticks = Ticks(n=rng.randint(20, 50), delay_ms=rng.randint(10, 30))
            work.append(Planned("ticks", ticks))
        else:
            work.append(Planned("nap", Nap(tag=tag, delay_ms=rng.randint(5, 50))))
    return work


def waves(work: list[Planned], size: int) -> Iterator[list[Planned]]:
    for start in range(0, len(work), size):
        yield work[start : start + size]


async def submit_all(
    scheduler: MockScheduler, work: list[Planned], rng: random.Random
) -> list[RequestRecord]:
    """Submit in waves spread over about three seconds, so many land mid-outage.

    The spread also keeps work in flight through enough restarts: a restart that finds the
    worker still reconnecting does not count, and with quick answers a shorter workload could
    end before MIN_RESTARTS restarts had cut a live stream (a CI run once got 19 of 35).
    """
    records = []
    for wave in waves(work, 20):
        for item in wave:
            payload = msgspec.msgpack.encode(item.payload)
            records.append(await scheduler.submit(item.function, payload))
        await asyncio.sleep(rng.uniform(0.2, 0.45))
    return records


async def registered(conn: WorkerConnection, timeout_s: float = 2.0) -> None:
    """Until the worker has registered again (its reconnect back-off can outlast a gap)."""
    with contextlib.suppress(TimeoutError):  # the restart then simply may not count
        await asyncio.wait_for(conn.connected.wait(), timeout_s)


async def restart_loop(
    scheduler: MockScheduler,
    *,
    proc: asyncio.subprocess.Process,
    submitted: asyncio.Event,
    records: list[RequestRecord],
    rng: random.Random,
    chaos: Chaos,
) -> None:
    """Restart the scheduler on its port until enough restarts cut live streams mid-work."""
    conn = scheduler.workers[WORKER_ID]
    while not (submitted.is_set() and chaos.hits >= MIN_RESTARTS):
        if chaos.restarts and rng.random() < SETTLE_SHARE:
            await registered(conn)  # then the gap: this restart cuts a live stream
        await asyncio.sleep(rng.uniform(*RESTART_GAP_S))
        live = conn.session is not None  # a registered stream is about to be cut
        in_flight = not submitted.is_set() or any(r.terminal is None for r in records)
        await scheduler.stop()
        if rng.random() < OUTAGE_SHARE:
            await asyncio.sleep(rng.uniform(*OUTAGE_S))
        await scheduler.start(scheduler.address)
        chaos.restarts += 1
        chaos.hits += live and in_flight
        pending = sum(r.terminal is None for r in records)
        chaos.log.append(f"restart {chaos.restarts}: live={live} unfinished={pending}")
        if proc.returncode is not None:
            chaos.crashed_at = chaos.restarts
            return
        if submitted.is_set() and pending == 0:
            return  # the workload ended; whether enough restarts hit it is asserted below


# -- checks ---------------------------------------------------------------------------------------


def check_record(record: RequestRecord, item: Planned) -> list[str]:
    """Every problem with one request's outcomes (an empty list when it is exactly right)."""
    rid = record.job.request_id
    where = f"{item.function} {rid}"
    problems = []
    if record.terminal is None:
        return [f"{where}: no terminal outcome ({len(record.outcomes)} outcomes received)"]
    if record.extra_terminals:
        problems.append(f"{where}: {record.extra_terminals} extra terminal outcomes")
    if gaps := record.gaps():
        problems.append(f"{where}: sequence gaps at {gaps[:10]}")
    last = max(record.outcomes)
    if record.terminal.ref.seq != last:
        problems.append(f"{where}: terminal seq {record.terminal.ref.seq}, last seq {last}")
    if isinstance(item.payload, Ticks):
        problems += check_stream(where, record, item.payload)
    else:
        problems += check_single(where, record, item.payload)
    return problems


def check_single(where: str, record: RequestRecord, payload: Nap) -> list[str]:
    terminal = record.terminal
    if not isinstance(terminal, m.JobResult) or not terminal.success:
        return [f"{where}: expected a successful JobResult, got {terminal!r}"]
    output = msgspec.msgpack.decode(terminal.output, type=Nap)
    return [] if output == payload else [f"{where}: output {output!r} is not {payload!r}"]


def check_stream(where: str, record: RequestRecord, payload: Ticks) -> list[str]:
    problems = []
    if not isinstance(record.terminal, m.StreamDone):
        problems.append(f"{where}: expected StreamDone, got {record.terminal!r}")
    elif record.terminal.delta_count != payload.n:
        problems.append(f"{where}: StreamDone counts {record.terminal.delta_count} deltas")
    indexes = [msgspec.msgpack.decode(d.data, type=Tick).i for d in record.deltas]
    if indexes != list(range(payload.n)):
        problems.append(f"{where}: delta indexes {indexes} are not 0..{payload.n - 1}")
    seqs = [o.ref.seq for o in record.ordered()]
    if seqs != sorted(set(seqs)):
        problems.append(f"{where}: outcomes out of seq order {seqs}")
    marks = [e for e in record.events if e.event_type == "tick.mark"]
    mark_indexes = [msgspec.json.decode(e.payload_json, type=Mark).i for e in marks]
    if mark_indexes != list(range(0, payload.n, 5)):
        problems.append(f"{where}: tick.mark events {mark_indexes}, not every fifth index")
    # Each mark is emitted before the delta of the same index: the seqs must say so too.
    delta_seq = {msgspec.msgpack.decode(d.data, type=Tick).i: d.ref.seq for d in record.deltas}
    for event, i in zip(marks, mark_indexes, strict=True):
        if i in delta_seq and event.ref.seq > delta_seq[i]:
            problems.append(f"{where}: mark {i} (seq {event.ref.seq}) after its delta")
    return problems


# -- the scenario -------------------------------------------------------------------------------


async def wait_exit(proc: asyncio.subprocess.Process, timeout_s: float) -> int | None:
    try:
        return await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        return None


async def scenario(root: Path, seed: int) -> None:
    # One generator per task, so their interleaving cannot change what each one draws.
    plan_rng, submit_rng, chaos_rng = (random.Random(f"{seed}/{n}") for n in range(3))
    context = f"seed={seed} (replay with GEN_WORKER_FAULT_SEED={seed})"
    project, lock = write_endpoint(root)
    work = plan(plan_rng)
    scheduler = MockScheduler(ack_interval_s=0.01, heartbeat_interval_s=0.5)
    address = await scheduler.start()
    log_path = root / "worker.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gen_worker.entrypoint",
            env=worker_env(root, project, lock, address),
            stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        await scheduler.wait_for_worker(timeout_s=20)
        chaos = Chaos()
        submitted = asyncio.Event()
        records: list[RequestRecord] = []

        async def submitter() -> None:
            records.extend(await submit_all(scheduler, work, submit_rng))
            submitted.set()

        feeding = asyncio.create_task(submitter())
        await restart_loop(
            scheduler, proc=proc, submitted=submitted, records=records, rng=chaos_rng, chaos=chaos
        )
        await feeding
        assert chaos.crashed_at is None, (
            f"{context}: the worker exited with {proc.returncode} after restart "
            f"{chaos.crashed_at}\n{log_tail(log_path)}"
        )
        assert chaos.hits >= MIN_RESTARTS, (
            f"{context}: only {chaos.hits} of {chaos.restarts} restarts cut a live stream with "
            "requests in flight; the workload is too short to test anything\n"
            + "\n".join(chaos.log)
        )

        # The scheduler now stays up: every request must finish, exactly once.
        unfinished = [asyncio.ensure_future(r.done.wait()) for r in records if r.terminal is None]
        if unfinished:
            _, late = await asyncio.wait(unfinished, timeout=20)
            for task in late:
                task.cancel()
        assert proc.returncode is None, (
            f"{context}: the worker died with {proc.returncode}\n{log_tail(log_path)}"
        )
        problems = [p for record, item in zip(records, work, strict=True)
                    for p in check_record(record, item)]  # fmt: skip
        assert not problems, (
            f"{context}: {len(problems)} delivery problems after {chaos.restarts} restarts:\n"
            + "\n".join(problems[:20])
            + f"\nworker log:\n{log_tail(log_path)}"
        )
        assert not scheduler.orphans, f"{context}: outcomes for unknown requests"

        # Finally the worker drains cleanly: nothing undelivered, exit code 0.
        conn = await scheduler.wait_for_worker(timeout_s=10)
        assert conn.registrations > chaos.hits, f"{context}: {conn.registrations} registrations"
        assert await scheduler.drain(deadline_s=10), f"{context}: the drain was not sent"
        code = await wait_exit(proc, 15)
        beats = conn.heartbeats[-3:]
        assert code == 0, (
            f"{context}: drain ended with exit code {code}; last heartbeats {beats}\n"
            f"{log_tail(log_path)}"
        )
        assert conn.drain_result is not None, f"{context}: no drain result"
        assert conn.drain_result.undelivered == 0
        assert conn.drain_result.canceled == 0
        text = log_path.read_text(errors="replace")
        assert "Traceback" not in text, f"{context}: the worker logged a traceback\n{text[-3000:]}"
        assert "worker.fatal" not in text, f"{context}: the worker logged a fatal ending"
        duplicates = sum(r.duplicates for r in records)
        print(
            f"{context}: {len(records)} requests, {chaos.restarts} restarts "
            f"({chaos.hits} cut a live stream mid-work), "
            f"{conn.registrations} registrations, {duplicates} duplicate outcomes dropped; "
            f"{chaos.log[-1]}"
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await scheduler.close()


def test_requests_survive_scheduler_restarts(tmp_path: Path) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(tmp_path, SEED), TEST_BUDGET_S)

    asyncio.run(bounded())


# -- what the fault test relies on from the mock, step by step ---------------------------------


class FakeWorker:
    """A worker spoken by hand over the real transport, to drive the mock step by step."""

    def __init__(self, stream: WorkerStream) -> None:
        self.stream = stream
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(StreamClosed):
            async for message in self.stream:
                self.inbox.put_nowait(message)

    @classmethod
    async def register(cls, address: str, **registration: Any) -> tuple[FakeWorker, Any]:
        worker = cls(await connect(address, tls=False, token="fake-token"))
        await worker.stream.send(m.WorkerRegistration(worker_id="fake-worker", **registration))
        return worker, await worker.next(m.RegistrationAck)

    async def next(self, kind: type, timeout_s: float = 2.0) -> Any:
        """The next message of ``kind``, skipping others (endpoint config, acks, ...)."""
        async with asyncio.timeout(timeout_s):
            while not isinstance(message := await self.inbox.get(), kind):
                pass
        return message

    async def collect(self, kind: type, quiet_s: float) -> list[Any]:
        """Every message of ``kind`` until none arrives for ``quiet_s``."""
        found = []
        with contextlib.suppress(TimeoutError):
            while True:
                found.append(await self.next(kind, quiet_s))
        return found

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.stream.close()


async def with_mock(body: Callable[[MockScheduler], Awaitable[None]]) -> None:
    scheduler = MockScheduler(ack_interval_s=0.005)
    await scheduler.start()
    try:
        await asyncio.wait_for(body(scheduler), 15)
    finally:
        await scheduler.close()


def test_mock_scheduler_delivers_concurrent_submits() -> None:
    """Concurrent sends on one stream are serialized, none dropped (grpc.aio allows one write
    in flight per call; without a lock the others failed and ``submit`` lost the request)."""

    async def body(scheduler: MockScheduler) -> None:
        worker, _ = await FakeWorker.register(scheduler.address)
        try:
            for _ in range(3):  # whether two writes overlap is timing: a few rounds
                submits = (scheduler.submit("nap", b"\x80") for _ in range(100))
                records = await asyncio.gather(*submits)
                jobs = await worker.collect(m.JobRequest, quiet_s=0.3)
                got = {job.request_id for job in jobs}
                lost = [r.job.request_id for r in records if r.job.request_id not in got]
                assert not lost, f"{len(lost)} of {len(records)} job requests never sent"
        finally:
            await worker.close()

    asyncio.run(with_mock(body))


def test_mock_scheduler_acknowledges_resent_outcomes() -> None:
    """An ack lost with a stream: the outcome resent after the reconnect is acknowledged again
    (otherwise the worker keeps it forever and its drain never ends)."""

    async def body(scheduler: MockScheduler) -> None:
        worker, _ = await FakeWorker.register(scheduler.address)
        record = await scheduler.submit("nap", b"\x80")
        job = await worker.next(m.JobRequest)
        ref = m.RequestRef(request_id=job.request_id)
        await worker.stream.send(m.JobResult(ref=ref, success=True, output=b"\x80"))
        await worker.next(m.Ack)  # acknowledged on this stream ... and lost with it
        await worker.close()
        assert record.terminal is not None

        held = [m.Assignment(request_id=job.request_id, sent_count=1)]
        worker, ack = await FakeWorker.register(scheduler.address, assignments=held)
        try:
            resumed = {r.request_id: r.received_count for r in ack.resume}
            if resumed.get(job.request_id) == 1:
                return  # the acknowledgement itself says the scheduler has it: also right
            await worker.stream.send(m.JobResult(ref=ref, success=True, output=b"\x80"))
            acks = await worker.collect(m.Ack, quiet_s=0.5)
            acked = [r for a in acks for r in a.received if r.request_id == job.request_id]
            assert acked, "the resent result was never acknowledged: the worker keeps it forever"
        finally:
            await worker.close()

    asyncio.run(with_mock(body))
