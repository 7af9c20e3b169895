"""The worker's thin shell: it feeds events to the pure core and carries out its actions.

Every decision (when to reconnect, what to resend, when a drain is over, when to exit) is made
by :class:`~gen_worker.runtime.core.WorkerCore`; this module only does I/O: dialing, reading
and writing the stream, timers, starting and canceling engine runs, signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gen_worker.discovery.endpoint import LoadedEndpoint
from gen_worker.engine import Codec, Engine, Outcome, RequestMeta, RequestRun, Result
from gen_worker.logs import log
from gen_worker.protocol import messages as m
from gen_worker.runtime import core_types as ct
from gen_worker.runtime.batches import BatchPlan, batch_result, plan_batch, pump_batch
from gen_worker.runtime.core import WorkerCore
from gen_worker.runtime.link import CLOSE, Heartbeat, InlineRun, Link, closed_event
from gen_worker.runtime.messages import (
    OutcomeEncoder,
    heartbeat,
    job_failure,
    model_unsupported,
    registration,
    request_meta,
)
from gen_worker.runtime.models import WorkerModels, availability_changes
from gen_worker.transport.stream import StreamClosed, WorkerStream, connect

__all__ = ["Identity", "Worker"]

Connect = Callable[..., Awaitable[WorkerStream]]


@dataclass
class Identity:
    """Who this worker is, as the registration says."""

    worker_id: str
    release_id: str = ""
    token: str = field(default="", repr=False)
    tls: bool = False
    image_digest: str = ""
    git_commit: str = ""
    build_time: str = ""


class Worker:
    def __init__(
        self,
        config: ct.CoreConfig,
        identity: Identity,
        endpoint: LoadedEndpoint,
        engine: Engine,
        *,
        connect_stream: Connect = connect,
        rng: random.Random | None = None,
        verify_token: Callable[[str], Awaitable[Any]] | None = None,
        heartbeat_interval_s: float = 10.0,
        models: WorkerModels | None = None,
    ) -> None:
        self.models = models  # prefetches the endpoint config's models (None: no store)
        if models is not None:  # expired download URLs are refreshed by asking the scheduler
            models.send = self._write
        #: Used when the scheduler's acknowledgement does not set an interval.
        self.heartbeat_interval_s = heartbeat_interval_s
        #: Checks a rotated token before it is used (JWKS verification when configured).
        self.verify_token = verify_token
        self.core = WorkerCore(config, rng or random.Random())
        self.identity = identity
        self.endpoint = endpoint
        self.engine = engine
        self._connect = connect_stream
        self._link: Link | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._heartbeat = Heartbeat(self._heartbeat_message, self._write)
        self._runs: dict[ct.RequestKey, RequestRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._disabled: set[str] = set()
        self._pending_events: list[m.WorkerEvent] = []
        # The reader runs the job request it just read itself (see _reader): set while it
        # handles one message, and the run it is to execute.
        self._inline_ok = False
        self._inline: InlineRun | None = None
        self._exit: asyncio.Future[int] | None = None
        self.canceled = 0
        #: Requests that finished successfully while draining (the drain result reports it).
        self.completed = 0

    # -- running --------------------------------------------------------------------------------

    async def run(self) -> int:
        """Connect, serve, and return the exit code once the core says to exit."""
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.handle, ct.SignalReceived())
        self.worker_event("worker.startup.phase", {"phase": "scheduler_connecting"})
        self.handle(ct.Start())
        try:
            code = await self._exit
        finally:
            if on_main:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await self._teardown()
        return code

    def worker_event(self, event_type: str, payload: dict[str, Any]) -> None:
        """A worker-level event: logged now, sent once a stream is registered."""
        log("error" if event_type == "worker.fatal" else "info", event_type, **payload)
        event = m.WorkerEvent(event_type=event_type, payload_json=msgspec.json.encode(payload))
        if self._link is not None and self.core.registered:
            self._write(event)
        else:
            self._pending_events.append(event)

    def handle(self, event: ct.Event) -> None:
        for action in self.core.handle(event):
            self._do(action)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _timer(self, name: str, delay_s: float, event: ct.Event) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[name] = loop.call_later(delay_s, self.handle, event)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    # -- actions --------------------------------------------------------------------------------

    def _do(self, action: ct.Action) -> None:  # noqa: C901, PLR0912  # one case per action
        # Each case is an isinstance check, tried in order: the per-request actions first.
        match action:
            case ct.Send(payloads=payloads):
                self._send(payloads, wake=True)
            case ct.StartJob(request_id=rid, attempt=attempt, payload=m.JobRequest() as job):
                self._start_job((rid, attempt), job)
            case ct.Dial(address=address):
                self._spawn(self._dial(address))
            case ct.ScheduleReconnect(delay_s=delay):
                self._timer("reconnect", delay, ct.ReconnectDue())
            case ct.SendRegistration(assignments=assignments):
                self._write(self._registration(assignments))
            case ct.StartHeartbeat(interval_s=interval):
                self._heartbeat.start(interval)
            case ct.StopHeartbeat():
                self._heartbeat.stop()
            case ct.ArmWatchdog(timeout_s=timeout):
                self._timer("watchdog", timeout, ct.RegisterTimedOut())
            case ct.DisarmWatchdog():
                self._cancel_timer("watchdog")
                self._on_registered()
            case ct.StartJob(request_id=rid, attempt=attempt, payload=plan):
                self._start_batch((rid, attempt), plan)
            case ct.ReplayResult(payload=payload):
                self._write(payload)
            case ct.RejectJob(request_id=rid, attempt=attempt, reason=reason):
                text = f"this worker is {reason}; retry on another worker"
                ref = m.RequestRef(request_id=rid, attempt_epoch=attempt)
                self._write(job_failure(ref, "retryable", text))
            case ct.CancelJob(request_id=rid, attempt=attempt):
                self._cancel((rid, attempt))
            case ct.CancelAllJobs():
                for key in list(self._runs):
                    self._cancel(key)
            case ct.ScheduleDrainDeadline(delay_s=delay):
                self._timer("drain", delay, ct.DrainDeadline())
            case ct.ScheduleFinalDeadline(delay_s=delay):
                self._timer("final", delay, ct.FinalDeadline())
            case ct.SendDrainResult(canceled=canceled, undelivered=undelivered):
                self._write(
                    m.DrainResult(
                        completed=self.completed,
                        canceled=canceled,
                        undelivered=undelivered,
                        reason="drained",
                    )
                )
            case ct.CloseStream():
                self._write(CLOSE)
            case ct.Exit(code=code, reason=reason):
                self._on_exit(code, reason)

    # -- the stream ------------------------------------------------------------------------------

    async def _dial(self, address: str) -> None:
        try:
            stream = await self._connect(address, tls=self.identity.tls, token=self.identity.token)
        except StreamClosed as exc:
            self.handle(closed_event(exc, dial=True))
            return
        link = Link(stream)
        self._link = link
        link.reader = asyncio.create_task(self._reader(link))
        link.writer = asyncio.create_task(self._writer(link))
        self.handle(ct.Dialed())

    def _write(self, message: Any) -> None:
        link = self._link
        if link is not None and not link.closed:
            link.outbox.put(message)

    def _send(self, payloads: tuple[Any, ...], *, wake: bool) -> None:
        link = self._link
        if link is not None and not link.closed:
            link.outbox.extend(payloads, wake=wake)

    async def _writer(self, link: Link) -> None:
        while True:
            await link.outbox.wait()
            async with link.writing:
                # Taken once the previous write is done: whatever queued up meanwhile (the
                # answers of several requests under load) goes in one frame, in order.
                try:
                    closing = await link.write_queued(close=True)
                except StreamClosed as exc:
                    await self._drop(link, exc)
                    return
            if closing:
                await self._drop(link, None)
                return

    async def _reader(self, link: Link) -> None:
        """Read and handle the scheduler's messages; a job request's run is executed here,
        without a task of its own (see _execute)."""
        while True:
            inline: InlineRun | None = None
            try:
                while inline is None:
                    inline = self._on_read(await link.stream.read())
            except StreamClosed as exc:
                await self._drop(link, exc)
                return
            except Exception as exc:  # a malformed message: the stream cannot be trusted
                await self._drop(link, StreamClosed("broken", f"{type(exc).__name__}: {exc}"))
                return
            if not await self._execute(link, inline):
                return  # another task reads now (the run had to wait), or the stream is gone

    def _on_read(self, message: m.SchedulerMessage) -> InlineRun | None:
        """Handle one message; the run the reader is to execute, if it started one."""
        self._inline_ok = True
        try:
            self._on_message(message)
        except BaseException:
            inline, self._inline = self._inline, None
            if inline is not None:  # started before the failure: it still runs, in its own task
                inline.attach()
                self._spawn(inline.run.execute())
            raise
        finally:
            self._inline_ok = False
        inline, self._inline = self._inline, None
        return inline

    async def _execute(self, link: Link, inline: InlineRun) -> bool:
        """Execute the run in this task and write its answer from here; whether this task
        reads on. A no-op request thus ends, and its answer is written, in the very step its
        request arrived in, with no task, flush callback or writer wake-up of its own, and
        its JobStopped reaches the core once the answer is on its way."""
        me = asyncio.current_task()
        assert me is not None
        link.reader = None  # a stream that breaks under the run has no reader to cancel
        inline.executing = True
        asyncio.get_running_loop().call_soon(inline.first_wait, self._read_elsewhere, link)
        self._tasks.add(me)  # canceled at teardown like any spawned task
        try:
            await inline.run.execute()
            inline.executing = False
            batch = inline.take()
            if batch:
                inline.sink(batch, quiet=True)
            # Written from here, an iteration before the writer task would; the stream's write
            # lock keeps the order (whoever takes from the outbox first also locks first).
            link.answering(self._read_elsewhere)
            try:
                await self._write_now()
            finally:
                link.answered()
        finally:
            self._tasks.discard(me)
            if inline.executing:  # execute() raised (a teardown): the rest goes the usual way
                inline.executing = False
                inline.attach()
            if inline.stopped:
                self._on_run_stopped(inline.key, inline.run, None)
        if link.reader is None and not link.closed:
            link.reader = me
            return True
        return False

    def _read_elsewhere(self, link: Link) -> None:
        """A new task reads while the reader task is held up (in a run that waits, or in a
        slow write of an answer)."""
        if link.reader is None and not link.closed:
            link.reader = asyncio.create_task(self._reader(link))

    async def _write_now(self) -> None:
        link = self._link
        if link is None or link.closed:
            return
        if link.writing.locked():
            # A write is in flight: the writer sends ours after it, with whatever else queues
            # up meanwhile, as one frame (fewer, larger writes when busy).
            link.outbox.wake()
            return
        async with link.writing:  # free, so taken without waiting: nothing can come between
            try:
                await link.write_queued(close=False)
            except StreamClosed as exc:
                await self._drop(link, exc)

    async def _drop(self, link: Link, reason: StreamClosed | None) -> None:
        """Close a stream once; tell the core unless we closed it on purpose."""
        if link.closed:
            return
        link.closed = True
        if self._link is link:
            self._link = None
        current = asyncio.current_task()
        # Close (half-close, let the scheduler take the last frames) before cancelling the
        # reader: cancelling a pending grpc read can cancel the whole call with them in flight.
        with contextlib.suppress(Exception):
            await link.stream.close()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        if reason is not None:
            self.handle(closed_event(reason, dial=False))

    # -- messages from the scheduler -----------------------------------------------------------

    def _on_message(self, message: m.SchedulerMessage) -> None:  # noqa: C901, PLR0912  # a case per kind
        match message:
            case m.RegistrationAck(heartbeat_interval_s=interval, resume=resume):
                done = tuple((r.request_id, r.attempt_epoch, r.received_count - 1) for r in resume)
                self.handle(
                    ct.RegistrationAcked(heartbeat_interval_s=interval or 10.0, resume=done)
                )
            case m.Ack(received=received):
                for r in received:
                    self.handle(
                        ct.OutcomeAcked(r.request_id, r.attempt_epoch, r.received_count - 1)
                    )
            case m.JobRequest():
                self.handle(ct.JobReceived(message.request_id, message.attempt_epoch, message))
            case m.BatchJobRequest():
                self._on_batch(message)
            case m.Interrupt():
                self._on_interrupt(message)
            case m.Drain(deadline_s=deadline):
                self.handle(ct.DrainRequested(deadline if deadline > 0 else None))
            case m.EndpointConfig():
                self._on_endpoint_config(message)
            case m.RuntimeBatchingConfig(function_name=name, preferred_batch_size=size):
                self._on_batching(name, size)
            case m.LoadModel() | m.UnloadModel():
                self._spawn(self._answer_model_command(message))
            case m.ModelUrlRefreshResponse() if self.models is not None:
                self.models.on_refreshed(message)
            case m.SchedulerEvent(event_type="jwt.rotated", jwt=token) if token:
                self._spawn(self._rotate_token(token))
            case _:
                log("debug", "scheduler message ignored", kind=type(message).__name__)

    def _on_batch(self, batch: m.BatchJobRequest) -> None:
        """One call along batch_dimension when the items allow it, else each item alone."""
        plan = plan_batch(self.engine, self.endpoint.lock, batch)
        if plan is None:
            for item in batch.items:
                self.handle(ct.JobReceived(item.request_id, item.attempt_epoch, item))
            return
        self.handle(ct.JobReceived(batch.batch_id, 0, plan))

    async def _answer_model_command(self, message: m.LoadModel | m.UnloadModel) -> None:
        """Load or unload a model in the model cache (refused while a request uses it)."""
        models = self.models
        answer = await models.command(message, self.worker_event) if models else None
        self._write(answer or model_unsupported(message, message.model_id))

    def _on_endpoint_config(self, config: m.EndpointConfig) -> None:
        """Prefetch the models in the background; disabled functions refuse requests."""
        if self.models is not None:
            self._spawn(self.models.prefetch(config, self.worker_event))
        disabled = set(config.disabled_functions)
        known = {spec.name for spec in self.engine.functions}
        for change in availability_changes(self._disabled, disabled, known):
            self._write(change)
        self._disabled = disabled

    async def _rotate_token(self, token: str) -> None:
        """Use a rotated token for the next connection, once it passes local verification."""
        if self.verify_token is not None:
            try:
                await self.verify_token(token)
            except Exception as exc:  # keep the old token; the message never holds the token
                log("error", "jwt rotation refused", reason=type(exc).__name__, detail=str(exc))
                return
        self.identity.token = token
        log("info", "jwt rotated", worker_id=self.identity.worker_id)

    def _on_interrupt(self, message: m.Interrupt) -> None:
        attempt = None if message.any_attempt else message.attempt_epoch
        if message.queued_only:
            for (rid, att), run in self._runs.items():
                if rid == message.request_id and run.is_queued and attempt in (None, att):
                    self.handle(ct.InterruptReceived(rid, att))
            return
        self.handle(ct.InterruptReceived(message.request_id, attempt))

    def _on_batching(self, name: str, size: int) -> None:
        spec = self.engine.find(name)
        if spec is None or size < 1:
            error = f"unknown function {name!r}" if spec is None else "batch size must be >= 1"
            self._write(
                m.RuntimeBatchingConfigResult(function_name=name, ok=False, error_message=error)
            )
            return
        self.engine.set_preferred_batch_size(spec.name, size)
        self._write(m.RuntimeBatchingConfigResult(function_name=name, ok=True))

    # -- jobs -----------------------------------------------------------------------------------

    def _start_job(self, key: ct.RequestKey, job: m.JobRequest) -> None:
        spec = self.engine.find(job.function_name)
        ref = m.RequestRef(
            request_id=job.request_id, item_id=job.item_id, attempt_epoch=job.attempt_epoch
        )
        if spec is None or spec.name in self._disabled:
            why = "is disabled" if spec is not None else "does not exist on this worker"
            text = f"function {job.function_name!r} {why}"
            self._refuse(key, job_failure(ref, "validation", text))
            return
        meta = request_meta(job)
        inline = self._inline_ok and self._inline is None
        try:
            run = self.engine.start(spec, job.payload, meta, own_task=not inline)
        except Exception as exc:  # e.g. the same request id is still stopping from an attempt
            self._refuse(key, job_failure(ref, "retryable", str(exc)))
            return
        self._runs[key] = run
        # Pushed, not pulled: the run's outcomes come to _on_outcomes in batches (from a loop
        # callback, or at once as the run ends; no reader task per request) and are encoded
        # for the wire right there. The reader executes an inline run and attaches its sink
        # only if it has to wait (see _execute).
        encoder = OutcomeEncoder(ref, streaming=spec.is_streaming)
        sink = functools.partial(self._on_outcomes, key, run, encoder)
        if inline:
            self._inline = InlineRun(key, run, sink)
        else:
            run.channel.attach(sink)
        run.on_stopped(
            functools.partial(self._on_run_stopped, key, run, self._inline if inline else None)
        )

    def _refuse(self, key: ct.RequestKey, failure: m.JobResult) -> None:
        """Answer a job request that never ran: its one outcome, and it is over."""
        self.handle(ct.OutcomeProduced(key[0], key[1], 0, True, failure))
        self.handle(ct.JobStopped(key[0], key[1]))

    def _on_outcomes(self, key: ct.RequestKey, run: RequestRun, encoder: OutcomeEncoder,
                     batch: list[Outcome], *, quiet: bool = False) -> None:  # fmt: skip
        channel = run.channel
        items = encoder.encode_batch(batch, channel.delta_count)
        last = batch[-1]
        terminal = last is channel.terminal
        if terminal and self.core.draining and isinstance(last, Result):
            self.completed += 1
        for action in self.core.handle(ct.OutcomesProduced(key[0], key[1], items, terminal)):
            if quiet and type(action) is ct.Send:
                self._send(action.payloads, wake=False)  # the caller writes them right away
            else:
                self._do(action)

    def _on_run_stopped(
        self, key: ct.RequestKey, run: RequestRun, inline: InlineRun | None
    ) -> None:
        if inline is not None and inline.executing:
            inline.stopped = True  # _execute reports it once the outcomes are handed over
            return
        # The core must have the terminal outcome before it hears that the run stopped. It
        # usually has (the channel hands the terminal over as it is posted); if a flush is
        # still to come, go after it (call_soon is FIFO).
        if run.channel.has_pending:
            asyncio.get_running_loop().call_soon(self._job_stopped, key)
        else:
            self._job_stopped(key)

    def _job_stopped(self, key: ct.RequestKey) -> None:
        self._runs.pop(key, None)
        self.handle(ct.JobStopped(key[0], key[1]))

    def _start_batch(self, key: ct.RequestKey, plan: BatchPlan) -> None:
        def produced(seq: int, terminal: bool, message: Any) -> None:
            self.handle(ct.OutcomeProduced(key[0], key[1], seq, terminal, message))

        meta = RequestMeta(request_id=plan.batch.batch_id, codec=Codec.MSGPACK)
        try:
            run = self.engine.start(plan.spec, plan.payload, meta)
        except Exception as exc:
            ref = m.RequestRef(request_id=plan.batch.batch_id)
            produced(0, True, batch_result(plan, None, str(exc), ref))
            self.handle(ct.JobStopped(key[0], key[1]))
            return
        self._runs[key] = run
        self._spawn(self._then_stopped(key, pump_batch(run, plan, produced)))

    async def _then_stopped(self, key: ct.RequestKey, pump: Awaitable[None]) -> None:
        await pump
        self._job_stopped(key)

    def _cancel(self, key: ct.RequestKey) -> None:
        run = self._runs.get(key)
        if run is not None and run.cancel():
            self.canceled += 1

    # -- registration and heartbeats ------------------------------------------------------------

    def _registration(self, assignments: tuple[ct.Assignment, ...]) -> m.WorkerRegistration:
        return registration(self.identity, self.endpoint.lock, self.engine.slots,
                            draining=self.core.draining, assignments=assignments,
                            models=self.models.inventory() if self.models else None)  # fmt: skip

    def _heartbeat_message(self) -> m.Heartbeat:
        slots = self.engine.slots
        active = [m.Assignment(request_id=rid, attempt_epoch=att) for rid, att in self.core.active]
        models = self.models.inventory() if self.models else None
        return heartbeat(slots, active, draining=self.core.draining, models=models)

    def _on_registered(self) -> None:
        """The first acknowledged registration: report the startup phases held until now."""
        pending, self._pending_events = self._pending_events, []
        for event in pending:  # the phases before registration come first, in order
            self._write(event)
        self.worker_event("worker.startup.phase", {"phase": "registered"})
        self.worker_event("worker.startup.phase", {"phase": "ready"})

    # -- the end ----------------------------------------------------------------------------------

    def _on_exit(self, code: int, reason: str) -> None:
        if code != 0:
            phase = (
                "startup_timeout_unregistered"
                if code == ct.ExitCode.REGISTER_TIMEOUT
                else "running"
            )
            self.worker_event("worker.fatal", {"phase": phase, "exception_class": "WorkerExit",
                                               "exception_message": reason, "traceback": "",
                                               "exit_code": code})  # fmt: skip
        else:
            log("info", "worker stopping", reason=reason)
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(code)

    async def _teardown(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._heartbeat.stop()
        link = self._link
        if link is not None:
            # The writer ends by itself after sending what was queued before the close marker
            # (the drain result, a worker.fatal event); cancelling it sooner could lose them.
            self._write(CLOSE)
            writer = link.writer
            if writer is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(writer), 3.0)
            await self._drop(link, None)
        for run in self._runs.values():
            run.cancel()
        await self.engine.shutdown(grace_s=0)
        for task in list(self._tasks):
            task.cancel()
