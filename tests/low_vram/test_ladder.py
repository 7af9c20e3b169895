"""apply_low_vram_config and escalate on stand-in pipelines: calls, payloads, events."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gen_worker import apply_low_vram_config
from gen_worker.errors import DefinitionError
from gen_worker.low_vram import current_mode, escalate, event_sink, use_event_sink

from .fakes import (
    VAE_CALLS,
    VAE_ON,
    BarePipeline,
    BrokenPipeline,
    Events,
    FakePipeline,
    LegacyPipeline,
    payload,
)

GIB = 1024**3


def test_vae_only_turns_on_the_three_enablers_once() -> None:
    pipe, events = FakePipeline(), Events()
    result = apply_low_vram_config(pipe, "vae_only", model_id="acme/sd", emit=events)
    expected = payload(
        model_id="acme/sd",
        requested_mode="vae_only",
        selected_mode="vae_only",
        applied_mode="vae_only",
        changed=True,
        **VAE_ON,
    )
    assert result == expected
    assert events.items == [("low_vram_mode_applied", expected)]
    assert pipe.calls == VAE_CALLS
    assert current_mode(pipe) == "vae_only"

    again = apply_low_vram_config(pipe, "vae_only", emit=events)
    assert again == payload(
        model_id="acme/sd",
        requested_mode="vae_only",
        selected_mode="vae_only",
        applied_mode="vae_only",
        previous_mode="vae_only",
        **VAE_ON,
    )
    assert pipe.calls == VAE_CALLS  # the same mode twice calls nothing


def test_pipeline_level_vae_methods_are_the_fallback() -> None:
    pipe = LegacyPipeline()
    result = apply_low_vram_config(pipe, "vae_only", emit=Events())
    assert pipe.calls == ["enable_vae_slicing", "enable_vae_tiling"]
    assert result == payload(
        requested_mode="vae_only",
        selected_mode="vae_only",
        applied_mode="vae_only",
        changed=True,
        vae_slicing=True,
        vae_tiling=True,
    )


def test_missing_enablers_are_safe_no_ops_reported_off() -> None:
    pipe = BarePipeline()
    result = apply_low_vram_config(pipe, "vae_only", emit=Events())
    assert pipe.calls == []
    assert result == payload(
        requested_mode="vae_only", selected_mode="vae_only", applied_mode="vae_only"
    )
    assert result["changed"] is False  # nothing could be turned on, and it says so


def test_off_changes_nothing() -> None:
    pipe = FakePipeline()
    assert apply_low_vram_config(pipe, "off", emit=Events()) == payload(requested_mode="off")
    assert pipe.calls == []


@pytest.mark.parametrize(
    ("mode", "call"),
    [
        ("model_offload", ("enable_model_cpu_offload", "cuda:1")),
        ("sequential", ("enable_sequential_cpu_offload", "cuda:1")),
    ],
)
def test_accelerate_offload_modes_call_their_enabler_on_the_device(
    mode: str, call: tuple[str, str]
) -> None:
    pipe = FakePipeline()
    result = apply_low_vram_config(pipe, mode, emit=Events(), device="cuda:1")
    enabler = "model_cpu_offload" if mode == "model_offload" else "sequential_cpu_offload"
    assert pipe.calls == [*VAE_CALLS, call]
    assert result == payload(
        requested_mode=mode,
        selected_mode=mode,
        applied_mode=mode,
        changed=True,
        **VAE_ON,
        **{enabler: True},
    )


def test_group_offload_is_leaf_level_with_streams_in_ram_when_ram_is_plenty() -> None:
    torch = pytest.importorskip("torch")
    pipe = FakePipeline()
    result = apply_low_vram_config(
        pipe, "group_offload", emit=Events(), device="cuda", available_ram_bytes=64 * GIB
    )
    assert pipe.calls == [
        *VAE_CALLS,
        (
            "enable_group_offload",
            {
                "onload_device": torch.device("cuda"),
                "offload_device": torch.device("cpu"),
                "offload_type": "leaf_level",
                "use_stream": True,
                "offload_to_disk_path": None,
            },
        ),
    ]
    assert result == payload(
        requested_mode="group_offload",
        selected_mode="group_offload",
        applied_mode="group_offload",
        changed=True,
        group_offload=True,
        **VAE_ON,
    )


def test_group_offload_goes_to_disk_when_ram_is_short(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("COZY_INFERENCE_AUTO_DISK_OFFLOAD", "1")
    monkeypatch.setenv("COZY_OFFLOAD_DIR", str(tmp_path / "offload"))
    first, second = FakePipeline(), FakePipeline()
    results = [
        apply_low_vram_config(
            pipe,
            "group_offload",
            model_id="acme/flux",
            emit=Events(),
            device="cuda",
            available_ram_bytes=8 * GIB,
        )
        for pipe in (first, second)
    ]
    paths = [pipe.calls[-1][1]["offload_to_disk_path"] for pipe in (first, second)]
    # One fresh directory per pipeline: diffusers reuses files by module name.
    assert paths[0] != paths[1]
    for path in paths:
        assert path.startswith(str(tmp_path / "offload" / "acme-flux-"))
    assert sorted(p.name for p in (tmp_path / "offload").iterdir()) == sorted(
        path.rsplit("/", 1)[1] for path in paths
    )
    for result in results:
        assert result["disk_offload"] is True
        assert result["group_offload"] is True
    # The directory goes with its pipeline.
    del first, second, results
    import gc

    gc.collect()
    assert list((tmp_path / "offload").iterdir()) == []


def test_disk_offload_stays_off_at_the_ram_threshold_or_when_disabled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("COZY_OFFLOAD_DIR", str(tmp_path))
    monkeypatch.setenv("COZY_INFERENCE_AUTO_DISK_OFFLOAD", "1")
    pipe = FakePipeline()
    result = apply_low_vram_config(
        pipe, "group_offload", emit=Events(), device="cuda", available_ram_bytes=16 * GIB
    )
    assert result["disk_offload"] is False
    assert pipe.calls[-1][1]["offload_to_disk_path"] is None
    monkeypatch.setenv("COZY_INFERENCE_AUTO_DISK_OFFLOAD", "0")
    pipe = FakePipeline()
    result = apply_low_vram_config(
        pipe, "group_offload", emit=Events(), device="cuda", available_ram_bytes=1 * GIB
    )
    assert result["disk_offload"] is False
    assert list(tmp_path.iterdir()) == []


def test_offload_without_cuda_is_not_called_and_says_why() -> None:
    pipe = FakePipeline()
    result = apply_low_vram_config(pipe, "sequential", emit=Events(), device="cpu")
    assert pipe.calls == VAE_CALLS
    assert result == payload(
        requested_mode="sequential",
        selected_mode="sequential",
        applied_mode="vae_only",
        changed=True,
        skipped="no CUDA device",
        **VAE_ON,
    )


def test_an_enabler_that_raises_is_reported_not_raised() -> None:
    pipe = BrokenPipeline()
    result = apply_low_vram_config(pipe, "model_offload", emit=Events(), device="cuda")
    assert result == payload(
        requested_mode="model_offload",
        selected_mode="model_offload",
        applied_mode="vae_only",
        changed=True,
        error="model_cpu_offload: RuntimeError: accelerate is too old",
        **VAE_ON,
    )


def test_an_unknown_mode_names_the_valid_ones() -> None:
    with pytest.raises(DefinitionError) as caught:
        apply_low_vram_config(FakePipeline(), "turbo")
    assert str(caught.value) == (
        "apply_low_vram_config: mode 'turbo' is not a ladder step; "
        "use one of auto, off, vae_only, model_offload, group_offload, sequential"
    )


def test_an_explicit_mode_beats_the_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COZY_INFERENCE_MEMORY_MODE", "sequential")
    pipe = FakePipeline()
    result = apply_low_vram_config(pipe, "model_offload", emit=Events(), device="cuda")
    assert result["applied_mode"] == "model_offload"
    assert pipe.calls == [*VAE_CALLS, ("enable_model_cpu_offload", "cuda")]


def test_auto_uses_the_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COZY_INFERENCE_MEMORY_MODE", "sequential")
    pipe = FakePipeline()
    result = apply_low_vram_config(pipe, emit=Events(), device="cuda", total_vram_bytes=80 * GIB)
    assert result == payload(
        requested_mode="auto",
        selected_mode="sequential",
        applied_mode="sequential",
        changed=True,
        sequential_cpu_offload=True,
        **VAE_ON,
    )


@pytest.mark.parametrize(
    ("total_gib", "selected"),
    [(80, "off"), (9, "vae_only"), (7, "model_offload"), (0, "off")],
)
def test_auto_without_override_follows_total_vram(total_gib: int, selected: str) -> None:
    pipe = FakePipeline()
    result = apply_low_vram_config(
        pipe, emit=Events(), device="cuda", total_vram_bytes=total_gib * GIB
    )
    assert result["selected_mode"] == selected
    assert result["applied_mode"] == selected


def test_auto_on_a_cpu_host_is_off() -> None:
    # No device known and no CUDA in this process: auto measures 0 VRAM.
    pipe = FakePipeline()
    assert apply_low_vram_config(pipe, emit=Events()) == payload()
    assert pipe.calls == []


def test_the_ladder_does_not_step_down() -> None:
    pipe = FakePipeline()
    apply_low_vram_config(pipe, "model_offload", emit=Events(), device="cuda")
    calls = list(pipe.calls)
    result = apply_low_vram_config(pipe, "vae_only", emit=Events())
    assert pipe.calls == calls
    assert result == payload(
        requested_mode="vae_only",
        selected_mode="vae_only",
        applied_mode="model_offload",
        previous_mode="model_offload",
        skipped="model_offload stays: the ladder does not step down",
        model_cpu_offload=True,
        **VAE_ON,
    )


def test_escalation_climbs_one_step_at_a_time_and_says_when_at_the_top() -> None:
    torch = pytest.importorskip("torch")
    pipe, events = FakePipeline(), Events()
    apply_low_vram_config(pipe, "vae_only", model_id="m", emit=events, device="cuda")
    steps = [escalate(pipe, emit=events, available_ram_bytes=64 * GIB) for _ in range(4)]
    common = {"model_id": "m", "stage": "oom_escalation", **VAE_ON}
    assert steps == [
        payload(
            **common,
            requested_mode="model_offload",
            selected_mode="model_offload",
            applied_mode="model_offload",
            previous_mode="vae_only",
            changed=True,
            model_cpu_offload=True,
        ),
        payload(
            **common,
            requested_mode="group_offload",
            selected_mode="group_offload",
            applied_mode="group_offload",
            previous_mode="model_offload",
            changed=True,
            group_offload=True,
        ),
        payload(
            **common,
            requested_mode="sequential",
            selected_mode="sequential",
            applied_mode="sequential",
            previous_mode="group_offload",
            changed=True,
            sequential_cpu_offload=True,
        ),
        payload(
            **common,
            requested_mode="sequential",
            selected_mode="sequential",
            applied_mode="sequential",
            previous_mode="sequential",
            changed=False,
            sequential_cpu_offload=True,
            skipped="already at the top of the ladder (sequential)",
        ),
    ]
    assert events.items[1:] == [("low_vram_mode_applied", step) for step in steps]
    assert pipe.calls[3:] == [
        ("enable_model_cpu_offload", "cuda"),
        "remove_all_hooks",
        (
            "enable_group_offload",
            {
                "onload_device": torch.device("cuda"),
                "offload_device": torch.device("cpu"),
                "offload_type": "leaf_level",
                "use_stream": True,
                "offload_to_disk_path": None,
            },
        ),
        ("enable_sequential_cpu_offload", "cuda"),
    ]


def test_escalation_from_off_goes_straight_to_model_offload() -> None:
    pipe = FakePipeline()
    result = escalate(pipe, model_id="m", emit=Events(), device="cuda")
    assert pipe.calls == [*VAE_CALLS, ("enable_model_cpu_offload", "cuda")]
    assert result["previous_mode"] == "off"
    assert result["applied_mode"] == "model_offload"


def test_escalation_past_a_missing_step_keeps_what_is_in_force() -> None:
    pipe = LegacyPipeline()  # model offload only
    events = Events()
    first = escalate(pipe, emit=events, device="cuda")
    second = escalate(pipe, emit=events, device="cuda")
    assert first["applied_mode"] == "model_offload"
    assert second == payload(
        stage="oom_escalation",
        requested_mode="group_offload",
        selected_mode="group_offload",
        applied_mode="model_offload",
        previous_mode="model_offload",
        vae_slicing=True,
        vae_tiling=True,
        model_cpu_offload=True,
        skipped="neither the pipeline nor its components have group offload",
    )
    assert "remove_all_hooks" not in pipe.calls  # the model offload was not taken off


def test_events_go_to_the_context_sink_and_explicit_emit_wins() -> None:
    sink, explicit = Events(), Events()
    assert event_sink.get() is None
    with use_event_sink(sink):
        apply_low_vram_config(FakePipeline(), "vae_only")
        apply_low_vram_config(FakePipeline(), "off", emit=explicit)
    assert event_sink.get() is None
    assert sink.types == ["low_vram_mode_applied"]
    assert sink.items[0][1]["applied_mode"] == "vae_only"
    assert explicit.types == ["low_vram_mode_applied"]
    assert explicit.items[0][1]["applied_mode"] == "off"


def test_without_a_sink_the_event_is_a_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    apply_low_vram_config(FakePipeline(), "vae_only", model_id="acme/sd")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["msg"] == "low_vram_mode_applied"
    assert line["level"] == "info"
    assert line["model_id"] == "acme/sd"
    assert line["applied_mode"] == "vae_only"
    assert line["vae_tiling"] is True


def test_a_failing_sink_never_reaches_the_caller(capsys: pytest.CaptureFixture[str]) -> None:
    def broken(event_type: str, data: dict[str, Any]) -> None:
        raise OSError("queue closed")

    result = apply_low_vram_config(FakePipeline(), "vae_only", emit=broken)
    assert result["applied_mode"] == "vae_only"
    line = json.loads(capsys.readouterr().err.splitlines()[0])
    assert line["msg"] == "event sink failed"
    assert line["error"] == "OSError: queue closed"


def test_the_logger_gets_one_line(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tenant")
    with caplog.at_level(logging.INFO, logger="tenant"):
        apply_low_vram_config(FakePipeline(), "vae_only", logger=logger, emit=Events())
    assert [r.getMessage() for r in caplog.records] == [
        "low-VRAM baseline: vae_only (requested vae_only, previous off, changed True)"
    ]


def readme_block(first_line: str) -> str:
    """The README's ``py`` block that starts with ``first_line``, as written there."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", readme, re.S) if b.startswith(first_line)]
    return block


def test_the_readme_snippet_runs_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    import contextlib
    import threading

    snippet = readme_block("from gen_worker import apply_low_vram_config")
    lock = threading.Lock()
    pipeline = FakePipeline()
    seen: list[str] = []

    class Logger:
        def info(self, msg: str, *args: Any) -> None:
            seen.append(msg % args)

    @contextlib.contextmanager
    def _lock_for_pipeline(pipe: Any) -> Any:
        with lock:
            yield

    namespace: dict[str, Any] = {
        "_lock_for_pipeline": _lock_for_pipeline,
        "pipeline": pipeline,
        "logger": Logger(),
    }
    exec(compile(snippet, "README", "exec"), namespace)
    assert namespace["result"] == {
        "images": ["image"],
        "kwargs": {"prompt": "...", "num_inference_steps": 8},
    }
    # This host has no CUDA: the VAE step is on, the sequential offload is skipped.
    assert pipeline.calls == [*VAE_CALLS, ("call", {"prompt": "...", "num_inference_steps": 8})]
    assert seen == [
        "low-VRAM baseline: vae_only (requested sequential, previous off, changed True)"
    ]
    logged = json.loads(capsys.readouterr().err.splitlines()[0])
    assert logged["skipped"] == "no CUDA device"


def test_importing_and_using_the_ladder_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import gen_worker\n"
        "from gen_worker.low_vram import apply_low_vram_config, is_oom_error, place_pipeline\n"
        "class P:\n"
        "    def to(self, device): pass\n"
        "    def enable_attention_slicing(self): pass\n"
        "p = P()\n"
        "place_pipeline(p, 'cpu', model_id='m', emit=lambda t, d: None)\n"
        "apply_low_vram_config(p, 'vae_only', emit=lambda t, d: None)\n"
        "assert is_oom_error(RuntimeError('CUDA out of memory'))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'diffusers', 'transformers', 'accelerate', 'numpy'})\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
