"""@worker_function: what it accepts, what it records, and every DefinitionError it raises."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest

from gen_worker import (
    ModelRef,
    ModelRefSource,
    RequestContext,
    ResourceRequirements,
    worker_function,
)
from gen_worker.authoring import FunctionSpec, get_function_spec
from gen_worker.errors import DefinitionError


class Input(msgspec.Struct):
    prompt: str
    model: str = "a"
    count: int = 1


class Other(msgspec.Struct):
    x: int


class Output(msgspec.Struct):
    text: str


FIXED = ModelRef(ModelRefSource.FIXED, "sdxl")
PAYLOAD = ModelRef(ModelRefSource.PAYLOAD, "model")


def spec_of(fn: Any) -> FunctionSpec:
    return get_function_spec(fn)


def test_plain_function_is_returned_unwrapped_and_callable() -> None:
    def generate(ctx: RequestContext, payload: Input) -> Output:
        return Output(text=f"Hello, {payload.prompt}!")

    decorated = worker_function()(generate)
    assert decorated is generate
    ctx = RequestContext(request_id="r1", function_name="generate")
    assert decorated(ctx, Input(prompt="x")) == Output(text="Hello, x!")
    spec = spec_of(generate)
    assert spec.name == "generate"
    assert (
        spec.python_name
        == f"{__name__}:test_plain_function_is_returned_unwrapped_and_callable.<locals>.generate"
    )
    assert (spec.ctx_param, spec.payload_param) == ("ctx", "payload")
    assert spec.payload_type is Input and spec.output_type is Output
    assert not spec.is_streaming and not spec.is_async
    assert spec.injections == () and spec.timeout_s is None
    assert spec.resources == ResourceRequirements()


def test_bare_decorator_and_options() -> None:
    @worker_function
    def bare(ctx: RequestContext, payload: Input) -> Output:
        return Output(text="")

    @worker_function(
        name="Make_Image v2", timeout_s=5, resources=ResourceRequirements(min_vram_gb=8)
    )
    async def medasr_transcribe(ctx: RequestContext, payload: Input) -> Output:
        return Output(text="")

    assert spec_of(bare).name == "bare"
    spec = spec_of(medasr_transcribe)
    assert spec.name == "make-image-v2"
    assert spec.is_async and not spec.is_streaming
    assert spec.timeout_s == 5.0
    assert spec.resources.hints() == {"min_vram_gb": 8}


def test_slug_comes_from_the_python_name() -> None:
    @worker_function()
    def medasr_transcribe(ctx: RequestContext, payload: Input) -> Output:
        return Output(text="")

    assert spec_of(medasr_transcribe).name == "medasr-transcribe"


def test_model_parameters_in_any_order_after_ctx() -> None:
    @worker_function()
    def generate(
        ctx: RequestContext,
        pipe: Annotated[object, PAYLOAD],
        payload: Input,
        tokenizer: Annotated[Path, FIXED],
    ) -> Output:
        return Output(text="")

    spec = spec_of(generate)
    assert spec.payload_param == "payload"
    assert [(i.param, i.type, i.source, i.key) for i in spec.injections] == [
        ("pipe", object, ModelRefSource.PAYLOAD, "model"),
        ("tokenizer", Path, ModelRefSource.FIXED, "sdxl"),
    ]


def test_payload_selector_may_be_a_literal_of_strings() -> None:
    class Choice(msgspec.Struct):
        model: Literal["a", "b"] = "a"

    globals()["Choice"] = Choice  # get_type_hints resolves names from the module
    try:

        @worker_function()
        def pick(ctx: RequestContext, payload: Choice, m: Annotated[object, PAYLOAD]) -> Output:
            return Output(text="")

        assert spec_of(pick).injections[0].key == "model"
    finally:
        del globals()["Choice"]


def sync_gen(ctx: RequestContext, payload: Input) -> Iterator[Output]:
    yield Output(text="a")


def sync_generator(ctx: RequestContext, payload: Input) -> Generator[Output, None, None]:
    yield Output(text="a")


def sync_returns_iterator(ctx: RequestContext, payload: Input) -> Iterator[Output]:
    return iter([Output(text="a")])


async def async_gen(ctx: RequestContext, payload: Input) -> AsyncIterator[Output]:
    yield Output(text="a")


async def async_generator(ctx: RequestContext, payload: Input) -> AsyncGenerator[Output, None]:
    yield Output(text="a")


@pytest.mark.parametrize(
    ("fn", "is_async"),
    [
        (sync_gen, False),
        (sync_generator, False),
        (sync_returns_iterator, False),
        (async_gen, True),
        (async_generator, True),
    ],
)
def test_streaming_detection(fn: Any, is_async: bool) -> None:
    spec = spec_of(worker_function()(fn))
    assert spec.is_streaming
    assert spec.is_async is is_async
    assert spec.output_type is Output


# -- every mistake ------------------------------------------------------------------------


def no_params() -> Output:
    return Output(text="")


def no_ctx(payload: Input) -> Output:
    return Output(text="")


def ctx_unannotated(ctx, payload: Input) -> Output:  # type: ignore[no-untyped-def]
    return Output(text="")


def ctx_kw_only(*, ctx: RequestContext, payload: Input) -> Output:
    return Output(text="")


def two_payloads(ctx: RequestContext, payload: Input, extra: Other) -> Output:
    return Output(text="")


def no_payload(ctx: RequestContext, m: Annotated[object, FIXED]) -> Output:
    return Output(text="")


def payload_not_struct(ctx: RequestContext, payload: dict[str, str]) -> Output:
    return Output(text="")


def unannotated_param(ctx: RequestContext, payload: Input, model) -> Output:  # type: ignore[no-untyped-def]
    return Output(text="")


def var_args(ctx: RequestContext, payload: Input, *rest: Any) -> Output:
    return Output(text="")


def positional_only(ctx: RequestContext, payload: Input, /) -> Output:
    return Output(text="")


def no_return(ctx: RequestContext, payload: Input):  # type: ignore[no-untyped-def]
    return Output(text="")


def return_not_struct(ctx: RequestContext, payload: Input) -> dict[str, str]:
    return {}


def stream_of_non_struct(ctx: RequestContext, payload: Input) -> Iterator[str]:
    yield "a"


def generator_with_send(ctx: RequestContext, payload: Input) -> Generator[Output, int, None]:
    yield Output(text="a")


def yields_but_single(ctx: RequestContext, payload: Input) -> Output:  # type: ignore[misc]
    yield Output(text="a")


async def async_annotated_iterator(ctx: RequestContext, payload: Input) -> Iterator[Output]:  # type: ignore[misc]
    yield Output(text="a")


def sync_annotated_async(ctx: RequestContext, payload: Input) -> AsyncIterator[Output]:  # type: ignore[empty-body]
    ...


async def coroutine_annotated_async_iterator(
    ctx: RequestContext, payload: Input
) -> AsyncIterator[Output]:  # type: ignore[empty-body]
    ...


def two_model_refs(
    ctx: RequestContext, payload: Input, m: Annotated[object, FIXED, PAYLOAD]
) -> Output:
    return Output(text="")


def bad_ref_source(
    ctx: RequestContext,
    payload: Input,
    m: Annotated[object, ModelRef("fixed", "sdxl")],  # type: ignore[arg-type]
) -> Output:
    return Output(text="")


def bad_ref_key(
    ctx: RequestContext, payload: Input, m: Annotated[object, ModelRef(ModelRefSource.FIXED, "")]
) -> Output:
    return Output(text="")


def selector_missing(
    ctx: RequestContext,
    payload: Input,
    m: Annotated[object, ModelRef(ModelRefSource.PAYLOAD, "checkpoint")],
) -> Output:
    return Output(text="")


def selector_not_str(
    ctx: RequestContext,
    payload: Input,
    m: Annotated[object, ModelRef(ModelRefSource.PAYLOAD, "count")],
) -> Output:
    return Output(text="")


def unresolvable(ctx: RequestContext, payload: NotDefinedAnywhere) -> Output:  # type: ignore[name-defined]  # noqa: F821
    return Output(text="")


def ctx_wrong_type(ctx: Input, payload: Input) -> Output:
    return Output(text="")


def ctx_twice(ctx: RequestContext, payload: Input, other: RequestContext) -> Output:
    return Output(text="")


MISTAKES = [
    (no_params, "takes no parameters", "def f(ctx: RequestContext, payload: Input) -> Output"),
    (no_ctx, "first parameter 'payload' must be the request context", "annotated RequestContext"),
    (ctx_unannotated, "parameter 'ctx' has no annotation", "`ctx: RequestContext`"),
    (ctx_kw_only, "first parameter must be the request context", "def f(ctx: RequestContext"),
    (ctx_wrong_type, "first parameter 'ctx' must be the request context", "not Input"),
    (
        two_payloads,
        "parameters 'payload' and 'extra' are both msgspec.Struct payloads",
        "exactly one payload",
    ),
    (no_payload, "has no payload parameter", "`payload: Input`"),
    (payload_not_struct, "parameter 'payload' is typed", "msgspec.Struct subclass"),
    (unannotated_param, "parameter 'model' has no type annotation", "Annotated[T, ModelRef("),
    (var_args, "parameter 'rest': *args and **kwargs are not allowed", "named parameter"),
    (positional_only, "parameter 'payload' is positional-only", "remove the `/`"),
    (ctx_twice, "parameter 'other' is typed RequestContext", "msgspec.Struct subclass"),
    (no_return, "has no return annotation", "`-> Iterator[Delta]`"),
    (return_not_struct, "returns dict[str, str], which is not supported", "`-> Output`"),
    (stream_of_non_struct, "streams str items", "must be a msgspec.Struct"),
    (generator_with_send, "Generator[Output, None, None]", "neither sends values in"),
    (
        yields_but_single,
        "uses `yield` but is annotated to return one Output",
        "`-> Iterator[Output]`",
    ),
    (async_annotated_iterator, "is an `async def` but is annotated `Iterator`", "AsyncIterator"),
    (sync_annotated_async, "not an `async def` with `yield`", "async generator"),
    (coroutine_annotated_async_iterator, "not an `async def` with `yield`", "async generator"),
    (two_model_refs, "parameter 'm' has 2 ModelRef markers", "keep exactly one"),
    (bad_ref_source, "ModelRef source 'fixed' is not valid", "ModelRefSource.FIXED"),
    (bad_ref_key, "ModelRef key '' is not valid", "[models] key"),
    (
        selector_missing,
        "payload field 'checkpoint', but Input has no such field",
        "`checkpoint: str`",
    ),
    (selector_not_str, "'count', which is typed int", "must be a `str`"),
    (unresolvable, "cannot resolve its type annotations (NameError", "module level"),
]


@pytest.mark.parametrize(("fn", "problem", "fix"), MISTAKES, ids=[m[0].__name__ for m in MISTAKES])
def test_every_mistake_names_function_parameter_and_fix(fn: Any, problem: str, fix: str) -> None:
    with pytest.raises(DefinitionError) as info:
        worker_function()(fn)
    message = str(info.value)
    assert f"worker function '{__name__}.{fn.__name__}'" in message
    assert problem in message
    assert fix in message
    assert not hasattr(fn, "__gen_worker_spec__")


def test_decorating_twice_is_an_error() -> None:
    def f(ctx: RequestContext, payload: Input) -> Output:
        return Output(text="")

    worker_function()(f)
    with pytest.raises(DefinitionError, match="decorated with @worker_function twice"):
        worker_function()(f)


def test_only_functions_can_be_decorated() -> None:
    class NotAFunction:
        def __call__(self, ctx: RequestContext, payload: Input) -> Output:
            return Output(text="")

    with pytest.raises(DefinitionError, match="must decorate a plain `def` or `async def`"):
        worker_function()(NotAFunction())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "___"}, "the name must be a string with at least one letter or digit"),
        ({"name": 3}, "the name must be a string"),
        ({"timeout_s": 0}, "timeout must be a number of seconds > 0"),
        ({"timeout_s": -1.5}, "timeout must be a number of seconds > 0"),
        ({"timeout_s": True}, "timeout must be a number of seconds > 0"),
        ({"timeout_s": "10"}, "timeout must be a number of seconds > 0"),
        ({"resources": {"min_vram_gb": 8}}, "pass ResourceRequirements(...)"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError) as info:
        worker_function(**kwargs)
    assert message in str(info.value)


def test_get_function_spec_on_an_undecorated_function() -> None:
    def plain() -> None:
        return None

    with pytest.raises(DefinitionError, match="was it decorated with @worker_function"):
        get_function_spec(plain)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size_min": 0}, "batch_size_min=0 is not valid; it must be >= 1"),
        ({"batch_size_max": -4}, "batch_size_max=-4 is not valid; it must be >= 1"),
        ({"memory_hint_mb": 0}, "memory_hint_mb=0 is not valid"),
        ({"prefetch_depth": -1}, "prefetch_depth=-1 is not valid; it must be >= 0"),
        ({"max_wait_ms": 1.5}, "max_wait_ms=1.5 is not valid; use an int"),
        ({"min_vram_gb": 0}, "min_vram_gb=0 is not valid; it must be > 0"),
        ({"vram_multiplier": -1.0}, "vram_multiplier=-1.0 is not valid; it must be > 0"),
        ({"batch_size_target": True}, "use an int"),
        (
            {"batch_size_min": 8, "batch_size_max": 4},
            "batch_size_min=8 is larger than batch_size_max=4",
        ),
        ({"batch_size_target": 9, "batch_size_max": 4}, "min <= target <= max"),
        ({"kind": "serving"}, "kind='serving' is not valid; use one of"),
        ({"compute_capability_min": "8"}, '"major.minor" string such as "8.0"'),
        ({"supported_precisions": ("fp16", "")}, "tuple of non-empty strings"),
    ],
)
def test_resource_requirements_reject_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError) as info:
        ResourceRequirements(**kwargs)
    assert message in str(info.value)


def test_resource_requirements_hints_only_list_set_fields() -> None:
    r = ResourceRequirements(
        batch_size_min=1, batch_size_target=4, batch_size_max=8, requires_gpu=True
    )
    assert r.hints() == {
        "batch_size_min": 1,
        "batch_size_target": 4,
        "batch_size_max": 8,
        "requires_gpu": True,
    }
