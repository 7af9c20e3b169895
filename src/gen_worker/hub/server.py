"""Running the hub: in a background thread for tests (:class:`HubServer`), or in the
foreground for the command line (:func:`serve`).

Both use uvicorn over the Starlette app built by :func:`create_app`, on a socket bound here
(so ``port 0`` picks a free port and the URL is known before the first request). uvicorn's
access log is off: a blob or part URL's query string is a signature, and log lines never hold
one.

Shutdown (SIGINT/SIGTERM for :func:`serve`, :meth:`HubServer.stop` for the thread): no new
connections, transfers in progress get ``grace_s`` to finish, then end at their next chunk
(a downloader resumes with Range), and the process exits 0 without a traceback. A second
signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

import uvicorn
from starlette.applications import Starlette

from gen_worker.hub.app import HubApp, internal_error, not_found
from gen_worker.hub.files_api import FileApi
from gen_worker.hub.signing import DEFAULT_URL_TTL_S, BearerAuth, UrlSigner
from gen_worker.hub.storage import HubStorage

__all__ = ["DEFAULT_GRACE_S", "HubServer", "HubSettings", "create_app", "serve"]

#: How long transfers in progress may go on after a stop was asked for.
DEFAULT_GRACE_S = 2.0
_CUT_MESSAGE = "ASGI callable returned without completing response."
_ABORT_AFTER_CUT_S = 0.5


@dataclass(frozen=True, slots=True)
class HubSettings:
    """What a hub serves and how: its root, tokens, URL lifetime and signing key."""

    root: Path
    tokens: tuple[str, ...] = ()
    url_ttl_s: float = DEFAULT_URL_TTL_S
    signing_key: bytes | None = None
    public_url: str | None = None
    max_file_bytes: int | None = None


def create_app(
    settings: HubSettings, *, clock: Callable[[], float] = time.time
) -> tuple[Starlette, HubApp]:
    """The hub's ASGI app and its state; the root's directories are created if missing."""
    storage = HubStorage(settings.root).ensure()
    signer = UrlSigner(settings.signing_key, ttl_s=settings.url_ttl_s, clock=clock)
    auth = BearerAuth(settings.tokens)
    hub = HubApp(storage, signer=signer, auth=auth, public_url=settings.public_url)
    files = FileApi(
        storage,
        signer,
        auth,
        base_url=hub.base_url,
        is_stopping=hub.is_stopping,
        max_file_bytes=settings.max_file_bytes,
    )
    app = Starlette(
        routes=hub.routes() + files.routes(),
        exception_handlers={404: not_found, 405: not_found, Exception: internal_error},
    )
    return app, hub


class _CutTransfers(logging.Filter):
    """Drops uvicorn's complaint about a response the hub ended on purpose while stopping."""

    def __init__(self, hub: HubApp) -> None:
        super().__init__()
        self._hub = hub

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self._hub.stopping and record.getMessage() == _CUT_MESSAGE)


@contextlib.contextmanager
def _quiet_cuts(hub: HubApp) -> Generator[None, None, None]:
    logger = logging.getLogger("uvicorn.error")
    cut = _CutTransfers(hub)
    logger.addFilter(cut)
    try:
        yield
    finally:
        logger.removeFilter(cut)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only for TCP-proto
    # listeners; without it small responses wait for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, sock: socket.socket) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{sock.getsockname()[1]}"


def _config(app: Starlette, log_level: str, grace_s: float) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        # A backstop only: _Server ends transfers and connections itself before this.
        timeout_graceful_shutdown=math.ceil(grace_s) + 3,
    )


class _Server(uvicorn.Server):
    """uvicorn with the hub's ordered stop.

    On a stop (``should_exit``, or the first SIGINT/SIGTERM in the main thread): no new
    connections; transfers get ``grace_s``, then end at their next chunk; half a second later
    connections still open are closed hard, since a client that stopped reading would keep a
    graceful close (which flushes first) waiting forever. The signal is not re-raised, so the
    process exits 0. A second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, hub: HubApp, grace_s: float) -> None:
        super().__init__(config)
        self._hub = hub
        self._grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self._grace_s, self._cut)
        loop.call_later(self._grace_s + _ABORT_AFTER_CUT_S, self._abort_connections)
        await super().shutdown(sockets)

    def _cut(self) -> None:
        self._hub.stopping = True

    def _abort_connections(self) -> None:
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if isinstance(transport, asyncio.Transport):
                transport.abort()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only; HubServer stops through should_exit
            return

        def stop(signum: int, frame: FrameType | None) -> None:
            if self.should_exit:
                self.force_exit = True
                self._hub.stopping = True
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def serve(
    settings: HubSettings,
    host: str,
    port: int,
    *,
    log_level: str = "warning",
    grace_s: float = DEFAULT_GRACE_S,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; ``ready(url)`` is called once requests are accepted.

    Raises ``OSError`` when ``host:port`` cannot be bound.
    """
    app, hub = create_app(settings)
    sock = _bind(host, port)
    server = _Server(_config(app, log_level, grace_s), hub, grace_s)
    try:
        with _quiet_cuts(hub):
            task = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not task.done():
                await asyncio.sleep(0.01)
            if server.started and ready is not None:
                ready(_url(host, sock))
            await task
    finally:
        sock.close()


class HubServer:
    """A hub on ``host:port`` (default ``127.0.0.1:0``) in a background thread.

    ``with HubServer(root) as hub: httpx.post(hub.url + ...)``; ``clock`` makes signed URLs
    expire on demand in tests.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Sequence[str] = (),
        url_ttl_s: float = DEFAULT_URL_TTL_S,
        signing_key: bytes | None = None,
        public_url: str | None = None,
        max_file_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        grace_s: float = 0.5,
    ) -> None:
        self.root = Path(root)
        settings = HubSettings(
            self.root, tuple(tokens), url_ttl_s, signing_key, public_url, max_file_bytes
        )
        self.app, self.hub = create_app(settings, clock=clock)
        self._host = host
        self._port = port
        self._grace_s = grace_s
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> HubServer:
        """Bind, start serving, and wait until requests are accepted (at most 10 s)."""
        if self._thread is not None:
            raise RuntimeError("this hub server is already started")
        self.hub.stopping = False
        self._sock = _bind(self._host, self._port)
        self.url = _url(self._host, self._sock)
        config = _config(self.app, "warning", self._grace_s)
        server = self._server = _Server(config, self.hub, self._grace_s)
        self._thread = threading.Thread(
            target=self._run, args=(server, self._sock), name=f"hub {self.url}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the hub at {self.url} did not start")
            time.sleep(0.01)
        return self

    def _run(self, server: _Server, sock: socket.socket) -> None:
        with _quiet_cuts(self.hub):
            server.run(sockets=[sock])

    def stop(self) -> None:
        """Stop serving and wait for it: transfers in progress get ``grace_s`` to finish."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
            if self._thread.is_alive():
                print(f"warning: the hub at {self.url} did not stop in 15 s", file=sys.stderr)
        if self._sock is not None:
            self._sock.close()
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
