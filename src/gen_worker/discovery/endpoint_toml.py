"""Parse and validate ``endpoint.toml`` (SPEC section 2) into typed, frozen structs.

Validation walks the dict that :mod:`tomllib` returns with small typed helpers instead of
decoding with msgspec: every error must name the file, the dotted key path and what would be
valid, and msgspec's messages know none of those. Every problem is an
:class:`~gen_worker.errors.EndpointConfigError`.
"""

from __future__ import annotations

import functools
import json
import keyword
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from itertools import pairwise
from pathlib import Path

import msgspec

from gen_worker.authoring.slug import slugify
from gen_worker.errors import EndpointConfigError, InvalidModelRefError
from gen_worker.refs import parse_cozy_ref

__all__ = [
    "ENDPOINT_TOML",
    "SCHEMA_VERSION",
    "EndpointConfig",
    "EndpointResources",
    "FunctionConfig",
    "HostRequirements",
    "ModelEntry",
    "load_endpoint_toml",
    "parse_endpoint_toml",
]

ENDPOINT_TOML = "endpoint.toml"
SCHEMA_VERSION = 1


class ModelEntry(msgspec.Struct, frozen=True):
    """One model of a keyspace: its key, canonical ref and hub attributes."""

    key: str
    ref: str
    # A single string is stored as a 1-tuple so every value reads as an ordered preference list.
    attributes: dict[str, tuple[str, ...]]


class FunctionConfig(msgspec.Struct, frozen=True):
    """``[functions.<name>]``: per-function settings, keyed by the name as written."""

    name: str
    batch_dimension: str | None = None
    resources: dict[str, object] = msgspec.field(default_factory=dict)


class EndpointResources(msgspec.Struct, frozen=True):
    """``[resources]``: what one worker of this endpoint needs."""

    vram_gb: float | None = None
    ram_gb: float | None = None
    cpu_cores: float | None = None
    disk_gb: float | None = None
    max_inflight_requests: int | None = None


class HostRequirements(msgspec.Struct, frozen=True):
    """``[host.requirements]``: what the host machine must offer."""

    cuda: str | None = None
    compute_capabilities: tuple[str, ...] = ()

    @property
    def requires_gpu(self) -> bool:
        """Whether a GPU is required: either key being present implies one."""
        return self.cuda is not None or bool(self.compute_capabilities)


class EndpointConfig(msgspec.Struct, frozen=True):
    """A validated endpoint.toml."""

    path: str
    schema_version: int
    name: str
    main: str
    functions: dict[str, FunctionConfig]
    models: dict[str, ModelEntry]
    models_by_function: dict[str, dict[str, ModelEntry]]
    resources: EndpointResources
    host_requirements: HostRequirements


_Check = Callable[[object, str, str], object]

_TOP_KEYS = ("schema_version", "name", "main", "functions", "models", "resources", "host")
_BATCH_SIZE_KEYS = ("batch_size_min", "batch_size_target", "batch_size_max")

# [0-9] rather than \d: \d also matches non-ASCII digits, which no version string contains.
_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+){0,2}")
_CAPABILITY_RE = re.compile(r"[0-9]+\.[0-9]+")
_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9.-]*")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
# A scheme before the first "/" (``hf:owner/repo``); ``owner/repo:tag`` has its colon after it.
_PROVIDER_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):[^/]*/")


def load_endpoint_toml(path: str | os.PathLike[str]) -> EndpointConfig:
    """Read and validate the endpoint.toml at ``path``."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise EndpointConfigError(
            file, "", f"file not found; create {ENDPOINT_TOML} at the project root"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise EndpointConfigError(
            file, "", f"cannot read the file ({exc}); it must be a readable UTF-8 text file"
        ) from exc
    return parse_endpoint_toml(text, path=file)


def parse_endpoint_toml(text: str, *, path: str = ENDPOINT_TOML) -> EndpointConfig:
    """Validate endpoint.toml source ``text``; ``path`` names it in errors and in the result."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EndpointConfigError(path, "", f"invalid TOML: {exc}; fix the syntax there") from exc
    _check_keys(doc, _TOP_KEYS, path, "")
    # schema_version first: under another version every other key may mean something else.
    schema_version = _parse_schema_version(doc, path)
    name, main = _parse_name(doc, path), _parse_main(doc, path)
    functions = _parse_functions(doc.get("functions", {}), path)
    models, models_by_function = _parse_models(doc.get("models", {}), path)
    return EndpointConfig(
        path=path,
        schema_version=schema_version,
        name=name,
        main=main,
        functions=functions,
        models=models,
        models_by_function=models_by_function,
        resources=_parse_resources(doc.get("resources", {}), path),
        host_requirements=_parse_host(doc.get("host", {}), path),
    )


# --- generic helpers -------------------------------------------------------------------------


def _join(prefix: str, key: str) -> str:
    """The dotted key path of ``key`` under ``prefix``, quoting keys TOML would need quoted."""
    part = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{prefix}.{part}" if prefix else part


def _got(value: object) -> str:
    """What was found, in TOML's words, for the second half of an error message."""
    if isinstance(value, dict):
        return "got a table"
    if isinstance(value, list):
        return "got an array"
    if isinstance(value, bool):
        return f"got boolean {str(value).lower()}"
    names = {int: "integer", float: "float", str: "string"}
    return f"got {names.get(type(value), type(value).__name__)} {_shown(value)}"


def _shown(value: object) -> str:
    # A pasted multi-kilobyte value must not become the whole error message.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected(file: str, key: str, expected: str, value: object) -> EndpointConfigError:
    return EndpointConfigError(file, key, f"expected {expected}; {_got(value)}")


def _check_keys(table: dict[str, object], allowed: Iterable[str], file: str, prefix: str) -> None:
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            where = f"[{prefix}]" if prefix else "the top level"
            raise EndpointConfigError(
                file, _join(prefix, key), f"unknown key; allowed in {where}: {', '.join(allowed)}"
            )


def _require_present(table: dict[str, object], key: str, file: str, what: str) -> object:
    if key not in table:
        raise EndpointConfigError(file, key, f"missing; required: {what}")
    return table[key]


def _require_table(value: object, file: str, key: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _expected(file, key, "a table", value)
    return value


def _validate(
    value: object, checks: Mapping[str, _Check], file: str, key: str
) -> dict[str, object]:
    """Check that ``value`` is a table with only ``checks``' keys and run each key's check."""
    table = _require_table(value, file, key)
    _check_keys(table, checks, file, key)
    return {name: checks[name](raw, file, _join(key, name)) for name, raw in table.items()}


def _require_str(
    value: object,
    file: str,
    key: str,
    *,
    pattern: re.Pattern[str] | None = None,
    expected: str = "a non-empty string",
) -> str:
    if not isinstance(value, str) or not value or (pattern and not pattern.fullmatch(value)):
        raise _expected(file, key, expected, value)
    return value


def _require_str_list(
    value: object,
    file: str,
    key: str,
    *,
    pattern: re.Pattern[str] | None = None,
    expected: str = "non-empty strings",
) -> list[str]:
    if not isinstance(value, list):
        raise _expected(file, key, f"an array of {expected}", value)
    return [
        _require_str(item, file, f"{key}[{index}]", pattern=pattern, expected=expected)
        for index, item in enumerate(value)
    ]


def _require_int(value: object, file: str, key: str, *, minimum: int) -> int:
    # bool is an int subclass in Python, but `true` is never a count in TOML.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _expected(file, key, f"an integer >= {minimum}", value)
    return value


def _require_positive(value: object, file: str, key: str) -> float:
    # bool is an int subclass; inf (and ints past float range) are never usable sizes.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= sys.float_info.max
    ):
        raise _expected(file, key, "a number > 0 (an integer or float, e.g. 24 or 0.5)", value)
    return float(value)


def _require_bool(value: object, file: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise _expected(file, key, "true or false", value)
    return value


def _require_choice(value: object, file: str, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _expected(file, key, f"one of {', '.join(choices)}", value)
    return str(value)


def _is_identifier(text: str) -> bool:
    return text.isidentifier() and not keyword.iskeyword(text)


def _check_function_name(name: str, file: str, key: str) -> None:
    if not (_is_identifier(name) or _SLUG_RE.fullmatch(name)):
        raise EndpointConfigError(
            file,
            key,
            f"{_shown(name)} is not a function name; use the function's Python name (e.g. "
            "generate_image) or its slug (e.g. generate-image: [a-z0-9][a-z0-9.-]*)",
        )


# --- top-level scalars -----------------------------------------------------------------------


def _parse_schema_version(doc: dict[str, object], file: str) -> int:
    value = _require_present(doc, "schema_version", file, f"schema_version = {SCHEMA_VERSION}")
    # type() rather than isinstance(): `true` and `1.0` compare equal to 1 but are not versions.
    if type(value) is not int or value != SCHEMA_VERSION:
        expected = f"schema_version = {SCHEMA_VERSION} (the only supported version)"
        raise _expected(file, "schema_version", expected, value)
    return value


def _parse_name(doc: dict[str, object], file: str) -> str:
    value = _require_present(doc, "name", file, 'the endpoint name, e.g. name = "my-worker"')
    name = _require_str(value, file, "name", expected='a non-empty string, e.g. "my-worker"')
    if not slugify(name):
        raise EndpointConfigError(
            file,
            "name",
            f"{_shown(name)} has no ASCII letters or digits, so its endpoint slug would be empty; "
            'use a name like "my-worker"',
        )
    return name


def _parse_main(doc: dict[str, object], file: str) -> str:
    expected = 'a dotted Python module path, e.g. "my_pkg.main"'
    value = _require_present(doc, "main", file, f"main = {expected}")
    main = _require_str(value, file, "main", expected=expected)
    if not all(_is_identifier(part) for part in main.split(".")):
        raise _expected(file, "main", expected, main)
    return main


# --- [functions] -----------------------------------------------------------------------------


def _batch_dimension(value: object, file: str, key: str) -> str:
    if not isinstance(value, str) or not _is_identifier(value):
        expected = "the name of a list-typed payload field (a Python identifier, e.g. items)"
        raise _expected(file, key, expected, value)
    return value


_positive_int = functools.partial(_require_int, minimum=1)

_RESOURCE_HINTS: dict[str, _Check] = {
    "batch_size_min": _positive_int,
    "batch_size_target": _positive_int,
    "batch_size_max": _positive_int,
    "prefetch_depth": functools.partial(_require_int, minimum=0),
    "max_wait_ms": functools.partial(_require_int, minimum=0),
    "memory_hint_mb": _positive_int,
    "kind": functools.partial(_require_choice, choices=("inference", "conversion", "training")),
    "requires_gpu": _require_bool,
    "min_vram_gb": _require_positive,
    "vram_multiplier": _require_positive,
    "compute_capability_min": functools.partial(
        _require_str, pattern=_CAPABILITY_RE, expected='a compute capability like "8.0"'
    ),
    "supported_precisions": _require_str_list,
    "supported_conversion_profiles": _require_str_list,
}


def _resource_hints(value: object, file: str, key: str) -> dict[str, object]:
    hints = _validate(value, _RESOURCE_HINTS, file, key)
    sizes = [(name, size) for name in _BATCH_SIZE_KEYS if isinstance(size := hints.get(name), int)]
    for (low_name, low), (high_name, high) in pairwise(sizes):
        if low > high:
            raise EndpointConfigError(
                file,
                _join(key, low_name),
                f"{low_name} ({low}) is greater than {high_name} ({high}); "
                "need batch_size_min <= batch_size_target <= batch_size_max",
            )
    return hints


_FUNCTION_CHECKS: dict[str, _Check] = {
    "batch_dimension": _batch_dimension,
    "resources": _resource_hints,
}


def _parse_functions(value: object, file: str) -> dict[str, FunctionConfig]:
    functions: dict[str, FunctionConfig] = {}
    for name, raw in _require_table(value, file, "functions").items():
        key = _join("functions", name)
        _check_function_name(name, file, key)
        fields = _validate(raw, _FUNCTION_CHECKS, file, key)
        # Every value was validated above; convert only assembles the typed struct.
        functions[name] = msgspec.convert({"name": name, **fields}, FunctionConfig)
    return functions


# --- [models] --------------------------------------------------------------------------------


def _is_entry(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, dict) and "ref" in value)


def _parse_models(
    value: object, file: str
) -> tuple[dict[str, ModelEntry], dict[str, dict[str, ModelEntry]]]:
    fixed: dict[str, ModelEntry] = {}
    by_function: dict[str, dict[str, ModelEntry]] = {}
    for name, raw in _require_table(value, file, "models").items():
        key = _join("models", name)
        if _is_entry(raw):
            fixed[name] = _parse_entry(name, raw, file, key)
        elif isinstance(raw, dict):
            by_function[name] = _parse_keyspace(name, raw, file, key)
        else:
            raise EndpointConfigError(
                file,
                key,
                'expected a model ref string ("owner/repo"), a table with a ref '
                f"({{ ref = ... }}) or a function keyspace table [{key}]; {_got(raw)}",
            )
    return fixed, by_function


def _parse_keyspace(
    name: str, table: dict[str, object], file: str, key: str
) -> dict[str, ModelEntry]:
    _check_function_name(name, file, key)
    if not table:
        raise EndpointConfigError(
            file, key, f'empty function keyspace; add models (e.g. tiny = "owner/repo") to [{key}]'
        )
    entries: dict[str, ModelEntry] = {}
    for model_key, raw in table.items():
        entry_key = _join(key, model_key)
        if not _is_entry(raw):
            raise EndpointConfigError(
                file,
                entry_key,
                f"entries of [{key}] must be a model ref string or a table with a ref "
                f"({{ ref = ..., attributes = {{ ... }} }}); {_got(raw)} without ref",
            )
        entries[model_key] = _parse_entry(model_key, raw, file, entry_key)
    return entries


def _parse_entry(model_key: str, value: object, file: str, key: str) -> ModelEntry:
    if isinstance(value, str):
        return ModelEntry(key=model_key, ref=_parse_ref(value, file, key), attributes={})
    table = _require_table(value, file, key)
    _check_keys(table, ("ref", "attributes"), file, key)
    ref = _parse_ref(table["ref"], file, _join(key, "ref"))
    attributes_key = _join(key, "attributes")
    attributes = _require_table(table.get("attributes", {}), file, attributes_key)
    return ModelEntry(
        key=model_key,
        ref=ref,
        attributes={
            name: _parse_attribute(raw, file, _join(attributes_key, name))
            for name, raw in attributes.items()
        },
    )


def _parse_attribute(value: object, file: str, key: str) -> tuple[str, ...]:
    if isinstance(value, list) and value:
        return tuple(_require_str_list(value, file, key))
    if isinstance(value, str) and value:
        return (value,)
    raise EndpointConfigError(
        file,
        key,
        'expected a non-empty string or a non-empty array of non-empty strings (e.g. "fp16" or '
        f'["fp16", "bf16"]); {_got(value)}',
    )


def _parse_ref(value: object, file: str, key: str) -> str:
    if not isinstance(value, str):
        raise EndpointConfigError(
            file, key, f'expected a model ref string like "owner/repo:tag"; {_got(value)}'
        )
    provider = _PROVIDER_RE.match(value)
    if provider:
        raise EndpointConfigError(
            file,
            key,
            f"refs in endpoint.toml must not have a provider prefix ({provider.group(1)}:); "
            "write a Cozy ref: owner/repo[:tag][#flavor] or owner/repo@blake3:<hex>[#flavor]",
        )
    try:
        return parse_cozy_ref(value).canonical
    except InvalidModelRefError as exc:
        # The ref module's message already names the rule broken, the valid forms and a fix.
        raise EndpointConfigError(file, key, str(exc)) from exc


# --- [resources] and [host] ------------------------------------------------------------------

_ENDPOINT_RESOURCES: dict[str, _Check] = {
    "vram_gb": _require_positive,
    "ram_gb": _require_positive,
    "cpu_cores": _require_positive,
    "disk_gb": _require_positive,
    "max_inflight_requests": _positive_int,
}

_HOST_REQUIREMENTS: dict[str, _Check] = {
    "cuda": functools.partial(
        _require_str, pattern=_VERSION_RE, expected='a CUDA version like "12.8"'
    ),
    "compute_capabilities": functools.partial(
        _require_str_list, pattern=_CAPABILITY_RE, expected='compute capabilities like "8.0"'
    ),
}


def _parse_resources(value: object, file: str) -> EndpointResources:
    fields = _validate(value, _ENDPOINT_RESOURCES, file, "resources")
    return msgspec.convert(fields, EndpointResources)


def _parse_host(value: object, file: str) -> HostRequirements:
    host = _require_table(value, file, "host")
    _check_keys(host, ("requirements",), file, "host")
    key = "host.requirements"
    fields = _validate(host.get("requirements", {}), _HOST_REQUIREMENTS, file, key)
    return msgspec.convert(fields, HostRequirements)
