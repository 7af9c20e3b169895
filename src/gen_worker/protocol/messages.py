"""The wire protocol as typed messages: what the rest of the worker sees instead of protobuf.

Each message mirrors one message of ``pb/worker.proto`` field for field (same names), and the
two envelopes are tagged unions whose tags are the proto's oneof field names, so conversion
(:mod:`gen_worker.protocol.convert`) is mechanical. Sections follow the direction of travel.
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec

__all__ = [
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "Ack",
    "Assignment",
    "BatchJobRequest",
    "BatchResult",
    "Drain",
    "DrainResult",
    "EndpointConfig",
    "FunctionAvailability",
    "FunctionInfo",
    "GpuInfo",
    "Heartbeat",
    "HostInfo",
    "Interrupt",
    "JobDelta",
    "JobEvent",
    "JobRequest",
    "JobResult",
    "Keyspace",
    "LoadModel",
    "LoadModelResult",
    "ModelInventory",
    "ModelUrlRefreshRequest",
    "ModelUrlRefreshResponse",
    "ProtocolVersion",
    "Received",
    "RegistrationAck",
    "RequestRef",
    "ResolvedFile",
    "ResolvedModel",
    "RuntimeBatchingConfig",
    "RuntimeBatchingConfigResult",
    "SchedulerEvent",
    "SchedulerMessage",
    "StreamDone",
    "StreamError",
    "UnloadModel",
    "UnloadModelResult",
    "WorkerEvent",
    "WorkerMessage",
    "WorkerRegistration",
]

#: A scheduler refuses a different major; minors are backward compatible additions.
PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0


class _Msg(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Base: keyword-only construction.

    Every default is the proto3 default of its field (zero, empty, False): proto3 does not
    send a field holding its default, so any other default would change a value in transit.

    ``gc=False``: messages are plain data that never refer back to themselves, so the cycle
    collector need not track them; a scheduler keeps many thousands of them, and tracked they
    made its every collection walk them all.
    """


# -- shared -----------------------------------------------------------------------------------


class ProtocolVersion(_Msg):
    major: int = PROTOCOL_MAJOR
    minor: int = PROTOCOL_MINOR


class RequestRef(_Msg):
    request_id: str
    item_id: str = ""
    attempt_epoch: int = 0
    seq: int = 0


class ResolvedFile(_Msg):
    path: str
    size_bytes: int = 0
    blake3: str = ""
    url: str = ""


class ResolvedModel(_Msg):
    ref: str
    snapshot_digest: str = ""
    files: list[ResolvedFile] = []


class ModelInventory(_Msg):
    hot: list[str] = []
    warm: list[str] = []
    downloading: list[str] = []
    loading: list[str] = []


class Received(_Msg):
    """How much of a request the scheduler holds: the outcomes with seq < ``received_count``."""

    request_id: str
    attempt_epoch: int = 0
    received_count: int = 0


# -- worker -> scheduler ------------------------------------------------------------------------


class FunctionInfo(_Msg):
    name: str
    python_name: str = ""
    streaming: bool = False
    is_async: bool = False
    input_schema: str = ""
    output_schema: str = ""
    delta_schema: str = ""
    input_schema_sha256: str = ""
    output_schema_sha256: str = ""
    capacity: int = 0
    batch_dimension: str = ""
    resources_json: bytes = b""


class GpuInfo(_Msg):
    index: int = 0
    name: str = ""
    total_vram_bytes: int = 0
    used_vram_bytes: int = 0
    free_vram_bytes: int = 0
    compute_capability: str = ""


class HostInfo(_Msg):
    cpu_count: int = 0
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    gpus: list[GpuInfo] = []
    driver_version: str = ""
    cuda_version: str = ""
    torch_version: str = ""
    libraries: dict[str, str] = {}
    image_digest: str = ""
    git_commit: str = ""
    build_time: str = ""
    python_version: str = ""
    hostname: str = ""


class Assignment(_Msg):
    """A request this worker runs; it has sent the outcomes with seq < ``sent_count``."""

    request_id: str
    item_id: str = ""
    attempt_epoch: int = 0
    sent_count: int = 0


class WorkerRegistration(_Msg, tag="registration"):
    worker_id: str
    release_id: str = ""
    protocol: ProtocolVersion = msgspec.field(default_factory=ProtocolVersion)
    endpoint_name: str = ""
    functions: list[FunctionInfo] = []
    max_concurrency: int = 1
    host: HostInfo = msgspec.field(default_factory=HostInfo)
    models: ModelInventory = msgspec.field(default_factory=ModelInventory)
    gpu_busy: bool = False
    draining: bool = False
    assignments: list[Assignment] = []


class Heartbeat(_Msg, tag="heartbeat"):
    models: ModelInventory = msgspec.field(default_factory=ModelInventory)
    running: int = 0
    waiting: int = 0
    gpu_busy: bool = False
    draining: bool = False
    assignments: list[Assignment] = []


class JobResult(_Msg, tag="job_result"):
    ref: RequestRef
    success: bool = False
    output: bytes = b""
    error_type: str = ""
    retryable: bool = False
    safe_message: str = ""
    error_message: str = ""
    timing_ms: dict[str, float] = {}


class JobEvent(_Msg, tag="job_event"):
    ref: RequestRef
    event_type: str
    payload_json: bytes = b"{}"


class JobDelta(_Msg, tag="job_delta"):
    ref: RequestRef
    data: bytes = b""


class StreamDone(_Msg, tag="stream_done"):
    ref: RequestRef
    delta_count: int = 0
    timing_ms: dict[str, float] = {}


class StreamError(_Msg, tag="stream_error"):
    ref: RequestRef
    error_type: str = ""
    retryable: bool = False
    safe_message: str = ""
    error_message: str = ""
    timing_ms: dict[str, float] = {}


class LoadModelResult(_Msg, tag="load_model_result"):
    model_id: str
    ok: bool = False
    reason: str = ""
    error_message: str = ""


class UnloadModelResult(_Msg, tag="unload_model_result"):
    model_id: str
    ok: bool = False
    reason: str = ""
    error_message: str = ""


class ModelUrlRefreshRequest(_Msg, tag="url_refresh_request"):
    model_ref: str
    paths: list[str] = []
    request_id: str = ""


class RuntimeBatchingConfigResult(_Msg, tag="batching_config_result"):
    function_name: str
    ok: bool = False
    error_message: str = ""


class FunctionAvailability(_Msg, tag="function_availability"):
    function_name: str
    available: bool = False
    reason: str = ""


class DrainResult(_Msg, tag="drain_result"):
    completed: int = 0
    canceled: int = 0
    undelivered: int = 0
    reason: str = ""


class BatchResult(_Msg, tag="batch_result"):
    batch_id: str
    function_name: str = ""
    results: list[JobResult] = []
    #: The batch run's own request position (request_id = batch_id), for acks and resumes.
    ref: RequestRef | None = None


class WorkerEvent(_Msg, tag="worker_event"):
    event_type: str
    payload_json: bytes = b"{}"


WorkerMessage: TypeAlias = (
    WorkerRegistration
    | Heartbeat
    | JobResult
    | JobEvent
    | JobDelta
    | StreamDone
    | StreamError
    | LoadModelResult
    | UnloadModelResult
    | ModelUrlRefreshRequest
    | RuntimeBatchingConfigResult
    | FunctionAvailability
    | DrainResult
    | BatchResult
    | WorkerEvent
)


# -- scheduler -> worker ------------------------------------------------------------------------


class RegistrationAck(_Msg, tag="registration_ack"):
    accepted: ProtocolVersion = msgspec.field(default_factory=ProtocolVersion)
    heartbeat_interval_s: float = 10.0
    resume: list[Received] = []
    worker_id: str = ""


class Ack(_Msg, tag="ack"):
    received: list[Received] = []


class JobRequest(_Msg, tag="job_request"):
    request_id: str
    function_name: str
    payload: bytes = b""
    job_id: str = ""
    required_models: list[str] = []
    timeout_ms: int = 0
    owner: str = ""
    invoker_id: str = ""
    file_base_url: str = ""
    file_token: str = ""
    capability_token: str = ""
    resolved_models: list[ResolvedModel] = []
    parent_request_id: str = ""
    child_request_id: str = ""
    item_id: str = ""
    item_index: int = 0
    attempt_epoch: int = 0
    resolved_compute_json: bytes = b""

    def __repr__(self) -> str:  # tokens must never reach a log line
        return (
            f"JobRequest(request_id={self.request_id!r}, function_name={self.function_name!r}, "
            f"attempt_epoch={self.attempt_epoch}, item_id={self.item_id!r}, "
            f"payload=<{len(self.payload)} bytes>, tokens=[REDACTED])"
        )


class BatchJobRequest(_Msg, tag="batch_job_request"):
    batch_id: str
    function_name: str
    items: list[JobRequest] = []


class Interrupt(_Msg, tag="interrupt"):
    request_id: str
    item_ids: list[str] = []
    queued_only: bool = False
    attempt_epoch: int = 0
    any_attempt: bool = False


class LoadModel(_Msg, tag="load_model"):
    model_id: str


class UnloadModel(_Msg, tag="unload_model"):
    model_id: str


class Keyspace(_Msg):
    models: dict[str, str] = {}


class EndpointConfig(_Msg, tag="endpoint_config"):
    release_id: str = ""
    resolved_models: list[ResolvedModel] = []
    required_models: list[str] = []
    keyspaces: dict[str, Keyspace] = {}
    disabled_functions: list[str] = []


class ModelUrlRefreshResponse(_Msg, tag="url_refresh_response"):
    model: ResolvedModel | None = None
    error_message: str = ""


class RuntimeBatchingConfig(_Msg, tag="batching_config"):
    function_name: str
    preferred_batch_size: int = 0
    max_wait_ms: int = 0
    prefetch_depth: int = 0


class Drain(_Msg, tag="drain"):
    reason: str = ""
    deadline_s: float = 0.0
    terminate_after_deadline: bool = False


class SchedulerEvent(_Msg, tag="scheduler_event"):
    event_type: str
    payload_json: bytes = b"{}"
    #: Set with ``event_type == "jwt.rotated"``: the token for the next connection.
    jwt: str = ""

    def __repr__(self) -> str:  # the token must never reach a log line
        jwt = "[REDACTED]" if self.jwt else ""
        return f"SchedulerEvent(event_type={self.event_type!r}, jwt={jwt!r})"


SchedulerMessage: TypeAlias = (
    RegistrationAck
    | Ack
    | JobRequest
    | BatchJobRequest
    | Interrupt
    | LoadModel
    | UnloadModel
    | EndpointConfig
    | ModelUrlRefreshResponse
    | RuntimeBatchingConfig
    | Drain
    | SchedulerEvent
)
