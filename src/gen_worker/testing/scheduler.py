"""A scheduler that speaks the production protocol: the mock orchestrator as a library.

It accepts any number of workers on one port, sends them job requests, batches, interrupts,
drains and endpoint configs, acknowledges what it receives, and records everything, keeping
each request's outcomes by sequence number so duplicates after a resume are counted, not
stored twice. It can be stopped and started again on the same port mid-traffic; its records
survive, which is how the fault tests check exactly-once delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gen_worker.protocol import messages as m
from gen_worker.transport.stream import (
    REDIRECT_PREFIX,
    REJECT_PREFIX,
    SchedulerServer,
    SchedulerSession,
)

__all__ = ["MockScheduler", "RequestRecord", "WorkerConnection"]

Terminal = m.JobResult | m.StreamDone | m.StreamError | m.BatchResult
#: The messages about one request, by exact type (a dict lookup, not an isinstance chain: the
#: benchmarks time the scheduler's side too): whether each is the request's terminal one.
_REQUEST_MESSAGES: dict[type, bool] = {
    m.JobEvent: False,
    m.JobDelta: False,
    m.JobResult: True,
    m.StreamDone: True,
    m.StreamError: True,
}


def _new_request_id() -> str:
    """A random UUID4 as 32 hex digits, like ``uuid.uuid4().hex`` at a third of its cost."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


@dataclass
class RequestRecord:
    """Everything received about one request attempt, deduplicated by sequence number."""

    job: m.JobRequest
    worker_id: str
    #: What to send again if the worker reconnects without it (the job, or its whole batch).
    resend: Any = None
    outcomes: dict[int, Any] = field(default_factory=dict)
    duplicates: int = 0
    terminal: Terminal | None = None
    extra_terminals: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> tuple[str, int]:
        return (self.job.request_id, self.job.attempt_epoch)

    #: How many outcomes from seq 0 on arrived without a gap (kept up to date by ``add``).
    received_count: int = 0

    def add(self, seq: int, message: Any) -> None:
        self.outcomes[seq] = message
        while self.received_count in self.outcomes:
            self.received_count += 1

    def ordered(self) -> list[Any]:
        return [self.outcomes[s] for s in sorted(self.outcomes)]

    @property
    def deltas(self) -> list[m.JobDelta]:
        return [o for o in self.ordered() if isinstance(o, m.JobDelta)]

    @property
    def events(self) -> list[m.JobEvent]:
        return [o for o in self.ordered() if isinstance(o, m.JobEvent)]

    def gaps(self) -> list[int]:
        top = max(self.outcomes, default=-1)
        return [s for s in range(top + 1) if s not in self.outcomes]

    async def wait(self, timeout_s: float) -> Terminal:
        await asyncio.wait_for(self.done.wait(), timeout_s)
        assert self.terminal is not None
        return self.terminal


@dataclass
class WorkerConnection:
    """A worker as the scheduler knows it, across its reconnects."""

    worker_id: str
    registration: m.WorkerRegistration
    session: SchedulerSession | None = None
    registrations: int = 0
    heartbeats: list[m.Heartbeat] = field(default_factory=list)
    worker_events: list[m.WorkerEvent] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    drain_result: m.DrainResult | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    metadata: dict[str, str] = field(default_factory=dict)


class MockScheduler:
    def __init__(
        self,
        *,
        heartbeat_interval_s: float = 10.0,
        ack_interval_s: float = 0.02,
        accept_major: int = m.PROTOCOL_MAJOR,
        endpoint_config: m.EndpointConfig | None = None,
        redirect_to: str | None = None,
        expected_token: str | None = None,
        listener: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.ack_interval_s = ack_interval_s
        self.accept_major = accept_major
        self.endpoint_config = endpoint_config
        self.redirect_to = redirect_to
        self.expected_token = expected_token
        self.listener = listener
        self.workers: dict[str, WorkerConnection] = {}
        self.records: dict[tuple[str, int], RequestRecord] = {}
        self.orphans: list[Any] = []
        self.batches: dict[str, RequestRecord] = {}
        self.rejected_sessions = 0
        self._dirty: dict[str, set[tuple[str, int]]] = {}
        self._server: SchedulerServer | None = None
        self._address = ""
        self._ack_task: asyncio.Task[None] | None = None
        self._worker_joined = asyncio.Condition()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._address

    async def start(self, address: str = "127.0.0.1:0") -> str:
        """Listen (port 0 picks one) and return ``host:port``."""
        self._server = SchedulerServer(self._session)
        port = await self._server.start(address)
        self._address = f"{address.rpartition(':')[0]}:{port}"
        if self._ack_task is None:
            self._ack_task = asyncio.create_task(self._ack_loop())
        return self._address

    async def stop(self) -> None:
        """Stop listening and drop every stream at once (records are kept)."""
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        for conn in self.workers.values():
            conn.session = None
            conn.connected.clear()

    async def restart(self) -> None:
        """Listen again on the same port."""
        await self.stop()
        await self.start(self._address)

    async def close(self) -> None:
        """Acknowledge what arrived (so workers need not hold it for a resume), then stop."""
        await self._flush_acks()
        await self.stop()
        if self._ack_task is not None:
            self._ack_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ack_task
            self._ack_task = None

    # -- driving workers ------------------------------------------------------------------------

    async def wait_for_worker(
        self, timeout_s: float = 30.0, worker_id: str | None = None
    ) -> WorkerConnection:
        """The first (or the named) worker once it has registered and is connected."""

        def ready() -> WorkerConnection | None:
            for conn in self.workers.values():
                if (worker_id is None or conn.worker_id == worker_id) and conn.session is not None:
                    return conn
            return None

        async with self._worker_joined:
            await asyncio.wait_for(self._worker_joined.wait_for(ready), timeout_s)
        conn = ready()
        assert conn is not None
        return conn

    def _pick(self, worker_id: str | None) -> WorkerConnection:
        if worker_id is not None:
            return self.workers[worker_id]
        if not self.workers:
            raise RuntimeError("no worker has registered")
        return next(iter(self.workers.values()))

    async def send(self, message: Any, worker_id: str | None = None) -> bool:
        """Send to a worker; False when it is not connected right now."""
        conn = self._pick(worker_id)
        session = conn.session
        if session is None:
            return False
        try:
            await session.send(message)
        except Exception:  # the stream died under us: the worker will reconnect
            return False
        return True

    async def submit(
        self, function_name: str, payload: bytes, *, worker_id: str | None = None, **job: Any
    ) -> RequestRecord:
        """Send a job request; the record fills in as outcomes arrive."""
        request = m.JobRequest(
            request_id=job.pop("request_id", None) or _new_request_id(),
            function_name=function_name,
            payload=payload,
            **job,
        )
        conn = self._pick(worker_id)
        key = (request.request_id, request.attempt_epoch)
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = RequestRecord(job=request, worker_id=conn.worker_id)
        session = conn.session
        if session is not None:  # if disconnected, re-sent after it registers
            with contextlib.suppress(Exception):  # the stream died under us: the same
                await session.send(request)
        return record

    async def submit_batch(
        self, function_name: str, payloads: list[bytes], *, worker_id: str | None = None
    ) -> list[RequestRecord]:
        conn = self._pick(worker_id)
        batch_id = _new_request_id()
        items = [
            m.JobRequest(request_id=f"{batch_id}-{i}", function_name=function_name, payload=p,
                         item_id=str(i), item_index=i)
            for i, p in enumerate(payloads)
        ]  # fmt: skip
        batch = m.BatchJobRequest(batch_id=batch_id, function_name=function_name, items=items)
        records = [
            RequestRecord(job=item, worker_id=conn.worker_id, resend=batch) for item in items
        ]
        # The batch itself: a merged run reports its events and its BatchResult under its id.
        whole = m.JobRequest(request_id=batch_id, function_name=function_name)
        self.batches[batch_id] = RequestRecord(job=whole, worker_id=conn.worker_id, resend=batch)
        for record in [*records, self.batches[batch_id]]:
            self.records[record.key] = record
        await self.send(batch, conn.worker_id)
        return records

    async def interrupt(
        self, request_id: str, *, worker_id: str | None = None, **fields: Any
    ) -> bool:
        fields.setdefault("any_attempt", True)
        return await self.send(m.Interrupt(request_id=request_id, **fields), worker_id)

    async def drain(self, *, worker_id: str | None = None, deadline_s: float = 10.0) -> bool:
        return await self.send(m.Drain(reason="test", deadline_s=deadline_s), worker_id)

    # -- the stream -----------------------------------------------------------------------------

    async def _session(self, session: SchedulerSession) -> None:
        if not await self._admit(session):
            return
        frames = session.frames()
        try:
            first_frame = await anext(frames)
        except (StopAsyncIteration, Exception):
            return
        first = first_frame[0] if first_frame else None
        if not isinstance(first, m.WorkerRegistration):
            await session.abort("FAILED_PRECONDITION", "expected a registration first")
            return
        if first.protocol.major != self.accept_major:
            self.rejected_sessions += 1
            detail = (
                f"{REJECT_PREFIX}worker protocol {first.protocol.major}.x, "
                f"scheduler speaks {self.accept_major}.x"
            )
            await session.abort("FAILED_PRECONDITION", detail)
            return
        conn = await self._register(session, first)
        try:
            # A broken stream ends the loop; the worker reconnects on its own.
            with contextlib.suppress(Exception):
                self._receive_all(conn, first_frame[1:])
                async for frame in frames:
                    self._receive_all(conn, frame)
        finally:
            if conn.session is session:
                conn.session = None
                conn.connected.clear()

    async def _admit(self, session: SchedulerSession) -> bool:
        if self.redirect_to is not None:
            await session.abort("UNAVAILABLE", f"{REDIRECT_PREFIX}{self.redirect_to}")
            return False
        if self.expected_token is not None:
            auth = session.metadata.get("authorization", "")
            if auth != f"Bearer {self.expected_token}":
                self.rejected_sessions += 1
                await session.abort("UNAUTHENTICATED", "invalid worker token")
                return False
        return True

    async def _register(
        self, session: SchedulerSession, reg: m.WorkerRegistration
    ) -> WorkerConnection:
        conn = self.workers.get(reg.worker_id)
        if conn is None:
            conn = WorkerConnection(worker_id=reg.worker_id, registration=reg)
            self.workers[reg.worker_id] = conn
        conn.registration = reg
        conn.registrations += 1
        conn.metadata = {k: v for k, v in session.metadata.items() if k != "authorization"}
        mine = [
            r for r in self.records.values() if r.worker_id == reg.worker_id and r.terminal is None
        ]
        resume = [
            m.Received(
                request_id=r.job.request_id,
                attempt_epoch=r.job.attempt_epoch,
                received_count=r.received_count,
            )
            for r in mine
        ]
        ack = m.RegistrationAck(
            heartbeat_interval_s=self.heartbeat_interval_s, resume=resume, worker_id=reg.worker_id
        )
        await session.send(ack)
        if self.endpoint_config is not None:
            await session.send(self.endpoint_config)
        # Job requests the worker does not list may never have reached it: send them again.
        running = {(a.request_id, a.attempt_epoch) for a in reg.assignments}
        resent: set[int] = set()
        for record in mine:
            again = record.resend if record.resend is not None else record.job
            if record.key not in running and not record.outcomes and id(again) not in resent:
                resent.add(id(again))
                await session.send(again)
        conn.session = session
        conn.connected.set()
        self._notify(reg.worker_id, reg)
        async with self._worker_joined:
            self._worker_joined.notify_all()
        return conn

    def _receive_all(self, conn: WorkerConnection, messages: list[Any]) -> None:
        listener = self.listener
        worker_id = conn.worker_id
        # A frame is usually the outcomes of one request: its record and its acknowledgement
        # are looked up once for a run of messages about the same request.
        last: tuple[str, int] | None = None
        record: RequestRecord | None = None
        for message in messages:
            if listener is not None:
                listener(worker_id, message)
            terminal = _REQUEST_MESSAGES.get(type(message))
            if terminal is None:
                self._receive_other(conn, message)
                continue
            ref = message.ref
            key = (ref.request_id, ref.attempt_epoch)
            if key != last:
                last = key
                record = self.records.get(key)
                if record is not None:
                    self._acknowledge(worker_id, key)
            if record is None:
                self.orphans.append(message)
            else:
                self._add(record, ref.seq, message, terminal)

    def _receive_other(self, conn: WorkerConnection, message: Any) -> None:
        if isinstance(message, m.BatchResult):
            for result in message.results:
                self._record(conn, result, True)
            if message.ref is not None:
                self._record(conn, message, True)
        elif isinstance(message, m.Heartbeat):
            conn.heartbeats.append(message)
        elif isinstance(message, m.WorkerEvent):
            conn.worker_events.append(message)
        elif isinstance(message, m.DrainResult):
            conn.drain_result = message
            conn.drained.set()
        else:
            conn.messages.append(message)

    def _record(self, conn: WorkerConnection, message: Any, terminal: bool) -> None:
        ref = message.ref
        key = (ref.request_id, ref.attempt_epoch)
        record = self.records.get(key)
        if record is None:
            self.orphans.append(message)
            return
        self._acknowledge(conn.worker_id, key)
        self._add(record, ref.seq, message, terminal)

    def _acknowledge(self, worker_id: str, key: tuple[str, int]) -> None:
        # Acknowledged either way: a resend means our acknowledgement was lost.
        dirty = self._dirty.get(worker_id)
        if dirty is None:
            dirty = self._dirty[worker_id] = set()
        dirty.add(key)

    @staticmethod
    def _add(record: RequestRecord, seq: int, message: Any, terminal: bool) -> None:
        if seq in record.outcomes:
            record.duplicates += 1
            return
        record.add(seq, message)
        if terminal:
            if record.terminal is None:
                record.terminal = message
                record.done.set()
            else:
                record.extra_terminals += 1

    def _notify(self, worker_id: str, message: Any) -> None:
        if self.listener is not None:
            self.listener(worker_id, message)

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ack_interval_s)
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for worker_id, keys in dirty.items():
            received = [
                m.Received(
                    request_id=k[0],
                    attempt_epoch=k[1],
                    received_count=self.records[k].received_count,
                )
                for k in keys
            ]
            if not await self.send(m.Ack(received=received), worker_id):
                self._dirty.setdefault(worker_id, set()).update(keys)
