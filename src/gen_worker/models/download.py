"""Blob downloads: verified, resumable, parallel, single-flight (SPEC 13.3).

:func:`download_blob` puts one blob at ``dest``:

* bytes go to ``<dest>.part``; the whole file's size and blake3 (and sha256 when given) are
  checked before ``os.replace`` moves it to ``dest``. On success only ``dest`` remains.
* A ``.part`` left by anything that stopped early (a dropped connection, a server that closed
  cleanly after a short body, a killed process) is resumed with ``Range: bytes=<n>-``. A
  server that ignores ``Range`` (200) or answers another range restarts the file from zero.
* Blobs of ``parallel_min_bytes`` or more download as parallel ranges (:mod:`.ranges`), with a
  ``<dest>.part.state`` sidecar so a killed download fetches only the missing ranges.
* 401/403 refreshes the URL once; 404 fails at once; 5xx, 408/429, connection errors and read
  timeouts are retried with backoff, then :class:`DownloadError` keeps the ``.part``; a digest
  mismatch discards the file and retries once from zero, then :class:`DigestMismatchError`.
* The same ``dest`` asked for at once by several coroutines of one event loop shares one
  transfer; threads and processes serialise on a file lock and the later ones find ``dest``
  complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
import filelock

from gen_worker.errors import DigestMismatchError
from gen_worker.logs import log
from gen_worker.models.blob_io import Cursor, Digests, InlineHash, Progress, hash_file
from gen_worker.models.ranges import fill_parallel, state_path_of
from gen_worker.models.single_flight import SingleFlight, report_progress
from gen_worker.models.transfer import (
    Attempts,
    BlobSource,
    DownloadPolicy,
    Fetcher,
    Forbidden,
    Mismatch,
    RangeRejected,
    Transient,
    UrlHolder,
    describe,
    retry_after_s,
    transport_errors,
)

if TYPE_CHECKING:
    # httpx is imported where it is used: it is slow to import (see files/assets.py).
    import httpx

__all__ = [
    "BlobSource",
    "DownloadPolicy",
    "DownloadResult",
    "download_blob",
    "make_client",
]

DEFAULT_POLICY = DownloadPolicy()
_PART_MODE = 0o644
# Waiting for another thread's or process's download: poll the lock, backing off to this.
_LOCK_POLL_MAX_S = 0.25


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """A blob that is now complete at ``path``.

    ``sha256`` is empty unless the source gave one to check. ``bytes_transferred`` counts body
    bytes this call received (0 when the blob was already there); ``resumed_from`` the bytes
    of an earlier partial file that were kept rather than downloaded again.
    """

    path: Path
    size_bytes: int
    blake3: str
    sha256: str
    bytes_transferred: int
    resumed_from: int


def make_client(
    policy: DownloadPolicy = DEFAULT_POLICY,
    *,
    headers: Mapping[str, str] | None = None,
    max_connections: int = 64,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` suited to blob downloads.

    The policy's timeouts; HTTP/1.1 (one TCP connection per range is what makes ranges
    parallel); up to ``max_connections`` pooled connections; redirects followed (presigned
    storage URLs redirect; httpx drops ``Authorization`` when a redirect changes origin); no
    content encoding asked for (bytes on disk must be the bytes hashed). ``headers`` are sent
    with every request (a hub token, for example).
    """
    import httpx  # noqa: PLC0415  # deferred: see the module's imports

    return httpx.AsyncClient(
        http1=True,
        http2=False,
        follow_redirects=True,
        timeout=httpx.Timeout(
            connect=policy.connect_timeout_s,
            read=policy.read_timeout_s,
            write=policy.read_timeout_s,
            pool=None,
        ),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        ),
        headers={**(headers or {}), "Accept-Encoding": "identity"},
    )


async def download_blob(
    client: httpx.AsyncClient,
    source: BlobSource,
    dest: Path,
    *,
    policy: DownloadPolicy = DEFAULT_POLICY,
    refresh_url: Callable[[], Awaitable[str]] | None = None,
    on_progress: Callable[[int], None] | None = None,
    lock_path: Path | None = None,
) -> DownloadResult:
    """Make ``dest`` hold the blob ``source`` describes, downloading only what is missing.

    ``refresh_url`` is awaited (once) for a new URL when the server answers 401/403.
    ``on_progress(delta_bytes)`` is called as bytes land in the partial file: deltas are
    always positive and add up to ``size_bytes`` on success. The bytes of a kept partial file
    count once, when the download takes them up; after a restart from zero nothing is reported
    again until the file grows past what was already reported. A callback that raises is
    logged (once) and ignored.

    ``lock_path`` (default ``<dest>.lock``, removed again afterwards) serialises threads and
    processes; the caller must not hold it. A caller that joins a download already running
    in its event loop shares that download's result (and its URL and policy).

    Raises ``HubAuthError`` (401/403 after one refresh), ``HubNotFoundError`` (404/410),
    ``DownloadError`` (retries exhausted; the partial file is kept), ``DigestMismatchError``
    (wrong bytes twice; nothing is kept), ``HubError`` (another unexpected status).
    """
    dest = Path(dest)
    if source.blake3 and _size_if_file(dest) == source.size_bytes:
        report_progress(on_progress, source.size_bytes)
        return _existing(source, dest)

    def start(emit: Callable[[int], None]) -> Awaitable[DownloadResult]:
        job = _Job(client, source, dest, policy=policy, refresh_url=refresh_url, emit=emit)
        return _download_locked(job, lock_path)

    return await _FLIGHTS.run(str(dest.absolute()), start, on_progress)


_FLIGHTS: SingleFlight[DownloadResult] = SingleFlight()


# -- across threads and processes: the file lock ----------------------------------------------


async def _download_locked(job: _Job, lock_path: Path | None) -> DownloadResult:
    source, dest = job.source, job.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = Path(lock_path) if lock_path is not None else dest.with_name(dest.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path)
    delay = 0.005
    while True:  # never block the event loop: try, and sleep between tries
        try:
            lock.acquire(blocking=False)
            break
        except filelock.Timeout:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LOCK_POLL_MAX_S)
    try:
        found = await _complete_dest(source, dest)
        if found is not None:
            job.progress.set(source.size_bytes)
            return found
        return await job.run()
    finally:
        if lock_path is None:
            # Safe while held: filelock re-opens a lock file that was unlinked under it.
            path.unlink(missing_ok=True)
        lock.release()


def _size_if_file(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _existing(source: BlobSource, dest: Path) -> DownloadResult:
    return DownloadResult(dest, source.size_bytes, source.blake3, source.sha256, 0, 0)


async def _complete_dest(source: BlobSource, dest: Path) -> DownloadResult | None:
    """``dest`` when it is complete, else None (and a wrong-sized or wrong ``dest`` removed).

    A ``dest`` of the right size is trusted when its name is its blake3 (the caller's store
    names blobs so); without a blake3 it is hashed, and checked against the sha256 if any.
    """
    size = _size_if_file(dest)
    if size is None:
        return None
    if size == source.size_bytes:
        if source.blake3:
            return _existing(source, dest)
        digests = await hash_file(dest, with_sha256=bool(source.sha256))
        if digests.sha256 == source.sha256:
            return DownloadResult(dest, size, digests.blake3, digests.sha256, 0, 0)
    log("warning", "replacing a blob that is not what its manifest says", file=source.name)
    dest.unlink()
    return None


# -- one download, run under the lock ---------------------------------------------------------


class _Job:
    def __init__(
        self,
        client: httpx.AsyncClient,
        source: BlobSource,
        dest: Path,
        *,
        policy: DownloadPolicy,
        refresh_url: Callable[[], Awaitable[str]] | None,
        emit: Callable[[int], None],
    ) -> None:
        self.source = source
        self.dest = dest
        self.policy = policy
        self.part = dest.with_name(dest.name + ".part")
        self.state = state_path_of(self.part)
        self.progress = Progress(emit)
        url = UrlHolder(source.name, source.url, refresh_url)
        self.fetcher = Fetcher(client, source, policy, url, self.progress)
        self.resumed_from = 0

    async def run(self) -> DownloadResult:
        for last_try in (False, True):
            try:
                digests = await self._fill()
                if digests is None:  # not hashed on the way in (resumed or parallel)
                    digests = await hash_file(self.part, with_sha256=bool(self.source.sha256))
                self._check(digests)
            except Mismatch as exc:
                self._discard()
                if last_try:
                    raise DigestMismatchError(
                        self.source.name, exc.expected, exc.actual, what=exc.what
                    ) from None
                log(
                    "warning",
                    "downloaded bytes are wrong; downloading again from zero",
                    file=self.source.name,
                    problem=str(exc),
                )
                continue
            return self._commit(digests)
        raise AssertionError("unreachable: the last try returns or raises")

    async def _fill(self) -> Digests | None:
        size = self.source.size_bytes
        if size == 0:
            self.part.write_bytes(b"")
            return Digests(blake3.blake3().hexdigest(), "")
        parallel = self.policy.range_workers > 1 and size >= self.policy.parallel_min_bytes
        if parallel or self.state.exists():
            filled = await fill_parallel(self.fetcher, self.part, self.state)
            if filled is not None:
                self.resumed_from, digests = filled
                return digests
            log(
                "info",
                "the server ignores Range; downloading in one stream from zero",
                file=self.source.name,
            )
            self._discard()
        return await self._fill_sequential()

    def _check(self, digests: Digests) -> None:
        source = self.source
        size = self.part.stat().st_size
        if size != source.size_bytes:
            raise Mismatch("size", str(source.size_bytes), str(size))
        if source.blake3 and digests.blake3 != source.blake3:
            raise Mismatch("blake3", source.blake3, digests.blake3)
        if source.sha256 and digests.sha256 != source.sha256:
            raise Mismatch("sha256", source.sha256, digests.sha256)

    def _commit(self, digests: Digests) -> DownloadResult:
        self.part.replace(self.dest)  # readers see no blob or the whole verified blob
        self.state.unlink(missing_ok=True)
        self.progress.set(self.source.size_bytes)
        return DownloadResult(
            self.dest,
            self.source.size_bytes,
            digests.blake3,
            digests.sha256,
            self.fetcher.bytes_transferred,
            self.resumed_from,
        )

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)
        self.resumed_from = 0
        self.progress.set(0)

    # -- one stream, resumed as often as it breaks ----------------------------------------

    async def _fill_sequential(self) -> Digests | None:
        size = self.source.size_bytes
        have = _size_if_file(self.part) or 0
        if have > size:
            self._discard()
            have = 0
        self.resumed_from = have
        cursor = Cursor(have)
        # Hashing while writing saves a pass over the file, but only covers it from byte 0.
        inline = InlineHash(bool(self.source.sha256)) if have == 0 else None
        attempts = Attempts(self.policy, self.source.name)
        with _PartFile(self.part) as part:
            while cursor.pos < size:
                before = cursor.pos
                try:
                    inline = await self._stream_once(part, cursor, inline)
                except Forbidden as denied:
                    await self.fetcher.url.forbidden(denied)
                except RangeRejected as exc:
                    log(
                        "info",
                        "the server did not resume; downloading again from zero",
                        file=self.source.name,
                        reason=str(exc),
                    )
                    part.truncate()
                    cursor.pos = self.resumed_from = 0
                    self.progress.set(0)
                    inline = InlineHash(bool(self.source.sha256))
                    await attempts.failed(
                        "the server answered a different range",
                        progressed=False,
                        url=self.fetcher.url.value,
                        kept=0,
                    )
                except (Transient, transport_errors()) as exc:
                    await attempts.failed(
                        describe(exc),
                        progressed=cursor.pos > before,
                        url=self.fetcher.url.value,
                        kept=cursor.pos,
                        retry_after_s=retry_after_s(exc),
                    )
        if inline is not None and inline.upto == size:
            return inline.digests()
        return None

    async def _stream_once(
        self, part: _PartFile, cursor: Cursor, inline: InlineHash | None
    ) -> InlineHash | None:
        """One GET from ``cursor.pos``; returns the inline hash still valid afterwards."""
        size = self.source.size_bytes
        async with self.fetcher.open(cursor.pos) as response:
            if response.status_code == 200 and cursor.pos > 0:
                # The server ignored Range: this body is the whole blob, so use it from zero.
                log(
                    "info",
                    "the server ignored Range; downloading again from zero",
                    file=self.source.name,
                )
                part.truncate()
                cursor.pos = self.resumed_from = 0
                inline = InlineHash(bool(self.source.sha256))
            self.progress.set(cursor.pos)
            if inline is not None and inline.upto != cursor.pos:
                inline = None
            if await self.fetcher.pump(response, part.fd(), cursor, size, inline):
                raise Mismatch("size", str(size), f"more than {size}")
        if cursor.pos < size:
            raise Transient(f"the body ended early, at byte {cursor.pos} of {size}")
        return inline


class _PartFile:
    """The partial file, opened on first write so a refused download leaves no empty file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, _PART_MODE)
        return self._fd

    def truncate(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(self._path, 0)

    def __enter__(self) -> _PartFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
