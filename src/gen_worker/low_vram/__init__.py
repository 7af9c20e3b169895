"""The low-VRAM ladder: keep a pipeline running on a GPU too small for it (SPEC 13.6).

Steps, least aggressive first: ``off``, ``vae_only`` (VAE slicing and tiling, attention
slicing), ``model_offload`` (``enable_model_cpu_offload``), ``group_offload`` (leaf-level
group offload with CUDA streams, weights on disk when RAM is short) and ``sequential``
(``enable_sequential_cpu_offload``). The injection layer calls :func:`place_pipeline` after
loading a pipeline; the engine wraps single-output calls in :func:`with_oom_retry` and sets
:func:`use_event_sink` per request. Endpoints may call :func:`apply_low_vram_config` and
:func:`with_oom_retry` themselves.

Torch and diffusers are imported lazily, inside the calls that need them.
"""

from gen_worker.low_vram.events import EmitFn, emit_event, event_sink, use_event_sink
from gen_worker.low_vram.ladder import (
    EVENT,
    LoggerLike,
    apply_low_vram_config,
    current_mode,
    escalate,
    remember,
)
from gen_worker.low_vram.placement import (
    OOM_RETRY_EVENT,
    PLACEMENT_ATTEMPTS,
    place_pipeline,
    with_oom_retry,
)
from gen_worker.low_vram.probes import (
    available_ram_bytes,
    cuda_memory,
    estimate_pipeline_bytes,
    flush_memory,
    is_oom_error,
)
from gen_worker.low_vram.settings import (
    AUTO,
    MODES,
    LowVramSettings,
    disk_offload_wanted,
    load_low_vram_settings,
    select_mode,
)

__all__ = [
    "AUTO",
    "EVENT",
    "MODES",
    "OOM_RETRY_EVENT",
    "PLACEMENT_ATTEMPTS",
    "EmitFn",
    "LoggerLike",
    "LowVramSettings",
    "apply_low_vram_config",
    "available_ram_bytes",
    "cuda_memory",
    "current_mode",
    "disk_offload_wanted",
    "emit_event",
    "escalate",
    "estimate_pipeline_bytes",
    "event_sink",
    "flush_memory",
    "is_oom_error",
    "load_low_vram_settings",
    "place_pipeline",
    "remember",
    "select_mode",
    "use_event_sink",
    "with_oom_retry",
]
