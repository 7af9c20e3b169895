"""``gen_worker.testing``: run worker functions through the real engine, or call them directly."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import msgspec
import pytest

from gen_worker import ModelRef, ModelRefSource, RequestContext, worker_function
from gen_worker.engine import Delta, Failure, Result
from gen_worker.errors import GenWorkerError
from gen_worker.testing import (
    CapturedContext,
    FunctionRun,
    arun_function,
    make_context,
    run_function,
)

# -- functions under test -----------------------------------------------------------------------


class Greeting(msgspec.Struct):
    name: str
    times: int = 1


class Reply(msgspec.Struct):
    text: str


class Count(msgspec.Struct):
    n: int


class Tick(msgspec.Struct):
    i: int


class Nap(msgspec.Struct):
    seconds: float


class Saved(msgspec.Struct):
    ref: str
    size_bytes: int


class Prefixer:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix


@worker_function()
def greet(ctx: RequestContext, payload: Greeting) -> Reply:
    ctx.progress(0.5, stage="greeting")
    ctx.log("greeting someone")
    ctx.emit("custom.greeted", {"name": payload.name})
    return Reply(text=" ".join([f"hello {payload.name}"] * payload.times))


@worker_function()
def tick(ctx: RequestContext, payload: Count) -> Iterator[Tick]:
    for i in range(payload.n):
        ctx.progress((i + 1) / payload.n)
        yield Tick(i=i * 10)


@worker_function()
def prefixed(
    ctx: RequestContext,
    payload: Greeting,
    model: Annotated[object, ModelRef(ModelRefSource.FIXED, "k")],
) -> Reply:
    assert isinstance(model, Prefixer)
    return Reply(text=model.prefix + payload.name)


@worker_function()
def save_blob(ctx: RequestContext, payload: Greeting) -> Saved:
    asset = ctx.save_bytes("x.bin", payload.name.encode())
    assert asset.ref is not None and asset.size_bytes is not None
    return Saved(ref=asset.ref, size_bytes=asset.size_bytes)


@worker_function()
async def slow(ctx: RequestContext, payload: Nap) -> Reply:
    await asyncio.sleep(payload.seconds)
    return Reply(text="woke up")


@worker_function()
def explode(ctx: RequestContext, payload: Greeting) -> Reply:
    raise RuntimeError("boom with token=abc123")


@pytest.fixture(autouse=True)
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default output folders (``tempfile.mkdtemp``) go under this test's own tmp_path."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


# -- run_function: success ----------------------------------------------------------------------


def test_struct_payload_output_is_decoded_to_the_output_struct() -> None:
    result = run_function(greet, Greeting(name="ada", times=2))
    assert isinstance(result, FunctionRun)
    assert result.failure is None
    assert isinstance(result.output, Reply)
    assert result.output == Reply(text="hello ada hello ada")
    assert result.deltas == []
    assert isinstance(result.outcomes[-1], Result)
    result.raise_for_failure()  # success: does not raise


def test_dict_payload() -> None:
    result = run_function(greet, {"name": "bob"})
    assert result.output == Reply(text="hello bob")


def test_json_bytes_payload() -> None:
    result = run_function(greet, b'{"name": "cy", "times": 3}')
    assert result.output == Reply(text="hello cy hello cy hello cy")


def test_events_include_progress_log_and_custom_events() -> None:
    result = run_function(greet, {"name": "dee"})
    assert ("request.progress", {"progress": 0.5, "stage": "greeting"}) in result.events
    assert ("request.log", {"message": "greeting someone", "level": "info"}) in result.events
    assert ("custom.greeted", {"name": "dee"}) in result.events
    types = [t for t, _ in result.events]
    assert types[0] == "request.received"
    assert "request.completed" in types
    assert types.index("request.started") < types.index("request.progress")
    assert types.index("request.progress") < types.index("request.completed")


def test_events_leave_out_deltas_and_the_terminal_outcome() -> None:
    result = run_function(tick, {"n": 2})
    others = [o for o in result.outcomes if not isinstance(o, Delta | Result | Failure)]
    assert len(result.events) == len(others)
    assert sum(isinstance(o, Delta) for o in result.outcomes) == 2
    assert [p["progress"] for t, p in result.events if t == "request.progress"] == [0.5, 1.0]


def test_arun_function_inside_a_running_loop() -> None:
    async def go() -> FunctionRun:
        return await arun_function(greet, {"name": "eve"}, request_id="async-1")

    result = asyncio.run(go())
    assert result.output == Reply(text="hello eve")


# -- streaming -----------------------------------------------------------------------------------


def test_streaming_function_deltas() -> None:
    result = run_function(tick, Count(n=3))
    assert result.failure is None
    assert result.deltas == [Tick(i=0), Tick(i=10), Tick(i=20)]
    assert all(isinstance(d, Tick) for d in result.deltas)
    assert result.output is None
    progress = [p["progress"] for t, p in result.events if t == "request.progress"]
    assert progress == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_streaming_function_with_no_items() -> None:
    result = run_function(tick, {"n": 0})
    assert result.failure is None
    assert result.deltas == []


# -- failures ------------------------------------------------------------------------------------


def test_wrong_type_is_a_validation_failure_naming_the_path() -> None:
    result = run_function(greet, {"name": 5})
    assert result.output is None
    failure = result.failure
    assert isinstance(failure, Failure)
    assert failure.error_type == "validation"
    assert failure.retryable is False
    assert "$.name" in failure.safe_message
    assert "Expected `str`, got `int`" in failure.safe_message
    assert failure.safe_message.startswith("invalid payload:")


def test_nested_wrong_type_in_bytes_payload() -> None:
    result = run_function(greet, b'{"name": "x", "times": "two"}')
    assert result.failure is not None
    assert result.failure.error_type == "validation"
    assert "$.times" in result.failure.safe_message


def test_missing_field_is_a_validation_failure() -> None:
    result = run_function(greet, {})
    assert result.failure is not None
    assert result.failure.error_type == "validation"
    assert "name" in result.failure.safe_message


def test_malformed_json_bytes_is_a_validation_failure() -> None:
    result = run_function(greet, b"{not json")
    assert result.failure is not None
    assert result.failure.error_type == "validation"
    assert result.failure.safe_message.startswith("payload is not valid json")


def test_raise_for_failure_raises_with_type_and_message() -> None:
    result = run_function(greet, {"name": 5})
    with pytest.raises(GenWorkerError) as info:
        result.raise_for_failure()
    assert str(info.value).startswith("validation: invalid payload: Expected `str`, got `int`")


def test_unexpected_exception_is_internal_with_redacted_detail() -> None:
    result = run_function(explode, {"name": "z"})
    failure = result.failure
    assert failure is not None
    assert failure.error_type == "internal"
    assert failure.safe_message == "internal error in function 'explode'"
    assert "RuntimeError" in failure.error_message
    assert "abc123" not in failure.error_message
    assert "token=[REDACTED]" in failure.error_message
    with pytest.raises(GenWorkerError, match=r"^internal: internal error in function 'explode'"):
        result.raise_for_failure()


def test_timeout_ms_gives_a_timeout_failure_for_a_slow_async_function() -> None:
    start = time.monotonic()
    result = run_function(slow, {"seconds": 30}, timeout_ms=50, request_id="slow-1")
    elapsed = time.monotonic() - start
    assert elapsed < 5
    failure = result.failure
    assert failure is not None
    assert failure.error_type == "timeout"
    assert failure.safe_message == "request slow-1 did not finish within its deadline of 0.05 s"
    assert result.output is None
    with pytest.raises(GenWorkerError, match=r"^timeout: "):
        result.raise_for_failure()


def test_timeout_ms_does_not_affect_a_fast_function() -> None:
    result = run_function(slow, {"seconds": 0}, timeout_ms=5000)
    assert result.failure is None
    assert result.output == Reply(text="woke up")


# -- models --------------------------------------------------------------------------------------


def test_models_are_injected_by_parameter_name() -> None:
    result = run_function(prefixed, {"name": "grace"}, models={"model": Prefixer("dr. ")})
    assert result.failure is None
    assert result.output == Reply(text="dr. grace")


def test_missing_model_object_fails_naming_the_parameter() -> None:
    result = run_function(prefixed, {"name": "grace"})
    failure = result.failure
    assert failure is not None
    assert failure.safe_message == (
        "run_function(models=...) has no object for model parameter 'model'"
    )
    assert result.output is None


def test_model_given_under_another_name_is_missing() -> None:
    result = run_function(prefixed, {"name": "grace"}, models={"k": Prefixer("x")})
    assert result.failure is not None
    assert "'model'" in result.failure.safe_message


# -- outputs -------------------------------------------------------------------------------------


def test_saved_outputs_land_under_outputs_dir(tmp_path: Path) -> None:
    result = run_function(
        save_blob, {"name": "payload-bytes"}, outputs_dir=tmp_path, request_id="r-7"
    )
    assert result.failure is None
    assert result.output == Saved(ref="jobs/r-7/outputs/x.bin", size_bytes=13)
    path = tmp_path / "jobs" / "r-7" / "outputs" / "x.bin"
    assert path.read_bytes() == b"payload-bytes"


def test_outputs_go_to_a_fresh_temporary_folder_by_default(temp_root: Path) -> None:
    first = run_function(save_blob, {"name": "a"}, request_id="same-id")
    second = run_function(save_blob, {"name": "bc"}, request_id="same-id")
    assert first.output == Saved(ref="jobs/same-id/outputs/x.bin", size_bytes=1)
    assert second.output == Saved(ref="jobs/same-id/outputs/x.bin", size_bytes=2)
    folders = sorted(temp_root.glob("gw-*"))
    assert len(folders) == 2
    contents = {(f / "jobs/same-id/outputs/x.bin").read_bytes() for f in folders}
    assert contents == {b"a", b"bc"}


def test_generated_request_ids_differ() -> None:
    first = run_function(save_blob, {"name": "a"})
    second = run_function(save_blob, {"name": "a"})
    assert isinstance(first.output, Saved) and isinstance(second.output, Saved)
    assert first.output.ref.startswith("jobs/test-")
    assert first.output.ref != second.output.ref


# -- make_context ---------------------------------------------------------------------------------


def test_make_context_defaults(temp_root: Path) -> None:
    captured = make_context()
    assert isinstance(captured, CapturedContext)
    ctx = captured.context
    assert isinstance(ctx, RequestContext)
    assert ctx.function_name == "test"
    assert ctx.request_id.startswith("test-")
    assert ctx.device == "cpu"
    assert ctx.timeout_ms is None and ctx.deadline is None
    assert captured.events == [] and captured.progress == [] and captured.outputs == []
    ctx.save_bytes("y.txt", b"hi")
    [folder] = temp_root.glob("gw-*")
    assert (folder / "jobs" / ctx.request_id / "outputs" / "y.txt").read_bytes() == b"hi"


def test_make_context_options() -> None:
    captured = make_context(
        function_name="greet", request_id="ctx-9", timeout_ms=2000, device="cuda:0"
    )
    ctx = captured.context
    assert (ctx.function_name, ctx.request_id, ctx.device) == ("greet", "ctx-9", "cuda:0")
    assert ctx.timeout_ms == 2000
    remaining = ctx.time_remaining_s()
    assert remaining is not None and 0 < remaining <= 2.0


def test_direct_call_with_captured_context_records_progress_and_events() -> None:
    captured = make_context(request_id="ctx-1")
    reply = greet(captured.context, Greeting(name="hal"))
    assert reply == Reply(text="hello hal")
    assert captured.progress == [0.5]
    assert captured.events == [
        ("request.progress", {"progress": 0.5, "stage": "greeting"}),
        ("request.log", {"message": "greeting someone", "level": "info"}),
        ("custom.greeted", {"name": "hal"}),
    ]


def test_direct_call_of_a_streaming_function() -> None:
    captured = make_context()
    assert list(tick(captured.context, Count(n=2))) == [Tick(i=0), Tick(i=10)]
    assert captured.progress == [0.5, 1.0]


def test_direct_call_records_outputs(tmp_path: Path) -> None:
    captured = make_context(request_id="ctx-2", outputs_dir=tmp_path)
    saved = save_blob(captured.context, Greeting(name="abc"))
    assert saved == Saved(ref="jobs/ctx-2/outputs/x.bin", size_bytes=3)
    assert [a.ref for a in captured.outputs] == ["jobs/ctx-2/outputs/x.bin"]
    assert captured.outputs[0].size_bytes == 3
    assert (tmp_path / "jobs" / "ctx-2" / "outputs" / "x.bin").read_bytes() == b"abc"


def test_direct_call_with_a_model_object() -> None:
    captured = make_context()
    reply = prefixed(captured.context, Greeting(name="ian"), Prefixer("mr. "))
    assert reply == Reply(text="mr. ian")
