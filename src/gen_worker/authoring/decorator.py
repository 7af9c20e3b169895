"""``@worker_function``: validate a signature once, attach a frozen spec, return the function.

The decorator does not wrap: the function stays directly callable in the author's own tests.
Every mistake raises :class:`DefinitionError` naming the function, the parameter and the fix,
at import time, so a broken endpoint fails its image build instead of its first request.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

import msgspec

from gen_worker.authoring.context import RequestContext
from gen_worker.authoring.signature import analyse_return, classify_parameter
from gen_worker.authoring.slug import slugify
from gen_worker.authoring.spec import (
    FunctionSpec,
    InjectionSpec,
    ModelRefSource,
    ResourceRequirements,
)
from gen_worker.errors import DefinitionError

__all__ = ["SPEC_ATTRIBUTE", "find_function_spec", "get_function_spec", "worker_function"]

F = TypeVar("F", bound=Callable[..., Any])

#: Where the spec is attached on the decorated function.
SPEC_ATTRIBUTE = "__gen_worker_spec__"


@overload
def worker_function(fn: F, /) -> F: ...
@overload
def worker_function(
    *,
    name: str | None = None,
    resources: ResourceRequirements | None = None,
    timeout_s: float | None = None,
) -> Callable[[F], F]: ...


def worker_function(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    resources: ResourceRequirements | None = None,
    timeout_s: float | None = None,
) -> Any:
    """Declare a worker function: ``@worker_function()`` (or bare ``@worker_function``).

    ``name`` overrides the invocation name (it is slugified), ``resources`` gives scheduling
    hints, ``timeout_s`` is the default deadline when a request carries none.
    """
    _check_options(name, resources, timeout_s)

    def decorate(func: F) -> F:
        spec = _build_spec(func, name=name, resources=resources, timeout_s=timeout_s)
        setattr(func, SPEC_ATTRIBUTE, spec)
        return func

    if fn is not None:
        return decorate(fn)
    return decorate


def find_function_spec(obj: object) -> FunctionSpec | None:
    """The spec attached by ``@worker_function``, or None for anything else."""
    spec = getattr(obj, SPEC_ATTRIBUTE, None) if inspect.isfunction(obj) else None
    return spec if isinstance(spec, FunctionSpec) else None


def get_function_spec(obj: object) -> FunctionSpec:
    """The spec attached by ``@worker_function``; a clear error for anything else."""
    spec = find_function_spec(obj)
    if spec is None:
        raise DefinitionError(
            f"{obj!r} is not a worker function: was it decorated with @worker_function?"
        )
    return spec


def _check_options(name: object, resources: object, timeout_s: object) -> None:
    if name is not None and (not isinstance(name, str) or not slugify(name)):
        raise DefinitionError(
            f"@worker_function(name={name!r}): the name must be a string with at least one "
            "letter or digit, such as name='generate-image'"
        )
    if resources is not None and not isinstance(resources, ResourceRequirements):
        raise DefinitionError(
            f"@worker_function(resources={resources!r}): pass ResourceRequirements(...), "
            "e.g. resources=ResourceRequirements(min_vram_gb=16)"
        )
    bad_timeout = isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float | None)
    if bad_timeout or (isinstance(timeout_s, int | float) and timeout_s <= 0):
        raise DefinitionError(
            f"@worker_function(timeout_s={timeout_s!r}): the timeout must be a number of "
            "seconds > 0, e.g. timeout_s=120"
        )


def _build_spec(
    fn: object,
    *,
    name: str | None,
    resources: ResourceRequirements | None,
    timeout_s: float | None,
) -> FunctionSpec:
    if not inspect.isfunction(fn):
        raise DefinitionError(
            f"@worker_function must decorate a plain `def` or `async def` function, got {fn!r}"
        )
    label = f"worker function '{fn.__module__}.{fn.__qualname__}'"
    if find_function_spec(fn) is not None:
        raise DefinitionError(f"{label} is decorated with @worker_function twice; remove one")
    hints = _resolve_hints(fn, label)
    params = list(inspect.signature(fn).parameters.values())
    ctx_param = _check_ctx(params, hints, label)
    payload_param, payload_type, injections = _collect_parameters(params[1:], hints, label)
    _check_payload_selectors(injections, payload_type, label)
    shape = analyse_return(fn, hints, label)
    return FunctionSpec(
        func=fn,
        python_name=f"{fn.__module__}:{fn.__qualname__}",
        name=slugify(name if name is not None else fn.__name__),
        ctx_param=ctx_param,
        payload_param=payload_param,
        payload_type=payload_type,
        output_type=shape.output_type,
        is_streaming=shape.is_streaming,
        is_async=shape.is_async,
        injections=tuple(injections),
        resources=resources if resources is not None else ResourceRequirements(),
        timeout_s=float(timeout_s) if timeout_s is not None else None,
    )


def _resolve_hints(fn: Callable[..., Any], label: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:  # NameError, TypeError, SyntaxError from string annotations
        raise DefinitionError(
            f"{label}: cannot resolve its type annotations ({type(exc).__name__}: {exc}); "
            "define the payload, output and model types at module level before the function"
        ) from exc


def _check_ctx(params: list[inspect.Parameter], hints: dict[str, Any], label: str) -> str:
    fix = "declare it as `def f(ctx: RequestContext, payload: Input) -> Output`"
    if not params:
        raise DefinitionError(f"{label} takes no parameters; {fix}")
    first = params[0]
    if first.kind in (first.VAR_POSITIONAL, first.VAR_KEYWORD, first.KEYWORD_ONLY):
        raise DefinitionError(f"{label}: the first parameter must be the request context; {fix}")
    hint = hints.get(first.name)
    if hint is None:
        raise DefinitionError(
            f"{label}: parameter '{first.name}' has no annotation; annotate the first "
            f"parameter `{first.name}: RequestContext`"
        )
    if not (inspect.isclass(hint) and issubclass(hint, RequestContext)):
        raise DefinitionError(
            f"{label}: the first parameter '{first.name}' must be the request context "
            f"(annotated RequestContext, not {_describe(hint)}); {fix}"
        )
    return first.name


def _collect_parameters(
    params: list[inspect.Parameter], hints: dict[str, Any], label: str
) -> tuple[str, type[msgspec.Struct], list[InjectionSpec]]:
    payload: tuple[str, type[msgspec.Struct]] | None = None
    injections: list[InjectionSpec] = []
    for param in params:
        kind = classify_parameter(param, hints, label)
        if isinstance(kind, InjectionSpec):
            injections.append(kind)
            continue
        if payload is not None:
            raise DefinitionError(
                f"{label}: parameters '{payload[0]}' and '{param.name}' are both msgspec.Struct "
                "payloads; a worker function takes exactly one payload, so merge them into one "
                "Struct (nest one inside the other if needed)"
            )
        payload = (param.name, kind)
    if payload is None:
        raise DefinitionError(
            f"{label} has no payload parameter; add one typed as a msgspec.Struct, e.g. "
            "`payload: Input` with `class Input(msgspec.Struct): ...`"
        )
    return payload[0], payload[1], injections


def _check_payload_selectors(
    injections: list[InjectionSpec], payload_type: type[msgspec.Struct], label: str
) -> None:
    fields = {f.name: f.type for f in msgspec.structs.fields(payload_type)}
    for inj in injections:
        if inj.source is not ModelRefSource.PAYLOAD:
            continue
        field_type = fields.get(inj.key)
        if field_type is None:
            raise DefinitionError(
                f"{label}: parameter '{inj.param}' selects its model with payload field "
                f"'{inj.key}', but {payload_type.__name__} has no such field; add "
                f"`{inj.key}: str` to {payload_type.__name__} (fields: {sorted(fields)})"
            )
        if not _is_str_type(field_type):
            raise DefinitionError(
                f"{label}: parameter '{inj.param}' selects its model with payload field "
                f"'{inj.key}', which is typed {_describe(field_type)}; the selector field must "
                f"be a `str` (or a Literal of strings) holding a key of [models.<function>]"
            )


def _is_str_type(tp: object) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) is typing.Literal:
        return all(isinstance(v, str) for v in typing.get_args(tp))
    return False


def _describe(tp: object) -> str:
    return tp.__qualname__ if inspect.isclass(tp) else repr(tp)
