"""The error tree: one root, wire meaning as data."""

from __future__ import annotations

import pytest

from gen_worker import errors
from gen_worker.errors import (
    AuthError,
    BusyError,
    CanceledError,
    ConfigError,
    DefinitionError,
    EndpointConfigError,
    FatalError,
    GenWorkerError,
    InvalidModelRefError,
    OutputTooLargeError,
    ResourceError,
    RetryableError,
    ValidationError,
)


@pytest.mark.parametrize(
    ("cls", "error_type", "retryable"),
    [
        (ValidationError, "validation", False),
        (RetryableError, "retryable", True),
        (ResourceError, "resource", True),
        (CanceledError, "canceled", False),
        (AuthError, "auth", False),
        (FatalError, "fatal", False),
        (DefinitionError, "definition", False),
        (BusyError, "busy", True),
        (GenWorkerError, "internal", False),
    ],
)
def test_wire_meaning_is_class_data(
    cls: type[GenWorkerError], error_type: str, retryable: bool
) -> None:
    err = cls("model refs/with/slashes stay readable")
    assert isinstance(err, GenWorkerError)
    assert (cls.error_type, cls.retryable) == (error_type, retryable)
    assert (err.error_type, err.retryable) == (error_type, retryable)
    assert err.safe_message == "model refs/with/slashes stay readable"


def test_output_too_large_carries_sizes() -> None:
    err = OutputTooLargeError(2048, 1024)
    assert (err.size_bytes, err.max_bytes) == (2048, 1024)
    assert err.error_type == "output_too_large" and not err.retryable
    assert "2048 bytes, above the limit of 1024 bytes" in err.safe_message


def test_invalid_ref_is_a_validation_error_and_a_value_error() -> None:
    err = InvalidModelRefError("a/b/c", "more than one '/'")
    assert isinstance(err, ValidationError) and isinstance(err, ValueError)
    assert (err.ref, err.rule) == ("a/b/c", "more than one '/'")
    assert str(err) == "invalid model ref 'a/b/c': more than one '/'"


def test_endpoint_config_error_names_file_and_key() -> None:
    err = EndpointConfigError("/p/endpoint.toml", "models.x.ref", "bad; use y")
    assert isinstance(err, DefinitionError)
    assert str(err) == "/p/endpoint.toml: models.x.ref: bad; use y"
    assert (
        str(EndpointConfigError("/p/endpoint.toml", "", "unreadable"))
        == "/p/endpoint.toml: unreadable"
    )


def test_every_public_error_is_under_the_one_root() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), GenWorkerError), name


def test_the_tree_in_the_docstring_lists_every_class() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, name


def test_config_error_names_the_variable() -> None:
    err = ConfigError("WORKER_MAX_CONCURRENCY", "'x' is not an integer; use a whole number >= 1")
    assert isinstance(err, FatalError)
    assert err.variable == "WORKER_MAX_CONCURRENCY"
    assert str(err) == "WORKER_MAX_CONCURRENCY: 'x' is not an integer; use a whole number >= 1"


def test_model_subsystem_errors_travel_with_the_right_wire_type() -> None:
    cases = [
        (errors.HubAuthError("resolve refused", status=403, detail="token expired"), "auth", False),
        (errors.HubNotFoundError("no such repo", status=404), "fatal", False),
        (errors.HubConflictError("no match", status=409), "fatal", False),
        (errors.HubUnavailableError("hub down", status=503), "retryable", True),
        (errors.DownloadError("gave up after 5 tries"), "retryable", True),
        (errors.DigestMismatchError("unet/w.safetensors", "aa", "bb"), "fatal", False),
        (errors.InsufficientDiskError("/cache", 10, 5), "resource", True),
        (errors.UnsafePathError("../x", "'..' escapes the snapshot"), "validation", False),
    ]
    for err, wire, retryable in cases:
        assert err.error_type == wire, err
        assert err.retryable is retryable, err
    hub = errors.HubAuthError("resolve refused", status=403, detail="token expired")
    assert (hub.status, hub.detail, str(hub)) == (
        403,
        "token expired",
        "resolve refused: token expired",
    )
    assert isinstance(hub, errors.AuthError) and isinstance(hub, errors.HubError)
    mismatch = errors.DigestMismatchError("unet/w.safetensors", "aa", "bb")
    assert str(mismatch) == "unet/w.safetensors: blake3 mismatch: expected aa, got bb"
    disk = str(errors.InsufficientDiskError("/cache", 10, 5))
    assert "need 10 bytes" in disk and "5 bytes free" in disk
    assert isinstance(errors.UnsafePathError("/etc/passwd", "absolute"), ValueError)


def test_hub_error_maps_each_status_to_its_class() -> None:
    table = {
        401: errors.HubAuthError,
        403: errors.HubAuthError,
        404: errors.HubNotFoundError,
        409: errors.HubConflictError,
        500: errors.HubUnavailableError,
        503: errors.HubUnavailableError,
        429: errors.HubUnavailableError,
        None: errors.HubUnavailableError,
        400: errors.HubError,
        413: errors.HubError,
        416: errors.HubError,
    }
    for status, cls in table.items():
        err = errors.hub_error(status, "resolve acme/sd:latest", "why")
        assert type(err) is cls, status
        assert err.retryable is (cls is errors.HubUnavailableError), status
        assert err.status == status
    assert str(errors.hub_error(409, "resolve acme/sd:latest", "no fp16")) == (
        "resolve acme/sd:latest (HTTP 409): no fp16"
    )
    assert str(errors.hub_error(None, "resolve acme/sd:latest")) == "resolve acme/sd:latest"
