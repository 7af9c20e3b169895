"""The worker's connection, resume and drain decisions, as a pure state machine.

DESIGN habit 5, "decide in pure code, act in a thin shell" (dask ``worker_state_machine``,
cog ``WorkerStateMachine``): :meth:`WorkerCore.handle` takes one event and returns the actions
the shell must carry out. No I/O, no clock; the only randomness is the injected
:class:`random.Random` for reconnect jitter. So every rule of SPEC sections 9 and 10 is a
table of events in and actions out, and a hypothesis model can drive thousands of disconnects.

Every outcome stays buffered until the scheduler acknowledges it (cumulatively, per request);
after a reconnect the registration acknowledgement says what already arrived, and the core
resends exactly the rest in production order: at-least-once on the wire, exactly-once at the
scheduler, which drops duplicates by sequence number.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any, assert_never

from gen_worker.runtime import core_types as ct

__all__ = ["WorkerCore"]

_OPEN = (ct.Link.REGISTERING, ct.Link.REGISTERED)
# 2.0 ** 1024 overflows a float; past 2 ** 60 any base delay is far above every sane maximum.
_MAX_EXPONENT = 60


class WorkerCore:
    """Events in, actions out. Not thread-safe: the shell feeds it from one task."""

    def __init__(self, config: ct.CoreConfig, rng: random.Random) -> None:
        self._cfg = config
        self._rng = rng
        self._link = ct.Link.IDLE
        self._address_index = 0
        self._address = config.addresses[0]
        self._failures = 0  # n in the back-off formula
        self._redirect_hops = 0
        self._ever_registered = False
        self._requests: dict[ct.RequestKey, ct.RequestRecord] = {}
        self._remembered: OrderedDict[ct.RequestKey, Any] = OrderedDict()
        self._produced = 0
        self._draining = False
        self._signals = 0
        self._canceled = 0
        self._drain_deadline_passed = False
        self._stopped = False

    # ---- what the shell may read -------------------------------------------------------

    @property
    def phase(self) -> ct.Phase:
        if self._stopped:
            return ct.Phase.STOPPED
        if self._draining:
            return ct.Phase.DRAINING
        return ct.PHASE_OF_LINK[self._link]

    @property
    def link(self) -> ct.Link:
        return self._link

    @property
    def registered(self) -> bool:
        """Whether the current stream's registration was acknowledged."""
        return self._link is ct.Link.REGISTERED

    @property
    def draining(self) -> bool:
        """Heartbeats advertise this so the scheduler stops routing new requests here."""
        return self._draining

    @property
    def active(self) -> tuple[ct.RequestKey, ...]:
        """Runs started and not yet stopped, in start order."""
        return tuple(key for key, req in self._requests.items() if req.running)

    @property
    def buffered_count(self) -> int:
        """Outcomes produced and not yet acknowledged by the scheduler."""
        return sum(len(req.outcomes) for req in self._requests.values())

    @property
    def address(self) -> str:
        """The address dialed last, or to be dialed at the next ReconnectDue."""
        return self._address

    @property
    def reconnect_attempts(self) -> int:
        """Failures since the last acknowledged registration (n in the back-off formula)."""
        return self._failures

    # ---- the one entry point -----------------------------------------------------------

    def handle(self, event: ct.Event) -> list[ct.Action]:
        if self._stopped:
            return []  # after Exit the shell is tearing down; nothing more to decide
        actions = self._dispatch(event)
        # Checked after every event, whatever the link: a drain may complete while
        # disconnected (nothing left to deliver) and must not wait for a reconnect.
        if self._draining and not self._stopped and self._idle():
            closing = self._close(self._canceled, 0)
            actions += [*closing, self._exit(ct.ExitCode.DRAINED, "drained")]
        return actions

    def _dispatch(self, event: ct.Event) -> list[ct.Action]:
        # Each case pattern is an isinstance check, tried in order: the per-request events
        # (several per request) come first, the rare link and lifecycle events after.
        match event:
            case ct.OutcomesProduced() | ct.OutcomeAcked() | ct.JobReceived() | ct.JobStopped():
                return self._on_request(event)
            case ct.OutcomeProduced() | ct.InterruptReceived():
                return self._on_request(event)
            case ct.Dialed() | ct.DialFailed() | ct.StreamBroken() | ct.ReconnectDue():
                return self._on_link(event)
            case ct.Redirected() | ct.RegistrationAcked():
                return self._on_link(event)
            case ct.Start() | ct.RegisterTimedOut() | ct.ProtocolRejected():
                return self._on_lifecycle(event)
            case _:
                return self._on_drain_event(event)

    def _exit(self, code: ct.ExitCode, reason: str) -> ct.Exit:
        self._stopped = True
        return ct.Exit(code=code, reason=reason)

    # ---- connection --------------------------------------------------------------------

    def _on_link(self, event: ct.LinkEvent) -> list[ct.Action]:
        # Each event is valid in one link state only; anything else is stale (a timer or a
        # stream from before the last change) and ignored, so it can never double-count.
        match event:
            case ct.Dialed():
                return self._on_dialed() if self._link is ct.Link.DIALING else []
            case ct.DialFailed(reason=reason):
                return self._lose_link(reason) if self._link is ct.Link.DIALING else []
            case ct.StreamBroken(reason=reason):
                return self._lose_link(reason) if self._link in _OPEN else []
            case ct.ReconnectDue():
                return self._redial() if self._link is ct.Link.WAITING else []
            case ct.Redirected():
                return self._on_redirect(event)
            case ct.RegistrationAcked():
                return self._on_registered(event) if self._link is ct.Link.REGISTERING else []
            case _:
                assert_never(event)

    def _on_dialed(self) -> list[ct.Action]:
        # Not registered yet: only the acknowledgement counts (SPEC 9, "registration is
        # acknowledged"); the old worker counted a mere open stream and spun at 100 Hz.
        self._link = ct.Link.REGISTERING
        assignments: list[ct.Assignment] = [
            (rid, attempt, req.last_sent) for (rid, attempt), req in self._requests.items()
        ]
        return [ct.SendRegistration(assignments=tuple(assignments))]

    def _redial(self) -> list[ct.Action]:
        self._link = ct.Link.DIALING
        return [ct.Dial(self._address)]

    def _lose_link(self, reason: str) -> list[ct.Action]:
        # A failed dial and a stream that broke after working are the same failure (SPEC 10).
        self._redirect_hops = 0  # a plain failure ends a chain of redirects
        self._failures += 1
        limit = self._cfg.max_reconnect_attempts
        if limit > 0 and self._failures > limit:
            # MAX_RECONNECT_ATTEMPTS is honoured (the old worker never did); fatal, non-zero.
            code = ct.ExitCode.RECONNECT_EXHAUSTED
            why = f"reconnect attempts exhausted ({limit}); last failure: {reason}"
            return [ct.StopHeartbeat(), self._exit(code, why)]
        # Round-robin: the primary, then each of SCHEDULER_ADDRS in turn, then again.
        self._address_index = (self._address_index + 1) % len(self._cfg.addresses)
        self._address = self._cfg.addresses[self._address_index]
        self._link = ct.Link.WAITING
        return [ct.StopHeartbeat(), ct.ScheduleReconnect(self._backoff_s())]

    def _backoff_s(self) -> float:
        # min(RECONNECT_DELAY * 2^(n-1), RECONNECT_MAX_DELAY) + uniform(0, jitter), the
        # jitter also capped by the maximum (SPEC 10), so a delay never exceeds 2 * max.
        cfg = self._cfg
        exponent = min(self._failures - 1, _MAX_EXPONENT)
        base = min(cfg.reconnect_delay_s * 2.0**exponent, cfg.reconnect_max_delay_s)
        jitter_cap = min(cfg.reconnect_jitter_s, cfg.reconnect_max_delay_s)
        return base + self._rng.uniform(0.0, jitter_cap)

    def _on_redirect(self, event: ct.Redirected) -> list[ct.Action]:
        if self._link not in (ct.Link.DIALING, *_OPEN):
            return []
        if self._cfg.lb_only_retries:
            # Behind a load balancer the hinted address is unreachable; retry the usual way.
            return self._lose_link(f"not_leader:{event.address} (LB_ONLY_RETRIES)")
        if self._redirect_hops >= self._cfg.max_redirect_hops:
            # Bounded so two schedulers pointing at each other cannot loop us forever.
            return self._lose_link(f"more than {self._cfg.max_redirect_hops} redirects")
        self._redirect_hops += 1
        actions: list[ct.Action] = [ct.StopHeartbeat()] if self._link is ct.Link.REGISTERED else []
        self._address = event.address
        self._link = ct.Link.DIALING
        return [*actions, ct.Dial(event.address)]

    def _on_registered(self, event: ct.RegistrationAcked) -> list[ct.Action]:
        # Only now is the worker registered: back-off resets, the watchdog is released,
        # heartbeats start (SPEC 9).
        self._link = ct.Link.REGISTERED
        self._failures = 0
        self._redirect_hops = 0
        actions: list[ct.Action] = []
        if not self._ever_registered:
            # The watchdog guards the first registration; later outages are the back-off's.
            self._ever_registered = True
            actions.append(ct.DisarmWatchdog())
        actions.append(ct.StartHeartbeat(event.heartbeat_interval_s))
        # What the scheduler already has is as good as acknowledged: drop it ...
        for rid, attempt, received_through in event.resume:
            self._trim((rid, attempt), received_through)
        # ... and resend everything else, requests it did not list included, in production
        # order (so seq order within each request): nothing lost, no gap, nothing twice.
        return actions + self._send_buffered()

    def _send_buffered(self) -> list[ct.Action]:
        pending = sorted(
            (o for req in self._requests.values() for o in req.outcomes),
            key=lambda o: o.order,
        )
        if not pending:
            return []
        for req in self._requests.values():
            if req.outcomes:
                req.last_sent = max(req.last_sent, req.outcomes[-1].seq)
        return [ct.Send(tuple(o.payload for o in pending))]

    # ---- requests ----------------------------------------------------------------------

    def _on_request(self, event: ct.RequestEvent) -> list[ct.Action]:
        match event:
            case ct.OutcomesProduced():
                return self._on_outcomes(event)
            case ct.OutcomeProduced():
                return self._on_outcome(event)
            case ct.OutcomeAcked():
                self._trim((event.request_id, event.attempt), event.through_seq)
                return []
            case ct.JobReceived():
                return self._on_job(event)
            case ct.JobStopped():
                return self._on_stopped((event.request_id, event.attempt))
            case ct.InterruptReceived():
                return [
                    ct.CancelJob(rid, attempt)
                    for (rid, attempt), req in self._requests.items()
                    if req.running and rid == event.request_id and event.attempt in (None, attempt)
                ]
            case _:
                assert_never(event)

    def _on_outcome(self, event: ct.OutcomeProduced) -> list[ct.Action]:
        key = (event.request_id, event.attempt)
        req = self._requests.setdefault(key, ct.RequestRecord())
        # Buffered until acknowledged, whether or not it can go out now: a stream can break
        # with it in flight, and results finishing during a reconnect must not be dropped.
        req.outcomes.append(ct.BufferedOutcome(event.seq, event.payload, self._produced))
        self._produced += 1
        if event.terminal:
            req.has_terminal = True
            req.terminal = event.payload
        if self._link is not ct.Link.REGISTERED:
            return []  # kept for the resume after the next acknowledged registration
        req.last_sent = event.seq
        return [ct.Send((event.payload,))]

    def _on_outcomes(self, event: ct.OutcomesProduced) -> list[ct.Action]:
        if not event.items:
            return []
        items = event.items
        key = (event.request_id, event.attempt)
        req = self._requests.get(key)
        if req is None:
            req = self._requests[key] = ct.RequestRecord()
        order = self._produced
        buffer = ct.BufferedOutcome
        req.outcomes += [buffer(seq, payload, n) for n, (seq, payload) in enumerate(items, order)]
        self._produced = order + len(items)
        last_seq, last = items[-1]
        if event.terminal:
            req.has_terminal = True
            req.terminal = last
        if self._link is not ct.Link.REGISTERED:
            return []  # kept for the resume after the next acknowledged registration
        req.last_sent = last_seq
        return [ct.Send(tuple([payload for _, payload in items]))]

    def _trim(self, key: ct.RequestKey, through_seq: int) -> None:
        req = self._requests.get(key)
        if req is None:
            return  # already forgotten: a late or repeated acknowledgement
        # Buffered outcomes are in seq order: drop the acknowledged prefix (no rebuild per ack).
        outcomes = req.outcomes
        cut = 0
        while cut < len(outcomes) and outcomes[cut].seq <= through_seq:
            cut += 1
        if cut:
            del outcomes[:cut]
        req.last_sent = max(req.last_sent, through_seq)
        self._forget_if_done(key, req)

    def _on_stopped(self, key: ct.RequestKey) -> list[ct.Action]:
        req = self._requests.get(key)
        if req is not None and req.running:
            req.running = False
            self._forget_if_done(key, req)
        return []

    def _forget_if_done(self, key: ct.RequestKey, req: ct.RequestRecord) -> None:
        # Kept while it runs or has anything undelivered; after that only its terminal
        # payload is worth keeping, in a bounded FIFO, to answer a duplicate job request.
        if req.running or req.outcomes:
            return
        del self._requests[key]
        if req.has_terminal and self._cfg.remembered_results > 0:
            self._remembered[key] = req.terminal
            while len(self._remembered) > self._cfg.remembered_results:
                self._remembered.popitem(last=False)

    def _on_job(self, event: ct.JobReceived) -> list[ct.Action]:
        key = (event.request_id, event.attempt)
        req = self._requests.get(key)
        # Duplicates are answered before the drain check: rejecting a request that is
        # running or done here would tell the scheduler to run it elsewhere as well.
        if req is not None and req.running:
            return []  # the same id and epoch is already running: never run twice
        if req is not None and req.has_terminal:
            return [ct.ReplayResult(req.terminal)]
        if key in self._remembered:
            return [ct.ReplayResult(self._remembered[key])]
        if self._draining:
            return [ct.RejectJob(event.request_id, event.attempt, "draining")]
        self._requests.setdefault(key, ct.RequestRecord()).running = True
        return [ct.StartJob(event.request_id, event.attempt, event.payload)]

    # ---- lifecycle: start, fatal endings, drain ----------------------------------------

    def _on_lifecycle(self, event: ct.LifecycleEvent) -> list[ct.Action]:
        match event:
            case ct.Start():
                return self._on_start() if self._link is ct.Link.IDLE else []
            case ct.RegisterTimedOut():
                if self._ever_registered:
                    return []  # the watchdog guards the first registration only
                why = f"registration not acknowledged within {self._cfg.register_timeout_s} s"
                return [self._exit(ct.ExitCode.REGISTER_TIMEOUT, why)]
            case ct.ProtocolRejected(reason=reason):
                # Retrying cannot change our protocol version: fatal, non-zero, at once.
                return [self._exit(ct.ExitCode.PROTOCOL_REJECTED, reason)]
            case _:
                assert_never(event)

    def _on_drain_event(self, event: ct.DrainEvent) -> list[ct.Action]:
        match event:
            case ct.SignalReceived():
                return self._on_signal()
            case ct.DrainRequested(timeout_s=timeout_s):
                return [] if self._draining else self._begin_drain(timeout_s)
            case ct.DrainDeadline():
                return self._on_drain_deadline()
            case ct.FinalDeadline():
                return self._on_final_deadline() if self._draining else []
            case _:
                assert_never(event)

    def _on_start(self) -> list[ct.Action]:
        self._link = ct.Link.DIALING
        return [ct.ArmWatchdog(self._cfg.register_timeout_s), ct.Dial(self._address)]

    def _on_signal(self) -> list[ct.Action]:
        self._signals += 1
        if self._signals >= 2:
            # The operator insists: exit at once, whatever is in flight (SPEC 10).
            return [self._exit(ct.ExitCode.SECOND_SIGNAL, "second signal")]
        # Works in every link state: the old worker hung forever on SIGTERM mid-reconnect.
        return [] if self._draining else self._begin_drain(None)

    def _begin_drain(self, timeout_s: float | None) -> list[ct.Action]:
        self._draining = True
        if self._idle():
            return []  # handle() completes the drain right away; no timers needed
        delay_s = self._cfg.drain_timeout_s if timeout_s is None else timeout_s
        # The final deadline leaves the canceled runs one more drain timeout to report.
        final_s = delay_s + self._cfg.drain_timeout_s
        return [ct.ScheduleDrainDeadline(delay_s), ct.ScheduleFinalDeadline(final_s)]

    def _on_drain_deadline(self) -> list[ct.Action]:
        if not self._draining or self._drain_deadline_passed:
            return []
        self._drain_deadline_passed = True
        running = len(self.active)
        if running == 0:
            return []  # only undelivered outcomes remain: keep delivering until the final one
        # The runs report their canceled outcomes and JobStopped like any other ending.
        self._canceled = running
        return [ct.CancelAllJobs()]

    def _on_final_deadline(self) -> list[ct.Action]:
        undelivered = sum(not req.delivered for req in self._requests.values())
        code = ct.ExitCode.DRAINED if undelivered == 0 else ct.ExitCode.UNDELIVERED
        why = (
            f"final deadline passed: {undelivered} requests undelivered, "
            f"{self.buffered_count} outcomes unacknowledged, {len(self.active)} runs active"
        )
        return [*self._close(self._canceled, undelivered), self._exit(code, why)]

    def _idle(self) -> bool:
        # Forgotten requests are exactly the stopped and fully acknowledged ones.
        return not self._requests

    def _close(self, canceled: int, undelivered: int) -> list[ct.Action]:
        actions: list[ct.Action] = []
        if self._link is ct.Link.REGISTERED:
            actions.append(ct.SendDrainResult(canceled=canceled, undelivered=undelivered))
        if self._link in _OPEN:
            actions.append(ct.CloseStream())
        return actions
