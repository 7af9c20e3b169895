"""The dev HTTP runner: every route of the spec over the shared execution engine."""

from __future__ import annotations

import contextlib
import html
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from gen_worker._version import __version__
from gen_worker.authoring import FunctionSpec
from gen_worker.devserver.model_routes import ModelRoutes
from gen_worker.devserver.openapi import openapi_document
from gen_worker.devserver.responses import (
    EventItem,
    error_body,
    event_item,
    invoke_response,
    sse,
    sse_for,
)
from gen_worker.discovery import EndpointLock
from gen_worker.engine import (
    Engine,
    Event,
    Failure,
    Log,
    Outcome,
    Progress,
    RequestMeta,
    RequestRun,
    Result,
)

__all__ = ["DevRunner"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ENVELOPE_KEYS = frozenset(
    {"payload", "request_id", "timeout_ms", "owner", "invoker_id", "required_models"}
)
_NOT_YET = (
    "this runner was built without a model store, so the model routes (/v1/models/*, "
    "/v1/warmup) are off; start it with the http_runner command (or build_runner), which "
    "configures one from TENSORHUB_URL and TENSORHUB_CACHE_DIR"
)
_encoder = msgspec.json.Encoder()
_INVOKE_PREFIX = "/v1/request/"
_JSON_TYPE = (b"content-type", b"application/json")


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    payload: msgspec.Raw
    request_id: str | None = None
    timeout_ms: int | None = None
    owner: str | None = None
    invoker_id: str | None = None
    required_models: list[str] = []


class BadRequest(Exception):
    """The request envelope is malformed (HTTP 400)."""


def _json(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


def _split_envelope(body: bytes) -> tuple[bytes, _Envelope | None]:
    """The payload bytes and the envelope, if the body is one.

    A body is an envelope when it is an object with a ``payload`` object and only envelope
    keys; anything else is the payload itself. The cheap substring test keeps the common
    case (a bare payload) to a single decode, done by the engine.
    """
    if b'"payload"' not in body:
        return body, None
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body, None  # the engine reports the JSON error
    if not isinstance(raw, dict) or "payload" not in raw or not raw.keys() <= _ENVELOPE_KEYS:
        return body, None
    if not isinstance(raw["payload"], dict):
        raise BadRequest("envelope `payload` must be a JSON object")
    try:
        envelope = msgspec.json.decode(body, type=_Envelope)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request envelope: {exc}") from None
    if envelope.timeout_ms is not None and envelope.timeout_ms <= 0:
        raise BadRequest("envelope `timeout_ms` must be a positive number of milliseconds")
    return bytes(envelope.payload), envelope


class DevRunner:
    """The app's state: the engine, the endpoint's lock, and whether it is shutting down."""

    def __init__(
        self, engine: Engine, lock: EndpointLock, *, models: ModelRoutes | None = None
    ) -> None:
        self.engine = engine
        self.lock = lock
        #: Prefetch and status over the local store; None answers 501 (no store configured).
        self.models = models
        self.stopping = False
        self.shutdown_grace_s = 5.0
        self._openapi: bytes | None = None
        self._starlette = Starlette(routes=self._routes(), lifespan=self._lifespan)
        #: The ASGI app: invocations on a fast path, every other route through Starlette.
        self.app = _App(self)

    def _routes(self) -> list[Route]:
        return [
            Route("/v1/request/{function}", self.invoke, methods=["POST"]),  # see _App
            Route("/v1/request/{request_id}", self.cancel, methods=["DELETE"]),
            Route("/v1/warmup/{function}", self.warmup, methods=["POST"]),
            Route(
                "/v1/models/prefetch",
                self.models.prefetch if self.models else self.not_yet,
                methods=["POST"],
            ),
            Route(
                "/v1/models/load",
                self.models.load if self.models else self.not_yet,
                methods=["POST"],
            ),
            Route(
                "/v1/models/unload",
                self.models.unload if self.models else self.not_yet,
                methods=["POST"],
            ),
            Route(
                "/v1/models/status",
                self.models.status if self.models else self.not_yet,
                methods=["GET"],
            ),
            Route("/v1/status", self.status, methods=["GET"]),
            Route("/v1/functions", self.functions, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/docs", self.docs, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.models is not None:
            self.models.start_prefetch()  # /readyz: ready once the declared models are on disk
        yield
        # Server shutdown: refuse new requests, let running ones finish, cancel the rest.
        self.stopping = True
        await self.engine.shutdown(grace_s=self.shutdown_grace_s)
        if self.models is not None:
            await self.models.aclose()

    # -- invoking -------------------------------------------------------------------------------

    async def invoke(self, request: Request) -> Response:
        """The Starlette route; ``_App`` serves the same requests before they get here."""
        spec, answer = self._find(request.path_params["function"])
        if answer is not None:
            return Response(answer[1], status_code=answer[0], media_type="application/json")
        assert spec is not None
        streaming = spec.is_streaming or "text/event-stream" in request.headers.get("accept", "")
        run, answer = self._begin(spec, await request.body(), streaming)
        if answer is not None:
            return Response(answer[1], status_code=answer[0], media_type="application/json")
        assert run is not None
        if streaming:
            return StreamingResponse(self._sse(run), media_type="text/event-stream")
        status, body = await self._collect(run)
        return Response(body, status_code=status, media_type="application/json")

    async def invoke_raw(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        spec, answer = self._find(name)
        if answer is None:
            assert spec is not None
            body = await _read_body(receive)
            if body is None:
                return  # the caller went away before sending its request
            streaming = spec.is_streaming or _wants_sse(scope)
            run, answer = self._begin(spec, body, streaming)
            if answer is None:
                assert run is not None
                if streaming:
                    stream = StreamingResponse(self._sse(run), media_type="text/event-stream")
                    await stream(scope, receive, send)
                    return
                answer = await self._collect(run)
        status, data = answer
        headers = [(b"content-length", str(len(data)).encode()), _JSON_TYPE]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def _find(self, name: str) -> tuple[FunctionSpec | None, tuple[int, bytes] | None]:
        """The function, or the answer when there is none or the runner is stopping."""
        spec = self.engine.find(name)
        if spec is None:
            available = [f.name for f in self.engine.functions]
            message = f"unknown function '{name}'; available: {available}"
            return None, (404, _encoder.encode(error_body("not_found", message)))
        if self.stopping:
            return None, (503, _encoder.encode(error_body("busy", "the runner is shutting down")))
        return spec, None

    def _begin(
        self, spec: FunctionSpec, body: bytes, streaming: bool
    ) -> tuple[RequestRun | None, tuple[int, bytes] | None]:
        """The run, or the answer when the envelope is bad or its id is taken.

        A streamed answer is written while the run goes on, so the run gets a task of its own;
        a JSON answer waits for the end, so the handler's task runs the request itself.
        """
        try:
            payload, envelope = _split_envelope(body)
        except BadRequest as exc:
            return None, (400, _encoder.encode(error_body("validation", str(exc))))
        run = self._start(spec, payload, envelope, own_task=streaming)
        if run is None:
            message = f"request {envelope.request_id if envelope else ''} is already running"
            return None, (409, _encoder.encode(error_body("validation", message)))
        return run, None

    def _start(
        self, spec: FunctionSpec, payload: bytes, envelope: _Envelope | None, *, own_task: bool
    ) -> RequestRun | None:
        e = envelope
        if e is None:  # the common case: a bare payload, every other field at its default
            meta = RequestMeta(request_id=_new_request_id())
        else:
            meta = RequestMeta(
                request_id=e.request_id or _new_request_id(),
                timeout_ms=e.timeout_ms,
                owner=e.owner,
                invoker_id=e.invoker_id,
                required_models=tuple(e.required_models),
            )
        if self.engine.get(meta.request_id) is not None:
            return None
        return self.engine.start(spec, payload, meta, own_task=own_task)

    async def _collect(self, run: RequestRun) -> tuple[int, bytes]:
        """Run the request in this task; the status and encoded body once it has ended."""
        try:
            await run.execute()
        finally:
            run.cancel()  # this task was canceled (the server stops): no-op once finished
        # An Event encodes as an event item itself; progress and log lines are converted.
        # Told apart by exact type: isinstance against a union costs several times more.
        events: list[EventItem | Event] = [
            o if type(o) is Event else event_item(o)
            for o in run.channel.take_nowait()
            if type(o) is Event or isinstance(o, Progress | Log)
        ]
        terminal = run.channel.terminal
        assert terminal is not None  # execute() returns once the run has ended
        status, body = invoke_response(run.request_id, terminal, events, streaming=False)
        return status, _encoder.encode(body)

    async def _sse(self, run: RequestRun) -> AsyncIterator[bytes]:
        try:
            # What was posted meanwhile goes out as one chunk (one write instead of one per
            # item); each item is still sent as soon as the loop gets to it.
            async for batch in run.channel.batches():
                yield b"".join(self._sse_item(run, outcome) for outcome in batch)
        finally:
            run.cancel()

    def _sse_item(self, run: RequestRun, outcome: Outcome) -> bytes:
        if not isinstance(outcome, Result | Failure):
            return sse_for(outcome)
        status, body = invoke_response(run.request_id, outcome, [], streaming=run.spec.is_streaming)
        kind = "result" if isinstance(outcome, Result) else "error"
        data = {**msgspec.structs.asdict(body), "status": status}
        del data["events"]
        return sse(kind, data, outcome.seq)

    async def cancel(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        return _json({"request_id": request_id, "canceled": self.engine.cancel(request_id)})

    # -- everything else ------------------------------------------------------------------------

    async def warmup(self, request: Request) -> Response:
        if self.models is None:
            return await self.not_yet(request)
        return await self.models.warmup(request, self.engine.find(request.path_params["function"]))

    async def not_yet(self, request: Request) -> Response:
        return _json(error_body("not_implemented", _NOT_YET), 501)

    async def status(self, request: Request) -> Response:
        slots = self.engine.slots
        return _json(
            {
                "endpoint": self.lock.endpoint_name,
                "functions": [f.name for f in self.lock.functions],
                "concurrency": slots.limit,
                "running": slots.in_use,
                "waiting": slots.waiting,
                "active_requests": sorted(self.engine.active),
                "stopping": self.stopping,
            }
        )

    async def functions(self, request: Request) -> Response:
        out = []
        for f in self.lock.functions:
            item: dict[str, Any] = {
                "name": f.name,
                "python_name": f.python_name,
                "streaming": f.streaming,
                "is_async": f.is_async,
                "input_schema": msgspec.json.decode(f.input_schema),
                "output_schema": msgspec.json.decode(f.output_schema),
            }
            if f.delta_schema is not None:
                item["delta_schema"] = msgspec.json.decode(f.delta_schema)
            out.append(item)
        return _json({"endpoint": self.lock.endpoint_name, "functions": out})

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            doc = openapi_document(self.lock.endpoint_name, __version__, self.engine.functions)
            self._openapi = _encoder.encode(doc)
        return Response(self._openapi, media_type="application/json")

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(_docs_page(self.lock, str(request.base_url).rstrip("/")))

    async def healthz(self, request: Request) -> Response:
        return _json({"ok": True})

    async def readyz(self, request: Request) -> Response:
        if self.stopping:
            return _json({"ready": False, "reason": "shutting down"}, 503)
        if self.models is not None:
            ready, detail = self.models.readiness()
            if not ready:
                return _json({"ready": False, **detail}, 503)
        return _json({"ready": True})


class _App:
    """``POST /v1/request/{function}`` without Starlette's routing, Request and Response.

    They cost about a third of a no-op request's time in the runner: a regex per route until
    one matches, a Request object, an async generator to read a one-chunk body, a Response
    object. The fast path reads the body from ``receive`` and answers with two ``send`` calls.
    What it does not serve (other routes, a path that is not one function name, lifespan) goes
    to the Starlette app, which also answers 404/405 as before. (A class, not a bound method:
    uvicorn takes a bound method for an ASGI 2 app.)
    """

    def __init__(self, runner: DevRunner) -> None:
        self._runner = runner
        self._starlette = runner._starlette

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = _route_path(scope)
            if path.startswith(_INVOKE_PREFIX):
                name = path[len(_INVOKE_PREFIX) :]
                if name and "/" not in name:
                    await self._runner.invoke_raw(name, scope, receive, send)
                    return
        await self._starlette(scope, receive, send)


def _new_request_id() -> str:
    """A random UUID4 as 32 hex digits, like ``uuid.uuid4().hex`` at a third of its cost."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def _route_path(scope: Scope) -> str:
    """The path below the app's root path, as Starlette's router matches it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _wants_sse(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if key == b"accept" and b"text/event-stream" in value:
            return True
    return False


def _docs_page(lock: EndpointLock, base: str) -> str:
    """A self-contained page (no external scripts: the runner may be offline)."""
    sections = []
    for f in lock.functions:
        schema = msgspec.json.format(f.input_schema.encode(), indent=2).decode()
        kind = "streaming (server-sent events)" if f.streaming else "single output"
        sections.append(
            f"<h2>{html.escape(f.name)}</h2><p>{html.escape(f.python_name)} &middot; {kind}</p>"
            f"<pre>curl -sS -X POST '{html.escape(base)}/v1/request/{html.escape(f.name)}' "
            "-H 'content-type: application/json' -d '{\"payload\": {...}}'</pre>"
            f"<details><summary>input schema</summary><pre>{html.escape(schema)}</pre></details>"
        )
    title = html.escape(lock.endpoint_name)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>OpenAPI: <a href='/openapi.json'>/openapi.json</a></p>"
        + "".join(sections)
        + "</body></html>"
    )
