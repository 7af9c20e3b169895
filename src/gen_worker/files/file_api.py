"""Client of a file API: the hub's (``{TENSORHUB_URL}/api/v1/files``) or a job's ``file_base_url``.

Routes, relative to the base URL (the local hub serves exactly these; see gen_worker.hub)::

    POST   {base}/uploads                        {ref, size_bytes, part_size_bytes}
                                                 -> {upload_id, part_size_bytes,
                                                     parts: [{part_number, url}]}
    PUT    <part url> (presigned, no bearer)     raw bytes -> {part_number, size_bytes, blake3}
    POST   {base}/uploads/{upload_id}/complete   {parts: [{part_number, blake3}]}
                                                 -> {ref, size_bytes, sha256, blake3, mime_type}
    DELETE {base}/uploads/{upload_id}            abort
    GET    {base}/{ref}                          the stored file

Uploads are multipart so one failed part is retried alone (a few times, with backoff) instead
of re-sending a whole video; each part's blake3 is checked against what the server stored, and
the whole file's digests against what was computed while it was written. A failed upload is
aborted on the server and raised: it is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import blake3
import msgspec

from gen_worker.errors import GenWorkerError, HubError, ValidationError, hub_error
from gen_worker.files.hashing import Digest, HashingWriter
from gen_worker.files.refs import check_relative_ref
from gen_worker.http_client import LazyHttpClient, retry_delay_s

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_PART_BYTES", "FileApi", "UploadedFile"]

_T = TypeVar("_T")
_REF_FORM = "expected a relative path such as jobs/<request_id>/outputs/a.png"

DEFAULT_PART_BYTES = 8 << 20
# Parts of one file in flight at once: enough to fill a link, few enough to bound memory
# (each in-flight part is held in memory once).
_PART_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """What the file API stored."""

    ref: str
    size_bytes: int
    sha256: str
    blake3: str
    mime_type: str | None


class _UploadPart(msgspec.Struct):
    part_number: int
    url: str


class _UploadStarted(msgspec.Struct):
    upload_id: str
    part_size_bytes: int
    parts: list[_UploadPart]


class _PartStored(msgspec.Struct):
    part_number: int
    size_bytes: int
    blake3: str


class _Completed(msgspec.Struct):
    ref: str
    size_bytes: int
    sha256: str
    blake3: str
    mime_type: str | None = None


def _detail(response: httpx.Response) -> str:
    """The server's own explanation (``{"error": ...}``), else a short text body."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return response.text[:200].strip()
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return ""


class FileApi:
    """Uploads and downloads files of requests through one file API."""

    def __init__(
        self,
        base_url: str,
        token: str = "",
        *,
        client: httpx.AsyncClient | None = None,
        part_bytes: int = DEFAULT_PART_BYTES,
        max_attempts: int = 4,
        backoff_s: float = 0.2,
        timeout_s: float = 60.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValidationError(
                f"file API base URL {base_url[:80]!r} must start with http:// or https://"
            )
        self._base = base_url.rstrip("/")
        self._token = token
        self._part_bytes = part_bytes
        self._max_attempts = max(1, max_attempts)
        self._backoff_s = backoff_s
        self._http = LazyHttpClient(client, timeout_s=timeout_s)  # most workers never upload

    @property
    def _client(self) -> httpx.AsyncClient:
        return self._http.client

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._token}"} if self._token else {}

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- uploads --------------------------------------------------------------------------

    async def upload(self, ref: str, path: Path, *, expected: Digest | None = None) -> UploadedFile:
        """Upload the file at ``path`` as ``ref``; raise if the server's digests disagree."""
        check_relative_ref(
            ref, "file ref", "expected a relative path such as jobs/<id>/outputs/a.png"
        )
        size = path.stat().st_size
        started = await self._call(
            "POST",
            f"{self._base}/uploads",
            f"start the upload of {ref}",
            _UploadStarted,
            json={"ref": ref, "size_bytes": size, "part_size_bytes": self._part_bytes},
        )
        try:
            stored = await self._put_parts(ref, path, size, started)
            done = await self._call(
                "POST",
                f"{self._base}/uploads/{quote(started.upload_id, safe='')}/complete",
                f"complete the upload of {ref}",
                _Completed,
                json={
                    "parts": [{"part_number": p.part_number, "blake3": p.blake3} for p in stored]
                },
            )
        except BaseException:
            await self._abort(started.upload_id)
            raise
        if done.size_bytes != size or (expected is not None and done.blake3 != expected.blake3):
            raise HubError(
                f"upload of {ref}: the server stored {done.size_bytes} bytes with blake3 "
                f"{done.blake3}, expected {size} bytes"
                + (f" with blake3 {expected.blake3}" if expected is not None else "")
            )
        return UploadedFile(done.ref, done.size_bytes, done.sha256, done.blake3, done.mime_type)

    async def _put_parts(
        self, ref: str, path: Path, size: int, started: _UploadStarted
    ) -> list[_PartStored]:
        part_size = started.part_size_bytes
        expected_parts = max(1, -(-size // part_size)) if part_size > 0 else 0
        if part_size <= 0 or len(started.parts) != expected_parts:
            raise HubError(
                f"upload of {ref}: the server offered {len(started.parts)} parts of "
                f"{part_size} bytes for a {size}-byte file"
            )
        limit = asyncio.Semaphore(_PART_CONCURRENCY)

        async def one(index: int, part: _UploadPart) -> _PartStored:
            async with limit:
                offset = index * part_size
                data = await asyncio.to_thread(
                    _read_at, path, offset, min(part_size, size - offset)
                )
                return await self._put_part(ref, part, data)

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(started.parts)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _put_part(self, ref: str, part: _UploadPart, data: bytes) -> _PartStored:
        digest = blake3.blake3(data).hexdigest()
        what = f"upload part {part.part_number} of {ref}"
        # The presigned URL authorises itself; the bearer token is not sent to it.
        stored = await self._call("PUT", part.url, what, _PartStored, content=data, bearer=False)
        if stored.blake3 != digest or stored.size_bytes != len(data):
            raise HubError(
                f"{what}: the server stored {stored.size_bytes} bytes with blake3 "
                f"{stored.blake3}, sent {len(data)} bytes with blake3 {digest}"
            )
        return stored

    async def _abort(self, upload_id: str) -> None:
        # Best effort: the upload already failed, and that failure is what gets reported.
        with contextlib.suppress(Exception):
            await self._client.delete(
                f"{self._base}/uploads/{quote(upload_id, safe='')}", headers=self._headers()
            )

    # -- downloads ------------------------------------------------------------------------

    async def download(self, ref: str, dest: Path, *, max_bytes: int | None = None) -> Digest:
        """Download the stored file ``ref`` to ``dest`` (atomically), hashing as it arrives."""
        import httpx  # noqa: PLC0415  # deferred: see the property above

        check_relative_ref(ref, "file ref", _REF_FORM)
        url = f"{self._base}/{quote(ref)}"

        def too_large(size: int) -> Exception:
            return ValidationError(
                f"input file {ref} is larger than the limit of {max_bytes} bytes "
                "(WORKER_MAX_INPUT_FILE_BYTES)"
            )

        for attempt in range(self._max_attempts):
            try:
                async with self._client.stream("GET", url, headers=self._headers()) as response:
                    if response.status_code != 200:
                        await response.aread()
                        error = hub_error(
                            response.status_code, f"download of {ref}", _detail(response)
                        )
                        if not error.retryable or attempt + 1 == self._max_attempts:
                            raise error
                        await self._sleep(attempt)
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    writer = HashingWriter(dest, max_bytes=max_bytes, too_large=too_large)
                    try:
                        async for chunk in response.aiter_bytes(1 << 20):
                            writer.write(chunk)
                        return writer.commit()
                    finally:
                        writer.discard()
            except httpx.RequestError as exc:
                if attempt + 1 == self._max_attempts:
                    raise hub_error(
                        None, f"download of {ref} failed ({type(exc).__name__})"
                    ) from exc
                await self._sleep(attempt)
        raise AssertionError("unreachable: the loop returns or raises")

    # -- plumbing -------------------------------------------------------------------------

    async def _sleep(self, attempt: int) -> None:
        await asyncio.sleep(retry_delay_s(self._backoff_s, attempt))

    async def _call(
        self,
        method: str,
        url: str,
        what: str,
        into: type[_T],
        *,
        bearer: bool = True,
        **kwargs: Any,
    ) -> _T:
        """One JSON call, retried on 5xx and connection errors; 4xx raise at once."""
        import httpx  # noqa: PLC0415  # deferred: see the property above

        headers = self._headers() if bearer else {}
        for attempt in range(self._max_attempts):
            try:
                response = await self._client.request(method, url, headers=headers, **kwargs)
            except httpx.RequestError as exc:
                if attempt + 1 == self._max_attempts:
                    raise hub_error(None, f"{what} failed ({type(exc).__name__})") from exc
                await self._sleep(attempt)
                continue
            if response.status_code < 300:
                try:
                    return msgspec.json.decode(response.content, type=into)
                except msgspec.ValidationError as exc:
                    raise HubError(f"{what}: unexpected answer from the server ({exc})") from exc
            error = hub_error(response.status_code, what, _detail(response))
            if not error.retryable or attempt + 1 == self._max_attempts:
                raise error
            await self._sleep(attempt)
        raise AssertionError("unreachable: the loop returns or raises")


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise GenWorkerError(f"{path} changed while it was being uploaded")
    return data
