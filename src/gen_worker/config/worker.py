"""Settings of the gRPC worker runtime (SPEC sections 10 and 17, the seed README's tables)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from gen_worker.config.engine import EngineSettings, load_engine_settings
from gen_worker.config.parse import (
    GRPC_PREFIXES,
    addresses,
    boolean,
    non_negative_float,
    non_negative_int,
    positive_float,
    read,
    string,
)
from gen_worker.config.parse import address as host_port
from gen_worker.errors import ConfigError

__all__ = ["WorkerMode", "WorkerSettings", "load_worker_settings", "tls_for"]

WorkerMode = Literal["inference", "trainer"]

# gen_worker.logs.REDACTED, spelled out: config and logs are sibling leaves that do not import
# each other (docs/DESIGN.md section 2).
_REDACTED = "[REDACTED]"
_SECRET_FIELDS = frozenset({"worker_jwt"})
_TLS_PORT = "443"


def _default_cache_dir() -> str:
    return str(Path("~/.cache/tensorhub").expanduser())


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the worker runtime reads from the environment, read once at startup.

    ``repr`` shows ``worker_jwt`` as ``[REDACTED]`` so the settings can be logged whole; the
    field itself holds the real token for the transport to send.
    """

    #: WORKER_MODE: "inference" runs the gRPC worker, "trainer" the trainer loop.
    mode: WorkerMode = "inference"
    #: PUBLIC_ORCHESTRATOR_GRPC_ADDR, then SCHEDULER_ADDRS in turn; ``grpc(s)://`` kept.
    orchestrator_addr: str | None = None
    scheduler_addrs: tuple[str, ...] = ()
    #: WORKER_JWT: required in inference mode; its claims are authoritative.
    worker_jwt: str | None = None
    #: WORKER_ID: None means the JWT's ``sub`` claim.
    worker_id: str | None = None
    #: SCHEDULER_JWKS_URL / _ISSUER / _AUDIENCE: local verification of WORKER_JWT when set.
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    use_tls: bool = False
    lb_only_retries: bool = True
    reconnect_delay_s: float = 0.1
    reconnect_max_delay_s: float = 1.0
    reconnect_jitter_s: float = 0.1
    #: MAX_RECONNECT_ATTEMPTS: 0 means retry forever.
    max_reconnect_attempts: int = 0
    register_timeout_s: float = 90.0
    heartbeat_interval_s: float = 10.0
    drain_timeout_s: float = 30.0
    tensorhub_cache_dir: str = msgspec.field(default_factory=_default_cache_dir)
    local_model_cache_dir: str = "/tmp/tensorhub/local-model-cache"
    manifest_path: str = "/app/.tensorhub/endpoint.lock"
    endpoint_root: str = "/app"
    #: GEN_WORKER_IMAGE_DIGEST / _GIT_COMMIT / _BUILD_TIME: reported at registration.
    image_digest: str | None = None
    git_commit: str | None = None
    build_time: str | None = None
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [(name, self._shown(name)) for name in self.__struct_fields__]

    def _shown(self, name: str) -> Any:
        value = getattr(self, name)
        return _REDACTED if name in _SECRET_FIELDS and value is not None else value

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"{type(self).__name__}({fields})"


def _mode(variable: str, text: str) -> WorkerMode:
    word = text.strip().lower()
    if word == "inference":
        return "inference"
    if word == "trainer":
        return "trainer"
    raise ConfigError(variable, f"{text!r} is not a worker mode; use inference or trainer")


def _cache_dir(variable: str, text: str) -> str:
    return str(Path(string(variable, text)).expanduser())


def _jwks_url(variable: str, text: str) -> str:
    url = text.strip()
    try:
        parts = urlsplit(url)
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # urlsplit refuses e.g. an unclosed IPv6 bracket
        valid = False
    if not valid:
        # The value is not echoed: a URL's query string or user info may carry a credential.
        usage = "use an http(s) URL, e.g. https://scheduler.internal/.well-known/jwks.json"
        raise ConfigError(variable, f"is not an http(s) URL with a host; {usage}")
    return url


def _connection(env: Mapping[str, str]) -> dict[str, object]:
    return {
        "orchestrator_addr": read(env, "PUBLIC_ORCHESTRATOR_GRPC_ADDR", host_port),
        "scheduler_addrs": read(env, "SCHEDULER_ADDRS", addresses),
        "worker_jwt": read(env, "WORKER_JWT", string),
        "worker_id": read(env, "WORKER_ID", string),
        "jwks_url": read(env, "SCHEDULER_JWKS_URL", _jwks_url),
        "jwt_issuer": read(env, "SCHEDULER_JWT_ISSUER", string),
        "jwt_audience": read(env, "SCHEDULER_JWT_AUDIENCE", string),
        "use_tls": read(env, "USE_TLS", boolean),
        "lb_only_retries": read(env, "LB_ONLY_RETRIES", boolean),
    }


def _timing(env: Mapping[str, str]) -> dict[str, object]:
    return {
        "reconnect_delay_s": read(env, "RECONNECT_DELAY", non_negative_float),
        "reconnect_max_delay_s": read(env, "RECONNECT_MAX_DELAY", positive_float),
        "reconnect_jitter_s": read(env, "RECONNECT_JITTER_SECONDS", non_negative_float),
        "max_reconnect_attempts": read(env, "MAX_RECONNECT_ATTEMPTS", non_negative_int),
        "register_timeout_s": read(env, "WORKER_REGISTER_TIMEOUT_S", positive_float),
        "heartbeat_interval_s": read(env, "WORKER_HEARTBEAT_INTERVAL_S", positive_float),
        "drain_timeout_s": read(env, "WORKER_DRAIN_TIMEOUT_SECONDS", positive_float),
    }


def _files(env: Mapping[str, str]) -> dict[str, object]:
    return {
        "tensorhub_cache_dir": read(env, "TENSORHUB_CACHE_DIR", _cache_dir),
        "local_model_cache_dir": read(env, "WORKER_LOCAL_MODEL_CACHE_DIR", string),
        "manifest_path": read(env, "GEN_WORKER_MANIFEST_PATH", string),
        "endpoint_root": read(env, "GEN_WORKER_ENDPOINT_ROOT", string),
        "image_digest": read(env, "GEN_WORKER_IMAGE_DIGEST", string),
        "git_commit": read(env, "GEN_WORKER_GIT_COMMIT", string),
        "build_time": read(env, "GEN_WORKER_BUILD_TIME", string),
    }


def _require_inference_settings(settings: WorkerSettings) -> None:
    if settings.orchestrator_addr is None:
        problem = "is required when WORKER_MODE=inference; set it to the scheduler's host:port"
        raise ConfigError("PUBLIC_ORCHESTRATOR_GRPC_ADDR", problem)
    if settings.worker_jwt is None:
        problem = "is required when WORKER_MODE=inference; set it to the worker-connect JWT"
        raise ConfigError("WORKER_JWT", problem)


def load_worker_settings(environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """Read the worker's variables; unset ones keep the seed README's defaults.

    Raises :class:`~gen_worker.errors.ConfigError` for the first malformed value, and in
    inference mode for a missing PUBLIC_ORCHESTRATOR_GRPC_ADDR or WORKER_JWT.
    """
    env = os.environ if environ is None else environ
    values = {
        "mode": read(env, "WORKER_MODE", _mode),
        **_connection(env),
        **_timing(env),
        **_files(env),
        "engine": load_engine_settings(env),
    }
    given = {k: v for k, v in values.items() if v is not None}
    settings = msgspec.structs.replace(WorkerSettings(), **given)
    if settings.mode == "inference":
        _require_inference_settings(settings)
    return settings


def tls_for(address: str, use_tls: bool) -> tuple[str, bool]:
    """The dialable ``host:port`` of ``address`` and whether to dial it with TLS.

    An explicit scheme wins (``grpcs://`` TLS, ``grpc://`` plaintext); port 443 means TLS, since
    nothing serves plaintext gRPC there; otherwise ``use_tls`` (USE_TLS) decides.
    """
    lowered = address.lower()
    for prefix in GRPC_PREFIXES:
        if lowered.startswith(prefix):
            return address[len(prefix) :], prefix == "grpcs://"
    if address.rpartition(":")[2] == _TLS_PORT:
        return address, True
    return address, use_tls
