from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(_message.Message):
    __slots__ = ("major", "minor")
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    major: int
    minor: int
    def __init__(self, major: _Optional[int] = ..., minor: _Optional[int] = ...) -> None: ...

class RequestRef(_message.Message):
    __slots__ = ("request_id", "item_id", "attempt_epoch", "seq")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_id: str
    attempt_epoch: int
    seq: int
    def __init__(self, request_id: _Optional[str] = ..., item_id: _Optional[str] = ..., attempt_epoch: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class ResolvedFile(_message.Message):
    __slots__ = ("path", "size_bytes", "blake3", "url")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLAKE3_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    blake3: str
    url: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., blake3: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class ResolvedModel(_message.Message):
    __slots__ = ("ref", "snapshot_digest", "files")
    REF_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    ref: str
    snapshot_digest: str
    files: _containers.RepeatedCompositeFieldContainer[ResolvedFile]
    def __init__(self, ref: _Optional[str] = ..., snapshot_digest: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ResolvedFile, _Mapping]]] = ...) -> None: ...

class ModelInventory(_message.Message):
    __slots__ = ("hot", "warm", "downloading", "loading")
    HOT_FIELD_NUMBER: _ClassVar[int]
    WARM_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADING_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    hot: _containers.RepeatedScalarFieldContainer[str]
    warm: _containers.RepeatedScalarFieldContainer[str]
    downloading: _containers.RepeatedScalarFieldContainer[str]
    loading: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hot: _Optional[_Iterable[str]] = ..., warm: _Optional[_Iterable[str]] = ..., downloading: _Optional[_Iterable[str]] = ..., loading: _Optional[_Iterable[str]] = ...) -> None: ...

class Received(_message.Message):
    __slots__ = ("request_id", "attempt_epoch", "received_count")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_COUNT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt_epoch: int
    received_count: int
    def __init__(self, request_id: _Optional[str] = ..., attempt_epoch: _Optional[int] = ..., received_count: _Optional[int] = ...) -> None: ...

class FunctionInfo(_message.Message):
    __slots__ = ("name", "python_name", "streaming", "is_async", "input_schema", "output_schema", "delta_schema", "input_schema_sha256", "output_schema_sha256", "capacity", "batch_dimension", "resources_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PYTHON_NAME_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    IS_ASYNC_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    DELTA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_SHA256_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    BATCH_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    python_name: str
    streaming: bool
    is_async: bool
    input_schema: str
    output_schema: str
    delta_schema: str
    input_schema_sha256: str
    output_schema_sha256: str
    capacity: int
    batch_dimension: str
    resources_json: bytes
    def __init__(self, name: _Optional[str] = ..., python_name: _Optional[str] = ..., streaming: _Optional[bool] = ..., is_async: _Optional[bool] = ..., input_schema: _Optional[str] = ..., output_schema: _Optional[str] = ..., delta_schema: _Optional[str] = ..., input_schema_sha256: _Optional[str] = ..., output_schema_sha256: _Optional[str] = ..., capacity: _Optional[int] = ..., batch_dimension: _Optional[str] = ..., resources_json: _Optional[bytes] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("index", "name", "total_vram_bytes", "used_vram_bytes", "free_vram_bytes", "compute_capability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    total_vram_bytes: int
    used_vram_bytes: int
    free_vram_bytes: int
    compute_capability: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., total_vram_bytes: _Optional[int] = ..., used_vram_bytes: _Optional[int] = ..., free_vram_bytes: _Optional[int] = ..., compute_capability: _Optional[str] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("cpu_count", "ram_total_bytes", "ram_available_bytes", "gpus", "driver_version", "cuda_version", "torch_version", "libraries", "image_digest", "git_commit", "build_time", "python_version", "hostname")
    class LibrariesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIBRARIES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GIT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    BUILD_TIME_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    driver_version: str
    cuda_version: str
    torch_version: str
    libraries: _containers.ScalarMap[str, str]
    image_digest: str
    git_commit: str
    build_time: str
    python_version: str
    hostname: str
    def __init__(self, cpu_count: _Optional[int] = ..., ram_total_bytes: _Optional[int] = ..., ram_available_bytes: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., driver_version: _Optional[str] = ..., cuda_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., libraries: _Optional[_Mapping[str, str]] = ..., image_digest: _Optional[str] = ..., git_commit: _Optional[str] = ..., build_time: _Optional[str] = ..., python_version: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("request_id", "item_id", "attempt_epoch", "sent_count")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_id: str
    attempt_epoch: int
    sent_count: int
    def __init__(self, request_id: _Optional[str] = ..., item_id: _Optional[str] = ..., attempt_epoch: _Optional[int] = ..., sent_count: _Optional[int] = ...) -> None: ...

class WorkerRegistration(_message.Message):
    __slots__ = ("worker_id", "release_id", "protocol", "endpoint_name", "functions", "max_concurrency", "host", "models", "gpu_busy", "draining", "assignments")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_NAME_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    GPU_BUSY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    release_id: str
    protocol: ProtocolVersion
    endpoint_name: str
    functions: _containers.RepeatedCompositeFieldContainer[FunctionInfo]
    max_concurrency: int
    host: HostInfo
    models: ModelInventory
    gpu_busy: bool
    draining: bool
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, worker_id: _Optional[str] = ..., release_id: _Optional[str] = ..., protocol: _Optional[_Union[ProtocolVersion, _Mapping]] = ..., endpoint_name: _Optional[str] = ..., functions: _Optional[_Iterable[_Union[FunctionInfo, _Mapping]]] = ..., max_concurrency: _Optional[int] = ..., host: _Optional[_Union[HostInfo, _Mapping]] = ..., models: _Optional[_Union[ModelInventory, _Mapping]] = ..., gpu_busy: _Optional[bool] = ..., draining: _Optional[bool] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("models", "running", "waiting", "gpu_busy", "draining", "assignments")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    GPU_BUSY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    models: ModelInventory
    running: int
    waiting: int
    gpu_busy: bool
    draining: bool
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, models: _Optional[_Union[ModelInventory, _Mapping]] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., gpu_busy: _Optional[bool] = ..., draining: _Optional[bool] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("ref", "success", "output", "error_type", "retryable", "safe_message", "error_message", "timing_ms")
    class TimingMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    SAFE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_MS_FIELD_NUMBER: _ClassVar[int]
    ref: RequestRef
    success: bool
    output: bytes
    error_type: str
    retryable: bool
    safe_message: str
    error_message: str
    timing_ms: _containers.ScalarMap[str, float]
    def __init__(self, ref: _Optional[_Union[RequestRef, _Mapping]] = ..., success: _Optional[bool] = ..., output: _Optional[bytes] = ..., error_type: _Optional[str] = ..., retryable: _Optional[bool] = ..., safe_message: _Optional[str] = ..., error_message: _Optional[str] = ..., timing_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("ref", "event_type", "payload_json")
    REF_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    ref: RequestRef
    event_type: str
    payload_json: bytes
    def __init__(self, ref: _Optional[_Union[RequestRef, _Mapping]] = ..., event_type: _Optional[str] = ..., payload_json: _Optional[bytes] = ...) -> None: ...

class JobDelta(_message.Message):
    __slots__ = ("ref", "data")
    REF_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ref: RequestRef
    data: bytes
    def __init__(self, ref: _Optional[_Union[RequestRef, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamDone(_message.Message):
    __slots__ = ("ref", "delta_count", "timing_ms")
    class TimingMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    DELTA_COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMING_MS_FIELD_NUMBER: _ClassVar[int]
    ref: RequestRef
    delta_count: int
    timing_ms: _containers.ScalarMap[str, float]
    def __init__(self, ref: _Optional[_Union[RequestRef, _Mapping]] = ..., delta_count: _Optional[int] = ..., timing_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("ref", "error_type", "retryable", "safe_message", "error_message", "timing_ms")
    class TimingMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    SAFE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_MS_FIELD_NUMBER: _ClassVar[int]
    ref: RequestRef
    error_type: str
    retryable: bool
    safe_message: str
    error_message: str
    timing_ms: _containers.ScalarMap[str, float]
    def __init__(self, ref: _Optional[_Union[RequestRef, _Mapping]] = ..., error_type: _Optional[str] = ..., retryable: _Optional[bool] = ..., safe_message: _Optional[str] = ..., error_message: _Optional[str] = ..., timing_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ModelCommandResult(_message.Message):
    __slots__ = ("model_id", "ok", "reason", "error_message")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    ok: bool
    reason: str
    error_message: str
    def __init__(self, model_id: _Optional[str] = ..., ok: _Optional[bool] = ..., reason: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class ModelUrlRefreshRequest(_message.Message):
    __slots__ = ("model_ref", "paths", "request_id")
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_ref: str
    paths: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, model_ref: _Optional[str] = ..., paths: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RuntimeBatchingConfigResult(_message.Message):
    __slots__ = ("function_name", "ok", "error_message")
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    function_name: str
    ok: bool
    error_message: str
    def __init__(self, function_name: _Optional[str] = ..., ok: _Optional[bool] = ..., error_message: _Optional[str] = ...) -> None: ...

class FunctionAvailability(_message.Message):
    __slots__ = ("function_name", "available", "reason")
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    function_name: str
    available: bool
    reason: str
    def __init__(self, function_name: _Optional[str] = ..., available: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainResult(_message.Message):
    __slots__ = ("completed", "canceled", "undelivered", "reason")
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    CANCELED_FIELD_NUMBER: _ClassVar[int]
    UNDELIVERED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    completed: int
    canceled: int
    undelivered: int
    reason: str
    def __init__(self, completed: _Optional[int] = ..., canceled: _Optional[int] = ..., undelivered: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("batch_id", "function_name", "results", "ref")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    function_name: str
    results: _containers.RepeatedCompositeFieldContainer[JobResult]
    ref: RequestRef
    def __init__(self, batch_id: _Optional[str] = ..., function_name: _Optional[str] = ..., results: _Optional[_Iterable[_Union[JobResult, _Mapping]]] = ..., ref: _Optional[_Union[RequestRef, _Mapping]] = ...) -> None: ...

class WorkerEvent(_message.Message):
    __slots__ = ("event_type", "payload_json")
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    event_type: str
    payload_json: bytes
    def __init__(self, event_type: _Optional[str] = ..., payload_json: _Optional[bytes] = ...) -> None: ...

class WorkerMessages(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[WorkerMessage]
    def __init__(self, items: _Optional[_Iterable[_Union[WorkerMessage, _Mapping]]] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("registration", "heartbeat", "job_result", "job_event", "job_delta", "stream_done", "stream_error", "load_model_result", "unload_model_result", "url_refresh_request", "batching_config_result", "function_availability", "drain_result", "batch_result", "worker_event", "batch")
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    JOB_RESULT_FIELD_NUMBER: _ClassVar[int]
    JOB_EVENT_FIELD_NUMBER: _ClassVar[int]
    JOB_DELTA_FIELD_NUMBER: _ClassVar[int]
    STREAM_DONE_FIELD_NUMBER: _ClassVar[int]
    STREAM_ERROR_FIELD_NUMBER: _ClassVar[int]
    LOAD_MODEL_RESULT_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_MODEL_RESULT_FIELD_NUMBER: _ClassVar[int]
    URL_REFRESH_REQUEST_FIELD_NUMBER: _ClassVar[int]
    BATCHING_CONFIG_RESULT_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_AVAILABILITY_FIELD_NUMBER: _ClassVar[int]
    DRAIN_RESULT_FIELD_NUMBER: _ClassVar[int]
    BATCH_RESULT_FIELD_NUMBER: _ClassVar[int]
    WORKER_EVENT_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    registration: WorkerRegistration
    heartbeat: Heartbeat
    job_result: JobResult
    job_event: JobEvent
    job_delta: JobDelta
    stream_done: StreamDone
    stream_error: StreamError
    load_model_result: ModelCommandResult
    unload_model_result: ModelCommandResult
    url_refresh_request: ModelUrlRefreshRequest
    batching_config_result: RuntimeBatchingConfigResult
    function_availability: FunctionAvailability
    drain_result: DrainResult
    batch_result: BatchResult
    worker_event: WorkerEvent
    batch: WorkerMessages
    def __init__(self, registration: _Optional[_Union[WorkerRegistration, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., job_result: _Optional[_Union[JobResult, _Mapping]] = ..., job_event: _Optional[_Union[JobEvent, _Mapping]] = ..., job_delta: _Optional[_Union[JobDelta, _Mapping]] = ..., stream_done: _Optional[_Union[StreamDone, _Mapping]] = ..., stream_error: _Optional[_Union[StreamError, _Mapping]] = ..., load_model_result: _Optional[_Union[ModelCommandResult, _Mapping]] = ..., unload_model_result: _Optional[_Union[ModelCommandResult, _Mapping]] = ..., url_refresh_request: _Optional[_Union[ModelUrlRefreshRequest, _Mapping]] = ..., batching_config_result: _Optional[_Union[RuntimeBatchingConfigResult, _Mapping]] = ..., function_availability: _Optional[_Union[FunctionAvailability, _Mapping]] = ..., drain_result: _Optional[_Union[DrainResult, _Mapping]] = ..., batch_result: _Optional[_Union[BatchResult, _Mapping]] = ..., worker_event: _Optional[_Union[WorkerEvent, _Mapping]] = ..., batch: _Optional[_Union[WorkerMessages, _Mapping]] = ...) -> None: ...

class RegistrationAck(_message.Message):
    __slots__ = ("accepted", "heartbeat_interval_s", "resume", "worker_id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: ProtocolVersion
    heartbeat_interval_s: float
    resume: _containers.RepeatedCompositeFieldContainer[Received]
    worker_id: str
    def __init__(self, accepted: _Optional[_Union[ProtocolVersion, _Mapping]] = ..., heartbeat_interval_s: _Optional[float] = ..., resume: _Optional[_Iterable[_Union[Received, _Mapping]]] = ..., worker_id: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: _containers.RepeatedCompositeFieldContainer[Received]
    def __init__(self, received: _Optional[_Iterable[_Union[Received, _Mapping]]] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("request_id", "job_id", "function_name", "payload", "required_models", "timeout_ms", "owner", "invoker_id", "file_base_url", "file_token", "capability_token", "resolved_models", "parent_request_id", "child_request_id", "item_id", "item_index", "attempt_epoch", "resolved_compute_json")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_MODELS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    INVOKER_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_BASE_URL_FIELD_NUMBER: _ClassVar[int]
    FILE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    PARENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHILD_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_COMPUTE_JSON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    job_id: str
    function_name: str
    payload: bytes
    required_models: _containers.RepeatedScalarFieldContainer[str]
    timeout_ms: int
    owner: str
    invoker_id: str
    file_base_url: str
    file_token: str
    capability_token: str
    resolved_models: _containers.RepeatedCompositeFieldContainer[ResolvedModel]
    parent_request_id: str
    child_request_id: str
    item_id: str
    item_index: int
    attempt_epoch: int
    resolved_compute_json: bytes
    def __init__(self, request_id: _Optional[str] = ..., job_id: _Optional[str] = ..., function_name: _Optional[str] = ..., payload: _Optional[bytes] = ..., required_models: _Optional[_Iterable[str]] = ..., timeout_ms: _Optional[int] = ..., owner: _Optional[str] = ..., invoker_id: _Optional[str] = ..., file_base_url: _Optional[str] = ..., file_token: _Optional[str] = ..., capability_token: _Optional[str] = ..., resolved_models: _Optional[_Iterable[_Union[ResolvedModel, _Mapping]]] = ..., parent_request_id: _Optional[str] = ..., child_request_id: _Optional[str] = ..., item_id: _Optional[str] = ..., item_index: _Optional[int] = ..., attempt_epoch: _Optional[int] = ..., resolved_compute_json: _Optional[bytes] = ...) -> None: ...

class BatchJobRequest(_message.Message):
    __slots__ = ("batch_id", "function_name", "items")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    function_name: str
    items: _containers.RepeatedCompositeFieldContainer[JobRequest]
    def __init__(self, batch_id: _Optional[str] = ..., function_name: _Optional[str] = ..., items: _Optional[_Iterable[_Union[JobRequest, _Mapping]]] = ...) -> None: ...

class Interrupt(_message.Message):
    __slots__ = ("request_id", "item_ids", "queued_only", "attempt_epoch", "any_attempt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_ONLY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ANY_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    queued_only: bool
    attempt_epoch: int
    any_attempt: bool
    def __init__(self, request_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., queued_only: _Optional[bool] = ..., attempt_epoch: _Optional[int] = ..., any_attempt: _Optional[bool] = ...) -> None: ...

class ModelCommand(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class Keyspace(_message.Message):
    __slots__ = ("models",)
    class ModelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.ScalarMap[str, str]
    def __init__(self, models: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EndpointConfig(_message.Message):
    __slots__ = ("release_id", "resolved_models", "required_models", "keyspaces", "disabled_functions")
    class KeyspacesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Keyspace
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Keyspace, _Mapping]] = ...) -> None: ...
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_MODELS_FIELD_NUMBER: _ClassVar[int]
    KEYSPACES_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    resolved_models: _containers.RepeatedCompositeFieldContainer[ResolvedModel]
    required_models: _containers.RepeatedScalarFieldContainer[str]
    keyspaces: _containers.MessageMap[str, Keyspace]
    disabled_functions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, release_id: _Optional[str] = ..., resolved_models: _Optional[_Iterable[_Union[ResolvedModel, _Mapping]]] = ..., required_models: _Optional[_Iterable[str]] = ..., keyspaces: _Optional[_Mapping[str, Keyspace]] = ..., disabled_functions: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelUrlRefreshResponse(_message.Message):
    __slots__ = ("model", "error_message")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model: ResolvedModel
    error_message: str
    def __init__(self, model: _Optional[_Union[ResolvedModel, _Mapping]] = ..., error_message: _Optional[str] = ...) -> None: ...

class RuntimeBatchingConfig(_message.Message):
    __slots__ = ("function_name", "preferred_batch_size", "max_wait_ms", "prefetch_depth")
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_DEPTH_FIELD_NUMBER: _ClassVar[int]
    function_name: str
    preferred_batch_size: int
    max_wait_ms: int
    prefetch_depth: int
    def __init__(self, function_name: _Optional[str] = ..., preferred_batch_size: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., prefetch_depth: _Optional[int] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason", "deadline_s", "terminate_after_deadline")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    TERMINATE_AFTER_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    deadline_s: float
    terminate_after_deadline: bool
    def __init__(self, reason: _Optional[str] = ..., deadline_s: _Optional[float] = ..., terminate_after_deadline: _Optional[bool] = ...) -> None: ...

class SchedulerEvent(_message.Message):
    __slots__ = ("event_type", "payload_json", "jwt")
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    JWT_FIELD_NUMBER: _ClassVar[int]
    event_type: str
    payload_json: bytes
    jwt: str
    def __init__(self, event_type: _Optional[str] = ..., payload_json: _Optional[bytes] = ..., jwt: _Optional[str] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("registration_ack", "ack", "job_request", "batch_job_request", "interrupt", "load_model", "unload_model", "endpoint_config", "url_refresh_response", "batching_config", "drain", "scheduler_event")
    REGISTRATION_ACK_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    JOB_REQUEST_FIELD_NUMBER: _ClassVar[int]
    BATCH_JOB_REQUEST_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    LOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_CONFIG_FIELD_NUMBER: _ClassVar[int]
    URL_REFRESH_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_EVENT_FIELD_NUMBER: _ClassVar[int]
    registration_ack: RegistrationAck
    ack: Ack
    job_request: JobRequest
    batch_job_request: BatchJobRequest
    interrupt: Interrupt
    load_model: ModelCommand
    unload_model: ModelCommand
    endpoint_config: EndpointConfig
    url_refresh_response: ModelUrlRefreshResponse
    batching_config: RuntimeBatchingConfig
    drain: Drain
    scheduler_event: SchedulerEvent
    def __init__(self, registration_ack: _Optional[_Union[RegistrationAck, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., job_request: _Optional[_Union[JobRequest, _Mapping]] = ..., batch_job_request: _Optional[_Union[BatchJobRequest, _Mapping]] = ..., interrupt: _Optional[_Union[Interrupt, _Mapping]] = ..., load_model: _Optional[_Union[ModelCommand, _Mapping]] = ..., unload_model: _Optional[_Union[ModelCommand, _Mapping]] = ..., endpoint_config: _Optional[_Union[EndpointConfig, _Mapping]] = ..., url_refresh_response: _Optional[_Union[ModelUrlRefreshResponse, _Mapping]] = ..., batching_config: _Optional[_Union[RuntimeBatchingConfig, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., scheduler_event: _Optional[_Union[SchedulerEvent, _Mapping]] = ...) -> None: ...
