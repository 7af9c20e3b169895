"""Round trip of a no-op async function through the mock scheduler and a worker process.

The worker (``python -m gen_worker.entrypoint``, its own process) serves ``anoop``; the
benchmark process runs the MockScheduler, submits job requests and waits for each terminal
outcome, at concurrency 1 and 16. The floor is a raw grpc.aio stream between the same two
kinds of process, in the same direction, with the same message sizes (the JobRequest's size
out, the JobResult's size back; see ``_grpc_floor.py``). Targets: p50 latency at c=1 within
1.5x of the floor; req/s at c=16 at least 0.5x of the floor. Rows alternate floor and worker so
machine noise hits both alike. Run: `uv run python benchmarks/worker_roundtrip.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from _grpc_floor import (
    FloorServer,
    Window,
    machine_note,
    median,
    process_cpu_s,
    start_floor_client,
    start_worker,
    stop_process,
    worker_env,
    write_endpoint,
)

from gen_worker.protocol.convert import scheduler_to_pb, worker_to_pb
from gen_worker.testing.scheduler import MockScheduler

LATENCY_TARGET = 1.5  # worker p50 / floor p50 at c=1, at most
THROUGHPUT_TARGET = 0.5  # worker req/s / floor req/s at c=16, at least

FUNCTIONS = '''\
"""A no-op for benchmarks/worker_roundtrip.py."""

import msgspec

from gen_worker import RequestContext, worker_function


class In(msgspec.Struct):
    x: int = 0


class Out(msgspec.Struct):
    x: int


@worker_function()
async def anoop(ctx: RequestContext, payload: In) -> Out:
    return Out(x=payload.x)
'''

PAYLOAD = msgspec.msgpack.encode({"x": 7})

OneTrip = Callable[[], Awaitable[float]]


async def drive(one: OneTrip, concurrency: int, args: argparse.Namespace, other_pid: int) -> Window:
    """``concurrency`` loops of ``one()``; trips that start inside the window are counted."""
    start = time.perf_counter() + args.warmup
    end = start + args.seconds
    latencies: list[float] = []
    trips = 0

    async def loop() -> None:
        nonlocal trips
        while (t0 := time.perf_counter()) < end:
            latency = await one()
            trips += 1
            if t0 >= start:
                latencies.append(latency)

    here, there = time.process_time(), process_cpu_s(other_pid)
    await asyncio.wait_for(asyncio.gather(*(loop() for _ in range(concurrency))), end + 30)
    here, there = time.process_time() - here, process_cpu_s(other_pid) - there
    latencies.sort()
    return Window(latencies, args.seconds, here / trips, there / trips)


def worker_trip(scheduler: MockScheduler) -> OneTrip:
    async def one() -> float:
        t0 = time.perf_counter()
        record = await scheduler.submit("anoop", PAYLOAD)
        await record.done.wait()
        return time.perf_counter() - t0

    return one


def floor_trip(floor: FloorServer, request_size: int) -> OneTrip:
    async def one() -> float:
        return await floor.ping(request_size)

    return one


async def run(args: argparse.Namespace, root: Path) -> None:
    project, lock = write_endpoint(root, "bench_anoop", FUNCTIONS)
    scheduler = MockScheduler()
    address = await scheduler.start()
    worker = start_worker(worker_env(root, project, lock, address, "bench-roundtrip"))
    floor = FloorServer()
    client: subprocess.Popen[bytes] | None = None
    try:
        await scheduler.wait_for_worker(timeout_s=60)
        sample = await scheduler.submit("anoop", PAYLOAD)
        await sample.wait(30)
        assert sample.terminal is not None
        request_size = len(scheduler_to_pb(sample.job))
        reply_size = len(worker_to_pb(sample.terminal))
        per_request = len(sample.outcomes)
        print(
            f"message sizes: job request {request_size} B, job result {reply_size} B; the worker "
            f"sends {per_request} messages per request (events and the result), the floor 1\n",
            flush=True,
        )
        await floor.start()
        client = start_floor_client(floor.address, reply_size)
        await floor.wait_client()
        floor_pid = client.pid
        rows: dict[tuple[int, str], list[Window]] = {}
        for _ in range(args.rounds):
            for c in args.concurrency:
                for name, one, pid in (
                    ("raw grpc.aio floor", floor_trip(floor, request_size), floor_pid),
                    ("worker anoop", worker_trip(scheduler), worker.pid),
                ):
                    window = await drive(one, c, args, pid)
                    rows.setdefault((c, name), []).append(window)
        print_table(rows)
    finally:
        code = await stop_process(worker)
        if client is not None:
            await floor.stop()
            await stop_process(client)
        await scheduler.close()
    if code != 0:
        print(f"(the worker exited with {code} after SIGTERM)")


def print_table(rows: dict[tuple[int, str], list[Window]]) -> None:
    header = (
        f"{'conc':>4}  {'target':<20}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'cpu us/req':>12}{'':>8}{'vs floor':>10}"
    )
    print(header + "  verdict")
    print(f"{'':<34}{'':>18}{'sched':>6}{'worker':>8}")
    print("-" * (len(header) + 40))
    floors: dict[int, tuple[float, float]] = {}
    for (c, name), windows in rows.items():
        rps = median([w.rps for w in windows])
        p50 = median([w.ms(0.50) for w in windows])
        p99 = median([w.ms(0.99) for w in windows])
        here = median([w.cpu_here for w in windows]) * 1e6
        there = median([w.cpu_there for w in windows]) * 1e6
        cells = f"{c:>4}  {name:<20}{rps:>9.0f}{p50:>9.3f}{p99:>9.3f}{here:>10.0f}{there:>8.0f}"
        if name.startswith("raw"):
            floors[c] = (rps, p50)
            print(f"{cells}{'':>12}  floor")
            continue
        floor_rps, floor_p50 = floors[c]
        if c == 1:
            ratio = p50 / floor_p50
            verdict = "PASS" if ratio <= LATENCY_TARGET else "BELOW TARGET"
            what = f"p50 {ratio:.2f}x (target <= {LATENCY_TARGET}x)"
        else:
            ratio = rps / floor_rps
            verdict = "PASS" if ratio >= THROUGHPUT_TARGET else "BELOW TARGET"
            what = f"req/s {ratio:.2f}x (target >= {THROUGHPUT_TARGET}x)"
        print(f"{cells}{ratio:>11.2f}x  {verdict}: {what}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per row")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured time per row")
    parser.add_argument("--rounds", type=int, default=3, help="repeat; report the median")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(
        f"worker round trip vs raw grpc.aio: {args.seconds:g} s per row after {args.warmup:g} s "
        f"warm-up, median of {args.rounds} round(s); targets: c=1 p50 <= {LATENCY_TARGET}x "
        f"floor, c=16 req/s >= {THROUGHPUT_TARGET}x floor"
    )
    print(machine_note() + "\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="gen-worker-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
