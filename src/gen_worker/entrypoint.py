"""``python -m gen_worker.entrypoint``: the image's ENTRYPOINT.

``WORKER_MODE=inference`` (the default) runs the gRPC worker: settings, cache preflight,
endpoint import (the baked lock plus the code under the endpoint root), optional local
verification of ``WORKER_JWT``, then connect, register, serve, drain. Every step is a
``worker.startup.phase`` event; every fatal ending exits non-zero with a one-line reason and no
token in it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gen_worker.authoring import OutputSink
from gen_worker.config import (
    ModelSettings,
    WorkerSettings,
    load_model_settings,
    load_worker_settings,
    tls_for,
)
from gen_worker.discovery.endpoint import LoadedEndpoint, load_from_lock
from gen_worker.engine import Engine, RequestMeta, resolve_concurrency
from gen_worker.errors import GenWorkerError
from gen_worker.files import AssetFetcher, LocalOutputSink
from gen_worker.files.file_api import FileApi
from gen_worker.files.hub_sink import UploadingOutputSink
from gen_worker.logs import log
from gen_worker.runtime import core_types as ct
from gen_worker.runtime.models import WorkerModels
from gen_worker.runtime.worker import Identity, Worker

if TYPE_CHECKING:
    from gen_worker.injection import CachedModels

__all__ = ["main", "run_inference"]


def _fatal(phase: str, exc: BaseException, code: int = 1) -> int:
    message = " ".join(str(exc).split())
    log("error", "worker.fatal", phase=phase, exception_class=type(exc).__name__,
        exception_message=message, exit_code=code)  # fmt: skip
    return code


def _preflight(settings: WorkerSettings) -> None:
    """The cache directories must be writable before any model or output lands there."""
    for folder in (Path(settings.tensorhub_cache_dir), Path(settings.local_model_cache_dir)):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".gen-worker-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()


def _peek_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT without verifying it, or {} for a token that is not one.

    Only names the worker (``sub``) and its release; the scheduler judges the token. Done
    by hand rather than with PyJWT, whose import (with cryptography) costs ~0.25 s at startup.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


async def _identity(settings: WorkerSettings, address: str) -> Identity:
    token = settings.worker_jwt or ""  # required in inference mode: settings checked it
    claims = _peek_claims(token)
    if settings.jwks_url:
        from gen_worker.transport.jwt import verify_worker_jwt  # noqa: PLC0415  # slow import

        verified = await verify_worker_jwt(
            token,
            jwks_url=settings.jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
        claims = verified.raw
    _, tls = tls_for(address, settings.use_tls)
    sub, release = claims.get("sub"), claims.get("release_id")
    return Identity(
        worker_id=settings.worker_id
        or (sub if isinstance(sub, str) and sub else f"worker-{uuid.uuid4().hex[:12]}"),
        release_id=release if isinstance(release, str) else "",
        token=token,
        tls=tls,
        image_digest=settings.image_digest or "",
        git_commit=settings.git_commit or "",
        build_time=settings.build_time or "",
    )


def _token_verifier(settings: WorkerSettings) -> Callable[[str], Awaitable[Any]] | None:
    jwks_url = settings.jwks_url
    if not jwks_url:
        return None

    async def verify(token: str) -> Any:
        from gen_worker.transport.jwt import verify_worker_jwt  # noqa: PLC0415  # slow import

        return await verify_worker_jwt(
            token, jwks_url=jwks_url, issuer=settings.jwt_issuer, audience=settings.jwt_audience
        )

    return verify


def _core_config(settings: WorkerSettings, address: str) -> ct.CoreConfig:
    addresses = [address, *settings.scheduler_addrs]
    dialable = tuple(tls_for(a, settings.use_tls)[0] for a in addresses)
    return ct.CoreConfig(
        addresses=tuple(dict.fromkeys(dialable)),
        reconnect_delay_s=settings.reconnect_delay_s,
        reconnect_max_delay_s=settings.reconnect_max_delay_s,
        reconnect_jitter_s=settings.reconnect_jitter_s,
        max_reconnect_attempts=settings.max_reconnect_attempts,
        register_timeout_s=settings.register_timeout_s,
        drain_timeout_s=settings.drain_timeout_s,
        lb_only_retries=settings.lb_only_retries,
    )


def _output_sinks(
    settings: WorkerSettings, hub_files_url: str | None, hub_token: str
) -> Callable[[RequestMeta], OutputSink]:
    """Each request's outputs: uploaded through the job's file API (or the hub's, when
    TENSORHUB_URL is set), staged and hashed under the cache first; kept on this machine
    under the cache only when neither is known."""
    staging = Path(settings.tensorhub_cache_dir) / "outputs"
    limit = settings.engine.max_upload_bytes
    loop = asyncio.get_running_loop()  # sinks are built lazily, possibly in a worker thread

    def make(meta: RequestMeta) -> OutputSink:
        local = LocalOutputSink(staging, meta.request_id, max_upload_bytes=limit)
        if meta.file_base_url:
            api = FileApi(meta.file_base_url, meta.file_token or "")
        elif hub_files_url:
            api = FileApi(hub_files_url, hub_token)
        else:
            return local
        return UploadingOutputSink(local, api, loop)

    return make


def _provider(
    endpoint: LoadedEndpoint, models: WorkerModels, emit: Callable[[str, dict[str, Any]], None]
) -> CachedModels | None:
    """The model cache and loaders, when a function injects a model (else None: no torch)."""
    if not any(spec.injections for spec in endpoint.functions):
        return None
    from gen_worker.injection import build_cached_models, detect_device  # noqa: PLC0415

    provider = build_cached_models(
        endpoint.lock,
        endpoint.functions,
        settings=models.settings,
        source=lambda: models.source,  # one store and one downloader for prefetch and loads
        allow_hub=models.settings.allow_hub_resolve,
        device=detect_device(),
        on_event=emit,
    )
    provider.finder.refresher = models.refresh  # expired URLs: ask the scheduler
    provider.finder.resolutions = models.resolutions  # the endpoint config's, as they come
    return provider


class _Relay:
    """An event sink whose target is set later (the worker is built after its engine)."""

    target: Callable[[str, dict[str, Any]], None] | None = None

    def __call__(self, event_type: str, payload: dict[str, Any]) -> None:
        if self.target is not None:
            self.target(event_type, payload)
        else:
            log("info", event_type, **payload)


def _engine(
    settings: WorkerSettings,
    endpoint: LoadedEndpoint,
    models: ModelSettings,
    provider: CachedModels | None = None,
) -> Engine:
    hub_files = f"{models.tensorhub_url}/api/v1/files" if models.tensorhub_url else None
    return Engine(
        endpoint.functions,
        settings=settings.engine,
        concurrency=resolve_concurrency(
            settings.engine, endpoint.lock.resources.get("max_inflight_requests")
        ),
        outputs=_output_sinks(settings, hub_files, models.tensorhub_token or ""),
        models=provider,
        device=provider.device if provider is not None else "cpu",
        # Input files by URL, public hosts only (the dev runner allows local ones).
        assets=AssetFetcher(
            Path(settings.tensorhub_cache_dir) / "inputs",
            max_bytes=settings.engine.max_input_file_bytes,
            files_url=hub_files,
            files_token=models.tensorhub_token or "",
        ),
    )


async def run_inference(settings: WorkerSettings) -> int:
    log("info", "worker.startup.phase", phase="boot")
    address = settings.orchestrator_addr or ""  # required in inference mode: settings checked it
    try:
        log("info", "worker.startup.phase", phase="cache_preflight_started")
        _preflight(settings)
        log("info", "worker.startup.phase", phase="cache_preflight_ok")
    except OSError as exc:
        log("error", "worker.startup.phase", phase="cache_preflight_failed")
        return _fatal("cache_preflight", exc)
    try:
        endpoint = load_from_lock(settings.manifest_path, settings.endpoint_root)
        identity = await _identity(settings, address)
        # One cache folder for the whole worker: the one the settings checked at preflight.
        model_settings = msgspec.structs.replace(
            load_model_settings(), cache_dir=settings.tensorhub_cache_dir
        )
        models = WorkerModels(model_settings)
        # Model events go to the worker's stream; the worker exists only after the engine.
        emit = _Relay()
        models.provider = _provider(endpoint, models, emit)
    except GenWorkerError as exc:
        return _fatal("boot", exc)
    worker = Worker(
        _core_config(settings, address),
        identity,
        endpoint,
        _engine(settings, endpoint, model_settings, models.provider),
        verify_token=_token_verifier(settings),
        heartbeat_interval_s=settings.heartbeat_interval_s,
        models=models,
    )
    emit.target = worker.worker_event
    try:
        return await worker.run()
    finally:
        await models.aclose()


def main() -> int:
    try:
        settings = load_worker_settings()
    except GenWorkerError as exc:
        return _fatal("settings", exc)
    if settings.mode == "trainer":
        print(
            "error: WORKER_MODE=trainer is not available in this version of gen-worker "
            "(the trainer runtime is not built yet)",
            file=sys.stderr,
        )
        return 1
    return asyncio.run(run_inference(settings))


if __name__ == "__main__":
    sys.exit(main())
