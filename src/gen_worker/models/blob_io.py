"""Bytes on their way from a socket to a partial file: received in large pieces, written by
threads, hashed on the way, counted.

:func:`network_backend` gives the downloader's HTTP connections a network stream that
receives straight into a large buffer (see :class:`_Receiver`). A body is written in blocks
by a small pool of threads (:class:`BlockWriter`) while the next block arrives, so the disk
and the hashing (``pwritev``, blake3 and sha256 all release the GIL) overlap the network
instead of adding to it. :class:`InlineHash` hashes a sequential download as it is written;
:class:`PrefixHash` hashes a file filled by parallel ranges from byte 0 as far as the finished
ranges reach, while the later ones still download; :func:`hash_file` is the pass over a whole
file for what neither covered (a resumed download).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import mmap
import os
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import blake3

if TYPE_CHECKING:
    # httpcore (under httpx) is imported where it is used: slow to import, like httpx.
    import httpcore

__all__ = [
    "BlockWriter",
    "Cursor",
    "Digests",
    "InlineHash",
    "PrefixHash",
    "Progress",
    "blake3_of_range",
    "hash_file",
    "network_backend",
]

_HASH_SPAN_BYTES = 64 << 20  # hashed per thread call: bounds a wait on cancellation


class Progress:
    """Turns "bytes now present" into forward-only deltas for ``emit``.

    ``covered`` is how many bytes of the blob the partial file holds; it drops when a download
    restarts from zero. Only growth past the highest value reported so far is emitted, so the
    deltas never go negative and add up to the blob's size once it is complete.
    """

    def __init__(self, emit: Callable[[int], None]) -> None:
        self._emit = emit
        self.covered = 0
        self._reported = 0

    def add(self, n: int) -> None:
        self.set(self.covered + n)

    def set(self, covered: int) -> None:
        self.covered = covered
        if covered > self._reported:
            delta = covered - self._reported
            self._reported = covered
            self._emit(delta)


@dataclass(slots=True)
class Cursor:
    """Where the next body byte goes; advanced only past bytes written to the file."""

    pos: int


@dataclass(frozen=True, slots=True)
class Digests:
    blake3: str
    sha256: str  # empty unless the source gave one to check


class InlineHash:
    """Hashes bytes as they are written, while they cover the file from byte 0 without a gap."""

    def __init__(self, with_sha256: bool, *, threads: int = 1) -> None:
        self.upto = 0
        self._blake3 = blake3.blake3(max_threads=threads)
        self._sha256 = hashlib.sha256() if with_sha256 else None

    def update(self, data: bytes | memoryview) -> None:
        self._blake3.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        self.upto += len(data)

    def digests(self) -> Digests:
        sha = self._sha256.hexdigest() if self._sha256 is not None else ""
        return Digests(self._blake3.hexdigest(), sha)


def _blake3_of(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def _sha256_of(path: Path) -> str:
    with path.open("rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def hash_file(path: Path, *, with_sha256: bool) -> Digests:
    """Digests of a whole file, off the event loop (blake3 on every core, sha256 beside it)."""
    if not with_sha256:
        return Digests(await asyncio.to_thread(_blake3_of, path), "")
    b3, sha = await asyncio.gather(
        asyncio.to_thread(_blake3_of, path), asyncio.to_thread(_sha256_of, path)
    )
    return Digests(b3, sha)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _write_block(fd: int, pieces: list[bytes], offset: int, inline: InlineHash | None) -> int:
    """Write ``pieces`` at ``offset`` (and hash them, in order); runs in a worker thread."""
    size = sum(len(p) for p in pieces)
    written = os.pwritev(fd, pieces, offset)
    if written < size:  # a short write to a regular file: finish it the plain way
        _pwrite_all(fd, memoryview(b"".join(pieces))[written:], offset + written)
    if inline is not None:
        for piece in pieces:
            inline.update(piece)
    return size


_EXECUTOR_LOCK = threading.Lock()
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
# Disk writes get their own threads: the default executor may be filled by callers that block
# in it for long (waiting on a lock), and a stalled write would stall the download.
_WRITER_THREADS = 8


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _EXECUTOR  # noqa: PLW0603  # one pool per process, made on first use
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
                _WRITER_THREADS, thread_name_prefix="gen-worker-download"
            )
        return _EXECUTOR


class BlockWriter:
    """Hands blocks of a body to a writer thread, one at a time and in order.

    ``cursor`` (and progress) advance only once a block is on disk. :meth:`settle` waits for
    the block in flight and writes what is left, so no thread is still writing into the file
    when the body's reader returns (a caller may truncate the file next).
    """

    def __init__(
        self, fd: int, cursor: Cursor, end: int, inline: InlineHash | None, progress: Progress
    ) -> None:
        self._fd = fd
        self._cursor = cursor
        self._end = end
        self._inline = inline
        self._progress = progress
        self._pieces: list[bytes] = []
        self._size = 0
        self._queued_to = cursor.pos
        self._in_flight: concurrent.futures.Future[int] | None = None

    def add(self, piece: bytes) -> int:
        self._pieces.append(piece)
        self._size += len(piece)
        return self._size

    def _take(self) -> tuple[list[bytes], bool]:
        """The pending pieces cut at ``end``, and whether anything lay beyond it."""
        pieces, room = self._pieces, self._end - self._queued_to
        overflow = self._size > room
        if overflow:
            data = b"".join(pieces)[:room]
            pieces = [data] if data else []
        self._pieces, self._size = [], 0
        return pieces, overflow

    def _landed(self, future: concurrent.futures.Future[int]) -> None:
        self._in_flight = None
        written = future.result()
        self._cursor.pos += written
        self._progress.add(written)

    def _landed_if_current(self, future: concurrent.futures.Future[int]) -> None:
        # Counted as soon as it lands, not when the next block comes: a stalled body must not
        # hide written bytes from progress or from a checkpoint of the partial file.
        if self._in_flight is future and future.exception() is None:
            self._landed(future)

    async def drain(self) -> bool:
        """Wait for the block in flight; always False (no overflow), for ``push() or drain()``."""
        if self._in_flight is not None:
            future = self._in_flight
            # Shielded: a canceled download must not cancel a write that has not started yet,
            # or settle() would find the block neither written nor pending.
            await asyncio.shield(asyncio.wrap_future(future))
            if self._in_flight is future:
                self._landed(future)
        return False

    async def push(self) -> bool:
        """Start writing the pending pieces (after the previous block); True on overflow."""
        await self.drain()
        pieces, overflow = self._take()
        if pieces:
            size = sum(len(p) for p in pieces)
            future = _executor().submit(
                _write_block, self._fd, pieces, self._queued_to, self._inline
            )
            self._in_flight = future
            self._queued_to += size
            loop = asyncio.get_running_loop()
            future.add_done_callback(
                lambda f: loop.call_soon_threadsafe(self._landed_if_current, f)
            )
        if overflow:
            await self.drain()
        return overflow

    def settle(self) -> None:
        """Finish the block in flight and write the rest, here and now (failure paths)."""
        if self._in_flight is not None:
            self._landed(self._in_flight)  # blocks for at most one block's write
        pieces, _ = self._take()
        if pieces:
            size = _write_block(self._fd, pieces, self._queued_to, self._inline)
            self._queued_to += size
            self._cursor.pos += size
            self._progress.add(size)


class PrefixHash:
    """Hashes a file being filled out of order, from byte 0 up to the first gap, in a thread.

    :meth:`advance` says how far the file is now complete; hashing catches up in the
    background. :meth:`finish` hashes the rest and returns the digests; :meth:`close` (always
    call it, before closing ``fd``) waits for a thread still reading.

    The file is read through a memory map of its ``size`` bytes (it must already be that long):
    the hash reads the page cache in place, which costs less than copying it out with
    ``pread`` (about 15% of the hashing time per GiB measured here).
    """

    def __init__(self, fd: int, size: int, *, with_sha256: bool) -> None:
        self._fd = fd
        self._size = size
        self._hash = InlineHash(with_sha256, threads=blake3.blake3.AUTO)
        self._map: mmap.mmap | None = None
        self._target = 0
        self._task: asyncio.Task[None] | None = None
        self._in_flight: concurrent.futures.Future[None] | None = None

    def advance(self, complete_to: int) -> None:
        self._target = max(self._target, complete_to)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._catch_up())

    async def _catch_up(self) -> None:
        while self._hash.upto < self._target:
            end = min(self._target, self._hash.upto + _HASH_SPAN_BYTES)
            self._in_flight = _executor().submit(self._hash_span, end)
            await asyncio.shield(asyncio.wrap_future(self._in_flight))
            self._in_flight.result()
            self._in_flight = None

    def _hash_span(self, end: int) -> None:
        if self._map is None:
            self._map = mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ)
        with memoryview(self._map) as view, view[self._hash.upto : end] as span:
            self._hash.update(span)

    async def finish(self, size: int) -> Digests:
        self.advance(size)
        if self._task is not None:
            await self._task
        return self._hash.digests()

    def close(self) -> None:
        if self._task is not None:
            if self._task.done() and not self._task.cancelled():
                self._task.exception()  # retrieved: the failure that matters is raised elsewhere
            self._task.cancel()
        if self._in_flight is not None:
            # Blocks for at most one span: the thread must be done with fd before it closes.
            concurrent.futures.wait([self._in_flight])
        if self._map is not None:
            self._map.close()
            self._map = None


def blake3_of_range(fd: int, start: int, end: int) -> str:
    """The blake3 hex of bytes ``[start, end)`` of the open file ``fd`` (read in place)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if end > start:
        with (
            mmap.mmap(fd, end, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as view,
            view[start:end] as span,
        ):
            hasher.update(span)
    return hasher.hexdigest()


# -- the network under the downloader's connections -------------------------------------------

# httpx reads a connection through httpcore and anyio: 64 KiB per read, and anyio stops and
# restarts the socket's reading (two epoll calls) around every wait, while asyncio receives at
# most 256 KiB per system call. For a blob body that bookkeeping cost more CPU than the bytes:
# pulling 1 GiB from a loopback hub on 2 cores took ~6.2 s of CPU that way (~4.9 s asking
# anyio for 1 MiB reads), ~3.8 s with this stream, which receives into a buffer of
# _RECV_BYTES and hands a reader all of it at once (256 KiB..2 MiB measured: 512 KiB-1 MiB best).
_RECV_BYTES = 1 << 20
# A dropped connection is gone after two turns of the event loop; never wait long for it.
_CLOSE_WAIT_S = 1.0


class _Receiver(asyncio.BufferedProtocol):
    """One connection's incoming bytes, received straight into one buffer.

    The socket is read while there is room, without stopping between reads; only a full
    buffer pauses it, until a reader takes what is there (all of it, as one ``bytes``).
    """

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self._buffer = bytearray(_RECV_BYTES)
        self._filled = 0
        self._eof = False
        self._gone = False
        self._lost: Exception | None = None
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self._writable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._filled == len(self._buffer):
            # Reading is paused when the buffer fills; should the transport ask again before
            # that takes hold, the buffer grows instead of refusing the bytes.
            grown = bytearray(2 * len(self._buffer))
            grown[: self._filled] = self._buffer
            self._buffer = grown
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled == len(self._buffer) and not self._paused:
            self._paused = True
            self._reading(pause=True)
        self._notify()

    def eof_received(self) -> bool:
        self._eof = True
        self._notify()
        return False  # close the transport: HTTP/1.1 has nothing to send after the peer's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._gone = True
        self._lost = exc  # None: closed cleanly
        self._writable = True
        self._notify()

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._notify()

    async def closed(self) -> None:
        """Wait until the connection is gone (``connection_lost`` came)."""
        while not self._gone:
            await self._wait()

    def readable(self) -> bool:
        """Whether a read would not wait (the peer sent bytes or closed)."""
        return self._filled > 0 or self._eof

    async def take(self) -> bytes:
        """Everything received so far (waiting for something); b"" once the peer closed."""
        while not self._filled:
            if self._lost is not None:
                raise self._lost
            if self._eof:
                return b""
            await self._wait()
        with memoryview(self._buffer) as view, view[: self._filled] as received:
            data = received.tobytes()
        self._filled = 0
        if self._paused:
            self._paused = False
            self._reading(pause=False)
        return data

    async def drained(self) -> None:
        """Wait until the transport takes more to send (its buffer is below its limit)."""
        while not self._writable:
            await self._wait()
        if self._lost is not None:
            raise self._lost

    def _reading(self, *, pause: bool) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    async def _wait(self) -> None:
        """Until the next change of state (bytes, EOF, loss, room to write)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def network_backend() -> httpcore.AsyncNetworkBackend:
    """An httpcore network backend whose TCP streams receive through a :class:`_Receiver`.

    For asyncio only (the downloader's loop). Unix sockets and connections with socket
    options are left to httpcore's own backend. httpcore uses backends and streams by their
    methods alone; subclassing its base classes would import it with this module.
    """
    return cast("httpcore.AsyncNetworkBackend", _Backend())


class _Backend:
    def __init__(self) -> None:
        import httpcore  # noqa: PLC0415  # deferred: see the module's imports

        self._default = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> _Stream | httpcore.AsyncNetworkStream:
        import httpcore  # noqa: PLC0415

        if socket_options is not None:
            return await self._default.connect_tcp(
                host, port, timeout, local_address, socket_options
            )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, receiver = await loop.create_connection(
                    _Receiver, host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection in {timeout} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
        return _Stream(transport, receiver)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._default.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Stream:
    """An httpcore network stream over an asyncio transport and its :class:`_Receiver`."""

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver) -> None:
        self._transport = transport
        self._receiver = receiver

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # Returns whatever arrived, up to the receiver's buffer: more than ``max_bytes`` asks
        # for (httpcore reads 64 KiB); h11, under it, keeps what it is given, however much.
        import httpcore  # noqa: PLC0415

        try:
            async with asyncio.timeout(timeout):
                return await self._receiver.take()
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no data for {timeout} s") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import httpcore  # noqa: PLC0415

        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        try:
            async with asyncio.timeout(timeout):
                await self._receiver.drained()
        except TimeoutError:
            raise httpcore.WriteTimeout(f"could not send for {timeout} s") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from None

    async def aclose(self) -> None:
        # Nothing is left to send once httpcore closes a connection, and a TLS close_notify
        # exchange could outlive the event loop (leaving the socket open): the transport is
        # dropped at once, and closed by the time this returns.
        self._transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await self._receiver.closed()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> _Stream:
        import httpcore  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                tls = await loop.start_tls(
                    self._transport, self._receiver, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self._transport.abort()
            raise httpcore.ConnectTimeout(f"no TLS handshake in {timeout} s") from None
        except OSError as exc:  # ssl.SSLError is an OSError
            self._transport.abort()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
        if tls is None:
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        self._receiver.transport = tls
        return _Stream(tls, self._receiver)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # httpcore drops an idle connection the server closed
            return self._receiver.readable() or self._transport.is_closing()
        names = {"client_addr": "sockname", "server_addr": "peername"}
        if info in ("ssl_object", "socket", *names):
            return self._transport.get_extra_info(names.get(info, info))
        return None
