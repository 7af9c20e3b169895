"""The hub's HTTP surface: model resolution, signed blob downloads, and the pieces every
route shares (JSON errors, bounded JSON bodies, Range-aware file responses).

Routes (errors are JSON ``{"error": "<what was wrong and what is valid>"}``)::

    POST /api/v1/inference/repos/{owner}/{repo}/resolve          bearer (when configured)
         {"digest": "blake3:<hex>"} | {"tag": T, "attributes": {k: v}} | {"tag": T} | {}
      -> {"checkpoint_id": "blake3:<hex>",
          "snapshot_manifest": {"entries": [{path, size_bytes, blake3, url}]}}
         precedence digest > attributes > tag; a missing tag means "latest". With attributes,
         the answer is the newest snapshot the tag has pointed to whose attributes contain
         every requested key=value; none -> 409 {"error", "asked", "available"}. 404: unknown
         repo, tag or digest (a digest of another repo included); 400: bad body or ref parts.
    GET|HEAD /api/v1/blobs/{hex}?exp=<unix>&sig=<hmac>           signed URL, no bearer
         the blob, whole or one Range (bytes=a-b, a-, -n -> 206; past the end -> 416);
         403 expired or bad signature, 404 unknown blob. ETag is the blake3.
    GET  /healthz                                                 {"ok": true}

Every URL in a resolve answer is absolute (``--public-url``, else the request's own base)
and expires after the hub's URL lifetime. The file API is in :mod:`gen_worker.hub.files_api`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gen_worker.errors import InvalidModelRefError
from gen_worker.hub.signing import AccessDenied, BearerAuth, UrlSigner
from gen_worker.hub.storage import HubStorage, RepoIndex
from gen_worker.models.manifest import DIGEST_PREFIX
from gen_worker.refs import DEFAULT_TAG, parse_cozy_ref

__all__ = [
    "CHUNK_BYTES",
    "BadRequest",
    "Handler",
    "HubApp",
    "RangedFile",
    "error_response",
    "handled",
    "internal_error",
    "json_response",
    "not_found",
    "parse_range",
    "read_json",
]

_T = TypeVar("_T")
#: Bytes read from disk and handed to the server per send: large, so serving is cheap.
CHUNK_BYTES = 4 << 20
_MAX_JSON_BYTES = 4 << 20
_STOP_POLL_S = 0.2
_encoder = msgspec.json.Encoder()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        _encoder.encode(body), status_code=status, media_type="application/json", headers=headers
    )


def error_response(status: int, message: str, **extra: Any) -> Response:
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return json_response({"error": message, **extra}, status, headers)


def denied(exc: AccessDenied) -> Response:
    return error_response(exc.status, exc.reason)


class BadRequest(Exception):
    """A request body or parameter is wrong; the message says what is valid (HTTP 400)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


async def read_json(request: Request, into: type[_T], form: str) -> _T:
    """The body decoded as ``into`` (unknown fields refused); ``BadRequest`` naming ``form``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_JSON_BYTES:
            raise BadRequest(f"the JSON body is larger than {_MAX_JSON_BYTES} bytes", 413)
    try:
        return msgspec.json.decode(bytes(body) or b"{}", type=into)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request body: {exc}; expected {form}") from None
    except msgspec.DecodeError:
        raise BadRequest(f"the request body is not valid JSON; expected {form}") from None


# -- serving bytes from disk ----------------------------------------------------------------

_RANGE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


class Unsatisfiable(Exception):
    """The Range asks for bytes the file does not have (HTTP 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as (first, last) inclusive, or None to send the whole file.

    A missing, malformed or multi-range header means the whole file (RFC 9110 lets a server
    ignore what it does not serve); a range starting past the end, or ``bytes=-0``, raises
    :class:`Unsatisfiable`.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _RANGE.fullmatch(spec)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size - 1
    start = int(first)
    end = size - 1 if last == "" else int(last)
    if last != "" and end < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size - 1)


class RangedFile(Response):
    """Response: an open file descriptor, whole (200) or one byte range (206), or 416.

    Reads ``CHUNK_BYTES`` at a time in a worker thread (``os.pread``), so neither the event
    loop nor memory holds more than a chunk; stops when the client disconnects or
    ``is_stopping()`` turns true (checked every 0.2 s). Closes the descriptor when done.
    """

    def __init__(
        self,
        fd: int,
        *,
        etag: str,
        media_type: str,
        is_stopping: Callable[[], bool],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(media_type=media_type)
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._etag = etag
        self._media_type = media_type
        self._is_stopping = is_stopping
        self._extra = headers or {}

    def _response_headers(
        self, length: int, content_range: str | None
    ) -> list[tuple[bytes, bytes]]:
        headers = {
            "content-type": self._media_type,
            "content-length": str(length),
            "accept-ranges": "bytes",
            "etag": self._etag,
            **self._extra,
        }
        if content_range is not None:
            headers["content-range"] = content_range
        return [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._respond(scope, receive, send)
        finally:
            os.close(self._fd)

    def _choose(self, scope: Scope) -> tuple[int, int, int] | None:
        """(status, first, length), or None for 416."""
        request_headers = dict(scope["headers"])
        header = request_headers.get(b"range")
        if_range = request_headers.get(b"if-range")
        if header is None or (if_range is not None and if_range.decode("latin-1") != self._etag):
            return 200, 0, self._size
        try:
            chosen = parse_range(header.decode("latin-1"), self._size)
        except Unsatisfiable:
            return None
        if chosen is None:
            return 200, 0, self._size
        return 206, chosen[0], chosen[1] - chosen[0] + 1

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        chosen = self._choose(scope)
        if chosen is None:
            message = (
                f"the range asked for is outside the {self._size} bytes of this file; "
                "valid: bytes=a-b, bytes=a-, bytes=-n"
            )
            body = _encoder.encode({"error": message})
            raw = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"content-range", f"bytes */{self._size}".encode()),
                (b"accept-ranges", b"bytes"),
            ]
            await send({"type": "http.response.start", "status": 416, "headers": raw})
            await send({"type": "http.response.body", "body": body})
            return
        status, first, length = chosen
        content_range = (
            f"bytes {first}-{first + length - 1}/{self._size}" if status == 206 else None
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": self._response_headers(length, content_range),
            }
        )
        if scope["method"] == "HEAD" or length == 0:
            await send({"type": "http.response.body", "body": b""})
            return
        # The transfer ends early when the client goes away (uvicorn would otherwise accept
        # and drop every remaining chunk) or when the hub stops, even while a stalled client
        # holds a send() waiting for room; ending it through our own cancel scope keeps the
        # server's graceful shutdown from cancelling the task itself (a traceback per transfer).
        async with anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    continue
                group.cancel_scope.cancel()

            async def watch_stopping() -> None:
                while not self._is_stopping():
                    await anyio.sleep(_STOP_POLL_S)
                group.cancel_scope.cancel()

            group.start_soon(watch_disconnect)
            group.start_soon(watch_stopping)
            await self._stream(send, first, length)
            group.cancel_scope.cancel()

    async def _stream(self, send: Send, offset: int, length: int) -> None:
        left = length
        while left > 0:
            chunk = await anyio.to_thread.run_sync(
                os.pread, self._fd, min(CHUNK_BYTES, left), offset
            )
            if not chunk:
                return  # the file shrank under us; the short body tells the client
            offset += len(chunk)
            left -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})


Handler = Callable[[Request], Awaitable[Response]]


def handled(endpoint: Handler) -> Handler:
    """``endpoint`` with :class:`BadRequest` and :class:`AccessDenied` turned into JSON errors."""

    async def respond(request: Request) -> Response:
        try:
            return await endpoint(request)
        except AccessDenied as exc:
            return denied(exc)
        except BadRequest as exc:
            return error_response(exc.status, str(exc))

    return respond


async def not_found(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 answers, as JSON like every other error of the hub."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 405:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")
    return error_response(
        status,
        f"no route {request.url.path}; the hub serves /api/v1/inference/repos/"
        "{owner}/{repo}/resolve, /api/v1/blobs/{blake3}, /api/v1/files/... and /healthz",
    )


async def internal_error(request: Request, exc: Exception) -> Response:
    """An unexpected failure, as JSON; the server still logs its traceback."""
    return error_response(
        500, f"internal error of the hub ({type(exc).__name__}); see the hub's log"
    )


# -- resolve and blobs ----------------------------------------------------------------------


class _ResolveBody(msgspec.Struct, forbid_unknown_fields=True):
    digest: str | None = None
    tag: str | None = None
    attributes: dict[str, str] | None = None


_RESOLVE_FORM = (
    '{"digest": "blake3:<64 hex>"}, {"tag": "latest", "attributes": {"key": "value"}}, '
    '{"tag": "latest"} or {}'
)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _digest(text: str) -> str:
    """``blake3:<hex>`` (or the bare hex) -> ``blake3:<hex>``; anything else is a 400."""
    hex_digest = text.removeprefix(DIGEST_PREFIX)
    if not _HEX64.fullmatch(hex_digest):
        raise BadRequest(
            f"digest {text[:80]!r} is not a snapshot digest; expected blake3:<64 lower-case hex>"
        )
    return DIGEST_PREFIX + hex_digest


def _repo_and_tag(owner: str, repo: str, tag: str | None) -> tuple[str, str]:
    """Validate the ref parts with the ref grammar; (owner/repo, tag) in canonical form."""
    try:
        chosen = DEFAULT_TAG if tag is None else tag
        parsed = parse_cozy_ref(f"{owner}/{repo}:{chosen}", lenient=True)
    except InvalidModelRefError as exc:
        raise BadRequest(str(exc)) from None
    return parsed.repo_id, parsed.tag or DEFAULT_TAG


class HubApp:
    """Resolve and blob routes over one storage, and the state the file API shares.

    ``stopping`` is set when the server shuts down: transfers in progress end at their next
    chunk instead of holding the shutdown up.
    """

    def __init__(
        self,
        storage: HubStorage,
        *,
        signer: UrlSigner,
        auth: BearerAuth,
        public_url: str | None = None,
    ) -> None:
        self.storage = storage
        self.signer = signer
        self.auth = auth
        self.public_url = public_url.rstrip("/") if public_url else None
        self.stopping = False

    def is_stopping(self) -> bool:
        return self.stopping

    def base_url(self, request: Request) -> str:
        return self.public_url or str(request.base_url).rstrip("/")

    def routes(self) -> list[Route]:
        return [
            Route(
                "/api/v1/inference/repos/{owner}/{repo}/resolve",
                handled(self.resolve),
                methods=["POST"],
            ),
            Route("/api/v1/blobs/{hex}", handled(self.blob), methods=["GET", "HEAD"]),
            Route("/healthz", self.healthz, methods=["GET"]),
        ]

    async def healthz(self, request: Request) -> Response:
        return json_response({"ok": True})

    async def resolve(self, request: Request) -> Response:
        self.auth.check(request.headers.get("authorization"))
        body = await read_json(request, _ResolveBody, _RESOLVE_FORM)
        params = request.path_params
        repo_id, tag = _repo_and_tag(params["owner"], params["repo"], body.tag)
        index = self.storage.repo(repo_id)
        if index is None:
            raise BadRequest(
                f"no repo {repo_id} on this hub: nothing was published to it "
                "(gen-worker hub publish OWNER/REPO[:TAG] PATH)",
                404,
            )
        if body.digest is not None:
            digest = _digest(body.digest)
            if digest not in index.snapshots:
                raise BadRequest(f"snapshot {digest} is not in repo {repo_id}", 404)
            return self._answer(request, digest)
        candidates = index.candidates(tag)
        if not candidates:
            raise BadRequest(
                f"repo {repo_id} has no tag {tag!r}; its tags: {sorted(index.tags)}", 404
            )
        if body.attributes:
            return self._match(request, index, tag, body.attributes, candidates)
        return self._answer(request, candidates[0][0])

    def _match(
        self,
        request: Request,
        index: RepoIndex,
        tag: str,
        asked: dict[str, str],
        candidates: list[tuple[str, dict[str, str]]],
    ) -> Response:
        for digest, attributes in candidates:
            if all(attributes.get(k) == v for k, v in asked.items()):
                return self._answer(request, digest)
        available = [{"checkpoint_id": d, "attributes": a} for d, a in candidates]
        return error_response(
            409,
            f"no snapshot of {index.repo}:{tag} has the attributes {asked}; the snapshots "
            f"this tag has pointed to have {[a for _, a in candidates]}",
            asked={"tag": tag, "attributes": asked},
            available=available,
        )

    def _answer(self, request: Request, digest: str) -> Response:
        record = self.storage.snapshot(digest.removeprefix(DIGEST_PREFIX))
        if record is None:
            raise BadRequest(f"snapshot {digest} is listed but its record is missing", 404)
        base = self.base_url(request)
        entries = [
            {
                "path": e.path,
                "size_bytes": e.size_bytes,
                "blake3": e.blake3,
                "url": base + self.signer.sign(f"/api/v1/blobs/{e.blake3}"),
            }
            for e in record.entries
        ]
        return json_response({"checkpoint_id": digest, "snapshot_manifest": {"entries": entries}})

    async def blob(self, request: Request) -> Response:
        query = request.query_params
        self.signer.check(request.url.path, query.get("exp"), query.get("sig"))
        hex_digest = request.path_params["hex"]
        if not _HEX64.fullmatch(hex_digest):
            raise BadRequest(f"no blob {hex_digest[:80]!r}: blobs are named by 64 hex", 404)
        try:
            fd = os.open(self.storage.blob_path(hex_digest), os.O_RDONLY)
        except FileNotFoundError:
            raise BadRequest(f"no blob {hex_digest} on this hub", 404) from None
        return RangedFile(
            fd,
            etag=f'"{hex_digest}"',
            media_type="application/octet-stream",
            is_stopping=self.is_stopping,
        )
