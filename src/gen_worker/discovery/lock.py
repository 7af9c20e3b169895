"""endpoint.lock: the build-time manifest the platform, the worker and the dev runner read.

TOML, UTF-8, deterministic bytes for the same sources: keys sorted at every level, functions
sorted by slug, no null values (absent means unset), JSON Schemas stored as canonical JSON
strings with their sha256.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import tomli_w

from gen_worker._version import __version__
from gen_worker.authoring import slugify
from gen_worker.discovery.checks import CheckedFunction
from gen_worker.discovery.endpoint_toml import EndpointConfig, ModelEntry
from gen_worker.errors import DefinitionError

__all__ = [
    "LOCK_SCHEMA_VERSION",
    "EndpointLock",
    "LockFunction",
    "LockInjection",
    "LockModel",
    "build_lock",
    "decode_lock",
    "encode_lock",
]

LOCK_SCHEMA_VERSION = 1


class LockInjection(msgspec.Struct, frozen=True):
    param: str
    #: Qualified name of the annotated type; it picks the loader.
    type: str
    source: str
    key: str


class LockModel(msgspec.Struct, frozen=True, omit_defaults=True):
    ref: str
    attributes: dict[str, list[str]] = {}


class LockFunction(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    python_name: str
    streaming: bool
    is_async: bool
    input_schema: str
    input_schema_sha256: str
    output_schema: str
    output_schema_sha256: str
    delta_schema: str | None = None
    delta_schema_sha256: str | None = None
    injections: list[LockInjection] = []
    resources: dict[str, Any] = {}
    batch_dimension: str | None = None
    timeout_s: float | None = None


class EndpointLock(msgspec.Struct, frozen=True, omit_defaults=True):
    schema_version: int
    gen_worker_version: str
    endpoint_name: str
    main: str
    functions: list[LockFunction]
    models: dict[str, LockModel] = {}
    models_by_function: dict[str, dict[str, LockModel]] = {}
    resources: dict[str, Any] = {}
    host_requirements: dict[str, Any] = {}

    def function(self, name: str) -> LockFunction | None:
        """The function invoked as ``name`` (its slug)."""
        return next((f for f in self.functions if f.name == name), None)


def _schema(tp: type[msgspec.Struct]) -> tuple[str, str]:
    text = msgspec.json.encode(msgspec.json.schema(tp), order="sorted").decode()
    return text, hashlib.sha256(text.encode()).hexdigest()


def _type_name(tp: object) -> str:
    if inspect.isclass(tp):
        return f"{tp.__module__}.{tp.__qualname__}"
    return repr(tp)


def _model(entry: ModelEntry) -> LockModel:
    return LockModel(ref=entry.ref, attributes={k: list(v) for k, v in entry.attributes.items()})


def _function(checked: CheckedFunction) -> LockFunction:
    spec = checked.spec
    input_schema, input_sha = _schema(spec.payload_type)
    output_schema, output_sha = _schema(spec.output_type)
    delta = (output_schema, output_sha) if spec.is_streaming else (None, None)
    return LockFunction(
        name=spec.name,
        python_name=spec.python_name,
        streaming=spec.is_streaming,
        is_async=spec.is_async,
        input_schema=input_schema,
        input_schema_sha256=input_sha,
        output_schema=output_schema,
        output_schema_sha256=output_sha,
        delta_schema=delta[0],
        delta_schema_sha256=delta[1],
        injections=[
            LockInjection(i.param, _type_name(i.type), i.source.value, i.key)
            for i in spec.injections
        ],
        resources=checked.resources.hints(),
        batch_dimension=checked.batch_dimension,
        timeout_s=spec.timeout_s,
    )


def build_lock(config: EndpointConfig, functions: Sequence[CheckedFunction]) -> EndpointLock:
    """The lock document for checked functions (see :func:`check_endpoint`)."""
    try:
        lock_functions = [_function(f) for f in sorted(functions, key=lambda f: f.spec.name)]
    except (TypeError, ValueError) as exc:  # msgspec cannot describe a type as JSON Schema
        raise DefinitionError(f"cannot generate a JSON Schema: {exc}") from exc
    return EndpointLock(
        schema_version=LOCK_SCHEMA_VERSION,
        gen_worker_version=__version__,
        endpoint_name=slugify(config.name),
        main=config.main,
        functions=lock_functions,
        models={k: _model(e) for k, e in config.models.items()},
        models_by_function={
            f.spec.name: {k: _model(e) for k, e in f.keyspace.items()}
            for f in functions
            if f.keyspace
        },
        resources=_set_fields(config.resources),
        host_requirements=_set_fields(config.host_requirements),
    )


def _set_fields(struct: msgspec.Struct) -> dict[str, Any]:
    """The fields of ``struct`` that were given, as plain data the lock stores."""
    plain: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(struct))  # tuples -> lists
    return {k: v for k, v in plain.items() if v is not None and v != []}


def _sorted_plain(value: Any) -> Any:
    """Builtins with dict keys sorted and nulls/empty containers dropped (TOML has no null)."""
    if isinstance(value, Mapping):
        items = ((k, _sorted_plain(v)) for k, v in sorted(value.items()))
        return {k: v for k, v in items if v is not None and v not in ({}, [])}
    if isinstance(value, list | tuple):
        return [_sorted_plain(v) for v in value]
    return value


def encode_lock(lock: EndpointLock) -> bytes:
    """The deterministic TOML bytes of ``lock``."""
    return tomli_w.dumps(_sorted_plain(msgspec.to_builtins(lock))).encode()


def decode_lock(data: bytes | str, *, source: str = "endpoint.lock") -> EndpointLock:
    """Read a lock back; an unreadable one is a :class:`DefinitionError` naming ``source``."""
    try:
        return msgspec.toml.decode(data, type=EndpointLock)
    except msgspec.DecodeError as exc:
        raise DefinitionError(
            f"{source} is not a valid endpoint.lock ({exc}); regenerate it with "
            "`python -m gen_worker.discover > endpoint.lock`"
        ) from exc
