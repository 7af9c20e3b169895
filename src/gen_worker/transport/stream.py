"""The worker <-> scheduler stream over grpc.aio, as typed messages.

The only place (with the mock scheduler's server side, below) that touches grpc. Messages are
(de)serialized by :mod:`gen_worker.protocol.convert`; grpc only moves bytes, through a generic
method handler, so no generated stub is needed here. grpc failures are translated at this edge
into :class:`StreamClosed` with a ``kind`` the worker decides on (``broken``, ``rejected``,
``redirect``, ``unauthenticated``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from gen_worker.errors import GenWorkerError
from gen_worker.protocol.convert import (
    scheduler_from_pb,
    scheduler_to_pb,
    worker_batch_to_pb,
    worker_messages_from_pb,
    worker_to_pb,
)
from gen_worker.protocol.messages import SchedulerMessage, WorkerMessage

__all__ = [
    "CONNECT_METHOD",
    "REDIRECT_PREFIX",
    "REJECT_PREFIX",
    "SchedulerServer",
    "SchedulerSession",
    "StreamClosed",
    "WorkerStream",
    "connect",
]

SERVICE = "gen_worker.v1.Scheduler"
CONNECT_METHOD = f"/{SERVICE}/Connect"
#: Status details the scheduler uses to say "talk to that address" and "your protocol is too old".
REDIRECT_PREFIX = "not_leader:"
REJECT_PREFIX = "incompatible_protocol:"

_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


class StreamClosed(GenWorkerError):
    """The stream ended; ``kind`` says whether to reconnect, follow ``address`` or give up."""

    def __init__(self, kind: str, detail: str, address: str = "") -> None:
        self.kind = kind
        self.detail = detail
        self.address = address
        super().__init__(f"scheduler stream {kind}: {detail}")


def _closed_from(exc: grpc.aio.AioRpcError) -> StreamClosed:
    details = exc.details() or ""
    code = exc.code()
    if details.startswith(REJECT_PREFIX):
        return StreamClosed("rejected", details[len(REJECT_PREFIX) :])
    if details.startswith(REDIRECT_PREFIX):
        return StreamClosed("redirect", details, details[len(REDIRECT_PREFIX) :])
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return StreamClosed("unauthenticated", f"{code.name}: {details}")
    return StreamClosed("broken", f"{code.name}: {details}")


class WorkerStream:
    """The worker's end: ``send`` typed messages, iterate the scheduler's."""

    def __init__(self, channel: grpc.aio.Channel, call: Any) -> None:
        self._channel = channel
        self._call = call
        self._write_lock = asyncio.Lock()

    async def send(self, message: WorkerMessage) -> None:
        await self._write(worker_to_pb(message))

    async def send_many(self, messages: list[WorkerMessage | bytes]) -> None:
        """Send in order, as one frame when there are several.

        An item may already be a serialized ``WorkerMessage`` (bytes): the worker encodes its
        per-request outcomes itself, straight to bytes.
        """
        encoded = [x if isinstance(x, bytes) else worker_to_pb(x) for x in messages]
        await self._write(encoded[0] if len(encoded) == 1 else worker_batch_to_pb(encoded))

    async def _write(self, data: bytes) -> None:
        try:
            async with self._write_lock:
                await self._call.write(data)
        except grpc.aio.AioRpcError as exc:
            raise _closed_from(exc) from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise StreamClosed("broken", f"write after close ({exc})") from None

    async def read(self) -> SchedulerMessage:
        """The next message from the scheduler; StreamClosed when there is none any more."""
        try:
            data = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _closed_from(exc) from None
        if data is grpc.aio.EOF:
            raise StreamClosed("broken", "the scheduler closed the stream")
        return scheduler_from_pb(data)

    async def __aiter__(self) -> AsyncIterator[SchedulerMessage]:
        while True:
            yield await self.read()

    async def close(self, *, linger_s: float = 1.0) -> None:
        """Half-close, give the scheduler ``linger_s`` to take what was written, then end."""
        with contextlib.suppress(Exception):
            async with self._write_lock:
                await self._call.done_writing()
        # Cancelling at once could drop the last frames (a drain result) still in flight: wait
        # a moment for the scheduler to end the call after our half-close.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger_s
        while not self._call.done() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._call.cancel()
        await self._channel.close(grace=None)


async def _ready_or_refused(channel: grpc.aio.Channel) -> None:
    """Wait until the channel is connected; fail at the first failed attempt.

    ``channel_ready()`` keeps retrying a refused address until its timeout, which would make
    every failed dial as slow as the timeout and delay trying the next scheduler address; the
    worker's own back-off decides when to try again.
    """
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            raise ConnectionRefusedError("the scheduler address refused the connection")
        if state is grpc.ChannelConnectivity.SHUTDOWN:
            raise ConnectionRefusedError("the channel was shut down")
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)


async def connect(address: str, *, tls: bool, token: str, timeout_s: float = 10.0) -> WorkerStream:
    """Open the stream to ``address`` (``host:port``), sending the token as bearer metadata."""
    if tls:
        channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(), _OPTIONS)
    else:
        channel = grpc.aio.insecure_channel(address, _OPTIONS)
    try:
        await asyncio.wait_for(_ready_or_refused(channel), timeout_s)
    except (TimeoutError, grpc.aio.AioRpcError, ConnectionRefusedError) as exc:
        await channel.close(grace=None)
        raise StreamClosed("broken", f"cannot reach {address} ({type(exc).__name__})") from None
    method: Any = channel.stream_stream(CONNECT_METHOD)  # bytes in, bytes out
    call = method(metadata=(("authorization", f"Bearer {token}"),))
    return WorkerStream(channel, call)


# -- the scheduler's side (the mock orchestrator) ---------------------------------------------


class SchedulerSession:
    """One connected worker, seen from the scheduler."""

    def __init__(self, request_iterator: AsyncIterator[bytes], context: Any) -> None:
        self._requests = request_iterator
        self._context = context
        # grpc.aio allows one write at a time per call; several tasks may send at once.
        self._write_lock = asyncio.Lock()
        self.metadata = dict(context.invocation_metadata() or ())
        self.peer: str = context.peer()

    async def send(self, message: SchedulerMessage) -> None:
        data = scheduler_to_pb(message)
        async with self._write_lock:
            await self._context.write(data)

    async def __aiter__(self) -> AsyncIterator[WorkerMessage]:
        async for data in self._requests:
            for message in worker_messages_from_pb(data):
                yield message

    async def frames(self) -> AsyncIterator[list[WorkerMessage]]:
        """The messages a frame at a time (a request's outcomes usually arrive as one)."""
        async for data in self._requests:
            yield worker_messages_from_pb(data)

    async def abort(self, status: str, details: str) -> None:
        """End the stream with a gRPC status named like ``"UNAVAILABLE"``."""
        await self._context.abort(grpc.StatusCode[status], details)


SessionHandler = Callable[[SchedulerSession], Awaitable[None]]


class SchedulerServer:
    """A grpc.aio server whose Connect calls go to ``handler(session)``."""

    def __init__(self, handler: SessionHandler) -> None:
        self._handler = handler
        self._server: grpc.aio.Server | None = None

    async def _connect(self, request_iterator: AsyncIterator[bytes], context: Any) -> None:
        await self._handler(SchedulerSession(request_iterator, context))

    async def start(self, address: str) -> int:
        """Listen on ``host:port`` (port 0 picks one); returns the port."""
        server = grpc.aio.server(options=_OPTIONS)
        rpc: Any = grpc.stream_stream_rpc_method_handler(self._connect)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Connect": rpc}),)
        )
        port: int = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        return port

    async def stop(self, grace_s: float | None = 0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
