"""``python -m gen_worker.testing.http_runner``: run an endpoint locally over HTTP.

The same engine as the production worker, without a scheduler::

    python -m gen_worker.testing.http_runner --listen 127.0.0.1:8081 --outputs ./out --project .

Prints ``listening on http://HOST:PORT`` once it accepts requests (``--listen HOST:0`` picks
a free port). SIGINT/SIGTERM stop it cleanly: no new requests, running ones get a grace period,
the rest are canceled; a second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from gen_worker.config import (
    EngineSettings,
    ModelSettings,
    load_engine_settings,
    load_model_settings,
    load_runner_settings,
)
from gen_worker.devserver import DevRunner
from gen_worker.devserver.model_routes import ModelRoutes
from gen_worker.discovery.endpoint import LoadedEndpoint, load_from_lock, load_from_project
from gen_worker.engine import DEFAULT_CANCEL_GRACE_S, Engine, resolve_concurrency
from gen_worker.errors import GenWorkerError
from gen_worker.files import AssetFetcher, LocalOutputSink
from gen_worker.injection import build_cached_models, detect_device
from gen_worker.logs import log
from gen_worker.models.source import ModelSource, build_model_source

__all__ = ["SHUTDOWN_GRACE_S", "add_arguments", "build_runner", "main", "parse_listen", "run"]

#: How long running requests may go on after SIGINT/SIGTERM before they are canceled.
SHUTDOWN_GRACE_S = 5.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8081`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8081")
    return host.strip("[]"), int(port)


def _model_dir(text: str) -> tuple[str, Path]:
    ref, sep, folder = text.partition("=")
    if not sep or not ref or not folder:
        raise argparse.ArgumentTypeError(f"{text!r} is not REF=DIR")
    if not Path(folder).is_dir():
        raise argparse.ArgumentTypeError(f"--model {text}: {folder} is not a directory")
    return ref, Path(folder).resolve()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = load_runner_settings()
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(defaults.listen),
        metavar="HOST:PORT",
        help=f"default {defaults.listen} (GEN_WORKER_HTTP_LISTEN)",
    )
    parser.add_argument(
        "--outputs",
        default=defaults.output_dir,
        metavar="DIR",
        help=f"where outputs are written; default {defaults.output_dir}",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--project", metavar="DIR", help="discover this project (endpoint.toml)")
    source.add_argument(
        "--manifest",
        metavar="PATH",
        default=None,
        help=f"a baked endpoint.lock; default {defaults.manifest_path}",
    )
    parser.add_argument(
        "--endpoint-root",
        default=defaults.endpoint_root,
        metavar="DIR",
        help="where the code of --manifest lives (it and its src/ go on sys.path)",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=_model_dir,
        default=[],
        metavar="REF=DIR",
        help="serve model REF (or [models] key) from a local folder",
    )
    parser.add_argument(
        "--no-prefetch",
        dest="prefetch_models",
        action="store_false",
        help="do not fetch the declared models at startup (each loads on its first request)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=100,
        metavar="N",
        help="requests that may wait for a slot before the runner answers 429",
    )
    levels = ["debug", "info", "warning", "error"]
    parser.add_argument("--log-level", default="warning", choices=levels)


def _load(args: argparse.Namespace) -> LoadedEndpoint:
    if args.project is not None:
        return load_from_project(args.project)
    manifest = args.manifest or load_runner_settings().manifest_path
    if args.manifest is None and not Path(manifest).exists():
        raise GenWorkerError(
            f"no endpoint to serve: {manifest} does not exist; pass --project DIR (a folder with "
            "endpoint.toml) or --manifest PATH"
        )
    return load_from_lock(manifest, args.endpoint_root)


def build_runner(
    endpoint: LoadedEndpoint,
    outputs: Path,
    *,
    settings: EngineSettings | None = None,
    model_dirs: dict[str, Path] | None = None,
    max_queue: int | None = 100,
    cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
    model_settings: ModelSettings | None = None,
    prefetch_models: bool = True,
) -> DevRunner:
    """A dev runner over a fresh engine for ``endpoint``, writing outputs under ``outputs``.

    With ``prefetch_models`` (the default) the declared models are fetched into the store as
    the runner starts, and ``/readyz`` answers ready once they are there.

    Models are prefetched into the store and through the hub that ``model_settings`` name
    (default: read from the environment, TENSORHUB_URL and TENSORHUB_CACHE_DIR).
    """
    settings = settings or load_engine_settings()
    model_settings = model_settings or load_model_settings()
    lock = endpoint.lock
    declared = {k: m.ref for k, m in lock.models.items()}
    folders = dict(model_dirs or {})
    folders.update({declared[k]: v for k, v in (model_dirs or {}).items() if k in declared})
    routes = ModelRoutes(_model_source(model_settings))
    injects = any(spec.injections for spec in endpoint.functions)

    def on_event(event_type: str, payload: dict[str, Any]) -> None:
        log("info", event_type, **payload)

    # The same store and downloads as the model routes; the hub is always asked in local dev.
    models = build_cached_models(
        lock, endpoint.functions, settings=model_settings, source=lambda: routes.source,
        allow_hub=True, device=detect_device() if injects else "cpu", folders=folders,
        on_event=on_event,
    )  # fmt: skip
    routes.provider = models
    routes.prefetch_on_start = prefetch_models
    outputs.mkdir(parents=True, exist_ok=True)
    upload_limit = settings.max_upload_bytes
    engine = Engine(
        endpoint.functions,
        settings=settings,
        concurrency=resolve_concurrency(settings, lock.resources.get("max_inflight_requests")),
        max_waiting=max_queue,
        cancel_grace_s=cancel_grace_s,
        models=models,
        device=models.device,
        outputs=lambda meta: LocalOutputSink(
            outputs, meta.request_id, max_upload_bytes=upload_limit
        ),
        # Local development: inputs may come from this machine, and refs name earlier outputs.
        assets=AssetFetcher(outputs / ".inputs", max_bytes=settings.max_input_file_bytes,
                            allow_private_hosts=True, local_refs_root=outputs),
    )  # fmt: skip
    return DevRunner(engine, lock, models=routes)


def _model_source(settings: ModelSettings) -> Callable[[ModelRoutes], ModelSource]:
    def make(routes: ModelRoutes) -> ModelSource:
        def on_event(event_type: str, payload: dict[str, Any]) -> None:
            routes.on_event(event_type, payload)
            log("info", event_type, **payload)

        return build_model_source(settings, on_event=on_event)

    return make


class _Server(uvicorn.Server):
    """uvicorn with the runner's own ordered stop on SIGINT/SIGTERM.

    First signal: refuse new requests, give running ones the grace period, cancel the rest
    (their callers get a ``canceled`` answer), then stop the server. A second signal exits at
    once with status 1. uvicorn's own handling would cancel in-flight handlers mid-response (a
    traceback per request) and re-raise the signal afterwards.
    """

    def __init__(self, config: uvicorn.Config, runner: DevRunner, grace_s: float) -> None:
        super().__init__(config)
        self._runner = runner
        self._grace_s = grace_s
        self._draining: asyncio.Task[None] | None = None

    async def _drain(self) -> None:
        self._runner.stopping = True
        await self._runner.engine.shutdown(grace_s=self._grace_s)
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()

        def stop(signum: int, frame: FrameType | None) -> None:
            if self._draining is not None:
                # Second signal: the user wants out now. Outputs are written atomically, so
                # nothing is left half-written; in-flight callers see their connection close.
                print("second signal: stopping at once", file=sys.stderr, flush=True)
                os._exit(1)
            loop.call_soon_threadsafe(self._start_drain)

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())


async def _serve(runner: DevRunner, host: str, port: int, log_level: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio enables TCP_NODELAY on accepted sockets only for TCP-proto
    # listeners; without it every response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        runner.app,
        log_level=log_level,
        timeout_graceful_shutdown=3,
        lifespan="on",
        access_log=log_level in ("debug", "info"),
    )
    server = _Server(config, runner, grace_s=SHUTDOWN_GRACE_S)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{bound}"
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"listening on {url}", flush=True)
    await task


def run(args: argparse.Namespace) -> int:
    try:
        endpoint = _load(args)
        runner = build_runner(
            endpoint,
            Path(args.outputs),
            model_dirs=dict(args.models),
            prefetch_models=args.prefetch_models,
            max_queue=args.max_queue,
        )
    except GenWorkerError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    host, port = args.listen
    try:
        asyncio.run(_serve(runner, host, port, args.log_level))
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m gen_worker.testing.http_runner",
        description="Run an endpoint's functions locally over HTTP (the dev runner).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
