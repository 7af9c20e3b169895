"""Serving a project with the real dev runner on 127.0.0.1:0 in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from gen_worker.config import EngineSettings, ModelSettings
from gen_worker.devserver import DevRunner
from gen_worker.discovery.endpoint import load_from_project
from gen_worker.testing.http_runner import build_runner

PROJECTS = Path(__file__).parent / "fixtures" / "projects"


class Served:
    def __init__(self, base_url: str, runner: DevRunner, outputs: Path) -> None:
        self.base_url = base_url
        self.runner = runner
        self.outputs = outputs


@contextlib.contextmanager
def serve(
    outputs: Path,
    project: Path = PROJECTS / "runner_scenarios",
    settings: EngineSettings | None = None,
    **kwargs: Any,
) -> Iterator[Served]:
    # Models go to a store beside the outputs, never to the real ~/.cache, and no hub unless
    # the test names one.
    kwargs.setdefault("model_settings", ModelSettings(cache_dir=str(outputs / ".cache")))
    runner = build_runner(
        load_from_project(project), outputs, settings=settings or EngineSettings(), **kwargs
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        runner.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dev runner did not start")
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{port}", runner, outputs)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
