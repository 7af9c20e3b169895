"""Reading a worker function's parameters and return annotation into spec parts."""

from __future__ import annotations

import collections.abc as cabc
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any

import msgspec

from gen_worker.authoring.spec import InjectionSpec, ModelRef, ModelRefSource
from gen_worker.errors import DefinitionError

__all__ = ["ReturnShape", "analyse_return", "classify_parameter"]

_MODEL_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_PARAM_FIX = (
    "annotate it as the payload (a msgspec.Struct subclass) or as a model "
    '(Annotated[T, ModelRef(ModelRefSource.FIXED, "key")])'
)


def _is_struct(tp: object) -> bool:
    return inspect.isclass(tp) and issubclass(tp, msgspec.Struct)


def _name(tp: object) -> str:
    return tp.__qualname__ if inspect.isclass(tp) else repr(tp)


def classify_parameter(
    param: inspect.Parameter, hints: dict[str, Any], label: str
) -> InjectionSpec | type[msgspec.Struct]:
    """A model parameter's injection, or the payload Struct type; anything else is an error."""
    where = f"{label}: parameter '{param.name}'"
    if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        raise DefinitionError(
            f"{where}: *args and **kwargs are not allowed; declare the payload and each model "
            "as a named parameter"
        )
    if param.kind is param.POSITIONAL_ONLY:
        raise DefinitionError(
            f"{where} is positional-only; remove the `/` so the worker can pass it by name"
        )
    if param.name not in hints:
        raise DefinitionError(f"{where} has no type annotation; {_PARAM_FIX}")
    hint = hints[param.name]
    if typing.get_origin(hint) is typing.Annotated:
        base, *metadata = typing.get_args(hint)
        refs = [m for m in metadata if isinstance(m, ModelRef)]
        if len(refs) > 1:
            raise DefinitionError(f"{where} has {len(refs)} ModelRef markers; keep exactly one")
        if refs:
            return _injection(param.name, base, refs[0], where)
        hint = base
    if _is_struct(hint):
        return typing.cast("type[msgspec.Struct]", hint)
    raise DefinitionError(f"{where} is typed {_name(hint)}; {_PARAM_FIX}")


def _injection(param: str, base: object, ref: ModelRef, where: str) -> InjectionSpec:
    if not isinstance(ref.source, ModelRefSource):
        raise DefinitionError(
            f"{where}: ModelRef source {ref.source!r} is not valid; use ModelRefSource.FIXED "
            "(a key of [models]) or ModelRefSource.PAYLOAD (a payload field naming the model)"
        )
    if not isinstance(ref.key, str) or not _MODEL_KEY.match(ref.key):
        what = "[models] key" if ref.source is ModelRefSource.FIXED else "payload field name"
        raise DefinitionError(
            f"{where}: ModelRef key {ref.key!r} is not valid; give the {what} as a non-empty "
            "string of letters, digits, '_', '.' or '-'"
        )
    return InjectionSpec(param=param, type=base, source=ref.source, key=ref.key)


@dataclass(frozen=True, slots=True)
class ReturnShape:
    output_type: type[msgspec.Struct]
    is_streaming: bool
    is_async: bool


_SYNC_STREAMS = (cabc.Iterator, cabc.Generator)
_ASYNC_STREAMS = (cabc.AsyncIterator, cabc.AsyncGenerator)
_RETURN_FIX = (
    "annotate the return as a msgspec.Struct (`-> Output`) or, to stream, as "
    "`-> Iterator[Delta]` / `-> Generator[Delta, None, None]` (def with yield) or "
    "`-> AsyncIterator[Delta]` / `-> AsyncGenerator[Delta, None]` (async def with yield)"
)


def analyse_return(fn: typing.Callable[..., Any], hints: dict[str, Any], label: str) -> ReturnShape:
    """Decide single vs streaming output, check it against how the function is defined."""
    if "return" not in hints:
        raise DefinitionError(f"{label} has no return annotation; {_RETURN_FIX}")
    hint = hints["return"]
    is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
    if _is_struct(hint):
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise DefinitionError(
                f"{label} uses `yield` but is annotated to return one {_name(hint)}; to stream, "
                f"annotate `-> Iterator[{_name(hint)}]` (or AsyncIterator for async def)"
            )
        return ReturnShape(typing.cast("type[msgspec.Struct]", hint), False, is_async)
    origin = typing.get_origin(hint)
    if origin in _SYNC_STREAMS or origin in _ASYNC_STREAMS:
        delta = _stream_item(hint, label)
        _check_stream_kind(fn, origin in _ASYNC_STREAMS, label)
        return ReturnShape(delta, True, is_async)
    raise DefinitionError(f"{label} returns {_name(hint)}, which is not supported; {_RETURN_FIX}")


def _stream_item(hint: object, label: str) -> type[msgspec.Struct]:
    args = typing.get_args(hint)
    item = args[0] if args else None
    if not _is_struct(item):
        raise DefinitionError(
            f"{label} streams {_name(item)} items; each streamed delta must be a msgspec.Struct, "
            "e.g. `-> Iterator[Delta]` with `class Delta(msgspec.Struct): ...`"
        )
    # Generator[S, send, ret] / AsyncGenerator[S, send]: the worker never sends a value in and
    # drops a return value, so anything but None would be silently lost.
    if any(extra not in (None, type(None)) for extra in args[1:]):
        raise DefinitionError(
            f"{label}: streaming generators must be Generator[{_name(item)}, None, None] or "
            f"AsyncGenerator[{_name(item)}, None]; the worker neither sends values in nor "
            "reads a return value"
        )
    return typing.cast("type[msgspec.Struct]", item)


def _check_stream_kind(fn: typing.Callable[..., Any], annotated_async: bool, label: str) -> None:
    if annotated_async and not inspect.isasyncgenfunction(fn):
        raise DefinitionError(
            f"{label} is annotated to stream asynchronously but is not an `async def` with "
            "`yield`; write it as an async generator, or annotate `-> Iterator[...]` for a "
            "plain def generator"
        )
    if not annotated_async and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
        raise DefinitionError(
            f"{label} is an `async def` but is annotated `Iterator`/`Generator`; annotate "
            "`-> AsyncIterator[...]` and `yield` from the async def"
        )
