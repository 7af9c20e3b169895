"""The worker core against a simulated scheduler over an unreliable stream (hypothesis model).

The simulated scheduler keeps, per request, a deduplicated log of the outcomes that really
arrived. A stream is ordered, so when it breaks the messages sent since they were last known
to arrive are lost from some point on: hypothesis decides, message by message, how far they
got. Whatever happens, the scheduler's log must stay a gap-free prefix of what was produced,
and once the link is reliable again every outcome must be there exactly once.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Concatenate, ParamSpec

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gen_worker.runtime.core import WorkerCore
from gen_worker.runtime.core_types import (
    Action,
    ArmWatchdog,
    Assignment,
    CancelAllJobs,
    CancelJob,
    CloseStream,
    CoreConfig,
    Dial,
    Dialed,
    DialFailed,
    DisarmWatchdog,
    DrainDeadline,
    DrainRequested,
    Event,
    Exit,
    FinalDeadline,
    InterruptReceived,
    JobReceived,
    JobStopped,
    Link,
    OutcomeAcked,
    OutcomeProduced,
    OutcomesProduced,
    ReconnectDue,
    Redirected,
    RegistrationAcked,
    RejectJob,
    ReplayResult,
    RequestKey,
    ScheduleDrainDeadline,
    ScheduleFinalDeadline,
    ScheduleReconnect,
    Send,
    SendDrainResult,
    SendRegistration,
    SignalReceived,
    Start,
    StartHeartbeat,
    StartJob,
    StopHeartbeat,
    StreamBroken,
)

ADDRESSES = ("a:1", "b:2", "c:3")
MAX_DELAY_S = 1.0
DRAIN_TIMEOUT_S = 30.0
MAX_REQUESTS = 6
OPEN = (Link.REGISTERING, Link.REGISTERED)
Payload = tuple[str, int, int, bool]  # (request_id, attempt, seq, terminal)
P = ParamSpec("P")


def step(
    fn: Callable[Concatenate[CoreModel, P], None],
) -> Callable[Concatenate[CoreModel, P], None]:
    """Mark the model inconsistent while a step runs, so teardown skips a failed example."""

    @functools.wraps(fn)
    def wrapper(self: CoreModel, /, *args: P.args, **kwargs: P.kwargs) -> None:
        self.healthy = False
        fn(self, *args, **kwargs)
        self.healthy = True

    return wrapper


class CoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.healthy = False
        self.core: WorkerCore
        self.jitter_s = 0.0
        self.lb_only = True
        self.started: list[RequestKey] = []
        self.running: set[RequestKey] = set()
        self.produced: dict[RequestKey, list[Payload]] = {}
        self.production: list[Payload] = []  # every outcome, in production order
        self.acked: dict[RequestKey, int] = {}  # what the core was told the scheduler has
        self.log: dict[RequestKey, list[Payload]] = {}  # the scheduler's deduplicated log
        self.in_flight: list[Payload] = []  # sent on this stream, arrival not yet known
        self.registration: tuple[Assignment, ...] = ()
        self.draining = False
        self.drain_deadline_passed = False
        self.canceled = 0
        self.final_deadline = False
        self.exited: Exit | None = None
        self.ever_registered = False

    # ---- plumbing ------------------------------------------------------------------------

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        jitter_s=st.sampled_from([0.0, 0.3, 5.0]),
        lb_only=st.booleans(),
    )
    @step
    def boot(self, seed: int, jitter_s: float, lb_only: bool) -> None:
        config = CoreConfig(
            addresses=ADDRESSES,
            reconnect_jitter_s=jitter_s,
            reconnect_max_delay_s=MAX_DELAY_S,
            drain_timeout_s=DRAIN_TIMEOUT_S,
            lb_only_retries=lb_only,
            max_redirect_hops=2,
        )
        self.core = WorkerCore(config, random.Random(seed))
        self.jitter_s, self.lb_only = jitter_s, lb_only
        assert self.apply(Start()) == [ArmWatchdog(90.0), Dial("a:1")]

    def apply(self, event: Event) -> list[Action]:
        actions = self.core.handle(event)
        for action in actions:
            self.observe(action)
        return actions

    def observe(self, action: Action) -> None:
        match action:
            case ScheduleReconnect(delay_s=delay_s):
                assert 0.0 <= delay_s <= MAX_DELAY_S + min(self.jitter_s, MAX_DELAY_S)
            case Send(payloads=payloads):
                assert self.core.registered  # only an acknowledged stream carries outcomes
                self.in_flight += payloads
            case ReplayResult(payload=payload):
                self.in_flight.append(payload)
            case StartJob(request_id=rid, attempt=attempt):
                self.running.add((rid, attempt))
            case Exit() as exit_:
                self.check_exit(exit_)
            case _:
                pass

    def check_exit(self, exit_: Exit) -> None:
        # Exits happen only in a drain: a clean one once everything arrived, or the final
        # deadline with a code that says whether anything is missing.
        assert self.draining
        self.exited = exit_
        missing = [key for key in self.started if not self.delivered(key)]
        if exit_.reason == "drained":
            assert exit_.code == 0 and missing == [] and not self.running
        else:
            assert self.final_deadline and exit_.code == (0 if missing == [] else 5)

    def delivered(self, key: RequestKey) -> bool:
        produced = self.produced.get(key, [])
        return bool(produced) and produced[-1][3] and self.acked[key] == len(produced) - 1

    def arrive(self, payloads: list[Payload]) -> None:
        for payload in payloads:
            rid, attempt, seq, _ = payload
            log = self.log.setdefault((rid, attempt), [])
            assert seq <= len(log), f"gap: {payload} arrived after {log}"
            if seq == len(log):
                log.append(payload)
            else:
                assert log[seq] == payload  # a duplicate after a resume, dropped

    def lose_stream(self, data: st.DataObject) -> None:
        # An ordered stream: the first lost message takes every later one with it.
        arrived = 0
        while arrived < len(self.in_flight) and data.draw(st.booleans(), label="arrived"):
            arrived += 1
        self.arrive(self.in_flight[:arrived])
        self.in_flight = []

    def drain_tail(self) -> list[Action]:
        tail: list[Action] = []
        if self.core.link is Link.REGISTERED:
            tail.append(SendDrainResult(self.canceled, 0))
        if self.core.link in OPEN:
            tail.append(CloseStream())
        return [*tail, Exit(0, "drained")]

    def expect(self, actions: list[Action], expected: list[Action]) -> None:
        """``expected``, then the drain's completion if this event completed it."""
        tail = self.drain_tail() if self.exited is not None else []
        assert actions == expected + tail

    def key_of(self, data: st.DataObject, keys: list[RequestKey]) -> RequestKey:
        return data.draw(st.sampled_from(sorted(keys)), label="request")

    # ---- the scheduler and the network -----------------------------------------------------

    def stale(self, *events: Event) -> None:
        # Timers and streams from before the last change must not move the link.
        link = self.core.link
        for event in events:
            assert self.apply(event) == []
        assert self.core.link is link

    def check_backoff(self, actions: list[Action]) -> None:
        assert len(actions) == 2 and actions[0] == StopHeartbeat()
        assert isinstance(actions[1], ScheduleReconnect)  # its bounds: observe()

    @precondition(lambda self: self.exited is None and self.core.link is Link.DIALING)
    @rule(outcome=st.sampled_from(["open", "open", "open", "refused", "not_leader"]))
    @step
    def dial_answered(self, outcome: str) -> None:
        self.stale(ReconnectDue(), RegistrationAcked(1.0), StreamBroken("old stream"))
        if outcome == "open":
            (registration,) = self.apply(Dialed())
            assert isinstance(registration, SendRegistration)
            self.registration = registration.assignments
            assert {(rid, attempt) for rid, attempt, _ in self.registration} == self.tracked()
            for rid, attempt, last_sent in self.registration:
                assert last_sent >= len(self.log.get((rid, attempt), [])) - 1
        elif outcome == "refused":
            self.check_backoff(self.apply(DialFailed("refused")))
        else:
            self.redirect(was_registered=False)

    def redirect(self, *, was_registered: bool) -> None:
        actions = self.apply(Redirected("leader:9"))
        followed = [StopHeartbeat(), Dial("leader:9")] if was_registered else [Dial("leader:9")]
        if self.lb_only or actions != followed:  # past the hop cap it is a broken stream
            self.check_backoff(actions)

    def tracked(self) -> set[RequestKey]:
        return {k for k in self.started if k in self.running or not self.delivered(k)}

    @precondition(lambda self: self.exited is None and self.core.link is Link.WAITING)
    @rule()
    @step
    def reconnect_due(self) -> None:
        self.stale(Dialed(), DialFailed("old dial"), StreamBroken("old stream"))
        (dial,) = self.apply(ReconnectDue())
        assert isinstance(dial, Dial) and dial.address in ADDRESSES

    @precondition(lambda self: self.exited is None and self.core.link is Link.REGISTERING)
    @rule(data=st.data(), acknowledged=st.sampled_from([True, True, True, False]))
    @step
    def registration_answered(self, data: st.DataObject, acknowledged: bool) -> None:
        self.stale(ReconnectDue(), Dialed(), DialFailed("old dial"))
        if not acknowledged:
            self.check_backoff(self.apply(StreamBroken("closed before the ack")))
            return
        listed: set[Assignment] = set()
        if self.registration:
            listed = data.draw(st.sets(st.sampled_from(self.registration)), label="listed")
        self.register(listed)

    def register(self, listed: set[Assignment]) -> None:
        # The scheduler lists what really arrived, for the assignments it chose to list.
        resume = tuple((r, a, len(self.log.get((r, a), [])) - 1) for r, a, _ in sorted(listed))
        for rid, attempt, seq in resume:
            self.acked[(rid, attempt)] = max(self.acked[(rid, attempt)], seq)
        first = not self.ever_registered
        self.ever_registered = True
        actions = self.apply(RegistrationAcked(1.0, resume))
        resend = [p for p in self.production if p[2] > self.acked[(p[0], p[1])]]
        expected: list[Action] = [DisarmWatchdog()] if first else []
        expected.append(StartHeartbeat(1.0))
        if resend:  # everything not known to have arrived, in production order
            expected.append(Send(tuple(resend)))
        self.expect(actions, expected)

    @precondition(lambda self: self.exited is None and self.core.registered)
    @rule(data=st.data(), redirect=st.booleans())
    @step
    def break_stream(self, data: st.DataObject, redirect: bool) -> None:
        self.lose_stream(data)
        if redirect:
            self.redirect(was_registered=True)
        else:
            self.check_backoff(self.apply(StreamBroken("connection reset")))

    def unacked(self) -> list[RequestKey]:
        return [key for key, log in self.log.items() if len(log) - 1 > self.acked[key]]

    @precondition(
        lambda self: (
            self.exited is None and self.core.registered and bool(self.in_flight or self.unacked())
        )
    )
    @rule(data=st.data())
    @step
    def scheduler_receives(self, data: st.DataObject) -> None:
        self.arrive(self.in_flight)
        self.in_flight = []
        for key in self.unacked():  # acks are cumulative, per request, and not always prompt
            if self.exited is None and data.draw(st.booleans(), label=f"ack {key}"):
                self.acked[key] = len(self.log[key]) - 1
                self.expect(self.apply(OutcomeAcked(*key, self.acked[key])), [])

    # ---- requests ---------------------------------------------------------------------------

    @precondition(lambda self: self.exited is None and self.core.registered)
    @rule(data=st.data(), kind=st.sampled_from(["new", "new", "duplicate", "interrupt"]))
    @step
    def scheduler_sends(self, data: st.DataObject, kind: str) -> None:
        if kind == "interrupt" and self.running:
            self.interrupt(data)
        elif (kind == "new" and len(self.started) < MAX_REQUESTS) or not self.started:
            self.new_job(data.draw(st.integers(0, 1), label="attempt"))
        else:
            self.duplicate_job(self.key_of(data, self.started))

    def new_job(self, attempt: int) -> None:
        rid = f"q{len(self.started)}"
        actions = self.apply(JobReceived(rid, attempt, payload=None))
        if self.draining:
            assert actions == [RejectJob(rid, attempt, "draining")]
            return
        assert actions == [StartJob(rid, attempt, None)]
        self.started.append((rid, attempt))
        self.produced[(rid, attempt)] = []
        self.acked[(rid, attempt)] = -1

    def duplicate_job(self, key: RequestKey) -> None:
        actions = self.apply(JobReceived(*key, payload=None))
        if key in self.running:
            assert actions == []  # never run twice
        else:
            assert actions == [ReplayResult(self.produced[key][-1])]

    def interrupt(self, data: st.DataObject) -> None:
        rid, attempt = self.key_of(data, list(self.running))
        any_attempt = data.draw(st.booleans(), label="any attempt")
        actions = self.apply(InterruptReceived(rid, None if any_attempt else attempt))
        matching = [k for k in self.running if k[0] == rid and (any_attempt or k[1] == attempt)]
        assert sorted(actions, key=repr) == sorted((CancelJob(*k) for k in matching), key=repr)

    def unfinished(self) -> list[RequestKey]:
        return [k for k in self.running if not (self.produced[k] and self.produced[k][-1][3])]

    @precondition(lambda self: self.exited is None and self.running)
    @rule(data=st.data(), count=st.integers(1, 8), terminal=st.booleans(), batched=st.booleans())
    @step
    def run_progresses(
        self, data: st.DataObject, count: int, terminal: bool, batched: bool
    ) -> None:
        """A run streams ``count`` outcomes (the last maybe terminal), one event each or all in
        one OutcomesProduced (as the worker's shell hands them over), or, finished, stops."""
        key = self.key_of(data, list(self.running))
        if key in self.unfinished() and batched:
            self.produce_batch(key, count, terminal=terminal)
        elif key in self.unfinished():
            for i in range(count):
                self.produce_one(key, terminal=terminal and i == count - 1)
        else:
            self.running.discard(key)
            self.expect(self.apply(JobStopped(*key)), [])

    def produce_batch(self, key: RequestKey, count: int, *, terminal: bool) -> None:
        start = len(self.produced[key])
        payloads = [(*key, start + i, terminal and i == count - 1) for i in range(count)]
        self.produced[key].extend(payloads)
        self.production.extend(payloads)
        items = tuple((p[2], p) for p in payloads)
        actions = self.apply(OutcomesProduced(*key, items, terminal))
        assert actions == ([Send(tuple(payloads))] if self.core.registered else [])

    def produce_one(self, key: RequestKey, *, terminal: bool) -> None:
        payload = (*key, len(self.produced[key]), terminal)
        self.produced[key].append(payload)
        self.production.append(payload)
        actions = self.apply(OutcomeProduced(*key, payload[2], terminal, payload))
        assert actions == ([Send((payload,))] if self.core.registered else [])

    # ---- drain and exit ---------------------------------------------------------------------

    def idle(self) -> bool:
        return not self.running and all(self.delivered(k) for k in self.started)

    @precondition(lambda self: self.exited is None and not self.draining and len(self.started) >= 2)
    @rule(timeout_s=st.none() | st.sampled_from([1.0, 5.0]), by_signal=st.booleans())
    @step
    def drain(self, timeout_s: float | None, by_signal: bool) -> None:
        self.draining = True
        idle = self.idle()
        event: Event = SignalReceived() if by_signal else DrainRequested(timeout_s)
        actions = self.apply(event)
        if idle:
            assert self.exited == Exit(0, "drained")
            self.expect(actions, [])
            return
        delay_s = DRAIN_TIMEOUT_S if by_signal or timeout_s is None else timeout_s
        final_s = delay_s + DRAIN_TIMEOUT_S
        assert actions == [ScheduleDrainDeadline(delay_s), ScheduleFinalDeadline(final_s)]
        assert self.core.draining

    @precondition(
        lambda self: (
            self.exited is None
            and self.draining
            and not (self.drain_deadline_passed and self.core.registered)
        )
    )
    @rule()
    @step
    def deadline(self) -> None:
        """The drain deadline cancels what still runs; the final one ends the worker.

        The final deadline only comes during an outage here: while connected, the model's
        runs would mostly have been given no time to report at all.
        """
        if not self.drain_deadline_passed:
            self.drain_deadline_passed = True
            if self.running:
                self.canceled = len(self.running)
            assert self.apply(DrainDeadline()) == ([CancelAllJobs()] if self.running else [])
            return
        self.final_deadline = True
        actions = self.apply(FinalDeadline())
        assert self.exited is not None and actions[-1] == self.exited

    @precondition(lambda self: self.exited is not None)
    @rule(data=st.data())
    @step
    def after_exit(self, data: st.DataObject) -> None:
        events: list[Event] = [Start(), Dialed(), SignalReceived(), JobReceived("z", 0, None)]
        assert self.apply(data.draw(st.sampled_from(events))) == []

    # ---- invariants and the reliable ending -------------------------------------------------

    @invariant()
    def scheduler_log_is_a_gap_free_prefix(self) -> None:
        for key, log in self.log.items():
            assert log == self.produced[key][: len(log)]

    @invariant()
    def core_agrees_with_the_model(self) -> None:
        if self.healthy and self.exited is None:
            unacked = sum(len(self.produced[k]) - 1 - self.acked[k] for k in self.started)
            assert self.core.buffered_count == unacked
            assert set(self.core.active) == self.running
            assert self.core.draining == self.draining

    @invariant()
    def an_idle_drain_has_exited(self) -> None:
        # Connected or not: waiting for a reconnect with nothing to deliver would hang.
        if self.healthy and self.draining and self.idle():
            assert self.exited is not None

    def teardown(self) -> None:
        if not self.healthy or self.exited is not None:
            return  # a failed step already reported; an exit was checked when it happened
        self.healthy = False
        self.reconnect_reliably()
        for key in sorted(self.running):  # every run finishes and stops
            if key in self.unfinished():
                self.produce_one(key, terminal=True)
            self.running.discard(key)
            self.apply(JobStopped(*key))
        self.arrive(self.in_flight)
        self.in_flight = []
        for key in self.started:  # the scheduler acknowledges all it has
            if self.exited is None and self.acked[key] < len(self.log[key]) - 1:
                self.acked[key] = len(self.log[key]) - 1
                self.apply(OutcomeAcked(*key, self.acked[key]))
        for key in self.started:
            assert self.log[key] == self.produced[key]  # every outcome exactly once, in order
            assert [p[3] for p in self.log[key]].count(True) == 1 and self.log[key][-1][3]
        if self.exited is None:
            self.draining = True
            self.expect(self.apply(SignalReceived()), [])
        assert self.exited == Exit(0, "drained")

    def reconnect_reliably(self) -> None:
        for _ in range(4):
            match self.core.link:
                case Link.WAITING:
                    self.apply(ReconnectDue())
                case Link.DIALING:
                    (registration,) = self.apply(Dialed())
                    assert isinstance(registration, SendRegistration)
                    self.registration = registration.assignments
                case Link.REGISTERING:
                    self.register(set(self.registration))
                case _:
                    return


CoreModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_worker_core_model = CoreModel.TestCase
