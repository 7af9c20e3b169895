"""Small worker functions that show the authoring API end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import msgspec

from gen_worker import Asset, ModelRef, ModelRefSource, RequestContext, worker_function
from gen_worker.errors import ValidationError


class HelloInput(msgspec.Struct):
    name: str


class HelloOutput(msgspec.Struct):
    message: str


@worker_function()
def hello(ctx: RequestContext, payload: HelloInput) -> HelloOutput:
    """A plain function: one payload in, one output back."""
    if not payload.name.strip():
        raise ValidationError("name must not be empty")
    return HelloOutput(message=f"Hello, {payload.name}!")


class GenerateInput(msgspec.Struct):
    prompt: str


class GenerateOutput(msgspec.Struct):
    caption: str
    image: Asset


@worker_function()
def generate(ctx: RequestContext, payload: GenerateInput) -> GenerateOutput:
    """Saves an output file (a tiny PPM image whose colour comes from the prompt)."""
    ctx.progress(0.5, stage="render")
    shade = sum(payload.prompt.encode()) % 256
    pixels = bytes([shade, 255 - shade, 128]) * (8 * 8)
    image = ctx.save_bytes("image.ppm", b"P6 8 8 255\n" + pixels)
    return GenerateOutput(caption=f"an 8x8 image for {payload.prompt!r}", image=image)


class StreamInput(msgspec.Struct):
    text: str
    delay_ms: int = 0


class WordDelta(msgspec.Struct):
    index: int
    word: str


@worker_function(timeout_s=60)
def stream_words(ctx: RequestContext, payload: StreamInput) -> Iterator[WordDelta]:
    """A streaming function: each yielded delta reaches the caller as soon as it is produced."""
    words = payload.text.split()
    for index, word in enumerate(words):
        ctx.raise_if_canceled()
        ctx.progress((index + 1) / len(words), stage="streaming")
        yield WordDelta(index=index, word=word)
        time.sleep(payload.delay_ms / 1000)


class TextsInput(msgspec.Struct):
    texts: list[str]


class LengthsOutput(msgspec.Struct):
    lengths: list[int]


@worker_function()
async def word_lengths(ctx: RequestContext, payload: TextsInput) -> LengthsOutput:
    """An async function whose payload the platform may batch along ``texts``."""
    return LengthsOutput(lengths=[len(t.split()) for t in payload.texts])


class ModelInput(msgspec.Struct):
    #: Which model of [models.describe_models] to use; callers can only pick those keys.
    model: str = "small"


class ModelFiles(msgspec.Struct):
    tokenizer_files: list[str]
    model_files: list[str]


@worker_function()
def describe_models(
    ctx: RequestContext,
    tokenizer: Annotated[Path, ModelRef(ModelRefSource.FIXED, "tokenizer")],
    weights: Annotated[Path, ModelRef(ModelRefSource.PAYLOAD, "model")],
    payload: ModelInput,
) -> ModelFiles:
    """A FIXED and a PAYLOAD-selected model, injected as their snapshot directories."""
    return ModelFiles(
        tokenizer_files=sorted(p.name for p in tokenizer.iterdir()),
        model_files=sorted(p.name for p in weights.iterdir()),
    )
