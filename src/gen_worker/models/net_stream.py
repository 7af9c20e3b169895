"""The downloader's connections: httpcore network streams that receive in large pieces, hand
the HTTP client each response head on its own, and can put a body straight into the
downloader's buffers.

Why not httpcore's own streams: httpx reads a connection through httpcore and anyio, 64 KiB
per read, and anyio stops and restarts the socket's reading (two epoll calls) around every
wait. Pulling 1 GiB from a loopback hub on 2 cores took ~6.2 s of CPU that way, ~3.8 s with a
stream that receives into a buffer of ``_RECV_BYTES`` and hands all of it over at once (256 KiB
to 2 MiB measured: 512 KiB-1 MiB best).

Why bodies may skip the HTTP client: under httpcore, h11 copies every body byte four times
(into its receive buffer, out of it twice, into ``bytes``) after the stream's own copy; for
512 MiB that was ~0.35 CPU-s of the ~0.45 that reading a body through httpx cost here, against
~0.1 for the socket itself. So a response head always reaches h11 alone (a read that would
carry body bytes with it stops at the head's end), and a caller that has its response may then
take the body from :func:`direct_body` into its own blocks, received there by the kernel with
no copy at all. h11 never sees such a body, so httpcore closes that connection when the
response closes instead of reusing it: one new connection per body, which on loopback costs
~0.1 ms and over TLS a handshake per blob or range (32 MiB by default).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import re
import ssl
import threading
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    # httpcore (under httpx) is imported where it is used: slow to import, like httpx.
    import httpcore
    import httpx

__all__ = [
    "BufferPool",
    "DirectBody",
    "buffers",
    "direct_body",
    "download_transport",
    "network_backend",
]

_RECV_BYTES = 1 << 20
# A dropped connection is gone after two turns of the event loop; never wait long for it.
_CLOSE_WAIT_S = 1.0
# A response head ends at its first empty line; h11 also accepts bare LF line ends.
_HEAD_END = re.compile(rb"\n\r?\n")
# h11 refuses a head over 16 KiB; past this the stream stops looking for the end of one.
_MAX_HEAD_BYTES = 64 << 10
_STATUS = re.compile(rb"HTTP/\d(?:\.\d)?\s+(\d{3})")


class BufferPool:
    """Buffers of a few sizes kept between bodies and connections, up to ``keep_bytes``.

    A new 1 MiB buffer costs its zeroing and page faults: allocating the blocks of each 32 MiB
    range afresh took ~8% of the event loop's time here. Threads of their own event loops may
    share the pool.
    """

    def __init__(self, keep_bytes: int) -> None:
        self._keep = keep_bytes
        self._kept = 0
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes (old contents: the caller overwrites what it reads)."""
        with self._lock:
            free = self._free.get(size)
            if free:
                self._kept -= size
                return free.pop()
        return bytearray(size)

    def give_back(self, buffer: bytearray) -> None:
        """Keep ``buffer`` for another taker; nothing may use it any more."""
        size = len(buffer)
        with self._lock:
            if self._kept + size <= self._keep:
                self._free.setdefault(size, []).append(buffer)
                self._kept += size


#: The downloader's buffers: enough for a few bodies at once and their connections.
buffers = BufferPool(keep_bytes=32 << 20)


class _Receiver(asyncio.BufferedProtocol):
    """One connection's incoming bytes, received straight into one buffer, or into a block of
    the caller's (:meth:`fill`).

    The socket is read while there is room, without stopping between reads; a full buffer
    pauses it until a reader takes bytes, and a filled block until the next block comes.
    """

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self._buffer = buffers.take(_RECV_BYTES)
        self._start = 0  # the unread bytes are _buffer[_start:_filled]
        self._filled = 0
        # The caller's blocks to fill from the socket, in order (see give()), bytes in the first
        # one, and the blocks filled (a shorter view for one the connection ended in).
        self._blocks: collections.deque[memoryview] = collections.deque()
        self._sunk = 0
        self._full: collections.deque[memoryview] = collections.deque()
        self._stalled = False  # a fill timed out after some bytes: the next one raises
        self._eof = False
        self._gone = False
        self._lost: Exception | None = None
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self._writable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._blocks:
            return self._blocks[0][self._sunk :]
        if self._filled == len(self._buffer):
            if self._start:
                unread = self._filled - self._start
                self._buffer[:unread] = self._buffer[self._start : self._filled]
                self._start, self._filled = 0, unread
            else:
                # Reading is paused when the buffer fills; should the transport ask again
                # before that takes hold, the buffer grows instead of refusing the bytes.
                grown = bytearray(2 * len(self._buffer))
                grown[: self._filled] = self._buffer
                self._buffer = grown
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._blocks:
            self._sunk += nbytes
            if self._sunk == len(self._blocks[0]):
                self._full.append(self._blocks.popleft())
                self._sunk = 0
                if not self._blocks:
                    self._pause()  # until the next block: no byte is received twice
        else:
            self._filled += nbytes
            if self._filled == len(self._buffer):
                self._pause()
        self._notify()

    def eof_received(self) -> bool:
        self._eof = True
        self._notify()
        return False  # close the transport: HTTP/1.1 has nothing to send after the peer's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._gone and self._start == self._filled and len(self._buffer) == _RECV_BYTES:
            # Nothing is left to read (a buffer still holding bytes stays with its reader).
            buffers.give_back(self._buffer)
            self._buffer = bytearray()
            self._start = self._filled = 0
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
        return self._filled > self._start or self._eof

    def unread(self) -> memoryview:
        """The bytes received and not taken yet (valid until the next turn of the loop)."""
        return memoryview(self._buffer)[self._start : self._filled]

    async def ready(self) -> None:
        """Wait until bytes are there to take, or the peer closed (raise if it broke)."""
        while self._filled == self._start:
            if self._lost is not None:
                raise self._lost
            if self._eof:
                return
            await self._wait()

    def take(self, limit: int | None = None) -> bytes:
        """Up to ``limit`` (default: all) of the unread bytes; b"" once the peer closed."""
        end = self._filled if limit is None else min(self._filled, self._start + limit)
        with memoryview(self._buffer) as view, view[self._start : end] as taken:
            data = taken.tobytes()
        self._start = end
        if self._start == self._filled:
            self._start = self._filled = 0
        if data:
            self._resume()
        return data

    def give(self, block: memoryview) -> None:
        """Receive the next ``len(block)`` bytes into ``block``, after the blocks given before.

        What was received already is copied first; the transport receives the rest into the
        block itself. The caller leaves the block alone until :meth:`filled` returns it.
        """
        if not self._blocks:
            unread = min(len(block), self._filled - self._start)
            if unread:
                block[:unread] = self._buffer[self._start : self._start + unread]
                self._start += unread
                if self._start == self._filled:
                    self._start = self._filled = 0
            if unread == len(block):
                self._full.append(block)
                return
            self._sunk = unread
        self._blocks.append(block)
        self._resume()

    async def filled(self, timeout: float | None) -> memoryview | None:
        """The first given block not returned yet, once full; None when nothing is left.

        It comes back shorter (a view of what landed) when the peer closed, or when the
        connection failed or went ``timeout`` s without a byte after some landed; the next
        call then returns None or raises the connection's error or ``TimeoutError``, so a
        caller keeps every byte that arrived.
        """
        while not self._full:
            if self._stalled:
                raise TimeoutError
            if self._eof or not self._blocks:
                break
            try:
                async with asyncio.timeout(timeout):
                    await self._wait()
            except TimeoutError:
                if not self._sunk:
                    raise
                self._stalled = True
                break
        if self._full:
            return self._full.popleft()
        if self._sunk:  # the connection ended (or stalled) inside this block
            short = self._blocks.popleft()[: self._sunk]
            self._sunk = 0
            return short
        if self._lost is not None:
            raise self._lost
        return None

    def detach(self) -> None:
        """Stop receiving into the caller's blocks: the buffer takes what comes next."""
        self._blocks.clear()
        self._full.clear()
        self._sunk = 0

    async def drained(self) -> None:
        """Wait until the transport takes more to send (its buffer is below its limit)."""
        while not self._writable:
            await self._wait()
        if self._lost is not None:
            raise self._lost

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._reading(pause=True)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._reading(pause=False)

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


def download_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """HTTP/1.1 over a pool whose connections use :func:`network_backend`.

    httpx builds its pool with no way to pass a network backend, so the transport's pool is
    replaced by an equivalent one with ours; an httpx that keeps its pool under another name
    keeps its own (and reads more slowly, but correctly).
    """
    import httpcore  # noqa: PLC0415  # deferred like httpx, which imports it
    import httpx  # noqa: PLC0415

    ssl_context = _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, http1=True, http2=False, limits=limits)
    if isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        transport._pool = httpcore.AsyncConnectionPool(  # see above
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=network_backend(),
        )
    return transport


@functools.lru_cache(maxsize=4)
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """httpx's default context for these trust settings (read by httpx from the environment).

    Made once per process: loading the CA bundle costs 30-50 ms of CPU (a pull of 512 MiB
    from a loopback hub costs ~0.8 s), and a context serves any number of connections,
    threads and clients.
    """
    del cert_file, cert_dir  # the cache key: httpx reads them itself
    import httpx  # noqa: PLC0415  # deferred: see the module's imports

    return httpx.create_ssl_context()


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


async def _within(
    waiting: Awaitable[None],
    timeout: float | None,
    what: str,
    on_timeout: type[Exception],
    on_error: type[Exception],
) -> None:
    """Await ``waiting`` for at most ``timeout`` s; the two ways it fails as httpcore's own."""
    try:
        async with asyncio.timeout(timeout):
            await waiting
    except TimeoutError:
        raise on_timeout(f"{what} for {timeout} s") from None
    except OSError as exc:
        raise on_error(str(exc) or type(exc).__name__) from None


class _Stream:
    """An httpcore network stream over an asyncio transport and its :class:`_Receiver`.

    After each request it sends, it hands the client the response head on its own (informational
    heads included), so that until the client reads on, the body is all still here.
    """

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver) -> None:
        self._transport = transport
        self._receiver = receiver
        self._head: bytearray | None = None  # the head handed over so far, while one is due
        self.body_untouched = False  # a final head was handed over, and nothing after it

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # Returns whatever arrived, up to the receiver's buffer: more than ``max_bytes`` asks
        # for (httpcore reads 64 KiB); h11, under it, keeps what it is given, however much.
        import httpcore  # noqa: PLC0415

        await _within(self._receiver.ready(), timeout, "no data", httpcore.ReadTimeout,
                      httpcore.ReadError)  # fmt: skip
        if self._head is not None:
            return self._head_part()
        self.body_untouched = False
        return self._receiver.take()

    def _head_part(self) -> bytes:
        """The awaited head's next bytes: up to its end, and not one byte further."""
        head = cast("bytearray", self._head)
        tail = bytes(head[-2:])  # the end of the head may straddle two reads
        with self._receiver.unread() as pending, pending[:_MAX_HEAD_BYTES] as window:
            found = _HEAD_END.search(tail + window.tobytes())
        end = None if found is None else max(1, found.end() - len(tail))
        data = self._receiver.take(end)
        head += data
        if end is None:
            if len(head) > _MAX_HEAD_BYTES:
                self._head = None  # not HTTP as h11 takes it: h11 will say so
            return data
        status = _STATUS.match(head)
        # 1xx heads come before the response's own (101 ends HTTP on this connection).
        informational = status is not None and status[1].startswith(b"1") and status[1] != b"101"
        self._head = bytearray() if informational else None
        self.body_untouched = not informational
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import httpcore  # noqa: PLC0415

        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._head = bytearray()  # a request goes out: its response's head is due next
        self.body_untouched = False
        self._transport.write(buffer)
        await _within(self._receiver.drained(), timeout, "could not send", httpcore.WriteTimeout,
                      httpcore.WriteError)  # fmt: skip

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


class DirectBody:
    """A response body taken from the connection into the caller's blocks (see the module)."""

    def __init__(self, receiver: _Receiver, length: int) -> None:
        self._receiver = receiver
        self.length = length  # the body's bytes, from its Content-Length

    def give(self, block: memoryview) -> None:
        """:meth:`_Receiver.give`: ``block`` takes the body's next bytes, after earlier ones."""
        self._receiver.give(block)

    async def filled(self, timeout: float | None) -> memoryview | None:
        """:meth:`_Receiver.filled`: the oldest block given, full (or short at the end)."""
        return await self._receiver.filled(timeout)

    def close(self) -> None:
        """Leave the caller's blocks alone from now on (call it before reusing them)."""
        self._receiver.detach()


def direct_body(response: httpx.Response) -> DirectBody | None:
    """The body of ``response`` to take straight from its connection, or None when it must go
    through the client: another network stream, bytes already read past the head, no
    ``Content-Length`` (or a ``Transfer-Encoding``), or an empty body.

    The caller reads at most ``length`` bytes and closes the response afterwards; the client
    then drops the connection, whose framing it no longer knows.
    """
    stream = response.extensions.get("network_stream")
    if not isinstance(stream, _Stream) or not stream.body_untouched:
        return None
    declared = response.headers.get("content-length", "")
    if "transfer-encoding" in response.headers or not declared.isdigit() or declared == "0":
        return None
    stream.body_untouched = False  # one taker
    return DirectBody(stream._receiver, int(declared))
