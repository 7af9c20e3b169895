"""The one error tree of gen-worker.

Every exception that gen-worker raises, or that an endpoint author raises to shape how a
failed request is reported, derives from :class:`GenWorkerError`. What a failure means on the
wire is data on the class (``error_type`` and ``retryable``), never a string match on a
message::

    GenWorkerError                 error_type         retryable
    ├── ValidationError            validation         no    bad input; a 4xx to the caller
    │   └── InvalidModelRefError   validation         no    a model ref outside the grammar
    ├── RetryableError             retryable          yes   transient; may be retried elsewhere
    │   └── ModelInUseError        retryable          yes   unloading a model a request uses
    ├── ResourceError              resource           yes   resources exhausted (e.g. OOM)
    ├── CanceledError              canceled           no    the run was canceled
    ├── AuthError                  auth               no    permission denied
    ├── FatalError                 fatal              no    unrecoverable
    │   ├── ConfigError            fatal              no    a setting (env variable) is malformed
    │   └── ModelLoadError         fatal              no    a loader could not load a model
    ├── OutputTooLargeError        output_too_large   no    output above the byte limit
    ├── BusyError                  busy               yes   the queue of waiting requests is full
    ├── HubError                   (per subclass)           the hub answered with an error
    │   ├── HubAuthError           auth               no    401/403 from the hub
    │   ├── HubNotFoundError       fatal              no    404: no such repo, tag, blob or file
    │   ├── HubConflictError       fatal              no    409: no snapshot matches what was asked
    │   └── HubUnavailableError    retryable          yes   5xx or the connection failed
    ├── DownloadError              retryable          yes   a download failed after its retries
    ├── DigestMismatchError        fatal              no    bytes did not match their digest
    ├── InsufficientDiskError      resource           yes   not enough free disk for a download
    ├── UnsafePathError            validation         no    a manifest path with .., / or \\
    ├── BlobMissingError           retryable          yes   a snapshot's blobs are not all stored
    ├── SnapshotInUseError         internal           no    removing a snapshot that is in use
    └── DefinitionError            definition         no    the endpoint itself is wrong
        └── EndpointConfigError    definition         no    endpoint.toml is wrong

Any other exception escaping an endpoint function is reported as ``internal`` and is not
retried. ``DefinitionError`` is raised at decoration and discovery time (image build), so a
broken endpoint fails its build instead of its first request.

The message of one of these errors is its ``safe_message``: what the end caller may see. Keep
secrets out of it.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthError",
    "BlobMissingError",
    "BusyError",
    "CanceledError",
    "ConfigError",
    "DefinitionError",
    "DigestMismatchError",
    "DownloadError",
    "EndpointConfigError",
    "FatalError",
    "GenWorkerError",
    "HubAuthError",
    "HubConflictError",
    "HubError",
    "HubNotFoundError",
    "HubUnavailableError",
    "InsufficientDiskError",
    "InvalidModelRefError",
    "ModelInUseError",
    "ModelLoadError",
    "OutputTooLargeError",
    "ResourceError",
    "RetryableError",
    "SnapshotInUseError",
    "UnsafePathError",
    "ValidationError",
]


class GenWorkerError(Exception):
    """Root of every gen-worker error; carries its wire meaning as class data."""

    error_type: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    @property
    def safe_message(self) -> str:
        """The text an end caller may see: the message the error was raised with."""
        return str(self)


class ValidationError(GenWorkerError):
    """The request's input is wrong; the caller must change it (HTTP 4xx, never retried)."""

    error_type = "validation"


class InvalidModelRefError(ValidationError, ValueError):
    """A model ref string is outside the ref grammar.

    Also a ``ValueError``, so code that parses refs can treat it like any parse failure.
    """

    def __init__(self, ref: str, rule: str) -> None:
        self.ref = ref
        self.rule = rule
        super().__init__(f"invalid model ref {ref!r}: {rule}")


class RetryableError(GenWorkerError):
    """A transient failure; the scheduler may retry the request, possibly on another worker."""

    error_type = "retryable"
    retryable = True


class ModelInUseError(RetryableError):
    """A model cannot be unloaded now: running requests use it. Refused, not failed: the
    same unload succeeds once they finish."""

    def __init__(self, model_id: str, uses: int) -> None:
        self.model_id = model_id
        self.uses = uses
        super().__init__(
            f"model {model_id} is in use by {uses} running request(s); wait for them to finish "
            "(or cancel them) and unload it again"
        )


class ResourceError(GenWorkerError):
    """Resources were exhausted (memory after the low-VRAM ladder, disk); retryable elsewhere."""

    error_type = "resource"
    retryable = True


class CanceledError(GenWorkerError):
    """The run was canceled (interrupt, HTTP cancel, drain)."""

    error_type = "canceled"


class AuthError(GenWorkerError):
    """Permission denied (a token was missing, expired or not allowed to do this)."""

    error_type = "auth"


class FatalError(GenWorkerError):
    """An unrecoverable failure; retrying the same request will not help."""

    error_type = "fatal"


class ConfigError(FatalError):
    """A setting is missing or malformed; the message names the variable and what is valid."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {problem}")


class ModelLoadError(FatalError):
    """A model's files could not be loaded by the loader its annotation picked."""

    def __init__(self, ref: str, loader: str, cause: str) -> None:
        self.ref = ref
        self.loader = loader
        self.cause = cause
        super().__init__(f"could not load {ref} with {loader}: {cause}")


class BusyError(GenWorkerError):
    """Every slot is taken and the queue of waiting requests is full; try again later."""

    error_type = "busy"
    retryable = True


class OutputTooLargeError(GenWorkerError):
    """The encoded output is larger than the configured limit."""

    error_type = "output_too_large"

    def __init__(
        self, size_bytes: int, max_bytes: int, setting: str = "WORKER_MAX_OUTPUT_BYTES"
    ) -> None:
        self.size_bytes = size_bytes
        self.max_bytes = max_bytes
        self.setting = setting
        hint = (
            "; return less data or save large data with ctx.save_bytes"
            if setting == "WORKER_MAX_OUTPUT_BYTES"
            else ""
        )
        super().__init__(
            f"output is {size_bytes} bytes, above the limit of {max_bytes} bytes ({setting}){hint}"
        )


class HubError(GenWorkerError):
    """The hub (or a file API) answered with an error.

    ``status`` is the HTTP status (``None`` when no answer came), ``detail`` the server's own
    explanation. Neither ever holds a token or a signed URL.
    """

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{message}: {detail}" if detail else message)


class HubAuthError(HubError, AuthError):
    """401/403: the token is missing, expired or not allowed to do this."""

    error_type = "auth"
    retryable = False


class HubNotFoundError(HubError, FatalError):
    """404: the repo, tag, snapshot, blob or file does not exist."""

    error_type = "fatal"
    retryable = False


class HubConflictError(HubError, FatalError):
    """409: no snapshot of the repo matches the tag and attributes asked for."""

    error_type = "fatal"
    retryable = False


class HubUnavailableError(HubError, RetryableError):
    """5xx, or the connection failed; the same call may succeed later or elsewhere."""

    error_type = "retryable"
    retryable = True


def hub_error(status: int | None, message: str, detail: str = "") -> HubError:
    """The error class an HTTP status from the hub means: 401/403 auth, 404 not found, 409
    conflict, 5xx/408/429 or no answer at all unavailable (retryable), any other 4xx a plain
    :class:`HubError` (our request was wrong; sending it again will not help). ``message`` says
    what was being done; ``detail`` is the server's own explanation."""
    cls: type[HubError]
    if status in (401, 403):
        cls = HubAuthError
    elif status in (404, 410):
        cls = HubNotFoundError
    elif status == 409:
        cls = HubConflictError
    elif status is None or status >= 500 or status in (408, 425, 429):
        cls = HubUnavailableError
    else:
        cls = HubError
    shown = f"{message} (HTTP {status})" if status is not None else message
    return cls(shown, status=status, detail=detail)


class DownloadError(RetryableError):
    """A download failed after its bounded retries; the ``.part`` file is kept for a resume."""


class DigestMismatchError(FatalError):
    """Downloaded (or reassembled) bytes did not match the digest the manifest promised."""

    def __init__(self, name: str, expected: str, actual: str, *, what: str = "blake3") -> None:
        self.name = name
        self.expected = expected
        self.actual = actual
        super().__init__(f"{name}: {what} mismatch: expected {expected}, got {actual}")


class InsufficientDiskError(ResourceError):
    """A download would not fit on the disk (after evicting what is not in use)."""

    def __init__(self, path: str, needed_bytes: int, free_bytes: int) -> None:
        self.path = path
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        super().__init__(
            f"not enough disk space under {path}: need {needed_bytes} bytes, "
            f"{free_bytes} bytes free (free space, or lower the snapshot size)"
        )


class UnsafePathError(ValidationError, ValueError):
    """A manifest or output path that would escape its directory (``..``, absolute, ``\\``)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(
            f"unsafe path {path!r}: {problem}; paths must be relative, use '/' and never '..'"
        )


class BlobMissingError(RetryableError):
    """A snapshot cannot be built: blobs it needs are not in the store (fetch them first)."""


class SnapshotInUseError(GenWorkerError):
    """A snapshot cannot be removed: a process uses it, or it is being built."""


class DefinitionError(GenWorkerError):
    """The endpoint's code is wrong (a bad @worker_function signature, an unknown model key).

    Raised at decoration or discovery time; the message names the function, the parameter
    and the fix.
    """

    error_type = "definition"


class EndpointConfigError(DefinitionError):
    """endpoint.toml is missing or invalid; the message names the file, the key and the fix."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)
