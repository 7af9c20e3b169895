"""The worker's pure decision core: tables of events in and actions out (SPEC sections 9, 10).

Each case feeds ``given`` events (their actions are not checked), then ``when`` events, and
compares every action those produced, in order. Jitter is 0 unless a test says otherwise, so
reconnect delays are exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from gen_worker.runtime.core import WorkerCore
from gen_worker.runtime.core_types import (
    Action,
    ArmWatchdog,
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
    Phase,
    ProtocolRejected,
    ReconnectDue,
    Redirected,
    RegisterTimedOut,
    RegistrationAcked,
    RejectJob,
    ReplayResult,
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


def make(seed: int = 7, **overrides: Any) -> WorkerCore:
    settings: dict[str, Any] = {"addresses": ADDRESSES, "reconnect_jitter_s": 0.0}
    settings.update(overrides)
    return WorkerCore(CoreConfig(**settings), random.Random(seed))


def feed(core: WorkerCore, *events: Event) -> list[Action]:
    actions: list[Action] = []
    for event in events:
        actions += core.handle(event)
    return actions


def out(rid: str, seq: int, *, terminal: bool = False, attempt: int = 0) -> OutcomeProduced:
    """An outcome whose payload names it, so a Send shows exactly what went out."""
    return OutcomeProduced(rid, attempt, seq, terminal, payload=f"{rid}/{attempt}/{seq}")


def outs(rid: str, first: int, count: int, *, terminal: bool = False) -> OutcomesProduced:
    """Outcomes first..first+count-1 as one batch, payloads named as by ``out``."""
    items = tuple((seq, f"{rid}/0/{seq}") for seq in range(first, first + count))
    return OutcomesProduced(rid, 0, items, terminal)


def job(rid: str, attempt: int = 0) -> JobReceived:
    return JobReceived(rid, attempt, payload=f"job {rid}")


READY: tuple[Event, ...] = (Start(), Dialed(), RegistrationAcked(10.0))
BROKEN_THEN_OPEN: tuple[Event, ...] = (StreamBroken("eof"), ReconnectDue(), Dialed())


@dataclass(frozen=True)
class Case:
    given: tuple[Event, ...]
    when: tuple[Event, ...]
    expected: list[Action]
    settings: dict[str, Any] = field(default_factory=dict)


def check(case: Case) -> WorkerCore:
    core = make(**case.settings)
    feed(core, *case.given)
    assert feed(core, *case.when) == case.expected
    return core


# ---- connection, registration, watchdog, back-off, rejection ------------------------------

CONNECTION = {
    "start arms the watchdog and dials the primary": Case(
        (), (Start(),), [ArmWatchdog(90.0), Dial("a:1")]
    ),
    "a second Start is stale": Case((Start(),), (Start(),), []),
    "an open stream only sends the registration": Case(
        (Start(),), (Dialed(),), [SendRegistration(())]
    ),
    "the first ack disarms the watchdog and starts heartbeats": Case(
        (Start(), Dialed()), (RegistrationAcked(7.5),), [DisarmWatchdog(), StartHeartbeat(7.5)]
    ),
    "a later ack only restarts heartbeats": Case(
        (*READY, *BROKEN_THEN_OPEN), (RegistrationAcked(5.0),), [StartHeartbeat(5.0)]
    ),
    "watchdog before the first ack exits 3": Case(
        (Start(), Dialed()),
        (RegisterTimedOut(), Dialed(), RegistrationAcked(1.0)),
        [Exit(3, "registration not acknowledged within 90.0 s")],
    ),
    "watchdog while reconnecting before any ack exits 3": Case(
        (Start(), DialFailed("refused")),
        (RegisterTimedOut(),),
        [Exit(3, "registration not acknowledged within 12.0 s")],
        {"register_timeout_s": 12.0},
    ),
    "watchdog after the first ack is ignored, even disconnected": Case(
        (*READY, StreamBroken("eof")), (RegisterTimedOut(),), []
    ),
    "a failed dial backs off": Case(
        (Start(),), (DialFailed("refused"),), [StopHeartbeat(), ScheduleReconnect(0.1)]
    ),
    "a stream broken while registering backs off": Case(
        (Start(), Dialed()), (StreamBroken("eof"),), [StopHeartbeat(), ScheduleReconnect(0.1)]
    ),
    "a stream broken after working backs off the same way": Case(
        READY, (StreamBroken("eof"),), [StopHeartbeat(), ScheduleReconnect(0.1)]
    ),
    "the reconnect dials the next address": Case(
        (Start(), DialFailed("refused")), (ReconnectDue(),), [Dial("b:2")]
    ),
    "stale ReconnectDue while connected": Case(READY, (ReconnectDue(),), []),
    "stale Dialed while waiting": Case((Start(), DialFailed("x")), (Dialed(),), []),
    "stale DialFailed while registered": Case(READY, (DialFailed("x"),), []),
    "stale StreamBroken while dialing": Case((Start(),), (StreamBroken("x"),), []),
    "stale StreamBroken while waiting (counted once)": Case(
        (*READY, StreamBroken("x")), (StreamBroken("x"),), []
    ),
    "stale ack while dialing": Case((Start(),), (RegistrationAcked(1.0),), []),
    "protocol rejection exits 2 without retrying": Case(
        (Start(), Dialed()),
        (ProtocolRejected("protocol major 2 unsupported"), StreamBroken("eof"), ReconnectDue()),
        [Exit(2, "protocol major 2 unsupported")],
    ),
    "attempts exhausted exits 4": Case(
        (Start(), DialFailed("x"), ReconnectDue(), DialFailed("x"), ReconnectDue()),
        (DialFailed("refused"), ReconnectDue()),
        [StopHeartbeat(), Exit(4, "reconnect attempts exhausted (2); last failure: refused")],
        {"max_reconnect_attempts": 2},
    ),
    "an ack resets the attempt count": Case(
        (Start(), DialFailed("x"), ReconnectDue(), Dialed(), RegistrationAcked(1.0)),
        (StreamBroken("eof"),),
        [StopHeartbeat(), ScheduleReconnect(0.1)],
        {"max_reconnect_attempts": 1},
    ),
    "an open stream without an ack does not reset the count": Case(
        (Start(), DialFailed("x"), ReconnectDue(), Dialed()),
        (StreamBroken("eof"),),
        [StopHeartbeat(), Exit(4, "reconnect attempts exhausted (1); last failure: eof")],
        {"max_reconnect_attempts": 1},
    ),
}


@pytest.mark.parametrize("case", CONNECTION.values(), ids=CONNECTION.keys())
def test_connection(case: Case) -> None:
    check(case)


def test_backoff_doubles_to_the_maximum_and_rotates_addresses() -> None:
    core = make()
    feed(core, Start())
    delays: list[float] = []
    dialed: list[str] = []
    for _ in range(7):
        (stop, schedule) = feed(core, DialFailed("refused"))
        assert stop == StopHeartbeat() and isinstance(schedule, ScheduleReconnect)
        delays.append(schedule.delay_s)
        (dial,) = feed(core, ReconnectDue())
        assert isinstance(dial, Dial)
        dialed.append(dial.address)
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert dialed == ["b:2", "c:3", "a:1", "b:2", "c:3", "a:1", "b:2"]
    assert core.reconnect_attempts == 7


def test_jitter_is_uniform_from_the_injected_random_and_capped_by_the_maximum() -> None:
    core = make(seed=11, reconnect_jitter_s=0.1)
    twin = random.Random(11)  # the core must draw exactly uniform(0, jitter) once per delay
    feed(core, Start())
    for base in (0.1, 0.2, 0.4, 0.8, 1.0):
        (_, schedule) = feed(core, DialFailed("x"))
        assert schedule == ScheduleReconnect(base + twin.uniform(0.0, 0.1))
        feed(core, ReconnectDue())
    capped = make(seed=3, reconnect_jitter_s=5.0, reconnect_max_delay_s=1.0)
    feed(capped, Start())
    delays = []
    for _ in range(200):
        (_, schedule) = feed(capped, DialFailed("x"))
        assert isinstance(schedule, ScheduleReconnect)
        delays.append(schedule.delay_s)
        feed(capped, ReconnectDue())
    assert all(0.1 <= d <= 2.0 for d in delays)
    assert max(delays[10:]) > 1.9 and min(delays[10:]) < 1.1  # the jitter spans [0, 1.0]


def test_backoff_survives_thousands_of_failures() -> None:
    # 2.0 ** 1024 overflows a float: a worker retrying forever must not crash on it.
    core = make()
    feed(core, Start())
    for _ in range(1500):
        (_, schedule) = feed(core, DialFailed("x"))
        feed(core, ReconnectDue())
    assert schedule == ScheduleReconnect(1.0)


# ---- not_leader redirects -----------------------------------------------------------------

NO_LB = {"lb_only_retries": False}
REDIRECTS = {
    "LB_ONLY_RETRIES treats a redirect as a broken stream": Case(
        (Start(), Dialed()),
        (Redirected("d:9"), ReconnectDue()),
        [StopHeartbeat(), ScheduleReconnect(0.1), Dial("b:2")],
    ),
    "without LB_ONLY_RETRIES the hint is dialed at once": Case(
        (Start(), Dialed()), (Redirected("d:9"),), [Dial("d:9")], NO_LB
    ),
    "a redirect of a registered stream stops heartbeats first": Case(
        READY, (Redirected("d:9"),), [StopHeartbeat(), Dial("d:9")], NO_LB
    ),
    "a redirect answering a dial is followed": Case(
        (Start(),), (Redirected("d:9"),), [Dial("d:9")], NO_LB
    ),
    "one redirect past the hop cap backs off and rotates": Case(
        (Start(), Dialed(), Redirected("x:1"), Dialed(), Redirected("y:2"), Dialed()),
        (Redirected("z:3"), ReconnectDue()),
        [StopHeartbeat(), ScheduleReconnect(0.1), Dial("b:2")],
        {**NO_LB, "max_redirect_hops": 2},
    ),
    "an ack starts a new chain of hops": Case(
        (Start(), Dialed(), Redirected("x:1"), Dialed(), RegistrationAcked(1.0)),
        (Redirected("y:2"),),
        [StopHeartbeat(), Dial("y:2")],
        {**NO_LB, "max_redirect_hops": 1},
    ),
    "a failed dial to the hint rotates from the configured list": Case(
        (Start(), Dialed(), Redirected("x:1")),
        (DialFailed("refused"), ReconnectDue()),
        [StopHeartbeat(), ScheduleReconnect(0.1), Dial("b:2")],
        NO_LB,
    ),
    "a redirect while waiting is stale": Case(
        (Start(), DialFailed("x")), (Redirected("d:9"),), [], NO_LB
    ),
}


@pytest.mark.parametrize("case", REDIRECTS.values(), ids=REDIRECTS.keys())
def test_redirects(case: Case) -> None:
    check(case)


def test_the_hop_cap_allows_exactly_max_redirect_hops_in_a_row() -> None:
    core = make(lb_only_retries=False)  # default cap: 5
    feed(core, Start(), Dialed())
    for hop in range(5):
        assert feed(core, Redirected(f"h:{hop}")) == [Dial(f"h:{hop}")]
        assert core.address == f"h:{hop}"
        feed(core, Dialed())
    assert feed(core, Redirected("h:5")) == [StopHeartbeat(), ScheduleReconnect(0.1)]
    assert core.address == "b:2"


# ---- outcomes, acknowledgements and resume ------------------------------------------------

STARTED: tuple[Event, ...] = (*READY, job("r"))
OUTCOMES = {
    "registered: an outcome goes out at once": Case(STARTED, (out("r", 0),), [Send(("r/0/0",))]),
    "disconnected: an outcome is only kept": Case(
        (*STARTED, StreamBroken("eof")), (out("r", 0), out("r", 1, terminal=True)), []
    ),
    "registering: an outcome waits for the ack": Case(
        (*STARTED, *BROKEN_THEN_OPEN), (out("r", 0),), []
    ),
    "the registration lists active runs with nothing sent": Case(
        (*STARTED, StreamBroken("eof"), ReconnectDue()),
        (Dialed(),),
        [SendRegistration((("r", 0, -1),))],
    ),
    "the registration carries the last seq sent, not produced": Case(
        (*STARTED, out("r", 0), out("r", 1), StreamBroken("eof"), out("r", 2), ReconnectDue()),
        (Dialed(),),
        [SendRegistration((("r", 0, 1),))],
    ),
    "resume sends what was produced while disconnected": Case(
        (*STARTED, StreamBroken("eof"), out("r", 0), out("r", 1), ReconnectDue(), Dialed()),
        (RegistrationAcked(10.0, (("r", 0, -1),)),),
        [StartHeartbeat(10.0), Send(("r/0/0", "r/0/1"))],
    ),
    "resume drops what the scheduler already has": Case(
        (*STARTED, out("r", 0), out("r", 1), out("r", 2), *BROKEN_THEN_OPEN),
        (RegistrationAcked(10.0, (("r", 0, 1),)),),
        [StartHeartbeat(10.0), Send(("r/0/2",))],
    ),
    "resume with everything received sends nothing": Case(
        (*STARTED, out("r", 0), out("r", 1), *BROKEN_THEN_OPEN),
        (RegistrationAcked(10.0, (("r", 0, 1),)),),
        [StartHeartbeat(10.0)],
    ),
    "an unlisted request is resent whole, in production order across requests": Case(
        (*STARTED, job("s"), out("r", 0), out("s", 0), StreamBroken("eof")),
        (
            out("r", 1),
            out("s", 1),
            ReconnectDue(),
            Dialed(),
            RegistrationAcked(1.0, (("r", 0, 0),)),
        ),
        [
            Dial("b:2"),
            SendRegistration((("r", 0, 0), ("s", 0, 0))),
            StartHeartbeat(1.0),
            Send(("s/0/0", "r/0/1", "s/0/1")),
        ],
    ),
    "acknowledged outcomes are not resent": Case(
        (*STARTED, out("r", 0), out("r", 1), OutcomeAcked("r", 0, 0), *BROKEN_THEN_OPEN),
        (RegistrationAcked(1.0),),
        [StartHeartbeat(1.0), Send(("r/0/1",))],
    ),
    "a batch of outcomes goes out as one send, in order": Case(
        STARTED, (outs("r", 0, 3, terminal=True),), [Send(("r/0/0", "r/0/1", "r/0/2"))]
    ),
    "a batch produced while disconnected is resent whole after the ack": Case(
        (*STARTED, out("r", 0), StreamBroken("eof"), outs("r", 1, 3), ReconnectDue(), Dialed()),
        (RegistrationAcked(1.0, (("r", 0, 0),)),),
        [StartHeartbeat(1.0), Send(("r/0/1", "r/0/2", "r/0/3"))],
    ),
    "a batch ending in the terminal outcome answers a duplicate job request": Case(
        (*STARTED, outs("r", 0, 2, terminal=True), JobStopped("r", 0)),
        (job("r"),),
        [ReplayResult("r/0/1")],
    ),
    "an empty batch does nothing": Case(STARTED, (outs("r", 0, 0),), []),
    "an ack for an unknown request is ignored": Case(STARTED, (OutcomeAcked("zz", 0, 3),), []),
    "a resume entry for an unknown request is ignored": Case(
        (*READY, *BROKEN_THEN_OPEN),
        (RegistrationAcked(1.0, (("zz", 0, 4),)),),
        [StartHeartbeat(1.0)],
    ),
}


@pytest.mark.parametrize("case", OUTCOMES.values(), ids=OUTCOMES.keys())
def test_outcomes(case: Case) -> None:
    check(case)


def test_buffer_counts_until_acknowledged() -> None:
    core = make()
    feed(core, *STARTED, out("r", 0), out("r", 1), out("r", 2, terminal=True))
    assert core.buffered_count == 3
    feed(core, OutcomeAcked("r", 0, 1))
    assert core.buffered_count == 1
    feed(core, OutcomeAcked("r", 0, 0))  # cumulative: an older ack changes nothing
    assert core.buffered_count == 1
    feed(core, OutcomeAcked("r", 0, 2))
    assert (core.buffered_count, core.active) == (0, (("r", 0),))


# ---- job requests, duplicates, interrupts -------------------------------------------------

FINISHED: tuple[Event, ...] = (*STARTED, out("r", 0, terminal=True), JobStopped("r", 0))
JOBS = {
    "a job request starts a run": Case(READY, (job("r"),), [StartJob("r", 0, "job r")]),
    "the same id and epoch while running is never run twice": Case(STARTED, (job("r"),), []),
    "running with its terminal acked is still not rerun": Case(
        (*STARTED, out("r", 0, terminal=True), OutcomeAcked("r", 0, 0)), (job("r"),), []
    ),
    "stopped but unacknowledged: replay the terminal outcome": Case(
        FINISHED, (job("r"),), [ReplayResult("r/0/0")]
    ),
    "finished and forgotten: replay from memory": Case(
        (*FINISHED, OutcomeAcked("r", 0, 0)), (job("r"),), [ReplayResult("r/0/0")]
    ),
    "another epoch of the same request is a new run": Case(
        (*FINISHED, OutcomeAcked("r", 0, 0)), (job("r", 1),), [StartJob("r", 1, "job r")]
    ),
    "memory is a bounded FIFO": Case(
        (
            *FINISHED,
            OutcomeAcked("r", 0, 0),
            *(job("s"), out("s", 0, terminal=True), JobStopped("s", 0), OutcomeAcked("s", 0, 0)),
        ),
        (job("r"), job("s")),
        [StartJob("r", 0, "job r"), ReplayResult("s/0/0")],
        {"remembered_results": 1},
    ),
    "no memory at all with remembered_results=0": Case(
        (*FINISHED, OutcomeAcked("r", 0, 0)),
        (job("r"),),
        [StartJob("r", 0, "job r")],
        {"remembered_results": 0},
    ),
    "an interrupt cancels the matching epoch": Case(
        (*READY, job("r", 1), job("r", 2)),
        (InterruptReceived("r", 2),),
        [CancelJob("r", 2)],
    ),
    "an interrupt without an epoch cancels every epoch": Case(
        (*READY, job("r", 1), job("s"), job("r", 2)),
        (InterruptReceived("r"),),
        [CancelJob("r", 1), CancelJob("r", 2)],
    ),
    "an interrupt for an unknown or stopped request does nothing": Case(
        FINISHED, (InterruptReceived("zz"), InterruptReceived("r")), []
    ),
}


@pytest.mark.parametrize("case", JOBS.values(), ids=JOBS.keys())
def test_jobs(case: Case) -> None:
    check(case)


def test_stopped_but_unacknowledged_runs_stay_in_the_registration() -> None:
    core = make()
    feed(core, *FINISHED, StreamBroken("eof"), ReconnectDue())
    assert core.active == ()
    assert feed(core, Dialed()) == [SendRegistration((("r", 0, 0),))]


# ---- drain and shutdown -------------------------------------------------------------------


def final(code: int, *, undelivered: int, unacked: int, active: int) -> Exit:
    return Exit(
        code,
        f"final deadline passed: {undelivered} requests undelivered, "
        f"{unacked} outcomes unacknowledged, {active} runs active",
    )


DRAINED: list[Action] = [SendDrainResult(0, 0), CloseStream(), Exit(0, "drained")]
DEADLINES: list[Action] = [ScheduleDrainDeadline(30.0), ScheduleFinalDeadline(60.0)]
DRAIN = {
    "a drain with nothing in flight completes at once": Case(READY, (DrainRequested(),), DRAINED),
    "a signal with nothing in flight completes at once": Case(READY, (SignalReceived(),), DRAINED),
    "a signal while reconnecting with nothing to deliver exits at once": Case(
        (*READY, StreamBroken("eof")), (SignalReceived(),), [Exit(0, "drained")]
    ),
    "a signal while registering closes the unacknowledged stream": Case(
        (Start(), Dialed()), (SignalReceived(),), [CloseStream(), Exit(0, "drained")]
    ),
    "a drain with a run in flight schedules both deadlines": Case(
        STARTED, (DrainRequested(),), DEADLINES
    ),
    "the drain command's timeout sets the first deadline": Case(
        STARTED, (DrainRequested(5.0),), [ScheduleDrainDeadline(5.0), ScheduleFinalDeadline(35.0)]
    ),
    "while draining new jobs are rejected": Case(
        (*STARTED, SignalReceived()), (job("s"),), [RejectJob("s", 0, "draining")]
    ),
    "while draining a duplicate is still answered, not rejected": Case(
        (*FINISHED, job("s"), SignalReceived()), (job("r"), job("s")), [ReplayResult("r/0/0")]
    ),
    "the drain completes when the last outcome is acknowledged": Case(
        (*STARTED, SignalReceived(), out("r", 0, terminal=True), JobStopped("r", 0)),
        (OutcomeAcked("r", 0, 0),),
        DRAINED,
    ),
    "the drain completes when the last run stops": Case(
        (*STARTED, DrainRequested(), out("r", 0, terminal=True), OutcomeAcked("r", 0, 0)),
        (JobStopped("r", 0),),
        DRAINED,
    ),
    "the drain deadline cancels the runs, which then report": Case(
        (*STARTED, job("s"), DrainRequested()),
        (
            *(DrainDeadline(), out("r", 0, terminal=True), out("s", 0, terminal=True)),
            *(JobStopped("r", 0), JobStopped("s", 0)),
            *(OutcomeAcked("r", 0, 0), OutcomeAcked("s", 0, 0)),
        ),
        [
            CancelAllJobs(),
            Send(("r/0/0",)),
            Send(("s/0/0",)),
            SendDrainResult(2, 0),
            CloseStream(),
            Exit(0, "drained"),
        ],
    ),
    "the drain deadline with only undelivered outcomes cancels nothing": Case(
        (*FINISHED, StreamBroken("eof"), SignalReceived()), (DrainDeadline(), DrainDeadline()), []
    ),
    "final deadline, registered, undelivered: report and exit 5": Case(
        (*FINISHED, SignalReceived()),
        (FinalDeadline(),),
        [SendDrainResult(0, 1), CloseStream(), final(5, undelivered=1, unacked=1, active=0)],
    ),
    "final deadline, disconnected, a run that never reported: exit 5": Case(
        (*STARTED, SignalReceived(), DrainDeadline(), StreamBroken("eof")),
        (FinalDeadline(),),
        [final(5, undelivered=1, unacked=0, active=1)],
    ),
    "final deadline, everything delivered but a run still stopping: exit 0": Case(
        (*STARTED, SignalReceived(), out("r", 0, terminal=True), OutcomeAcked("r", 0, 0)),
        (FinalDeadline(),),
        [SendDrainResult(0, 0), CloseStream(), final(0, undelivered=0, unacked=0, active=1)],
    ),
    "deadlines before any drain are stale": Case(STARTED, (DrainDeadline(), FinalDeadline()), []),
    "a second signal exits 1 at once": Case(
        (*STARTED, SignalReceived()), (SignalReceived(),), [Exit(1, "second signal")]
    ),
    "a drain command then a signal: the signal is the first": Case(
        (*STARTED, DrainRequested()),
        (SignalReceived(), DrainRequested(), SignalReceived()),
        [Exit(1, "second signal")],
    ),
    "a signal while reconnecting keeps reconnecting to deliver": Case(
        (*STARTED, out("r", 0, terminal=True), StreamBroken("eof"), JobStopped("r", 0)),
        (
            *(SignalReceived(), ReconnectDue(), Dialed()),
            *(RegistrationAcked(2.0, (("r", 0, -1),)), OutcomeAcked("r", 0, 0)),
        ),
        [
            *DEADLINES,
            Dial("b:2"),
            SendRegistration((("r", 0, 0),)),
            StartHeartbeat(2.0),
            Send(("r/0/0",)),
            *DRAINED,
        ],
    ),
    "nothing is decided after an exit": Case(
        (*READY, SignalReceived()), (SignalReceived(), Start(), job("s"), StreamBroken("x")), []
    ),
}


@pytest.mark.parametrize("case", DRAIN.values(), ids=DRAIN.keys())
def test_drain(case: Case) -> None:
    check(case)


def test_phases_and_properties_through_a_life() -> None:
    core = make()
    seen = [core.phase]
    for event in (Start(), DialFailed("x"), ReconnectDue(), Dialed(), RegistrationAcked(1.0)):
        feed(core, event)
        seen.append(core.phase)
    assert seen == [
        Phase.STARTING,
        Phase.CONNECTING,
        Phase.CONNECTING,
        Phase.CONNECTING,
        Phase.REGISTERING,
        Phase.READY,
    ]
    assert (core.registered, core.draining, core.address, core.link) == (
        True,
        False,
        "b:2",
        Link.REGISTERED,
    )
    feed(core, job("r"), SignalReceived(), StreamBroken("eof"))
    assert (core.phase, core.link, core.registered, core.draining) == (
        Phase.DRAINING,
        Link.WAITING,
        False,
        True,
    )
    assert core.active == (("r", 0),)
    feed(core, out("r", 0, terminal=True), JobStopped("r", 0), ReconnectDue(), Dialed())
    before = core.phase
    assert feed(core, RegistrationAcked(1.0, (("r", 0, 0),))) == [StartHeartbeat(1.0), *DRAINED]
    assert (before, core.phase) == (Phase.DRAINING, Phase.STOPPED)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"addresses": ()}, "at least one scheduler address"),
        ({"addresses": ("a",), "reconnect_delay_s": -0.1}, "reconnect_delay_s"),
        ({"addresses": ("a",), "max_reconnect_attempts": -1}, "max_reconnect_attempts"),
    ],
)
def test_nonsense_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoreConfig(**settings)
