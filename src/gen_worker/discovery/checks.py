"""Cross-checks between the decorated functions and endpoint.toml.

Whatever can be known at build time is checked here, so a broken endpoint fails its image
build with a message that says how to fix it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from gen_worker.authoring import FunctionSpec, ModelRefSource, ResourceRequirements
from gen_worker.discovery.endpoint_toml import EndpointConfig, FunctionConfig, ModelEntry
from gen_worker.errors import DefinitionError, EndpointConfigError

__all__ = ["CheckedFunction", "check_endpoint"]


@dataclass(frozen=True, slots=True)
class CheckedFunction:
    """A function with what endpoint.toml adds to it."""

    spec: FunctionSpec
    batch_dimension: str | None
    #: Decorator hints overridden by ``[functions.<name>.resources]``.
    resources: ResourceRequirements
    #: Its ``[models.<function>]`` keyspace (empty when it has none).
    keyspace: Mapping[str, ModelEntry]


def _by_function(
    table: Mapping[str, Any], specs: Sequence[FunctionSpec], config: EndpointConfig, what: str
) -> dict[str, Any]:
    """Re-key a table named by Python name or slug to slugs; unknown names are errors."""
    names: dict[str, str] = {}
    for spec in specs:
        names[spec.name] = spec.name
        names[spec.func.__name__] = spec.name
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            raise EndpointConfigError(
                config.path,
                f"{what}.{key}",
                f"names no worker function; use one of {sorted(names)} (Python name or slug)",
            )
        if names[key] in out:
            raise EndpointConfigError(
                config.path,
                f"{what}.{key}",
                f"function '{names[key]}' is configured twice (by Python name and by slug); "
                "keep one table",
            )
        out[names[key]] = value
    return out


def check_endpoint(config: EndpointConfig, specs: Sequence[FunctionSpec]) -> list[CheckedFunction]:
    """Check every function against endpoint.toml; return them with their configuration."""
    _check_unique_slugs(specs)
    function_tables = _by_function(config.functions, specs, config, "functions")
    keyspaces = _by_function(config.models_by_function, specs, config, "models")
    checked = []
    for spec in specs:
        fn_config: FunctionConfig | None = function_tables.get(spec.name)
        keyspace: Mapping[str, ModelEntry] = keyspaces.get(spec.name, {})
        _check_injections(spec, config, keyspace)
        batch_dimension = None
        if fn_config is not None and fn_config.batch_dimension is not None:
            batch_dimension = fn_config.batch_dimension
            _check_batch_dimension(spec, batch_dimension, config, fn_config)
        resources = _merge_resources(spec, fn_config, config)
        checked.append(CheckedFunction(spec, batch_dimension, resources, keyspace))
    return checked


def _check_unique_slugs(specs: Sequence[FunctionSpec]) -> None:
    seen: dict[str, FunctionSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.name, spec)
        if other is not spec:
            raise DefinitionError(
                f"worker functions '{other.python_name}' and '{spec.python_name}' both have the "
                f"slug '{spec.name}'; rename one or give it @worker_function(name=...)"
            )


def _check_injections(
    spec: FunctionSpec, config: EndpointConfig, keyspace: Mapping[str, ModelEntry]
) -> None:
    label = f"worker function '{spec.python_name}'"
    for inj in spec.injections:
        if inj.source is ModelRefSource.FIXED:
            if inj.key not in config.models:
                raise EndpointConfigError(
                    config.path,
                    f"models.{inj.key}",
                    f"{label} parameter '{inj.param}' uses ModelRef(FIXED, '{inj.key}') but "
                    f"[models] has no '{inj.key}'; declare it there, e.g. "
                    f'{inj.key} = "owner/repo:tag" (declared: {sorted(config.models)})',
                )
            continue
        if not keyspace:
            raise EndpointConfigError(
                config.path,
                f"models.{spec.func.__name__}",
                f"{label} parameter '{inj.param}' selects its model with payload field "
                f"'{inj.key}', so the function needs a [models.{spec.func.__name__}] table "
                "listing the models callers may choose",
            )
        _check_selector_values(spec, inj.key, keyspace, config)


def _check_selector_values(
    spec: FunctionSpec, field_name: str, keyspace: Mapping[str, ModelEntry], config: EndpointConfig
) -> None:
    """A selector's default and Literal values must be keys callers are allowed to pick."""
    field = next(f for f in msgspec.structs.fields(spec.payload_type) if f.name == field_name)
    values: list[object] = []
    if typing.get_origin(field.type) is typing.Literal:
        values.extend(typing.get_args(field.type))
    if field.default is not msgspec.NODEFAULT:
        values.append(field.default)
    for value in values:
        if value not in keyspace:
            raise EndpointConfigError(
                config.path,
                f"models.{spec.func.__name__}",
                f"payload field {spec.payload_type.__name__}.{field_name} of worker function "
                f"'{spec.python_name}' allows {value!r}, which is not a key of this table; "
                f"valid keys: {sorted(keyspace)}",
            )


def _check_batch_dimension(
    spec: FunctionSpec, dimension: str, config: EndpointConfig, fn_config: FunctionConfig
) -> None:
    fields = {f.name: f.type for f in msgspec.structs.fields(spec.payload_type)}
    lists = sorted(n for n, t in fields.items() if t is list or typing.get_origin(t) is list)
    if dimension not in lists:
        problem = "is not a field of" if dimension not in fields else "is not a list field of"
        raise EndpointConfigError(
            config.path,
            f"functions.{fn_config.name}.batch_dimension",
            f"'{dimension}' {problem} {spec.payload_type.__name__}; batch_dimension must name a "
            f"list-typed payload field (list fields: {lists})",
        )


def _merge_resources(
    spec: FunctionSpec, fn_config: FunctionConfig | None, config: EndpointConfig
) -> ResourceRequirements:
    if fn_config is None or not fn_config.resources:
        return spec.resources
    merged = {**spec.resources.hints(), **fn_config.resources}
    try:
        return msgspec.convert(merged, ResourceRequirements)
    except (DefinitionError, msgspec.ValidationError) as exc:
        raise EndpointConfigError(
            config.path,
            f"functions.{fn_config.name}.resources",
            f"combined with the @worker_function resources of '{spec.python_name}': {exc}",
        ) from exc
