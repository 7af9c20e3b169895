"""The hub's file API (SPEC 14): multipart uploads through presigned part URLs, and downloads.

Routes (JSON bodies; errors are ``{"error": "<what was wrong and what is valid>"}``)::

    POST   /api/v1/files/uploads                       bearer
           {ref, size_bytes, part_size_bytes?}
        -> {upload_id, part_size_bytes, parts: [{part_number, url}]}
           part_size_bytes defaults to 8 MiB and is raised if it would need over 10,000 parts;
           parts are numbered from 1 and there are max(1, ceil(size_bytes / part_size_bytes))
    PUT    /api/v1/files/uploads/{upload_id}/parts/{n}?exp=&sig=     signed URL, no bearer
           raw bytes (at most part_size_bytes; 413 above)
        -> {part_number, size_bytes, blake3}; putting a part again replaces it
    POST   /api/v1/files/uploads/{upload_id}/complete  bearer
           {parts: [{part_number, blake3}]}  (every part, each once)
        -> {ref, size_bytes, sha256, blake3, mime_type}
           400 when the list is malformed or incomplete; 409 when a part was never put, a
           digest differs from the stored bytes, or the parts do not add up to size_bytes
           (the upload stays open, so the client may put parts again and retry)
    DELETE /api/v1/files/uploads/{upload_id}           bearer   abort: the parts are removed
    GET    /api/v1/files/{ref}  (and HEAD)             bearer   the stored file, Range as blobs

"bearer" means ``Authorization: Bearer <token>`` when the hub was started with tokens. A ref is
a relative path (``jobs/<request_id>/outputs/<name>``, ``inputs/x.png``); the file lives at
``<root>/files/<ref>`` (a file copied there by hand is served too) with its digests in
``<root>/files-meta/<ref>.json``, and parts under ``<root>/uploads/<upload_id>/``. Parts and
finished files are streamed to disk while they are hashed and appear only by rename, so an
interrupted upload never leaves a partial file.
"""

from __future__ import annotations

import math
import mimetypes
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import blake3
import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gen_worker.errors import ValidationError
from gen_worker.files.hashing import HashingWriter
from gen_worker.files.refs import check_relative_ref
from gen_worker.hub.app import (
    CHUNK_BYTES,
    BadRequest,
    RangedFile,
    handled,
    json_response,
    read_json,
)
from gen_worker.hub.signing import BearerAuth, UrlSigner
from gen_worker.hub.storage import HubStorage, atomic_write
from gen_worker.models.manifest import check_relative_path

__all__ = ["DEFAULT_UPLOAD_PART_BYTES", "FileApi"]

DEFAULT_UPLOAD_PART_BYTES = 8 << 20
_MAX_PART_BYTES = 1 << 30
_MAX_PARTS = 10_000
_REF_FORM = "a file ref is a relative path such as jobs/<request_id>/outputs/image.png"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class _StartUpload(msgspec.Struct, forbid_unknown_fields=True):
    ref: str
    size_bytes: int
    part_size_bytes: int | None = None


class _PartDigest(msgspec.Struct, forbid_unknown_fields=True):
    part_number: int
    blake3: str


class _Complete(msgspec.Struct, forbid_unknown_fields=True):
    parts: list[_PartDigest]


class _UploadState(msgspec.Struct):
    ref: str
    size_bytes: int
    part_size_bytes: int
    part_count: int


class _FileMeta(msgspec.Struct):
    size_bytes: int
    mtime_ns: int
    sha256: str
    blake3: str
    mime_type: str


_START_FORM = '{"ref": "jobs/<id>/outputs/a.png", "size_bytes": N, "part_size_bytes": N?}'
_COMPLETE_FORM = '{"parts": [{"part_number": 1, "blake3": "<64 hex>"}, ...]}'


def _check_ref(ref: str) -> str:
    try:
        check_relative_path(ref)
        check_relative_ref(ref, "file ref", _REF_FORM)
    except ValidationError as exc:
        raise BadRequest(str(exc)) from None
    return ref


def _part_size(requested: int | None, size: int) -> int:
    """The part size of an upload: the one asked for (default 8 MiB), raised when it would need
    more than 10,000 parts."""
    if requested is not None and not 1 <= requested <= _MAX_PART_BYTES:
        raise BadRequest(f"part_size_bytes {requested} must be between 1 and {_MAX_PART_BYTES}")
    least = math.ceil(size / _MAX_PARTS)
    if least > _MAX_PART_BYTES:
        raise BadRequest(
            f"{size} bytes is more than one upload can hold "
            f"({_MAX_PARTS} parts of {_MAX_PART_BYTES} bytes)",
            413,
        )
    return max(requested or DEFAULT_UPLOAD_PART_BYTES, least)


class FileApi:
    """The file API's routes over one storage; see the module docstring for the contract."""

    def __init__(
        self,
        storage: HubStorage,
        signer: UrlSigner,
        auth: BearerAuth,
        *,
        base_url: Callable[[Request], str],
        is_stopping: Callable[[], bool],
        max_file_bytes: int | None = None,
    ) -> None:
        self._storage = storage
        self._signer = signer
        self._auth = auth
        self._base_url = base_url
        self._is_stopping = is_stopping
        self._max_file_bytes = max_file_bytes

    def routes(self) -> list[Route]:
        prefix = "/api/v1/files"
        return [
            Route(f"{prefix}/uploads", handled(self.start_upload), methods=["POST"]),
            Route(
                f"{prefix}/uploads/{{upload_id}}/parts/{{part:int}}",
                handled(self.put_part),
                methods=["PUT"],
            ),
            Route(
                f"{prefix}/uploads/{{upload_id}}/complete", handled(self.complete), methods=["POST"]
            ),
            Route(f"{prefix}/uploads/{{upload_id}}", handled(self.abort), methods=["DELETE"]),
            Route(f"{prefix}/{{ref:path}}", handled(self.download), methods=["GET", "HEAD"]),
        ]

    # -- uploads ------------------------------------------------------------------------------

    def _upload_dir(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise BadRequest(f"no upload {upload_id[:80]!r}: upload ids are 32 hex characters", 404)
        return self._storage.uploads_dir / upload_id

    def _state(self, upload_id: str) -> _UploadState:
        try:
            data = (self._upload_dir(upload_id) / "upload.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise BadRequest(
                f"no upload {upload_id}: it was completed, aborted or never started; "
                "start a new one with POST /api/v1/files/uploads",
                404,
            ) from None
        return msgspec.json.decode(data, type=_UploadState)

    def _check_target(self, ref: str) -> Path:
        """Where ``ref`` is stored; 409 when a file or directory already in place forbids it."""
        target = self._storage.files_dir / ref
        if target.is_dir():
            raise BadRequest(f"cannot store {ref!r}: it is a directory of stored files", 409)
        for parent in target.relative_to(self._storage.files_dir).parents:
            if (self._storage.files_dir / parent).is_file():
                raise BadRequest(
                    f"cannot store {ref!r}: {parent.as_posix()!r} is a stored file, "
                    "so it cannot hold other files",
                    409,
                )
        return target

    async def start_upload(self, request: Request) -> Response:
        self._auth.check(request.headers.get("authorization"))
        body = await read_json(request, _StartUpload, _START_FORM)
        ref = _check_ref(body.ref)
        if body.size_bytes < 0:
            raise BadRequest(f"size_bytes {body.size_bytes} must be 0 or more")
        if self._max_file_bytes is not None and body.size_bytes > self._max_file_bytes:
            raise BadRequest(
                f"{body.size_bytes} bytes is more than this hub stores per file "
                f"({self._max_file_bytes} bytes)",
                413,
            )
        part_size = _part_size(body.part_size_bytes, body.size_bytes)
        count = max(1, math.ceil(body.size_bytes / part_size))
        self._check_target(ref)
        upload_id = secrets.token_hex(16)
        folder = self._storage.uploads_dir / upload_id
        folder.mkdir(parents=True)
        state = _UploadState(ref, body.size_bytes, part_size, count)
        atomic_write(folder / "upload.json", msgspec.json.encode(state))
        base = self._base_url(request)
        parts = [
            {
                "part_number": n,
                "url": base + self._signer.sign(f"/api/v1/files/uploads/{upload_id}/parts/{n}"),
            }
            for n in range(1, count + 1)
        ]
        return json_response({"upload_id": upload_id, "part_size_bytes": part_size, "parts": parts})

    async def put_part(self, request: Request) -> Response:
        query = request.query_params
        self._signer.check(request.url.path, query.get("exp"), query.get("sig"))
        upload_id, number = request.path_params["upload_id"], request.path_params["part"]
        state = self._state(upload_id)
        if not 1 <= number <= state.part_count:
            raise BadRequest(
                f"part {number} does not exist: this upload has parts 1 to {state.part_count}"
            )
        limit = state.part_size_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"part {number} is {declared} bytes; parts hold at most {limit}", 413)

        def too_large(size: int) -> Exception:
            return BadRequest(f"part {number} is over {limit} bytes (part_size_bytes)", 413)

        final = self._upload_dir(upload_id) / f"{number:05d}.part"
        try:
            writer = HashingWriter(final, max_bytes=limit, too_large=too_large)
        except FileNotFoundError:
            raise BadRequest(f"no upload {upload_id}: it was aborted or completed", 404) from None
        try:
            await _receive_into(request, writer)
            digest = await anyio.to_thread.run_sync(writer.commit)
        except ClientDisconnect:
            writer.discard()
            raise BadRequest(
                f"part {number}: the client went away before sending all of it"
            ) from None
        except FileNotFoundError:
            writer.discard()
            raise BadRequest(
                f"upload {upload_id} was aborted while part {number} arrived", 404
            ) from None
        except BaseException:
            writer.discard()
            raise
        return json_response(
            {"part_number": number, "size_bytes": digest.size_bytes, "blake3": digest.blake3}
        )

    def _check_listing(self, body: _Complete, state: _UploadState, folder: Path) -> None:
        numbers = [p.part_number for p in body.parts]
        expected = list(range(1, state.part_count + 1))
        if sorted(numbers) != expected:
            missing = sorted(set(expected) - set(numbers))
            extra = sorted({n for n in numbers if n not in expected or numbers.count(n) > 1})
            raise BadRequest(
                f"the parts listed must be each of 1 to {state.part_count} once; missing "
                f"{missing}, unknown or repeated {extra}; expected {_COMPLETE_FORM}"
            )
        for part in body.parts:
            if not _HEX64.fullmatch(part.blake3):
                raise BadRequest(f"part {part.part_number}: blake3 must be 64 lower-case hex")
        total = 0
        for number in expected:
            try:
                total += (folder / f"{number:05d}.part").stat().st_size
            except FileNotFoundError:
                raise BadRequest(
                    f"part {number} was never put; PUT it to its URL first", 409
                ) from None
        if total != state.size_bytes:
            raise BadRequest(
                f"the parts hold {total} bytes in all, but the upload declared size_bytes "
                f"{state.size_bytes}; put the missing bytes or start again with the right size",
                409,
            )

    async def complete(self, request: Request) -> Response:
        self._auth.check(request.headers.get("authorization"))
        upload_id = request.path_params["upload_id"]
        body = await read_json(request, _Complete, _COMPLETE_FORM)
        state = self._state(upload_id)
        folder = self._upload_dir(upload_id)
        self._check_listing(body, state, folder)
        # Claim the upload by renaming it: a second complete (or an abort) now finds nothing.
        claimed = self._storage.uploads_dir / f".{upload_id}.completing"
        try:
            folder.rename(claimed)
        except FileNotFoundError:
            raise BadRequest(
                f"no upload {upload_id}: it was just completed or aborted", 404
            ) from None
        digests = {p.part_number: p.blake3 for p in body.parts}
        try:
            stored = await anyio.to_thread.run_sync(self._assemble, claimed, state, digests)
        except BaseException:
            claimed.rename(folder)  # nothing was stored: the client may fix parts and retry
            raise
        shutil.rmtree(claimed, ignore_errors=True)
        return json_response(stored)

    def _assemble(
        self, folder: Path, state: _UploadState, digests: dict[int, str]
    ) -> dict[str, Any]:
        target = self._check_target(state.ref)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise BadRequest(
                f"cannot store {state.ref!r}: a stored file is in its way", 409
            ) from None
        writer = HashingWriter(target)
        try:
            for number in range(1, state.part_count + 1):
                actual = _copy_part(folder / f"{number:05d}.part", writer)
                if actual != digests[number]:
                    raise BadRequest(
                        f"part {number}: the blake3 sent ({digests[number]}) differs from the "
                        f"stored part's ({actual}); put the part again",
                        409,
                    )
            if writer.size != state.size_bytes:
                raise BadRequest(
                    f"the parts hold {writer.size} bytes, the upload declared {state.size_bytes}",
                    409,
                )
            digest = writer.commit()
        except IsADirectoryError:
            raise BadRequest(f"cannot store {state.ref!r}: it is a directory", 409) from None
        finally:
            writer.discard()
        mime = mimetypes.guess_type(state.ref)[0] or "application/octet-stream"
        meta = _FileMeta(
            digest.size_bytes, target.stat().st_mtime_ns, digest.sha256, digest.blake3, mime
        )
        atomic_write(self._storage.files_meta_dir / f"{state.ref}.json", msgspec.json.encode(meta))
        return {
            "ref": state.ref,
            "size_bytes": digest.size_bytes,
            "sha256": digest.sha256,
            "blake3": digest.blake3,
            "mime_type": mime,
        }

    async def abort(self, request: Request) -> Response:
        self._auth.check(request.headers.get("authorization"))
        upload_id = request.path_params["upload_id"]
        folder = self._upload_dir(upload_id)
        self._state(upload_id)
        shutil.rmtree(folder, ignore_errors=True)
        return json_response({"upload_id": upload_id, "aborted": True})

    # -- downloads ----------------------------------------------------------------------------

    async def download(self, request: Request) -> Response:
        self._auth.check(request.headers.get("authorization"))
        ref = _check_ref(request.path_params["ref"])
        files = self._storage.files_dir.resolve()
        path = files / ref
        not_found = BadRequest(f"no file is stored at {ref!r}", 404)
        if not path.resolve().is_relative_to(files):
            raise not_found
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise not_found from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise not_found
        meta = _read_meta(self._storage.files_meta_dir / f"{ref}.json")
        if meta is not None and (meta.size_bytes, meta.mtime_ns) == (st.st_size, st.st_mtime_ns):
            etag, mime = f'"{meta.blake3}"', meta.mime_type
        else:  # put there by hand, or replaced since: describe what is on disk
            etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
            mime = mimetypes.guess_type(ref)[0] or "application/octet-stream"
        return RangedFile(fd, etag=etag, media_type=mime, is_stopping=self._is_stopping)


def _read_meta(path: Path) -> _FileMeta | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=_FileMeta)
    except (FileNotFoundError, NotADirectoryError, msgspec.DecodeError):
        return None


def _copy_part(part: Path, writer: HashingWriter) -> str:
    """Append ``part`` to ``writer``; the part's own blake3."""
    hasher = blake3.blake3()
    with part.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
            writer.write(chunk)
    return hasher.hexdigest()


async def _receive_into(request: Request, writer: HashingWriter) -> None:
    """Stream the request body into ``writer``, writing (in a thread) a chunk at a time."""
    buffer = bytearray()
    async for data in request.stream():
        buffer += data
        if len(buffer) >= CHUNK_BYTES:
            await anyio.to_thread.run_sync(writer.write, bytes(buffer))
            buffer.clear()
    if buffer:
        await anyio.to_thread.run_sync(writer.write, bytes(buffer))
