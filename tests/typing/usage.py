"""Typed usage of the public API, checked by `mypy --strict` (never run by pytest)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated

import msgspec

from gen_worker import (
    Asset,
    ModelRef,
    ModelRefSource,
    RequestContext,
    ResourceRequirements,
    worker_function,
)
from gen_worker.errors import GenWorkerError, RetryableError, ValidationError


class Input(msgspec.Struct):
    prompt: str
    model: str = "fast"
    image: Asset | None = None


class Output(msgspec.Struct):
    text: str


@worker_function()
def generate(ctx: RequestContext, payload: Input) -> Output:
    ctx.progress(0.5, stage="half")
    if not payload.prompt:
        raise ValidationError("prompt is required")
    return Output(text=payload.prompt)


@worker_function
def bare(ctx: RequestContext, payload: Input) -> Output:
    return Output(text="")


@worker_function(name="stream", timeout_s=30, resources=ResourceRequirements(min_vram_gb=8))
def stream(
    ctx: RequestContext,
    tokenizer: Annotated[Path, ModelRef(ModelRefSource.FIXED, "tokenizer")],
    payload: Input,
) -> Iterator[Output]:
    yield Output(text=str(tokenizer))


@worker_function()
async def astream(ctx: RequestContext, payload: Input) -> AsyncIterator[Output]:
    yield Output(text=payload.prompt)


# The decorator keeps the function's own type: calling it directly type-checks.
direct: Output = generate(
    RequestContext(request_id="r", function_name="generate"), Input(prompt="x")
)
remaining: float | None = RequestContext(request_id="r", function_name="f").time_remaining_s()
retryable: bool = RetryableError("x").retryable
kind: str = GenWorkerError.error_type
