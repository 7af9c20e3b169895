"""The execution engine: one request of one function in, typed outcomes out."""

from gen_worker.engine.engine import DEFAULT_CANCEL_GRACE_S, Engine, resolve_concurrency
from gen_worker.engine.models import InProcessModels, LoadRequest, ModelProvider
from gen_worker.engine.outcomes import (
    TERMINAL,
    Delta,
    Event,
    Failure,
    Log,
    Outcome,
    Progress,
    Result,
)
from gen_worker.engine.request import Codec, RequestMeta
from gen_worker.engine.run import RequestRun

__all__ = [
    "DEFAULT_CANCEL_GRACE_S",
    "TERMINAL",
    "Codec",
    "Delta",
    "Engine",
    "Event",
    "Failure",
    "InProcessModels",
    "LoadRequest",
    "Log",
    "ModelProvider",
    "Outcome",
    "Progress",
    "RequestMeta",
    "RequestRun",
    "Result",
    "resolve_concurrency",
]
