"""The engine's OOM retries around single-output calls, and ladder events reaching requests.

A function whose injected pipeline raises a real ``torch.cuda.OutOfMemoryError`` on its first
calls is retried (at most twice) after each injected pipeline moved one ladder step; when a
step changes nothing, or after the retries, the request fails as ``resource`` (retryable).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
import pytest

torch = pytest.importorskip("torch")

from gen_worker import (  # noqa: E402
    ModelRef,
    ModelRefSource,
    RequestContext,
    apply_low_vram_config,
    worker_function,
)
from gen_worker.authoring import FunctionSpec, InjectionSpec, get_function_spec  # noqa: E402
from gen_worker.engine import Engine, Event, Failure, Outcome, RequestMeta, Result  # noqa: E402


class FlakyPipeline:
    """Raises CUDA OOM on its first ``failures`` calls; records the ladder's enable_* calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.enabled: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return prompt.upper()

    def enable_vae_slicing(self) -> None:
        self.enabled.append("vae_slicing")

    def enable_vae_tiling(self) -> None:
        self.enabled.append("vae_tiling")

    def enable_attention_slicing(self) -> None:
        self.enabled.append("attention_slicing")

    def enable_model_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        self.enabled.append("model_cpu_offload")


class Prompt(msgspec.Struct):
    prompt: str = "hi"


class Text(msgspec.Struct):
    text: str


@worker_function()
def paint(
    ctx: RequestContext,
    pipe: Annotated[FlakyPipeline, ModelRef(ModelRefSource.FIXED, "pipe")],
    payload: Prompt,
) -> Text:
    return Text(pipe(payload.prompt))


@worker_function()
def tune(
    ctx: RequestContext,
    pipe: Annotated[FlakyPipeline, ModelRef(ModelRefSource.FIXED, "pipe")],
    payload: Prompt,
) -> Text:
    # An endpoint's own call: its event belongs to the request that made it.
    apply_low_vram_config(pipe, mode="vae_only")
    return Text(",".join(pipe.enabled))


class Provider:
    """Serves one pipeline; ``escalate`` says whether a ladder step changed anything."""

    def __init__(self, pipe: FlakyPipeline, *, steps_change: bool = True) -> None:
        self.pipe = pipe
        self.steps_change = steps_change
        self.escalations = 0

    async def resolve(self, spec: FunctionSpec, injection: InjectionSpec, payload: Any) -> str:
        return "acme/pipe:v1"

    async def load(self, request: Any) -> Any:
        return self.pipe

    async def escalate(self, obj: Any, emit: Any) -> bool:
        assert obj is self.pipe
        self.escalations += 1
        emit("low_vram_mode_applied", {"stage": "oom_escalation", "changed": self.steps_change})
        return self.steps_change


def run(fn: Any, provider: Provider) -> list[Outcome]:
    async def go() -> list[Outcome]:
        engine = Engine([get_function_spec(fn)], models=provider)
        try:
            meta = RequestMeta(request_id="r1")
            return [o async for o in engine.run(get_function_spec(fn), b"{}", meta)]
        finally:
            await engine.shutdown(grace_s=1)

    return asyncio.run(asyncio.wait_for(go(), 30))


def events(outcomes: list[Outcome], kind: str) -> list[dict[str, Any]]:
    return [o.payload for o in outcomes if isinstance(o, Event) and o.event_type == kind]


@pytest.mark.parametrize("failures", [1, 2])
def test_an_oom_is_retried_a_ladder_step_down(failures: int) -> None:
    provider = Provider(FlakyPipeline(failures))
    outcomes = run(paint, provider)
    assert isinstance(outcomes[-1], Result)
    assert msgspec.json.decode(outcomes[-1].output) == {"text": "HI"}
    retries = events(outcomes, "inference.oom_retry")
    assert retries == [{"function_name": "paint", "attempt": n} for n in range(1, failures + 1)]
    assert provider.escalations == failures
    assert len(events(outcomes, "low_vram_mode_applied")) == failures


def test_a_third_oom_fails_the_request_as_a_retryable_resource_error() -> None:
    provider = Provider(FlakyPipeline(3))
    outcomes = run(paint, provider)
    failure = outcomes[-1]
    assert isinstance(failure, Failure)
    assert (failure.error_type, failure.retryable) == ("resource", True)
    assert failure.safe_message == "function 'paint' ran out of GPU memory"
    assert "OutOfMemoryError: CUDA out of memory" in failure.error_message
    assert [e["attempt"] for e in events(outcomes, "inference.oom_retry")] == [1, 2]
    assert provider.pipe.calls == 3


def test_no_retry_when_the_ladder_step_changed_nothing() -> None:
    provider = Provider(FlakyPipeline(1), steps_change=False)
    outcomes = run(paint, provider)
    assert isinstance(outcomes[-1], Failure) and outcomes[-1].error_type == "resource"
    assert events(outcomes, "inference.oom_retry") == []
    assert events(outcomes, "low_vram_mode_applied") == [
        {"stage": "oom_escalation", "changed": False}
    ]
    assert provider.pipe.calls == 1  # the same placement would only run out again


def test_an_endpoints_own_ladder_call_reports_to_its_request() -> None:
    outcomes = run(tune, Provider(FlakyPipeline(0)))
    assert isinstance(outcomes[-1], Result)
    assert msgspec.json.decode(outcomes[-1].output) == {
        "text": "vae_slicing,vae_tiling,attention_slicing"
    }
    (applied,) = events(outcomes, "low_vram_mode_applied")
    assert applied["requested_mode"] == "vae_only" and applied["stage"] == "baseline"
    assert applied["vae_slicing"] is True and applied["model_cpu_offload"] is False
