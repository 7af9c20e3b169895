"""Settings from the environment: the only package that reads ``os.environ``.

Each reader returns one frozen object that is passed down explicitly. A malformed value is a
:class:`~gen_worker.errors.ConfigError` naming the variable and what would be valid, raised at
startup rather than at the first request that needs it.
"""

from gen_worker.config.engine import (
    EngineSettings,
    RunnerSettings,
    load_engine_settings,
    load_runner_settings,
)
from gen_worker.config.models import ModelSettings, load_model_settings
from gen_worker.config.worker import WorkerMode, WorkerSettings, load_worker_settings, tls_for

__all__ = [
    "EngineSettings",
    "ModelSettings",
    "RunnerSettings",
    "WorkerMode",
    "WorkerSettings",
    "load_engine_settings",
    "load_model_settings",
    "load_runner_settings",
    "load_worker_settings",
    "tls_for",
]
