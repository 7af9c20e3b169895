"""Throughput and latency of a no-op function through the dev runner, against the floor.

The floor is a bare Starlette app on uvicorn (same settings: log level warning, no access log,
lifespan on, one process) whose route reads the body, decodes it with msgspec and answers
the same JSON as the runner (its nine lifecycle events and timings included, so both write the
same bytes). The runner serves a sync (``noop``) and an async (``anoop``) no-op; the
ratio runner/bare of requests per second is what gen-worker costs per request. The async
no-op is compared with the bare route that calls the function on the loop; the sync no-op with
a second bare route that runs the same function the way this stack runs sync code, in a worker
thread (``starlette.concurrency.run_in_threadpool``), since a sync function must never block
the loop: the thread hand-off is then in both. Rows alternate so machine noise hits all alike.

The bare app runs every request at once; the runner runs at most ``WORKER_MAX_CONCURRENCY``
(default 1, the endpoint's own limit), so it is started with ``--limit`` (default 16, the
highest concurrency measured) to compare the cost per request rather than the queueing a limit
of 1 imposes at c=16 by design (``--limit 1`` shows that). For the async no-op the limit makes
no difference (it never waits while it holds its slot); a sync no-op holds its slot across the
thread hand-off, so at limit 1 its calls run one at a time.
Run: `uv run python benchmarks/dev_runner.py [--limit 16]`.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _load import LoadResult, run_load

TARGET = 0.85
BODY = b'{"x": 7}'

ENDPOINT_TOML = 'schema_version = 1\nname = "bench"\nmain = "bench_noop"\n'

BENCH_NOOP = '''\
"""No-op functions for benchmarks/dev_runner.py."""

import msgspec

from gen_worker import RequestContext, worker_function


class In(msgspec.Struct):
    x: int = 0


class Out(msgspec.Struct):
    x: int


@worker_function()
def noop(ctx: RequestContext, payload: In) -> Out:
    return Out(x=payload.x)


@worker_function()
async def anoop(ctx: RequestContext, payload: In) -> Out:
    return Out(x=payload.x)
'''

BARE_APP = '''\
"""The floor: Starlette on uvicorn, one route, msgspec in and out."""

import asyncio
import socket
import uuid

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.routing import Route


class In(msgspec.Struct):
    x: int = 0


class Out(msgspec.Struct):
    x: int


class Answer(msgspec.Struct):
    request_id: str
    success: bool
    output: Out
    error_type: str | None = None
    safe_message: str | None = None
    error_message: str | None = None
    events: list = []
    timing_ms: dict = {}


decoder = msgspec.json.Decoder(In)

# The runner's answer carries the request's lifecycle events and timings: the floor answers
# the same JSON, so both write the same bytes.
EVENTS = [
    {"seq": 0, "type": "request.received", "payload": {"function_name": "noop"}},
    {"seq": 1, "type": "request.started", "payload": {"function_name": "noop"}},
    {"seq": 2, "type": "metrics.compute.started", "payload": {"at": "2026-01-01T00:00:00.000Z"}},
    {"seq": 3, "type": "request.inference.started"},
    {"seq": 4, "type": "request.inference.completed", "payload": {"ms": 0.026}},
    {"seq": 5, "type": "metrics.inference", "payload": {"ms": 0.026}},
    {"seq": 6, "type": "metrics.job", "payload": {"schema_version": 1, "function_name": "noop",
     "models": {}, "queue_ms": 0.002, "inference_ms": 0.026}},
    {"seq": 7, "type": "metrics.compute.completed", "payload": {"at": "2026-01-01T00:00:00.000Z"}},
    {"seq": 8, "type": "request.completed", "payload": {"function_name": "noop"}},
]
TIMING = {"queue_ms": 0.0024649998522363603, "inference_ms": 0.026440000510774553,
          "total_ms": 0.16324600073858164}


def call(payload):
    return Out(x=payload.x)


async def noop(request):
    payload = decoder.decode(await request.body())
    answer = Answer(uuid.uuid4().hex, True, call(payload), events=EVENTS, timing_ms=TIMING)
    return Response(msgspec.json.encode(answer), media_type="application/json")


async def noop_thread(request):
    # The stack's own way to run a sync function: a worker thread (anyio), and back.
    payload = decoder.decode(await request.body())
    output = await run_in_threadpool(call, payload)
    answer = Answer(uuid.uuid4().hex, True, output, events=EVENTS, timing_ms=TIMING)
    return Response(msgspec.json.encode(answer), media_type="application/json")


async def serve():
    app = Starlette(
        routes=[
            Route("/v1/request/noop", noop, methods=["POST"]),
            Route("/v1/request/noop_thread", noop_thread, methods=["POST"]),
        ]
    )
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it every answer (head and body written apart) waits on delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await task


asyncio.run(serve())
'''


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    server: str  # key into the running servers
    path: str
    floor: str = ""  # the name of the floor this target is compared with; "" for a floor


BARE = "bare starlette"
BARE_THREAD = "bare starlette, thread"
TARGETS = (
    Target(BARE, "bare", "/v1/request/noop"),
    Target(BARE_THREAD, "bare", "/v1/request/noop_thread"),
    Target("runner noop (sync)", "runner", "/v1/request/noop", BARE_THREAD),
    Target("runner anoop (async)", "runner", "/v1/request/anoop", BARE),
)


# -- servers ----------------------------------------------------------------------------------


def write_files(root: Path) -> None:
    project = root / "project"
    project.mkdir()
    (project / "endpoint.toml").write_text(ENDPOINT_TOML)
    (project / "bench_noop.py").write_text(BENCH_NOOP)
    (root / "bare_app.py").write_text(BARE_APP)


def wait_for_url(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The URL from the server's ``listening on URL`` line."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        line = proc.stdout.readline() if ready else ""
        if line.startswith("listening on "):
            return line.removeprefix("listening on ").strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"server {proc.args!r} did not start (exit code {proc.poll()})")


def start(argv: list[str], limit: int) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WORKER_MAX_CONCURRENCY": str(limit)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    return proc, wait_for_url(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_commands(root: Path) -> dict[str, list[str]]:
    runner = [sys.executable, "-m", "gen_worker.testing.http_runner", "--listen", "127.0.0.1:0"]
    runner += ["--outputs", str(root / "outputs"), "--project", str(root / "project")]
    return {"bare": [sys.executable, str(root / "bare_app.py")], "runner": runner}


# -- measuring --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    concurrency: int
    target: Target
    rps: float
    p50: float
    p99: float
    errors: int
    cpu_us: float  # the server's CPU time per answered request (steadier than req/s here)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (NaN where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(urls: dict[str, str], pids: dict[str, int], args: argparse.Namespace) -> list[Row]:
    """Every (concurrency, target) ``args.rounds`` times, alternating targets; medians."""
    runs: dict[tuple[int, Target], list[tuple[LoadResult, float]]] = {}
    for _ in range(args.rounds):
        for c in args.concurrency:
            for target in TARGETS:
                before = cpu_seconds(pids[target.server])
                result = run_load(urls[target.server], target.path, BODY, concurrency=c,
                                  warmup=args.warmup, seconds=args.seconds)  # fmt: skip
                used = cpu_seconds(pids[target.server]) - before
                cpu_us = used / max(result.answered, 1) * 1e6
                runs.setdefault((c, target), []).append((result, cpu_us))
    return [summarize(c, target, results) for (c, target), results in runs.items()]


def summarize(c: int, target: Target, results: list[tuple[LoadResult, float]]) -> Row:
    return Row(
        c,
        target,
        statistics.median(r.rps for r, _ in results),
        statistics.median(r.ms(0.50) for r, _ in results),
        statistics.median(r.ms(0.99) for r, _ in results),
        sum(r.errors for r, _ in results),
        statistics.median(cpu for _, cpu in results),
    )


# -- report -----------------------------------------------------------------------------------


def print_intro(args: argparse.Namespace) -> None:
    print(
        f"dev runner vs bare Starlette/uvicorn: {args.seconds:g} s per row after {args.warmup:g} s "
        f"warm-up, median of {args.rounds} round(s); target runner/bare >= {TARGET:.2f}x; "
        f"runner started with WORKER_MAX_CONCURRENCY={args.limit}"
    )
    print(
        f"note: this machine has {os.cpu_count()} cores shared by the load generator and the "
        "server, so absolute numbers are low; the ratios are what matter.\n",
        flush=True,
    )


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'conc':>4}  {'target':<24}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs floor':>9}"
        f"{'CPU us/req':>12}{'bare/ours':>11}"
    )
    print(header + "  verdict (req/s)")
    print("-" * (len(header) + 18))
    floors = {(r.concurrency, r.target.name): r for r in rows if not r.target.floor}
    for r in rows:
        floor = floors[r.concurrency, r.target.floor or r.target.name]
        ratio = r.rps / floor.rps
        verdict = verdict_for(ratio, floor.target.name) if r.target.floor else "floor"
        errors = f"  ({r.errors} non-200 answers)" if r.errors else ""
        print(
            f"{r.concurrency:>4}  {r.target.name:<24}{r.rps:>9.0f}{r.p50:>9.2f}{r.p99:>9.2f}"
            f"{ratio:>8.2f}x{r.cpu_us:>12.0f}{floor.cpu_us / r.cpu_us:>10.2f}x  {verdict}{errors}"
        )
    print(
        "\nCPU us/req: the server process's CPU time per answered request; bare/ours is the "
        "throughput ratio the two would reach on a CPU of their own (the load generator shares "
        "these cores, and req/s swings with whatever else runs on them)."
    )


def verdict_for(ratio: float, floor: str) -> str:
    return f"{'PASS' if ratio >= TARGET else 'BELOW TARGET'} (vs {floor})"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per row")
    parser.add_argument("--rounds", type=int, default=1, help="repeat; report the median")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--limit", type=int, default=16, help="the runner's WORKER_MAX_CONCURRENCY")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print_intro(args)
    with tempfile.TemporaryDirectory(prefix="gen-worker-bench-") as tmp:
        root = Path(tmp)
        write_files(root)
        procs: dict[str, subprocess.Popen[str]] = {}
        urls: dict[str, str] = {}
        try:
            for key, argv in server_commands(root).items():
                procs[key], urls[key] = start(argv, args.limit)
            rows = measure(urls, {key: proc.pid for key, proc in procs.items()}, args)
        finally:
            for proc in procs.values():
                stop(proc)
    print_table(rows)


if __name__ == "__main__":
    main()
