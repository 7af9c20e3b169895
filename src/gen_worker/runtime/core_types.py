"""Events, actions and settings of the worker's pure decision core (:mod:`.core`).

Events are what happened (a dial failed, an outcome was produced, a signal arrived); actions
are what the shell must do about it (dial, arm a timer, send, exit). Both are frozen tagged
unions so the shell can ``match`` on them and tests can compare them with ``==``. Payloads are
opaque to the core: they are the shell's own messages, carried through untouched.
"""

from __future__ import annotations

import enum
from typing import Any, TypeAlias

import msgspec

__all__ = [
    "PHASE_OF_LINK",
    "Action",
    "ArmWatchdog",
    "Assignment",
    "CancelAllJobs",
    "CancelJob",
    "CloseStream",
    "CoreConfig",
    "Dial",
    "DialFailed",
    "Dialed",
    "DisarmWatchdog",
    "DrainDeadline",
    "DrainEvent",
    "DrainRequested",
    "Event",
    "Exit",
    "ExitCode",
    "FinalDeadline",
    "InterruptReceived",
    "JobReceived",
    "JobStopped",
    "LifecycleEvent",
    "Link",
    "LinkEvent",
    "OutcomeAcked",
    "OutcomeProduced",
    "OutcomesProduced",
    "Phase",
    "ProtocolRejected",
    "ReconnectDue",
    "Redirected",
    "RegisterTimedOut",
    "RegistrationAcked",
    "RejectJob",
    "ReplayResult",
    "RequestEvent",
    "RequestKey",
    "ScheduleDrainDeadline",
    "ScheduleFinalDeadline",
    "ScheduleReconnect",
    "Send",
    "SendDrainResult",
    "SendRegistration",
    "SignalReceived",
    "Start",
    "StartHeartbeat",
    "StartJob",
    "StopHeartbeat",
    "StreamBroken",
]

RequestKey: TypeAlias = tuple[str, int]
"""(request_id, attempt_epoch); item-level batches use distinct request ids."""

Assignment: TypeAlias = tuple[str, int, int]
"""(request_id, attempt_epoch, seq); -1 for the seq means none."""


class CoreConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Connection, resume and drain settings (SPEC section 10; defaults as in the seed)."""

    addresses: tuple[str, ...]  # primary first, then SCHEDULER_ADDRS, in order
    reconnect_delay_s: float = 0.1
    reconnect_max_delay_s: float = 1.0
    reconnect_jitter_s: float = 0.1
    max_reconnect_attempts: int = 0  # 0 = forever
    register_timeout_s: float = 90.0
    drain_timeout_s: float = 30.0
    lb_only_retries: bool = True
    max_redirect_hops: int = 5
    remembered_results: int = 1000  # finished requests kept for duplicate job requests

    def __post_init__(self) -> None:
        # Checked here, once, so the core never has to guard against a nonsense setting.
        if not self.addresses:
            raise ValueError("addresses must name at least one scheduler address")
        fields = msgspec.structs.asdict(self).items()
        negative = [name for name, value in fields if name != "addresses" and value < 0]
        if negative:
            raise ValueError(f"must not be negative: {', '.join(negative)}")


class Link(enum.Enum):
    """The state of the connection to the scheduler."""

    IDLE = "idle"  # not started
    DIALING = "dialing"  # a Dial is in flight
    WAITING = "waiting"  # a ScheduleReconnect is pending
    REGISTERING = "registering"  # stream open, registration sent, no acknowledgement yet
    REGISTERED = "registered"  # the scheduler acknowledged this stream's registration


class Phase(enum.Enum):
    """The worker's lifecycle (DESIGN habit 6), folding the link in while it matters."""

    STARTING = "starting"
    CONNECTING = "connecting"  # dialing or waiting to redial
    REGISTERING = "registering"
    READY = "ready"
    DRAINING = "draining"  # whatever the link is doing; see WorkerCore.link
    STOPPED = "stopped"  # an Exit was emitted; every later event is ignored


PHASE_OF_LINK = {
    Link.IDLE: Phase.STARTING,
    Link.DIALING: Phase.CONNECTING,
    Link.WAITING: Phase.CONNECTING,
    Link.REGISTERING: Phase.REGISTERING,
    Link.REGISTERED: Phase.READY,
}


class ExitCode(enum.IntEnum):
    """Process exit codes: 0 for a clean drain, non-zero for every fatal ending (SPEC 10)."""

    DRAINED = 0
    SECOND_SIGNAL = 1
    PROTOCOL_REJECTED = 2
    REGISTER_TIMEOUT = 3
    RECONNECT_EXHAUSTED = 4
    UNDELIVERED = 5


# ---- the core's own records (not for the shell) ----------------------------------------


class BufferedOutcome(msgspec.Struct, frozen=True, gc=False):
    """One outcome the core keeps until the scheduler acknowledges it.

    (``gc=False``, like RequestRecord: plain data with no way back to itself, kept by the
    thousand while acknowledgements are in flight.)
    """

    seq: int
    payload: Any
    order: int  # position in the worker-wide production order


class RequestRecord(msgspec.Struct, gc=False):
    """What the core knows of one (request_id, attempt): its run and its undelivered outcomes."""

    running: bool = False
    outcomes: list[BufferedOutcome] = []  # produced, not acknowledged, in seq order
    last_sent: int = -1  # highest seq put on the wire on any stream
    has_terminal: bool = False
    terminal: Any = None  # the terminal payload, for duplicate job requests

    @property
    def delivered(self) -> bool:
        # The terminal outcome is the last one and acks are cumulative.
        return self.has_terminal and not self.outcomes


# ---- events: what happened -------------------------------------------------------------


class Start(msgspec.Struct, frozen=True, tag=True):
    """The process is ready to connect."""


class Dialed(msgspec.Struct, frozen=True, tag=True):
    """The stream the last Dial asked for is open."""


class DialFailed(msgspec.Struct, frozen=True, tag=True):
    reason: str


class StreamBroken(msgspec.Struct, frozen=True, tag=True):
    """An open stream ended (for a not_leader ending the shell sends Redirected instead)."""

    reason: str


class ReconnectDue(msgspec.Struct, frozen=True, tag=True):
    """The timer of the last ScheduleReconnect fired."""


class RegistrationAcked(msgspec.Struct, frozen=True, tag=True):
    """The scheduler acknowledged the registration; ``resume`` is what it already received."""

    heartbeat_interval_s: float
    resume: tuple[Assignment, ...] = ()  # (request_id, attempt, received_through_seq)


class ProtocolRejected(msgspec.Struct, frozen=True, tag=True):
    """The scheduler refused our protocol version: fatal, never retried."""

    reason: str


class Redirected(msgspec.Struct, frozen=True, tag=True):
    """A ``not_leader:<address>`` hint ended the stream (or the dial)."""

    address: str


class RegisterTimedOut(msgspec.Struct, frozen=True, tag=True):
    """The watchdog of ArmWatchdog fired."""


class OutcomeProduced(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    attempt: int
    seq: int
    terminal: bool
    payload: Any  # the shell's message, sent as is


class OutcomesProduced(msgspec.Struct, frozen=True, tag=True):
    """Several outcomes of one request at once, in seq order; the last may be its terminal.

    The same as one OutcomeProduced per item, in order, with the sends merged into one
    action: a request's outcomes usually arrive together (a no-op request's ten at once), and
    each event through the core costs a dispatch, an action and a write of its own.
    """

    request_id: str
    attempt: int
    items: tuple[tuple[int, Any], ...]  # (seq, payload)
    terminal: bool  # whether the last item is the terminal outcome


class OutcomeAcked(msgspec.Struct, frozen=True, tag=True):
    """The scheduler has every outcome of the request up to ``through_seq`` (cumulative)."""

    request_id: str
    attempt: int
    through_seq: int


class JobReceived(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    attempt: int
    payload: Any


class JobStopped(msgspec.Struct, frozen=True, tag=True):
    """The local run really ended: its slot is free and it will produce nothing more."""

    request_id: str
    attempt: int


class InterruptReceived(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    attempt: int | None = None  # None: every attempt of the request


class DrainRequested(msgspec.Struct, frozen=True, tag=True):
    """The scheduler's drain command; ``timeout_s`` None means WORKER_DRAIN_TIMEOUT_SECONDS."""

    timeout_s: float | None = None


class SignalReceived(msgspec.Struct, frozen=True, tag=True):
    """SIGTERM or SIGINT."""


class DrainDeadline(msgspec.Struct, frozen=True, tag=True):
    """The timer of ScheduleDrainDeadline fired."""


class FinalDeadline(msgspec.Struct, frozen=True, tag=True):
    """The timer of ScheduleFinalDeadline fired."""


# Grouped by concern so the core dispatches each group to a small handler.
LinkEvent: TypeAlias = (
    Dialed | DialFailed | StreamBroken | ReconnectDue | Redirected | RegistrationAcked
)
RequestEvent: TypeAlias = (
    OutcomesProduced | OutcomeProduced | OutcomeAcked | JobReceived | JobStopped | InterruptReceived
)
LifecycleEvent: TypeAlias = Start | RegisterTimedOut | ProtocolRejected
DrainEvent: TypeAlias = SignalReceived | DrainRequested | DrainDeadline | FinalDeadline
Event: TypeAlias = LinkEvent | RequestEvent | LifecycleEvent | DrainEvent

# ---- actions: what the shell must do ---------------------------------------------------


class Dial(msgspec.Struct, frozen=True, tag=True):
    """Open a stream to ``address``; answer with Dialed, DialFailed or Redirected."""

    address: str


class ScheduleReconnect(msgspec.Struct, frozen=True, tag=True):
    """Send ReconnectDue after ``delay_s``."""

    delay_s: float


class SendRegistration(msgspec.Struct, frozen=True, tag=True):
    assignments: tuple[Assignment, ...]  # (request_id, attempt, last_seq_sent)


class Send(msgspec.Struct, frozen=True, tag=True):
    """Send these outcome payloads, in this order."""

    payloads: tuple[Any, ...]


class StartHeartbeat(msgspec.Struct, frozen=True, tag=True):
    interval_s: float


class StopHeartbeat(msgspec.Struct, frozen=True, tag=True):
    """Stop sending heartbeats (the stream is gone)."""


class ArmWatchdog(msgspec.Struct, frozen=True, tag=True):
    """Send RegisterTimedOut after ``timeout_s``."""

    timeout_s: float


class DisarmWatchdog(msgspec.Struct, frozen=True, tag=True):
    """The registration was acknowledged: cancel the watchdog."""


class StartJob(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    attempt: int
    payload: Any


class ReplayResult(msgspec.Struct, frozen=True, tag=True):
    """Answer a duplicate job request with the terminal outcome already produced."""

    payload: Any


class RejectJob(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    attempt: int
    reason: str


class CancelJob(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    attempt: int


class CancelAllJobs(msgspec.Struct, frozen=True, tag=True):
    """Cancel every run still active (the drain deadline passed)."""


class ScheduleDrainDeadline(msgspec.Struct, frozen=True, tag=True):
    """Send DrainDeadline after ``delay_s``."""

    delay_s: float


class ScheduleFinalDeadline(msgspec.Struct, frozen=True, tag=True):
    """Send FinalDeadline after ``delay_s`` (counted from the same moment as the drain one)."""

    delay_s: float


class SendDrainResult(msgspec.Struct, frozen=True, tag=True):
    canceled: int  # runs the drain deadline canceled
    undelivered: int  # requests whose terminal outcome the scheduler has not acknowledged


class CloseStream(msgspec.Struct, frozen=True, tag=True):
    """Send what is queued, then close the stream."""


class Exit(msgspec.Struct, frozen=True, tag=True):
    """End the process with ``code``; the core ignores every event after this."""

    code: int
    reason: str


Action: TypeAlias = (
    Dial
    | ScheduleReconnect
    | SendRegistration
    | Send
    | StartHeartbeat
    | StopHeartbeat
    | ArmWatchdog
    | DisarmWatchdog
    | StartJob
    | ReplayResult
    | RejectJob
    | CancelJob
    | CancelAllJobs
    | ScheduleDrainDeadline
    | ScheduleFinalDeadline
    | SendDrainResult
    | CloseStream
    | Exit
)
