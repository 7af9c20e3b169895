"""The example endpoint's functions behave as documented when called directly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gen_worker import RequestContext
from gen_worker.authoring import ContextHooks
from gen_worker.discovery import discover
from gen_worker.discovery.loader import import_main, isolated_imports
from gen_worker.errors import ValidationError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello-world"


@pytest.fixture
def example() -> Iterator[ModuleType]:
    with isolated_imports():
        yield import_main("hello_world.main", EXAMPLE)


def ctx(events: list[tuple[str, dict[str, Any]]] | None = None) -> RequestContext:
    sink = events if events is not None else []
    return RequestContext(
        request_id="r", function_name="f", hooks=ContextHooks(emit=lambda t, p: sink.append((t, p)))
    )


def test_hello(example: ModuleType) -> None:
    assert example.hello(ctx(), example.HelloInput(name="world")).message == "Hello, world!"
    with pytest.raises(ValidationError, match="name must not be empty"):
        example.hello(ctx(), example.HelloInput(name="  "))


def test_stream_words_yields_deltas_with_progress(example: ModuleType) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    deltas = list(example.stream_words(ctx(events), example.StreamInput(text="a b c")))
    assert [(d.index, d.word) for d in deltas] == [(0, "a"), (1, "b"), (2, "c")]
    assert [p["progress"] for _, p in events] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_word_lengths_is_async(example: ModuleType) -> None:
    out = asyncio.run(example.word_lengths(ctx(), example.TextsInput(texts=["a b", "", "x y z"])))
    assert out.lengths == [2, 0, 3]


def test_describe_models_lists_snapshot_files(example: ModuleType, tmp_path: Path) -> None:
    tok, weights = tmp_path / "tok", tmp_path / "w"
    tok.mkdir()
    weights.mkdir()
    (tok / "vocab.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"")
    (weights / "config.json").write_text("{}")
    out = example.describe_models(ctx(), tok, weights, example.ModelInput())
    assert out.tokenizer_files == ["vocab.json"]
    assert out.model_files == ["config.json", "model.safetensors"]


def test_example_declares_each_kind_of_function() -> None:
    lock = discover(EXAMPLE, isolated=True).lock
    by_name = {f.name: f for f in lock.functions}
    assert by_name["stream-words"].streaming
    assert by_name["word-lengths"].is_async and by_name["word-lengths"].batch_dimension == "texts"
    assert {i.source for i in by_name["describe-models"].injections} == {"fixed", "payload"}
