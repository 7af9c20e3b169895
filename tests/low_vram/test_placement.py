"""place_pipeline and with_oom_retry with real torch OOM errors raised by stand-ins."""

from __future__ import annotations

from typing import Any

import pytest

from gen_worker import with_oom_retry
from gen_worker.low_vram import current_mode, is_oom_error, place_pipeline

from .fakes import VAE_CALLS, VAE_ON, BarePipeline, Events, FakePipeline, payload

torch = pytest.importorskip("torch")

GIB = 1024**3
BIG = {"total_vram_bytes": 80 * GIB, "free_vram_bytes": 70 * GIB, "size_bytes": 4 * GIB}
ESCALATION = "low_vram_mode_applied"


def oom(n: int) -> list[BaseException]:
    return [torch.cuda.OutOfMemoryError(f"CUDA out of memory ({i + 1})") for i in range(n)]


def test_is_oom_error() -> None:
    assert is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("Out Of Memory while allocating"))
    assert not is_oom_error(RuntimeError("expected scalar type Half"))
    assert not is_oom_error(ValueError("out of memory"))
    assert not is_oom_error(MemoryError())


def test_a_pipeline_that_fits_is_moved_and_gets_the_baseline() -> None:
    pipe, events = FakePipeline(), Events()
    result = place_pipeline(pipe, "cuda", model_id="acme/sd", emit=events, **BIG)
    assert pipe.calls == [("to", "cuda")]
    expected = payload(model_id="acme/sd")
    assert result == expected
    assert events.items == [(ESCALATION, expected)]


def test_the_baseline_on_a_mid_size_card_adds_the_vae_step() -> None:
    pipe, events = FakePipeline(), Events()
    place_pipeline(
        pipe,
        "cuda",
        model_id="m",
        emit=events,
        total_vram_bytes=9 * GIB,
        free_vram_bytes=9 * GIB,
        size_bytes=GIB,
    )
    assert pipe.calls == [("to", "cuda"), *VAE_CALLS]
    assert events.items == [
        (
            ESCALATION,
            payload(
                model_id="m",
                selected_mode="vae_only",
                applied_mode="vae_only",
                changed=True,
                **VAE_ON,
            ),
        )
    ]


@pytest.mark.parametrize(
    ("total_gib", "mode", "enabler"),
    [(24, "model_offload", "model_cpu_offload"), (4, "group_offload", "group_offload")],
)
def test_preflight_offloads_instead_of_moving_what_does_not_fit(
    total_gib: int, mode: str, enabler: str
) -> None:
    pipe, events = FakePipeline(), Events()
    place_pipeline(
        pipe,
        "cuda",
        model_id="acme/flux",
        emit=events,
        total_vram_bytes=total_gib * GIB,
        free_vram_bytes=min(total_gib, 12) * GIB,
        size_bytes=10 * GIB + 1,  # 12 GiB free - 2 GiB margin = 10 GiB: one byte too many
        available_ram_bytes=64 * GIB,
    )
    assert ("to", "cuda") not in pipe.calls
    preflight = payload(
        model_id="acme/flux",
        stage="preflight",
        requested_mode=mode,
        selected_mode=mode,
        applied_mode=mode,
        changed=True,
        **VAE_ON,
        **{enabler: True},
    )
    # The baseline's own pick: off on the 24 GiB card (it stays offloaded), group on 4 GiB.
    selected = "off" if total_gib == 24 else mode
    baseline = payload(
        model_id="acme/flux",
        selected_mode=selected,
        applied_mode=mode,
        previous_mode=mode,
        skipped="model_offload stays: the ladder does not step down" if total_gib == 24 else None,
        **VAE_ON,
        **{enabler: True},
    )
    assert events.items == [(ESCALATION, preflight), (ESCALATION, baseline)]


def test_preflight_at_exactly_the_margin_still_moves() -> None:
    pipe = FakePipeline()
    place_pipeline(
        pipe,
        "cuda",
        model_id="m",
        emit=Events(),
        total_vram_bytes=24 * GIB,
        free_vram_bytes=12 * GIB,
        size_bytes=10 * GIB,
    )
    assert pipe.calls == [("to", "cuda")]


def test_a_small_card_gets_its_offload_without_a_pointless_move() -> None:
    pipe, events = FakePipeline(), Events()
    place_pipeline(
        pipe,
        "cuda:0",
        model_id="m",
        emit=events,
        total_vram_bytes=7 * GIB,
        free_vram_bytes=7 * GIB,
        size_bytes=GIB,
    )
    assert pipe.calls == [*VAE_CALLS, ("enable_model_cpu_offload", "cuda:0")]
    assert events.items == [
        (
            ESCALATION,
            payload(
                model_id="m",
                selected_mode="model_offload",
                applied_mode="model_offload",
                changed=True,
                model_cpu_offload=True,
                **VAE_ON,
            ),
        )
    ]


def test_an_oom_while_moving_escalates_and_the_offload_takes_over() -> None:
    pipe, events = FakePipeline(), Events()
    pipe.to_errors = oom(1)
    result = place_pipeline(pipe, "cuda", model_id="m", emit=events, **BIG)
    # After the escalation the offload hooks own placement: no second .to("cuda").
    assert pipe.calls == [("to", "cuda"), *VAE_CALLS, ("enable_model_cpu_offload", "cuda")]
    escalation = payload(
        model_id="m",
        stage="oom_escalation",
        requested_mode="model_offload",
        selected_mode="model_offload",
        applied_mode="model_offload",
        changed=True,
        model_cpu_offload=True,
        **VAE_ON,
    )
    baseline = payload(
        model_id="m",
        applied_mode="model_offload",
        previous_mode="model_offload",
        model_cpu_offload=True,
        skipped="model_offload stays: the ladder does not step down",
        **VAE_ON,
    )
    assert events.items == [(ESCALATION, escalation), (ESCALATION, baseline)]
    assert result == baseline


def _bare_escalation(requested: str, previous: str, skipped: str) -> dict[str, Any]:
    return payload(
        model_id="m",
        stage="oom_escalation",
        requested_mode=requested,
        selected_mode=requested,
        applied_mode="vae_only",
        previous_mode=previous,
        skipped=skipped,
    )


BARE_ESCALATIONS = [
    _bare_escalation("model_offload", "off", "the pipeline has no enable_model_cpu_offload"),
    _bare_escalation(
        "group_offload",
        "vae_only",
        "neither the pipeline nor its components have group offload",
    ),
]


@pytest.mark.parametrize("failures", [1, 2])
def test_moving_is_retried_while_no_offload_is_in_force(failures: int) -> None:
    pipe, events = BarePipeline(), Events()
    pipe.to_errors = oom(failures)
    result = place_pipeline(pipe, "cuda", model_id="m", emit=events, **BIG)
    assert pipe.calls == [("to", "cuda")] * (failures + 1)
    assert events.types == [ESCALATION] * (failures + 1)
    assert [p for _, p in events.items[:failures]] == BARE_ESCALATIONS[:failures]
    assert result["stage"] == "baseline"
    assert result["changed"] is False


def test_the_third_oom_while_moving_is_raised() -> None:
    pipe, events = BarePipeline(), Events()
    errors = oom(3)
    pipe.to_errors = list(errors)
    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
        place_pipeline(pipe, "cuda", model_id="m", emit=events, **BIG)
    assert caught.value is errors[2]
    assert pipe.calls == [("to", "cuda")] * 3
    assert [p for _, p in events.items] == BARE_ESCALATIONS  # two escalations, no baseline


def test_a_non_oom_error_while_moving_is_raised_at_once() -> None:
    pipe, events = FakePipeline(), Events()
    pipe.to_errors = [RuntimeError("CUDA driver version is insufficient")]
    with pytest.raises(RuntimeError, match="driver version"):
        place_pipeline(pipe, "cuda", model_id="m", emit=events, **BIG)
    assert events.items == []
    assert pipe.calls == [("to", "cuda")]


def test_cpu_placement_moves_and_applies_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, events = FakePipeline(), Events()
    assert place_pipeline(pipe, "cpu", model_id="m", emit=events) == payload(model_id="m")
    assert pipe.calls == [("to", "cpu")]
    monkeypatch.setenv("COZY_INFERENCE_MEMORY_MODE", "model_offload")
    pipe = FakePipeline()
    result = place_pipeline(pipe, "cpu", model_id="m", emit=events)
    assert pipe.calls == [("to", "cpu"), *VAE_CALLS]
    assert result == payload(
        model_id="m",
        selected_mode="model_offload",
        applied_mode="vae_only",
        changed=True,
        skipped="no CUDA device",
        **VAE_ON,
    )


def test_objects_without_to_are_left_where_they_are() -> None:
    events = Events()
    result = place_pipeline(object(), "cpu", model_id="tokenizer", emit=events)
    assert result == payload(model_id="tokenizer")


def _placed(events: Events, pipe: FakePipeline | None = None) -> FakePipeline:
    placed = pipe or FakePipeline()
    place_pipeline(placed, "cuda", model_id="acme/sd", emit=events, **BIG)
    placed.calls.clear()
    events.items.clear()
    return placed


def _call_escalation(requested: str, previous: str, **on: bool) -> dict[str, Any]:
    return payload(
        model_id="acme/sd",
        stage="oom_escalation",
        requested_mode=requested,
        selected_mode=requested,
        applied_mode=requested,
        previous_mode=previous,
        changed=True,
        **VAE_ON,
        **on,
    )


CALL_ESCALATIONS = [
    _call_escalation("model_offload", "off", model_cpu_offload=True),
    _call_escalation("group_offload", "model_offload", group_offload=True),
]


@pytest.mark.parametrize("failures", [1, 2])
def test_with_oom_retry_escalates_and_retries(failures: int) -> None:
    events = Events()
    pipe = _placed(events)
    pipe.call_errors = oom(failures)
    result = with_oom_retry(pipe, prompt="cat", pipelines=[pipe], emit=events)
    assert result["kwargs"] == {"prompt": "cat"}
    expected: list[tuple[str, dict[str, Any]]] = []
    for attempt in range(1, failures + 1):
        expected.append((ESCALATION, CALL_ESCALATIONS[attempt - 1]))
        expected.append(
            ("inference.oom_retry", {"function_name": "FakePipeline", "attempt": attempt})
        )
    assert events.items == expected
    assert [c for c in pipe.calls if isinstance(c, tuple) and c[0] == "call"] == [
        ("call", {"prompt": "cat"})
    ] * (failures + 1)


def test_with_oom_retry_raises_the_third_oom() -> None:
    events = Events()
    pipe = _placed(events)
    errors = oom(3)
    pipe.call_errors = list(errors)

    def generate(prompt: str) -> Any:
        return pipe(prompt=prompt)

    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
        with_oom_retry(generate, "cat", pipelines=[pipe], emit=events)
    assert caught.value is errors[2]
    name = generate.__qualname__
    assert events.items == [
        (ESCALATION, CALL_ESCALATIONS[0]),
        ("inference.oom_retry", {"function_name": name, "attempt": 1}),
        (ESCALATION, CALL_ESCALATIONS[1]),
        ("inference.oom_retry", {"function_name": name, "attempt": 2}),
    ]
    assert current_mode(pipe) == "group_offload"


def test_with_oom_retry_escalates_every_pipeline() -> None:
    events = Events()
    first, second = _placed(events), _placed(events)
    first.call_errors = [RuntimeError("CUDA error: out of memory")]
    with_oom_retry(
        first, pipelines=[first, second], function_name="generate", emit=events, retries=1
    )
    assert events.types == [ESCALATION, ESCALATION, "inference.oom_retry"]
    assert events.items[2][1] == {"function_name": "generate", "attempt": 1}
    assert current_mode(first) == current_mode(second) == "model_offload"


def test_with_oom_retry_passes_other_errors_through_at_once() -> None:
    events = Events()
    pipe = _placed(events)
    pipe.call_errors = [ValueError("bad prompt")]
    with pytest.raises(ValueError, match="bad prompt"):
        with_oom_retry(pipe, prompt="x", pipelines=[pipe], emit=events)
    assert events.items == []
    assert current_mode(pipe) == "off"


def test_with_oom_retry_with_no_retries_raises_the_first_oom() -> None:
    events = Events()
    pipe = _placed(events)
    pipe.call_errors = oom(1)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with_oom_retry(pipe, pipelines=[pipe], retries=0, emit=events)
    assert events.items == []
