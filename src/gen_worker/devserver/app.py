"""The dev HTTP runner: every route of the spec over the shared execution engine."""

from __future__ import annotations

import contextlib
import html
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from gen_worker._version import __version__
from gen_worker.authoring import FunctionSpec
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
from gen_worker.engine import Delta, Engine, Failure, RequestMeta, RequestRun, Result

__all__ = ["DevRunner"]

_ENVELOPE_KEYS = frozenset(
    {"payload", "request_id", "timeout_ms", "owner", "invoker_id", "required_models"}
)
_NOT_YET = (
    "model management (prefetch, load, unload, warmup, status) is not available in this "
    "version of the dev runner; serve local snapshot folders with --model REF=DIR"
)
_encoder = msgspec.json.Encoder()


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

    def __init__(self, engine: Engine, lock: EndpointLock) -> None:
        self.engine = engine
        self.lock = lock
        self.stopping = False
        self.shutdown_grace_s = 5.0
        self._openapi: bytes | None = None
        self.app = Starlette(routes=self._routes(), lifespan=self._lifespan)

    def _routes(self) -> list[Route]:
        return [
            Route("/v1/request/{function}", self.invoke, methods=["POST"]),
            Route("/v1/request/{request_id}", self.cancel, methods=["DELETE"]),
            Route("/v1/warmup/{function}", self.not_yet, methods=["POST"]),
            Route("/v1/models/prefetch", self.not_yet, methods=["POST"]),
            Route("/v1/models/load", self.not_yet, methods=["POST"]),
            Route("/v1/models/unload", self.not_yet, methods=["POST"]),
            Route("/v1/models/status", self.not_yet, methods=["GET"]),
            Route("/v1/status", self.status, methods=["GET"]),
            Route("/v1/functions", self.functions, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/docs", self.docs, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        # Server shutdown: refuse new requests, let running ones finish, cancel the rest.
        self.stopping = True
        await self.engine.shutdown(grace_s=self.shutdown_grace_s)

    # -- invoking -------------------------------------------------------------------------------

    async def invoke(self, request: Request) -> Response:
        name = request.path_params["function"]
        spec = self.engine.find(name)
        if spec is None:
            available = [f.name for f in self.engine.functions]
            message = f"unknown function '{name}'; available: {available}"
            return _json(error_body("not_found", message), 404)
        if self.stopping:
            return _json(error_body("busy", "the runner is shutting down"), 503)
        try:
            payload, envelope = _split_envelope(await request.body())
        except BadRequest as exc:
            return _json(error_body("validation", str(exc)), 400)
        run = self._start(spec, payload, envelope)
        if run is None:
            message = f"request {envelope.request_id if envelope else ''} is already running"
            return _json(error_body("validation", message), 409)
        wants_sse = "text/event-stream" in request.headers.get("accept", "")
        if spec.is_streaming or wants_sse:
            return StreamingResponse(self._sse(run), media_type="text/event-stream")
        return await self._collect(run)

    def _start(
        self, spec: FunctionSpec, payload: bytes, envelope: _Envelope | None
    ) -> RequestRun | None:
        e = envelope
        meta = RequestMeta(
            request_id=(e.request_id if e and e.request_id else uuid.uuid4().hex),
            timeout_ms=e.timeout_ms if e else None,
            owner=e.owner if e else None,
            invoker_id=e.invoker_id if e else None,
            required_models=tuple(e.required_models) if e else (),
        )
        if self.engine.get(meta.request_id) is not None:
            return None
        return self.engine.start(spec, payload, meta)

    async def _collect(self, run: RequestRun) -> Response:
        events: list[EventItem] = []
        try:
            async for outcome in run.channel:
                if isinstance(outcome, Result | Failure):
                    status, body = invoke_response(run.request_id, outcome, events, streaming=False)
                    return _json(body, status)
                if not isinstance(outcome, Delta):
                    events.append(event_item(outcome))
        finally:
            run.cancel()  # a caller that went away cancels its request; no-op once finished
        raise AssertionError("an outcome channel always ends with a terminal outcome")

    async def _sse(self, run: RequestRun) -> AsyncIterator[bytes]:
        try:
            async for outcome in run.channel:
                if isinstance(outcome, Result | Failure):
                    status, body = invoke_response(
                        run.request_id, outcome, [], streaming=run.spec.is_streaming
                    )
                    kind = "result" if isinstance(outcome, Result) else "error"
                    data = {**msgspec.structs.asdict(body), "status": status}
                    del data["events"]
                    yield sse(kind, data, outcome.seq)
                else:
                    yield sse_for(outcome)
        finally:
            run.cancel()

    async def cancel(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        return _json({"request_id": request_id, "canceled": self.engine.cancel(request_id)})

    # -- everything else ------------------------------------------------------------------------

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
        return _json({"ready": True})


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
