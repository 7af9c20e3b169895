"""Blob downloads: verified, resumable, parallel, single-flight (SPEC 13.3).

:func:`download_blob` puts one blob at ``dest``; :func:`download_parts` puts there a file
published as parts (the concatenation of several blobs, each with its own URL), writing each
part straight at its offset so that nothing is written twice:

* bytes go to ``<dest>.part``; the whole file's size and blake3 (and sha256 when given) are
  checked before ``os.replace`` moves it to ``dest``. On success only ``dest`` remains.
* A ``.part`` left by anything that stopped early (a dropped connection, a server that closed
  cleanly after a short body, a killed process) is resumed with ``Range: bytes=<n>-``. A
  server that ignores ``Range`` (200) or answers another range restarts the file from zero.
* Files of ``parallel_min_bytes`` or more download as byte ranges (:mod:`.ranges`), in
  parallel when the network rather than the CPU is what limits one stream, with a
  ``<dest>.part.state`` sidecar so a killed download fetches only the missing ranges.
* 401/403 refreshes the URL once; 404 fails at once; 5xx, 408/429, connection errors and read
  timeouts are retried with backoff, then :class:`DownloadError` keeps the ``.part``; a digest
  mismatch discards the file and retries once from zero, then :class:`DigestMismatchError`
  (naming the part whose bytes are wrong, for a file made of parts).
* The same ``dest`` asked for at once by several coroutines of one event loop shares one
  transfer; threads and processes serialise on a file lock and the later ones find ``dest``
  complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
import filelock

from gen_worker.errors import DigestMismatchError
from gen_worker.logs import log
from gen_worker.models.blob_io import (
    Cursor,
    Digests,
    InlineHash,
    Progress,
    blake3_of_range,
    hash_file,
)
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
    Segment,
    Target,
    Transient,
    UrlHolder,
    describe,
    make_client,
    retry_after_s,
    segment_at,
    transport_errors,
)

if TYPE_CHECKING:
    # httpx is imported where it is used: it is slow to import (see files/assets.py).
    import httpx

__all__ = [
    "BlobSource",
    "DownloadPolicy",
    "DownloadResult",
    "Target",
    "download_blob",
    "download_parts",
    "make_client",
]

DEFAULT_POLICY = DownloadPolicy()
_PART_MODE = 0o644
# Waiting for another thread's or process's download: poll the lock, backing off to this.
_LOCK_POLL_MAX_S = 0.25

#: Awaited for a fresh URL of one part (named by its ``BlobSource``) after a 401/403.
RefreshPart = Callable[[BlobSource], Awaitable[str]]


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
    return await _download(
        client,
        source.target,
        [(source, refresh_url)],
        Path(dest),
        policy=policy,
        on_progress=on_progress,
        lock_path=lock_path,
    )


async def download_parts(
    client: httpx.AsyncClient,
    target: Target,
    parts: Sequence[BlobSource],
    dest: Path,
    *,
    policy: DownloadPolicy = DEFAULT_POLICY,
    refresh_url: RefreshPart | None = None,
    on_progress: Callable[[int], None] | None = None,
    lock_path: Path | None = None,
) -> DownloadResult:
    """Make ``dest`` hold ``target``, the concatenation of ``parts`` (each from its own URL).

    Each part's bytes are written at its offset in ``<dest>.part`` (in parallel ranges for a
    large file), so the file is written once and no part is kept on its own. The whole file is
    checked against ``target`` as for :func:`download_blob`; when it does not match, each
    part's region is checked against the part's blake3 so the error names the part that is
    wrong (and the file is downloaded again once); when every part matches, the parts are
    simply not ``target`` and the ``DigestMismatchError`` names ``target`` at once.

    ``refresh_url(part)`` is awaited for a part's new URL after a 401/403 (once per part).
    Progress, locking, sharing and errors are :func:`download_blob`'s.
    """
    if not parts:
        raise ValueError(f"{target.name}: a file made of parts needs at least one part")
    total = sum(p.size_bytes for p in parts)
    if total != target.size_bytes:
        raise ValueError(
            f"{target.name}: its parts add up to {total} bytes, but the file has "
            f"{target.size_bytes}; the parts must be the file's bytes in order"
        )
    return await _download(
        client,
        target,
        [(part, _refresh_of(refresh_url, part)) for part in parts],
        Path(dest),
        policy=policy,
        on_progress=on_progress,
        lock_path=lock_path,
    )


#: A blob to download into a file (from its offset on), and how to get it a fresh URL.
_Source = tuple[BlobSource, Callable[[], Awaitable[str]] | None]


def _refresh_of(
    refresh: RefreshPart | None, part: BlobSource
) -> Callable[[], Awaitable[str]] | None:
    if refresh is None:
        return None

    async def fresh_url() -> str:
        return await refresh(part)

    return fresh_url


async def _download(
    client: httpx.AsyncClient,
    target: Target,
    sources: Sequence[_Source],
    dest: Path,
    *,
    policy: DownloadPolicy,
    on_progress: Callable[[int], None] | None,
    lock_path: Path | None,
) -> DownloadResult:
    if target.blake3 and _size_if_file(dest) == target.size_bytes:
        report_progress(on_progress, target.size_bytes)
        return _existing(target, dest)

    def start(emit: Callable[[int], None]) -> Awaitable[DownloadResult]:
        job = _Job(client, target, sources, dest, policy=policy, emit=emit)
        return _download_locked(job, lock_path)

    return await _FLIGHTS.run(str(dest.absolute()), start, on_progress)


_FLIGHTS: SingleFlight[DownloadResult] = SingleFlight()


# -- across threads and processes: the file lock ----------------------------------------------


async def _download_locked(job: _Job, lock_path: Path | None) -> DownloadResult:
    target, dest = job.target, job.dest
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
        found = await _complete_dest(target, dest)
        if found is not None:
            job.progress.set(target.size_bytes)
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


def _existing(target: Target, dest: Path) -> DownloadResult:
    return DownloadResult(dest, target.size_bytes, target.blake3, target.sha256, 0, 0)


async def _complete_dest(target: Target, dest: Path) -> DownloadResult | None:
    """``dest`` when it is complete, else None (and a wrong-sized or wrong ``dest`` removed).

    A ``dest`` of the right size is trusted when its name is its blake3 (the caller's store
    names blobs so); without a blake3 it is hashed, and checked against the sha256 if any.
    """
    size = _size_if_file(dest)
    if size is None:
        return None
    if size == target.size_bytes:
        if target.blake3:
            return _existing(target, dest)
        digests = await hash_file(dest, with_sha256=bool(target.sha256))
        if digests.sha256 == target.sha256:
            return DownloadResult(dest, size, digests.blake3, digests.sha256, 0, 0)
    log("warning", "replacing a blob that is not what its manifest says", file=target.name)
    dest.unlink()
    return None


# -- one download, run under the lock ---------------------------------------------------------


class _Job:
    def __init__(
        self,
        client: httpx.AsyncClient,
        target: Target,
        sources: Sequence[_Source],
        dest: Path,
        *,
        policy: DownloadPolicy,
        emit: Callable[[int], None],
    ) -> None:
        self.target = target
        self.dest = dest
        self.policy = policy
        self.part = dest.with_name(dest.name + ".part")
        self.state = state_path_of(self.part)
        self.progress = Progress(emit)
        self.segments: list[Segment] = []
        offset = 0
        for source, refresh in sources:
            url = UrlHolder(source.name, source.url, refresh)
            fetcher = Fetcher(client, source, policy, url, self.progress)
            self.segments.append(Segment(offset, fetcher))
            offset += source.size_bytes
        self.resumed_from = 0

    async def run(self) -> DownloadResult:
        for last_try in (False, True):
            try:
                digests = await self._fill()
                if digests is None:  # not hashed on the way in (resumed or parallel)
                    digests = await hash_file(self.part, with_sha256=bool(self.target.sha256))
                await self._check(digests)
            except Mismatch as exc:
                self._discard()
                if last_try or isinstance(exc, _NotTheWhole):
                    raise DigestMismatchError(
                        exc.name or self.target.name, exc.expected, exc.actual, what=exc.what
                    ) from None
                log(
                    "warning",
                    "downloaded bytes are wrong; downloading again from zero",
                    file=exc.name or self.target.name,
                    problem=str(exc),
                )
                continue
            return self._commit(digests)
        raise AssertionError("unreachable: the last try returns or raises")

    async def _fill(self) -> Digests | None:
        size = self.target.size_bytes
        if size == 0:
            self.part.write_bytes(b"")
            return Digests(blake3.blake3().hexdigest(), "")
        parallel = self.policy.range_workers > 1 and size >= self.policy.parallel_min_bytes
        if parallel or self.state.exists():
            filled = await fill_parallel(
                self.target,
                self.segments,
                policy=self.policy,
                progress=self.progress,
                part=self.part,
                state=self.state,
            )
            if filled is not None:
                self.resumed_from, digests = filled
                return digests
            log(
                "info",
                "the server ignores Range; downloading in one stream from zero",
                file=self.target.name,
            )
            self._discard()
        return await self._fill_sequential()

    async def _check(self, digests: Digests) -> None:
        target = self.target
        size = self.part.stat().st_size
        if size != target.size_bytes:
            raise Mismatch("size", str(target.size_bytes), str(size))
        if target.blake3 and digests.blake3 != target.blake3:
            if len(self.segments) > 1:
                await asyncio.to_thread(self._blame_part, digests.blake3)
            raise Mismatch("blake3", target.blake3, digests.blake3)
        if target.sha256 and digests.sha256 != target.sha256:
            raise Mismatch("sha256", target.sha256, digests.sha256)

    def _blame_part(self, whole: str) -> None:
        """Raise the mismatch of the first part whose bytes are not its blake3; every part being
        right, the whole's as :class:`_NotTheWhole` (``whole`` is the file's blake3)."""
        fd = os.open(self.part, os.O_RDONLY)
        try:
            for segment in self.segments:
                expected = segment.fetcher.source.blake3
                actual = blake3_of_range(fd, segment.offset, segment.end)
                if expected and actual != expected:
                    raise Mismatch("blake3", expected, actual, name=segment.name)
        finally:
            os.close(fd)
        raise _NotTheWhole("blake3", self.target.blake3, whole)

    def _commit(self, digests: Digests) -> DownloadResult:
        self.part.replace(self.dest)  # readers see no blob or the whole verified blob
        self.state.unlink(missing_ok=True)
        self.progress.set(self.target.size_bytes)
        return DownloadResult(
            self.dest,
            self.target.size_bytes,
            digests.blake3,
            digests.sha256,
            sum(s.fetcher.bytes_transferred for s in self.segments),
            self.resumed_from,
        )

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)
        self.resumed_from = 0
        self.progress.set(0)

    # -- one stream (per part), resumed as often as it breaks ------------------------------

    async def _fill_sequential(self) -> Digests | None:
        size = self.target.size_bytes
        have = _size_if_file(self.part) or 0
        if have > size:
            self._discard()
            have = 0
        self.resumed_from = have
        cursor = Cursor(have)
        # Hashing while writing saves a pass over the file, but only covers it from byte 0.
        inline = InlineHash(bool(self.target.sha256)) if have == 0 else None
        attempts = Attempts(self.policy, self.target.name)
        with _PartFile(self.part) as part:
            while cursor.pos < size:
                before = cursor.pos
                segment = segment_at(self.segments, cursor.pos)
                try:
                    inline = await self._stream_once(segment, part, cursor, inline)
                except Forbidden as denied:
                    await segment.fetcher.url.forbidden(denied)
                except RangeRejected as exc:
                    log(
                        "info",
                        "the server did not resume; downloading the part again from its start",
                        file=segment.name,
                        reason=str(exc),
                    )
                    inline = self._restart_at(segment.offset, part, cursor, inline)
                    await attempts.failed(
                        "the server answered a different range",
                        progressed=False,
                        url=segment.fetcher.url.value,
                        kept=cursor.pos,
                    )
                except (Transient, transport_errors()) as exc:
                    await attempts.failed(
                        describe(exc),
                        progressed=cursor.pos > before,
                        url=segment.fetcher.url.value,
                        kept=cursor.pos,
                        retry_after_s=retry_after_s(exc),
                    )
        if inline is not None and inline.upto == size:
            return inline.digests()
        return None

    def _restart_at(
        self, offset: int, part: _PartFile, cursor: Cursor, inline: InlineHash | None
    ) -> InlineHash | None:
        """Drop every byte from ``offset`` on (a part's start); the hash still valid after."""
        part.truncate(offset)
        cursor.pos = offset
        self.resumed_from = min(self.resumed_from, offset)
        self.progress.set(offset)
        if offset == 0:
            return InlineHash(bool(self.target.sha256))
        return inline if inline is not None and inline.upto == offset else None

    async def _stream_once(
        self, segment: Segment, part: _PartFile, cursor: Cursor, inline: InlineHash | None
    ) -> InlineHash | None:
        """One GET of ``segment`` from ``cursor.pos``; returns the inline hash still valid."""
        fetcher = segment.fetcher
        async with fetcher.open(cursor.pos - segment.offset) as response:
            if response.status_code == 200 and cursor.pos > segment.offset:
                # The server ignored Range: this body is the whole part, so use it from there.
                log(
                    "info",
                    "the server ignored Range; downloading the part again from its start",
                    file=segment.name,
                )
                inline = self._restart_at(segment.offset, part, cursor, inline)
            self.progress.set(cursor.pos)
            if inline is not None and inline.upto != cursor.pos:
                inline = None
            if await fetcher.pump(response, part.fd(), cursor, segment.end, inline):
                size = fetcher.source.size_bytes
                raise Mismatch("size", str(size), f"more than {size}", name=segment.name)
        if cursor.pos < segment.end:
            raise Transient(
                f"the body ended early, at byte {cursor.pos - segment.offset} "
                f"of {fetcher.source.size_bytes}"
            )
        return inline


class _NotTheWhole(Mismatch):
    """Every part has its own digest, yet together they are not the file: the parts file that
    lists them is wrong, and downloading them again cannot help."""


class _PartFile:
    """The partial file, opened on first write so a refused download leaves no empty file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, _PART_MODE)
        return self._fd

    def truncate(self, size: int = 0) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, size)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(self._path, size)

    def __enter__(self) -> _PartFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
