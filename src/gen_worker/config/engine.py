"""Engine limits and dev-runner defaults (seed README variables)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from gen_worker.config.parse import positive_float, positive_int, read

__all__ = ["EngineSettings", "RunnerSettings", "load_engine_settings", "load_runner_settings"]

MIB = 1024 * 1024


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Limits and warning thresholds of the execution engine (seed README variables)."""

    #: WORKER_MAX_CONCURRENCY; None means the endpoint's max_inflight_requests, else 1.
    max_concurrency: int | None = None
    #: WORKER_MAX_INPUT_BYTES / WORKER_MAX_OUTPUT_BYTES / WORKER_MAX_UPLOAD_BYTES; None: no limit.
    max_input_bytes: int | None = None
    max_output_bytes: int | None = None
    max_upload_bytes: int | None = None
    #: WORKER_MAX_INPUT_FILE_BYTES: the size limit of one downloaded input Asset.
    max_input_file_bytes: int = 200 * MIB
    warn_model_resolve_s: float = 30.0
    warn_model_load_s: float = 60.0
    warn_inference_s: float = 60.0


class RunnerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Defaults of the dev HTTP runner's command-line options."""

    listen: str = "127.0.0.1:8081"
    manifest_path: str = "/app/.tensorhub/endpoint.lock"
    endpoint_root: str = "/app"
    output_dir: str = "/outputs"


def load_engine_settings(environ: Mapping[str, str] | None = None) -> EngineSettings:
    """Read the engine's variables; unset ones keep the documented defaults."""
    env = os.environ if environ is None else environ
    defaults = EngineSettings()
    values = {
        "max_concurrency": read(env, "WORKER_MAX_CONCURRENCY", positive_int),
        "max_input_bytes": read(env, "WORKER_MAX_INPUT_BYTES", positive_int),
        "max_output_bytes": read(env, "WORKER_MAX_OUTPUT_BYTES", positive_int),
        "max_upload_bytes": read(env, "WORKER_MAX_UPLOAD_BYTES", positive_int),
        "max_input_file_bytes": read(env, "WORKER_MAX_INPUT_FILE_BYTES", positive_int),
        "warn_model_resolve_s": read(env, "WORKER_WARN_MODEL_RESOLVE_S", positive_float),
        "warn_model_load_s": read(env, "WORKER_WARN_MODEL_LOAD_S", positive_float),
        "warn_inference_s": read(env, "WORKER_WARN_INFERENCE_S", positive_float),
    }
    given = {k: v for k, v in values.items() if v is not None}
    return msgspec.structs.replace(defaults, **given)


def load_runner_settings(environ: Mapping[str, str] | None = None) -> RunnerSettings:
    """Defaults for the dev runner from GEN_WORKER_* variables (flags override them)."""
    env = os.environ if environ is None else environ
    names = {
        "listen": "GEN_WORKER_HTTP_LISTEN",
        "manifest_path": "GEN_WORKER_MANIFEST_PATH",
        "endpoint_root": "GEN_WORKER_ENDPOINT_ROOT",
        "output_dir": "GEN_WORKER_OUTPUT_DIR",
    }
    given = {field: env[var] for field, var in names.items() if env.get(var, "").strip()}
    return msgspec.structs.replace(RunnerSettings(), **given)
