"""One blob's bytes over HTTP: the request, the checks on the answer, writing at an offset.

The pieces the sequential and the parallel-range downloads share (:mod:`.download`,
:mod:`.ranges`): what a blob is (:class:`BlobSource`), what the finished file must be
(:class:`Target`) and how hard to try (:class:`DownloadPolicy`); :class:`Fetcher`, which sends
one ``GET`` (with ``Range`` when it resumes), classifies the answer and writes its body at the
right offset; :class:`Segment`, the part of the file one blob fills (a file downloaded from its
parts has several); :class:`Attempts`, the retry budget.

A URL may carry a presigned signature in its query string: every message and log line shows
:func:`shown_url` (``scheme://host[:port]/path``) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gen_worker.errors import DownloadError, HubAuthError, HubError, HubNotFoundError
from gen_worker.logs import log
from gen_worker.models.blob_io import BlockWriter, Cursor, Hashing, Progress
from gen_worker.models.net_stream import DirectBody, buffers, direct_body, download_transport

if TYPE_CHECKING:
    # httpx is imported where it is used (slow to import; see files/assets.py).
    import httpx

__all__ = [
    "Attempts",
    "BlobSource",
    "DownloadPolicy",
    "Fetcher",
    "Forbidden",
    "Mismatch",
    "RangeRejected",
    "Segment",
    "Target",
    "Transient",
    "UrlHolder",
    "describe",
    "make_client",
    "retry_after_s",
    "segment_at",
    "shown_url",
    "transport_errors",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.IGNORECASE)
# Statuses that say "not now" rather than "never".
_TRANSIENT_STATUS = frozenset({408, 425, 429})
# Blocks of ``chunk_bytes`` per body read straight from the socket: the ones being received,
# one after the other, and the ones the writer thread has.
_DIRECT_BLOCKS = 4


@dataclass(frozen=True, slots=True)
class BlobSource:
    """One blob to download: its manifest path (for messages), URL, size and digests.

    With neither digest (a small Hugging Face file, which publishes only a git object id)
    only the size is checked; the blake3 of what arrived is returned either way.
    """

    name: str  # the manifest path, for messages and events (never the URL)
    url: str
    size_bytes: int
    blake3: str = ""  # expected blake3 hex; empty when the source publishes none
    sha256: str = ""  # expected sha256 hex (Hugging Face LFS files); optional

    def __post_init__(self) -> None:
        if self.size_bytes < 0:
            raise ValueError(f"{self.name}: size_bytes is {self.size_bytes}; it must be >= 0")
        for what, value in (("blake3", self.blake3), ("sha256", self.sha256)):
            if value and not _HEX64.fullmatch(value):
                raise ValueError(
                    f"{self.name}: {what} {value[:80]!r} is not 64 lower-case hex characters"
                )
        if not self.url.lower().startswith(("http://", "https://")):
            raise ValueError(f"{self.name}: the download URL must be an http(s) URL")

    @property
    def target(self) -> Target:
        return Target(self.name, self.size_bytes, self.blake3, self.sha256)


@dataclass(frozen=True, slots=True)
class Target:
    """The file a download must produce: its name (for messages), size and digests.

    A blob's own (:attr:`BlobSource.target`), or a file that is the concatenation of several
    blobs (its parts, each a :class:`Segment`).
    """

    name: str
    size_bytes: int
    blake3: str = ""
    sha256: str = ""


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """How hard to try and how to split the work. Times in seconds, sizes in bytes."""

    max_attempts: int = 5  # 5xx/connection errors, per blob (and per range)
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    jitter_s: float = 0.5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    # The blocks a body is written in (read straight into them, on the downloader's own
    # connections): a 512 MiB pull cost ~0.89 CPU-s in 1 MiB blocks, ~0.77 in 2 MiB, ~0.8 in
    # 4 MiB here; a body in flight holds up to _DIRECT_BLOCKS of them.
    chunk_bytes: int = 2 << 20
    parallel_min_bytes: int = 64 << 20  # blobs at least this big download in parallel ranges
    range_bytes: int = 32 << 20  # size of each range
    range_workers: int = 4
    # A large blob's first stream gets helper ranges (up to range_workers in all) once the
    # event loop has spent at least this share of a moment idle, neither running nor waiting
    # for a CPU: the network is then what holds the stream back (a remote store's ~10-100 MB/s
    # per connection), which more connections beat. A loop that is busy is held back by the
    # CPU, which more streams would only load further. 0: helpers at once; over 1: never.
    parallel_when_idle: float = 0.5

    def __post_init__(self) -> None:
        rules: tuple[tuple[tuple[str, ...], Callable[[float], bool], str], ...] = (
            (("max_attempts", "chunk_bytes", "range_bytes", "range_workers"), _at_least_1, ">= 1"),
            (
                ("backoff_base_s", "backoff_max_s", "jitter_s", "parallel_when_idle"),
                _at_least_0,
                ">= 0",
            ),
            (("connect_timeout_s", "read_timeout_s"), _positive, "> 0"),
        )
        for fields, valid, rule in rules:
            for field in fields:
                if not valid(getattr(self, field)):
                    raise ValueError(
                        f"DownloadPolicy.{field} is {getattr(self, field)}; it must be {rule}"
                    )


# -- the HTTP client -------------------------------------------------------------------------


def make_client(
    policy: DownloadPolicy | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    max_connections: int = 64,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` suited to blob downloads.

    The policy's timeouts; HTTP/1.1 (one TCP connection per range is what makes ranges
    parallel); up to ``max_connections`` pooled connections; redirects followed (presigned
    storage URLs redirect; httpx drops ``Authorization`` when a redirect changes origin); no
    content encoding asked for (bytes on disk must be the bytes hashed); connections that
    receive in large pieces and can hand a body straight to the downloader (see
    :mod:`.net_stream`). ``headers`` are sent with every request (a hub token, for example).
    """
    import httpx  # noqa: PLC0415  # deferred: see the module's imports

    policy = policy or DownloadPolicy()
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(
        transport=download_transport(limits),
        limits=limits,  # for the transports of proxies taken from the environment
        follow_redirects=True,
        timeout=httpx.Timeout(
            connect=policy.connect_timeout_s,
            read=policy.read_timeout_s,
            write=policy.read_timeout_s,
            pool=None,
        ),
        headers={**(headers or {}), "Accept-Encoding": "identity"},
    )


def _at_least_1(value: float) -> bool:
    return value >= 1


def _at_least_0(value: float) -> bool:
    return value >= 0


def _positive(value: float) -> bool:
    return value > 0


def shown_url(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: never its credentials, query or fragment."""
    match = re.match(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>[^?#]*)", url)
    if match is None:
        return "<not an absolute URL>"
    authority, slash, path = match["rest"].partition("/")
    host = authority.rpartition("@")[2]  # drop user:password@
    return f"{match['scheme'].lower()}://{host}{slash}{path}"


# -- control flow between the pieces (never escapes the package) -----------------------------


class Transient(Exception):
    """A failure worth retrying: a 5xx/408/429 answer or a body that ended early."""

    def __init__(self, reason: str, *, retry_after_s: float = 0.0) -> None:
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(reason)


class Forbidden(Exception):
    """401/403 for the URL of ``generation``: refresh it once, or fail."""

    def __init__(self, status: int, generation: int) -> None:
        self.status = status
        self.generation = generation
        super().__init__(f"HTTP {status}")


class RangeRejected(Exception):
    """The server ignored ``Range`` or answered another range: restart from byte zero."""


class Mismatch(Exception):
    """The bytes are not the blob: a size or a digest differs from the manifest.

    ``name`` is the part that is wrong when a file made of parts is; else empty (the file).
    """

    def __init__(self, what: str, expected: str, actual: str, *, name: str = "") -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        self.name = name
        super().__init__(f"{name + ': ' if name else ''}{what}: expected {expected}, got {actual}")


# -- state shared by the requests of one download ---------------------------------------------


class UrlHolder:
    """The blob's current URL; a 401/403 refreshes it once, for every range at the same time."""

    def __init__(self, name: str, url: str, refresh: Callable[[], Awaitable[str]] | None) -> None:
        self.name = name
        self.value = url
        self.generation = 0
        self._refresh = refresh
        self._refreshed = False
        self._lock = asyncio.Lock()

    async def forbidden(self, denied: Forbidden) -> None:
        """Get a fresh URL after ``denied``, or raise :class:`HubAuthError` when that was done."""
        async with self._lock:
            if denied.generation != self.generation:
                return  # another range already refreshed the URL it was denied
            shown = shown_url(self.value)
            if self._refresh is None:
                raise HubAuthError(
                    f"{self.name}: download refused (HTTP {denied.status}) by {shown}; "
                    "no way to refresh the URL was given",
                    status=denied.status,
                )
            if self._refreshed:
                raise HubAuthError(
                    f"{self.name}: download refused (HTTP {denied.status}) by {shown} "
                    "even after refreshing the URL once",
                    status=denied.status,
                )
            self._refreshed = True
            log("info", "download URL refused; refreshing it", file=self.name, source=shown)
            self.value = await self._refresh()
            self.generation += 1


# -- the retry budget -------------------------------------------------------------------------


class Attempts:
    """The retry budget of one blob or one range.

    Failures count while no byte is gained; an attempt that wrote bytes before failing starts
    the count again, so a flaky link that keeps making progress finishes a 20 GB file while a
    server that answers 503 forever fails after ``max_attempts``.
    """

    def __init__(self, policy: DownloadPolicy, name: str, where: str = "") -> None:
        self._policy = policy
        self._name = name
        self._where = where
        self.failures = 0

    async def failed(
        self, reason: str, *, progressed: bool, url: str, kept: int, retry_after_s: float = 0.0
    ) -> None:
        """Wait before the next attempt, or raise :class:`DownloadError` when none is left.

        A server's ``Retry-After`` lengthens the wait, up to ``backoff_max_s``.
        """
        policy = self._policy
        self.failures = 1 if progressed else self.failures + 1
        if self.failures >= policy.max_attempts:
            raise DownloadError(
                f"{self._name}{self._where}: download from {shown_url(url)} failed "
                f"{self.failures} times in a row ({reason}); the partial file keeps {kept} bytes "
                "and the next download resumes from there"
            )
        delay = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** (self.failures - 1))
        delay = max(delay, min(retry_after_s, policy.backoff_max_s))
        delay += random.uniform(0, policy.jitter_s)  # jitter, not cryptography
        log(
            "warning",
            "download attempt failed; retrying",
            file=self._name + self._where,
            source=shown_url(url),
            reason=reason,
            attempt=self.failures,
            retry_in_s=round(delay, 3),
        )
        await asyncio.sleep(delay)


def transport_errors() -> type[Exception]:
    """``httpx.TransportError``: a connection that failed, reset, timed out or broke framing."""
    import httpx  # noqa: PLC0415  # deferred: see the module's imports

    return httpx.TransportError


def retry_after_s(exc: BaseException) -> float:
    """The wait a ``Retry-After`` header asked for (0 when none did)."""
    return exc.retry_after_s if isinstance(exc, Transient) else 0.0


def describe(exc: BaseException) -> str:
    """A short reason for a log line: the exception's type, and its text when it is ours."""
    if isinstance(exc, Transient):
        return exc.reason
    # httpx's texts come from the transport and never hold the URL, but the type is enough.
    return type(exc).__name__


# -- one request ------------------------------------------------------------------------------


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    match = _CONTENT_RANGE.fullmatch(value or "")
    if match is None:
        return None
    total = None if match[3] == "*" else int(match[3])
    return int(match[1]), int(match[2]), total


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0  # an HTTP date: the backoff is good enough


class Fetcher:
    """Sends the GETs of one blob and writes their bodies into its partial file."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        source: BlobSource,
        policy: DownloadPolicy,
        url: UrlHolder,
        progress: Progress,
    ) -> None:
        import httpx  # noqa: PLC0415  # deferred: see the module's imports

        self.source = source
        self.policy = policy
        self.url = url
        self.progress = progress
        self.bytes_transferred = 0
        self._client = client
        self._timeout = httpx.Timeout(
            connect=policy.connect_timeout_s,
            read=policy.read_timeout_s,
            write=policy.read_timeout_s,
            pool=None,  # waiting for a pooled connection is bounded by the caller's concurrency
        )

    @contextlib.asynccontextmanager
    async def open(self, first: int, last: int | None = None) -> AsyncIterator[httpx.Response]:
        """GET the blob from byte ``first`` (to ``last`` inclusive, else to its end).

        ``Range`` is sent unless the whole blob is asked for. The response is checked before it
        is yielded: its body starts at ``first``, or (a 200 to a request with ``Range``) at 0.
        Raises :class:`Forbidden`, :class:`Transient`, :class:`RangeRejected`,
        :class:`Mismatch` (the server's size is not the manifest's), ``HubNotFoundError`` or
        ``HubError`` for other answers; ``httpx.TransportError`` when the connection fails.
        """
        import httpx  # noqa: PLC0415  # deferred: see the module's imports

        headers = {"Accept-Encoding": "identity"}
        if first > 0 or last is not None:
            headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        generation = self.url.generation
        try:
            async with self._client.stream(
                "GET", self.url.value, headers=headers, timeout=self._timeout, follow_redirects=True
            ) as response:
                self._check(response, first, generation, ranged="Range" in headers)
                yield response
        except httpx.TooManyRedirects:
            raise HubError(
                f"{self.source.name}: too many redirects from {shown_url(self.url.value)}"
            ) from None

    def _check(
        self, response: httpx.Response, first: int, generation: int, *, ranged: bool
    ) -> None:
        status = response.status_code
        size = self.source.size_bytes
        if status == 206:
            content_range = _content_range(response.headers.get("content-range"))
            if content_range is not None and content_range[2] not in (None, size):
                raise Mismatch("size", str(size), str(content_range[2]), name=self.source.name)
            if content_range is None or content_range[0] != first:
                raise RangeRejected(f"asked for bytes {first}-, got Content-Range {content_range}")
            return
        if status == 200:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) != size:
                raise Mismatch("size", str(size), declared, name=self.source.name)
            return
        self._raise_for_status(status, response, generation, ranged=ranged)

    def _raise_for_status(
        self, status: int, response: httpx.Response, generation: int, *, ranged: bool
    ) -> None:
        shown = shown_url(self.url.value)
        name = self.source.name
        if status in (401, 403):
            raise Forbidden(status, generation)
        if status in (404, 410):
            raise HubNotFoundError(f"{name}: not found (HTTP {status}) at {shown}", status=status)
        if status >= 500 or status in _TRANSIENT_STATUS:
            raise Transient(f"HTTP {status}", retry_after_s=_retry_after_s(response))
        if status == 416 and ranged:
            raise RangeRejected("HTTP 416 to a Range request")
        raise HubError(
            f"{name}: unexpected HTTP {status} from {shown}; expected 200 or 206", status=status
        )

    async def pump(
        self,
        response: httpx.Response,
        fd: int,
        cursor: Cursor,
        end: int,
        inline: Hashing | None = None,
    ) -> bool:
        """Write the body at ``cursor.pos`` onwards, stopping at ``end``.

        Blocks of ``chunk_bytes`` are written (and hashed into ``inline``) by a thread while
        the next block arrives, so disk and hashing overlap the network. On the downloader's
        own connections the body skips the HTTP client (:func:`.net_stream.direct_body`): the
        socket fills the blocks themselves. Whatever arrived is written even when the
        connection fails halfway (the error then propagates), so a later attempt resumes after
        it. Returns True when the body went on past ``end``.
        """
        writer = BlockWriter(fd, cursor, end, inline, self.progress)
        blocks: list[bytearray] = []
        pooled = False  # blocks of a body smaller than one are not worth keeping
        try:
            body = direct_body(response)
            if body is not None:
                wanted = min(body.length, end - cursor.pos)
                if wanted <= 0:
                    return body.length > 0
                size = min(self.policy.chunk_bytes, wanted)
                count = min(_DIRECT_BLOCKS, -(-wanted // size))
                pooled = size == self.policy.chunk_bytes
                blocks += [buffers.take(size) if pooled else bytearray(size) for _ in range(count)]
                return await self._pump_direct(body, writer, wanted, blocks)
            limit = self.policy.chunk_bytes
            async for piece in response.aiter_raw():
                self.bytes_transferred += len(piece)
                if writer.add(piece) >= limit and await writer.push():
                    return True
            return await writer.push() or await writer.drain()
        finally:
            writer.settle()  # no thread reads the blocks any more
            for block in blocks if pooled else ():
                buffers.give_back(block)

    async def _pump_direct(
        self, body: DirectBody, writer: BlockWriter, wanted: int, blocks: list[bytearray]
    ) -> bool:
        # The socket fills blocks one after another while a thread writes the ones before:
        # a block is given to the socket again once it is on disk.
        size = len(blocks[0])
        free = [memoryview(block) for block in blocks]
        given = got = 0
        try:
            while got < wanted:
                while given < wanted and free:
                    block = free.pop()[: min(size, wanted - given)]
                    body.give(block)
                    given += len(block)
                if given == got:  # every block is with the writer
                    free += [memoryview(landed.obj) for landed in await writer.recycled()]
                    continue
                try:
                    filled = await body.filled(self.policy.read_timeout_s)
                except TimeoutError:
                    raise Transient(f"no data for {self.policy.read_timeout_s} s") from None
                except OSError as exc:
                    raise Transient(f"the connection broke ({type(exc).__name__})") from None
                if filled is None:
                    break  # the body ended early: the caller sees where
                self.bytes_transferred += len(filled)
                writer.write_soon(filled)
                got += len(filled)
                free += [memoryview(landed.obj) for landed in writer.take_free()]
        finally:
            body.close()
        await writer.drain()
        return got == wanted < body.length


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes ``[offset, end)`` of the file being filled are the blob ``fetcher`` downloads."""

    offset: int
    fetcher: Fetcher

    @property
    def end(self) -> int:
        return self.offset + self.fetcher.source.size_bytes

    @property
    def name(self) -> str:
        return self.fetcher.source.name


def segment_at(segments: Sequence[Segment], pos: int) -> Segment:
    """The segment holding byte ``pos`` (the last one for the end of the file)."""
    for segment in segments:
        if pos < segment.end:
            return segment
    return segments[-1]
