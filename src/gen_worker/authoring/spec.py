"""The frozen description of a worker function that the decorator attaches and the runtime reads."""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from gen_worker.errors import DefinitionError

__all__ = [
    "FunctionSpec",
    "InjectionSpec",
    "ModelRef",
    "ModelRefSource",
    "ResourceRequirements",
]


class ModelRefSource(enum.Enum):
    """Where a model parameter's model comes from."""

    #: A key of endpoint.toml's ``[models]`` table, fixed at build time.
    FIXED = "fixed"
    #: A ``str`` payload field whose value must be a key of ``[models.<function>]``; the
    #: caller picks among the keys the endpoint declared, never an arbitrary ref.
    PAYLOAD = "payload"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Marks a parameter as an injected model.

    ``Annotated[T, ModelRef(ModelRefSource.FIXED, "sdxl")]``; ``T`` picks the loader.

    It is validated by ``@worker_function``, which knows the function and parameter to name in
    the error, rather than here.
    """

    source: ModelRefSource
    key: str


_CAPABILITY = re.compile(r"^\d+\.\d+$")
_KINDS = ("inference", "conversion", "training")


class ResourceRequirements(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Scheduling hints for one function; every field is optional.

    Sizes must be positive; ``max_wait_ms`` and ``prefetch_depth`` may be 0.
    """

    batch_size_min: int | None = None
    batch_size_target: int | None = None
    batch_size_max: int | None = None
    prefetch_depth: int | None = None
    max_wait_ms: int | None = None
    memory_hint_mb: int | None = None
    kind: Literal["inference", "conversion", "training"] | None = None
    requires_gpu: bool | None = None
    min_vram_gb: float | None = None
    vram_multiplier: float | None = None
    compute_capability_min: str | None = None
    supported_precisions: tuple[str, ...] | None = None
    supported_conversion_profiles: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size_min", "batch_size_target", "batch_size_max", "memory_hint_mb"):
            _check_number(name, getattr(self, name), minimum=1, integral=True)
        for name in ("prefetch_depth", "max_wait_ms"):
            _check_number(name, getattr(self, name), minimum=0, integral=True)
        for name in ("min_vram_gb", "vram_multiplier"):
            _check_number(name, getattr(self, name), minimum=None, integral=False)
        _check_batch_order(self.batch_size_min, self.batch_size_target, self.batch_size_max)
        if self.kind is not None and self.kind not in _KINDS:
            raise DefinitionError(
                f"ResourceRequirements.kind={self.kind!r} is not valid; use one of {_KINDS}"
            )
        cap = self.compute_capability_min
        if cap is not None and (not isinstance(cap, str) or not _CAPABILITY.match(cap)):
            raise DefinitionError(
                f"ResourceRequirements.compute_capability_min={cap!r} is not valid; "
                'use a "major.minor" string such as "8.0"'
            )
        for name in ("supported_precisions", "supported_conversion_profiles"):
            _check_names(name, getattr(self, name))

    def hints(self) -> dict[str, Any]:
        """The fields that were set, as plain data (for endpoint.lock and the scheduler)."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


def _check_number(name: str, value: object, *, minimum: int | None, integral: bool) -> None:
    if value is None:
        return
    kind_ok = isinstance(value, int) if integral else isinstance(value, int | float)
    if isinstance(value, bool) or not kind_ok:
        want = "an int" if integral else "a number"
        raise DefinitionError(f"ResourceRequirements.{name}={value!r} is not valid; use {want}")
    assert isinstance(value, int | float)  # narrowed above; keeps mypy exact
    too_small = value < minimum if minimum is not None else value <= 0
    if too_small:
        bound = f">= {minimum}" if minimum is not None else "> 0"
        raise DefinitionError(
            f"ResourceRequirements.{name}={value!r} is not valid; it must be {bound}"
        )


def _check_batch_order(low: int | None, target: int | None, high: int | None) -> None:
    given = [(n, v) for n, v in (("min", low), ("target", target), ("max", high)) if v is not None]
    for (n1, v1), (n2, v2) in itertools.pairwise(given):
        if v1 > v2:
            raise DefinitionError(
                f"ResourceRequirements.batch_size_{n1}={v1} is larger than batch_size_{n2}={v2}; "
                "batch sizes must satisfy min <= target <= max"
            )


def _check_names(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple | list) or not all(isinstance(v, str) and v for v in value):
        raise DefinitionError(
            f"ResourceRequirements.{name}={value!r} is not valid; use a tuple of non-empty "
            'strings such as ("fp16", "bf16")'
        )


@dataclass(frozen=True, slots=True)
class InjectionSpec:
    """One model parameter of a worker function."""

    param: str
    #: The annotated type (``T`` in ``Annotated[T, ModelRef(...)]``): it picks the loader.
    type: Any
    source: ModelRefSource
    key: str


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """Everything the runtime needs to call a worker function, checked at decoration time."""

    func: Callable[..., Any]
    #: ``module:qualname``, how discovery and the runtime find the function again.
    python_name: str
    #: The URL-safe slug callers invoke it by.
    name: str
    ctx_param: str
    payload_param: str
    payload_type: type[msgspec.Struct]
    #: The returned Struct type, or for a streaming function the type of each delta.
    output_type: type[msgspec.Struct]
    is_streaming: bool
    is_async: bool
    injections: tuple[InjectionSpec, ...]
    resources: ResourceRequirements
    timeout_s: float | None

    @property
    def python_qualname(self) -> str:
        """The function's own name, as endpoint.toml tables may refer to it."""
        return self.python_name.rpartition(":")[2]
