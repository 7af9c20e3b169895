"""Deltas per second end to end: a function yields 100,000 small deltas through a worker.

The worker (``python -m gen_worker.entrypoint``, its own process) runs an async generator that
yields ``{"i": n}`` for n in 0..99,999; the benchmark process runs the MockScheduler, submits
the request and times it from the submit to the StreamDone, checking that every delta
arrived. Target: at least 20,000 deltas/s. For reference, the floor: a raw grpc.aio client
process streaming the same number of messages of the same size to a raw server in this
process (see ``_grpc_floor.py``). Run: `uv run python benchmarks/worker_streaming.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from _grpc_floor import (
    FloorServer,
    machine_note,
    median,
    process_cpu_s,
    start_floor_client,
    start_worker,
    stop_process,
    worker_env,
    write_endpoint,
)

from gen_worker.protocol import messages as m
from gen_worker.protocol.convert import worker_to_pb
from gen_worker.testing.scheduler import MockScheduler

TARGET = 20_000  # deltas per second, at least

FUNCTIONS = '''\
"""A generator of many small deltas for benchmarks/worker_streaming.py."""

from collections.abc import AsyncIterator

import msgspec

from gen_worker import RequestContext, worker_function


class Many(msgspec.Struct):
    n: int = 0


class Item(msgspec.Struct):
    i: int


@worker_function()
async def many(ctx: RequestContext, payload: Many) -> AsyncIterator[Item]:
    for i in range(payload.n):
        yield Item(i=i)
'''


@dataclass(frozen=True, slots=True)
class Run:
    messages: int
    seconds: float
    cpu_here: float  # CPU seconds per message, this process
    cpu_there: float  # CPU seconds per message, the worker or the floor client

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def worker_run(scheduler: MockScheduler, count: int, pid: int) -> Run:
    here, there = time.process_time(), process_cpu_s(pid)
    start = time.perf_counter()
    record = await scheduler.submit("many", msgspec.msgpack.encode({"n": count}))
    terminal = await record.wait(600)
    seconds = time.perf_counter() - start
    here, there = time.process_time() - here, process_cpu_s(pid) - there
    deltas = sum(isinstance(o, m.JobDelta) for o in record.outcomes.values())
    if not isinstance(terminal, m.StreamDone) or deltas != count:
        raise SystemExit(f"the stream ended with {terminal!r} after {deltas} of {count} deltas")
    return Run(count, seconds, here / count, there / count)


async def floor_run(floor: FloorServer, count: int, size: int, pid: int) -> Run:
    here, there = time.process_time(), process_cpu_s(pid)
    seconds = await floor.stream(count, size)
    here, there = time.process_time() - here, process_cpu_s(pid) - there
    return Run(count, seconds, here / count, there / count)


async def run(args: argparse.Namespace, root: Path) -> None:
    project, lock = write_endpoint(root, "bench_many", FUNCTIONS)
    scheduler = MockScheduler()
    address = await scheduler.start()
    worker = start_worker(worker_env(root, project, lock, address, "bench-streaming"))
    floor = FloorServer()
    client: subprocess.Popen[bytes] | None = None
    try:
        await scheduler.wait_for_worker(timeout_s=60)
        sample = await scheduler.submit("many", msgspec.msgpack.encode({"n": 1000}))
        await sample.wait(60)
        last_delta = [o for o in sample.ordered() if isinstance(o, m.JobDelta)][-1]
        size = len(
            worker_to_pb(msgspec.structs.replace(last_delta, data=b"\x81\xa1i\xce\0\1\x86\x9f"))
        )
        print(f"one delta on the wire: {size} B (a JobDelta of {{'i': 99999}})\n", flush=True)
        await floor.start()
        client = start_floor_client(floor.address, 0)
        await floor.wait_client()
        floors, workers = [], []
        for _ in range(args.rounds):  # alternating, so machine noise hits both alike
            floors.append(await floor_run(floor, args.count, size, client.pid))
            workers.append(await worker_run(scheduler, args.count, worker.pid))
        print_table(floors, workers)
    finally:
        await stop_process(worker)
        if client is not None:
            await floor.stop()
            await stop_process(client)
        await scheduler.close()


def print_table(floors: list[Run], workers: list[Run]) -> None:
    header = f"{'target':<24}{'msgs/s':>10}{'seconds':>9}{'cpu us/msg':>12}{'':>8}{'vs floor':>10}"
    print(header + "  verdict")
    print(f"{'':<43}{'sched':>8}{'worker':>8}")
    print("-" * (len(header) + 30))
    floor_rate = median([r.rate for r in floors])
    for name, runs in (("raw grpc.aio floor", floors), ("worker deltas", workers)):
        rate = median([r.rate for r in runs])
        seconds = median([r.seconds for r in runs])
        here = median([r.cpu_here for r in runs]) * 1e6
        there = median([r.cpu_there for r in runs]) * 1e6
        cells = f"{name:<24}{rate:>10.0f}{seconds:>9.2f}{here:>10.1f}{there:>8.1f}"
        if runs is floors:
            print(f"{cells}{'':>10}  floor (reference)")
        else:
            verdict = "PASS" if rate >= TARGET else "BELOW TARGET"
            print(
                f"{cells}{rate / floor_rate:>9.2f}x  {verdict}: {rate:.0f}/s (target >= {TARGET}/s)"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000, help="deltas per stream")
    parser.add_argument("--rounds", type=int, default=3, help="repeat; report the median")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(
        f"worker streaming vs raw grpc.aio: {args.count} deltas per stream, median of "
        f"{args.rounds} round(s); target >= {TARGET} deltas/s end to end"
    )
    print(machine_note() + "\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="gen-worker-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
