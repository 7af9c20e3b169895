"""Shared by the worker benchmarks: the raw grpc.aio floor, and a worker process to measure.

The floor is what any worker must pay to move the same bytes over the same kind of stream: a
bare grpc.aio server in the benchmark process (where the mock scheduler listens) and a bare
grpc.aio client in a second process (where the worker runs) that dials it and opens one
stream-stream call of raw bytes. No protobuf, no framework: a ping carries an 8-byte id and
padding, the client answers each ping with the id and padding of the reply size, or on a
``S`` command streams ``count`` messages of ``size`` bytes back-to-back, each write awaited as
the worker's writer does. Run as a script, this module is that client:
``python _grpc_floor.py client HOST:PORT REPLY_SIZE``.

The worker side: an endpoint project written to a temporary folder, its lock, and
``python -m gen_worker.entrypoint`` started against a MockScheduler with the environment a
local run uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

SERVICE = "bench.Floor"
METHOD = f"/{SERVICE}/Connect"
_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
_PING = b"P"
_STREAM = b"S"


# -- the floor: server side (this process) ------------------------------------------------------


class FloorServer:
    """One bare grpc.aio server; the floor client's one stream arrives as ``self.call``."""

    def __init__(self) -> None:
        self._server: grpc.aio.Server | None = None
        self._ready: asyncio.Future[Any] | None = None
        self._context: Any = None
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write in flight per call
        self._sink: tuple[int, asyncio.Future[float]] | None = None
        self._received = 0
        self.address = ""

    async def start(self) -> str:
        server = grpc.aio.server(options=_OPTIONS)
        handler = grpc.stream_stream_rpc_method_handler(self._connect)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self._ready = asyncio.get_running_loop().create_future()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def _connect(self, requests: Any, context: Any) -> None:
        self._context = context
        assert self._ready is not None
        self._ready.set_result(None)
        async for data in requests:
            if data[:1] == _PING:
                (ident,) = struct.unpack_from("<Q", data, 1)
                self._waiting.pop(ident).set_result(None)
            else:
                self._received += 1
                if self._sink is not None and self._received >= self._sink[0]:
                    self._sink[1].set_result(time.perf_counter())

    async def wait_client(self, timeout_s: float = 30.0) -> None:
        assert self._ready is not None
        await asyncio.wait_for(self._ready, timeout_s)

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            await self._context.write(data)

    async def ping(self, size: int) -> float:
        """One round trip with a ``size``-byte request; its latency in seconds."""
        ident = next(self._ids)
        done = asyncio.get_running_loop().create_future()
        self._waiting[ident] = done
        data = _PING + struct.pack("<Q", ident) + b"\0" * max(0, size - 9)
        start = time.perf_counter()
        await self._write(data)
        await done
        return time.perf_counter() - start

    async def stream(self, count: int, size: int) -> float:
        """Ask for ``count`` messages of ``size`` bytes; seconds until the last arrived."""
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._received = 0
        self._sink = (count, done)
        start = time.perf_counter()
        await self._write(_STREAM + struct.pack("<QQ", count, size))
        end = await done
        self._sink = None
        return end - start

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)


def start_floor_client(address: str, reply_size: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "client", address, str(reply_size)])


# -- the floor: client side (the other process) -------------------------------------------------


async def _client(address: str, reply_size: int) -> None:
    async with grpc.aio.insecure_channel(address, _OPTIONS) as channel:
        call: Any = channel.stream_stream(METHOD)()
        await call.write(b"hello")
        pad = b"\0" * max(0, reply_size - 9)
        while (data := await call.read()) is not grpc.aio.EOF:
            if data[:1] == _PING:
                await call.write(data[:9] + pad)
            else:
                count, size = struct.unpack_from("<QQ", data, 1)
                item = b"D" + b"\0" * max(0, size - 1)
                for _ in range(count):
                    await call.write(item)


# -- the worker under test ----------------------------------------------------------------------


def write_endpoint(root: Path, module: str, source: str) -> tuple[Path, Path]:
    """A project with one module; returns (project folder, endpoint.lock path)."""
    from gen_worker.discovery import discover, encode_lock  # noqa: PLC0415  # not for the client

    project = root / "project"
    project.mkdir()
    (project / "endpoint.toml").write_text(
        f'schema_version = 1\nname = "bench"\nmain = "{module}"\n'
    )
    (project / f"{module}.py").write_text(source)
    lock = root / "endpoint.lock"
    lock.write_bytes(encode_lock(discover(project, isolated=False).lock))
    return project, lock


def worker_env(
    root: Path, project: Path, lock: Path, address: str, worker_id: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "GEN_WORKER_"))}
    env.update(
        GEN_WORKER_MANIFEST_PATH=str(lock),
        GEN_WORKER_ENDPOINT_ROOT=str(project),
        GEN_WORKER_LOG_LEVEL="warning",
        PUBLIC_ORCHESTRATOR_GRPC_ADDR=address,
        WORKER_JWT="bench-token",
        WORKER_ID=worker_id,
        TENSORHUB_CACHE_DIR=str(root / "cache"),
        WORKER_LOCAL_MODEL_CACHE_DIR=str(root / "models"),
        RECONNECT_DELAY="0.02",
        RECONNECT_MAX_DELAY="0.2",
        RECONNECT_JITTER_SECONDS="0.02",
        WORKER_MAX_CONCURRENCY="16",
    )
    return env


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gen_worker.entrypoint"], env=env)


async def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int | None:
    """SIGTERM, then wait without blocking the loop (the worker drains through it)."""
    if proc.poll() is None:
        proc.terminate()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return proc.returncode


# -- numbers --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """Requests timed over a fixed window: latencies (s, sorted) and the window length.

    ``cpu_here`` and ``cpu_there`` are CPU seconds per trip (warm-up included) of this process
    and of the other one (the worker or the floor client).
    """

    latencies: list[float]
    seconds: float
    cpu_here: float = float("nan")
    cpu_there: float = float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return self.latencies[min(len(self.latencies) - 1, int(q * len(self.latencies)))] * 1000


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_note() -> str:
    return (
        f"note: this machine has {os.cpu_count()} cores shared by the benchmark process (mock "
        "scheduler or floor server) and the worker (or floor client); absolute numbers are "
        "low, the ratios are what matter."
    )


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:
    with contextlib.suppress(grpc.aio.AioRpcError):  # the server stopped: the benchmark is over
        asyncio.run(_client(sys.argv[2], int(sys.argv[3])))
