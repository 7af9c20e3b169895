"""Cold start: from starting ``python -m gen_worker.entrypoint`` to its registration arriving.

Measured at the mock scheduler: the time from ``Popen`` to the worker's registration message
reaching the scheduler in this process. The baseline is ``python -c "import grpc, msgspec"``
run to completion, the least any gRPC worker in Python pays. Target: the worker is less than
0.5 s slower than the baseline (medians; runs interleaved so machine noise hits both alike).
The worker's own startup log gives the split: interpreter and imports (Popen to the ``boot``
phase), endpoint import and identity (to ``scheduler_connecting``), dial and register (to the
registration's arrival). Run: `uv run python benchmarks/worker_cold_start.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _grpc_floor import machine_note, median, stop_process, worker_env, write_endpoint

from gen_worker.protocol import messages as m
from gen_worker.testing.scheduler import MockScheduler

TARGET_S = 0.5  # worker median - baseline median, less than

FUNCTIONS = '''\
"""One function for benchmarks/worker_cold_start.py."""

import msgspec

from gen_worker import RequestContext, worker_function


class In(msgspec.Struct):
    x: int = 0


@worker_function()
async def anoop(ctx: RequestContext, payload: In) -> In:
    return payload
'''


@dataclass(frozen=True, slots=True)
class Start:
    total: float  # Popen to the registration's arrival
    boot: float  # Popen to the "boot" phase: interpreter and imports
    connecting: float  # "boot" to "scheduler_connecting": settings, endpoint import, identity

    @property
    def register(self) -> float:
        return self.total - self.boot - self.connecting


def baseline() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import grpc, msgspec"], check=True)
    return time.perf_counter() - start


def phases(stderr: bytes) -> dict[str, float]:
    """Wall-clock time of each ``worker.startup.phase`` in the worker's JSON log."""
    found = {}
    for line in stderr.splitlines():
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "worker.startup.phase":
            found.setdefault(record["phase"], float(record["ts"]))
    return found


async def worker_start(
    scheduler: MockScheduler, arrivals: dict[str, float], env: dict[str, str]
) -> Start:
    worker_id = env["WORKER_ID"]
    wall = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gen_worker.entrypoint"], env=env, stderr=subprocess.PIPE
    )
    try:
        await scheduler.wait_for_worker(timeout_s=60, worker_id=worker_id)
    finally:
        await stop_process(proc)
    assert proc.stderr is not None
    seen = phases(proc.stderr.read())
    total = arrivals[worker_id] - start
    boot = seen.get("boot", float("nan")) - wall
    connecting = seen.get("scheduler_connecting", float("nan")) - wall - boot
    return Start(total, boot, connecting)


async def run(args: argparse.Namespace, root: Path) -> tuple[list[float], list[Start]]:
    project, lock = write_endpoint(root, "bench_cold", FUNCTIONS)
    arrivals: dict[str, float] = {}

    def listener(worker_id: str, message: Any) -> None:
        if isinstance(message, m.WorkerRegistration):
            arrivals.setdefault(worker_id, time.perf_counter())

    scheduler = MockScheduler(listener=listener)
    address = await scheduler.start()
    bases, starts = [], []
    try:
        env = worker_env(root, project, lock, address, "cold-warmup")
        await worker_start(scheduler, arrivals, env)  # warm the file cache and bytecode
        baseline()
        for i in range(args.runs):
            bases.append(baseline())
            env = worker_env(root, project, lock, address, f"cold-{i}")
            env["GEN_WORKER_LOG_LEVEL"] = "info"  # the startup phases are info lines
            starts.append(await worker_start(scheduler, arrivals, env))
    finally:
        await scheduler.close()
    return bases, starts


def report(bases: list[float], starts: list[Start], runs: int) -> None:
    base = median(bases)
    total = median([s.total for s in starts])
    extra = total - base
    print(f"{'':<44}{'median':>9}{'min':>9}{'max':>9}")
    print("-" * 71)
    rows = [
        ("python -c 'import grpc, msgspec' (baseline)", bases),
        ("worker: Popen -> registration at the mock", [s.total for s in starts]),
        ("  interpreter + imports (-> boot)", [s.boot for s in starts]),
        ("  settings, endpoint, identity (-> connect)", [s.connecting for s in starts]),
        ("  dial + register (-> arrival)", [s.register for s in starts]),
    ]
    for name, values in rows:
        print(
            f"{name:<44}{median(values) * 1000:>7.0f}ms{min(values) * 1000:>7.0f}ms"
            f"{max(values) * 1000:>7.0f}ms"
        )
    verdict = "PASS" if extra < TARGET_S else "BELOW TARGET"
    print(
        f"\nworker - baseline: {extra * 1000:.0f} ms (ratio {total / base:.2f}x) over {runs} runs; "
        f"target < {TARGET_S * 1000:.0f} ms: {verdict}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=9)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(
        f"worker cold start vs python -c 'import grpc, msgspec': median of {args.runs} runs; "
        f"target: less than {TARGET_S * 1000:.0f} ms slower than the baseline"
    )
    print(machine_note() + "\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="gen-worker-bench-") as tmp:
        bases, starts = asyncio.run(run(args, Path(tmp)))
    report(bases, starts, args.runs)


if __name__ == "__main__":
    main()
