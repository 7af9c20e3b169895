"""The one error tree of gen-worker.

Every exception that gen-worker raises, or that an endpoint author raises to shape how a
failed request is reported, derives from :class:`GenWorkerError`. What a failure means on the
wire is data on the class (``error_type`` and ``retryable``), never a string match on a
message::

    GenWorkerError                 error_type         retryable
    ├── ValidationError            validation         no    bad input; a 4xx to the caller
    │   └── InvalidModelRefError   validation         no    a model ref outside the grammar
    ├── RetryableError             retryable          yes   transient; may be retried elsewhere
    ├── ResourceError              resource           yes   resources exhausted (e.g. OOM)
    ├── CanceledError              canceled           no    the run was canceled
    ├── AuthError                  auth               no    permission denied
    ├── FatalError                 fatal              no    unrecoverable
    │   └── ConfigError            fatal              no    a setting (env variable) is malformed
    ├── OutputTooLargeError        output_too_large   no    output above the byte limit
    ├── BusyError                  busy               yes   the queue of waiting requests is full
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
    "BusyError",
    "CanceledError",
    "ConfigError",
    "DefinitionError",
    "EndpointConfigError",
    "FatalError",
    "GenWorkerError",
    "InvalidModelRefError",
    "OutputTooLargeError",
    "ResourceError",
    "RetryableError",
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
