"""Model pull: a 1 GiB snapshot from the local hub into an empty store, against ``curl -o``.

Setup: four files of random bytes (600 + 300 + 100 + 24 MiB; the largest above the 256 MiB
part threshold, so it travels as parts and is reassembled) are published into a local hub,
served by ``gen-worker hub serve`` in its own process on loopback.

* curl: one ``curl -s -o`` process fetching every blob URL of the resolved manifest in turn.
* ours: ``SnapshotFetcher.fetch`` into an empty store: downloads (parallel blobs; byte ranges,
  in parallel where the network rather than the CPU limits a stream), blake3 verification of
  every blob, part reassembly with its whole-file check, and the snapshot's atomic
  appearance. Target: at least 0.8x curl's throughput.
* kill at 50%: ``gen-worker models pull`` in a subprocess is SIGKILLed once half the bytes are
  on disk, then run again; the bytes the second run transfers are reported (target: at most
  55% of the total).

Rounds alternate curl and ours so machine noise hits both alike; medians are reported, with
the CPU seconds each side used (curl's process, our process, and the hub's while serving each):
on a small shared machine the side that needs less CPU is the faster one.
Run: `uv run python benchmarks/model_pull.py [--rounds 3] [--mib 1024]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from gen_worker.hub.publish import publish
from gen_worker.models.fetch import SnapshotFetcher
from gen_worker.models.hub_client import HubClient
from gen_worker.models.manifest import SnapshotManifest
from gen_worker.models.store import Store

REF = "bench/random:latest"
PART_BYTES = 256 << 20
TARGET_RATIO = 0.8
TARGET_RESUME = 0.55


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_source(directory: Path, total_mib: int) -> int:
    """Random files summing to ``total_mib`` MiB: 58.6%, 29.3%, 9.8% and the rest."""
    sizes = [total_mib * 600 // 1024, total_mib * 300 // 1024, total_mib * 100 // 1024]
    sizes.append(total_mib - sum(sizes))
    directory.mkdir(parents=True)
    for index, mib in enumerate(sizes):
        with (directory / f"weights-{index}.bin").open("wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    return total_mib << 20


def _start_hub(root: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "gen_worker.hub.cli", "serve", "--root", str(root)]
    proc = subprocess.Popen(
        [*cmd, "--listen", f"127.0.0.1:{port}", "--url-ttl", "3600"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the hub did not start")


class _Run(NamedTuple):
    seconds: float
    cpu_s: float  # the puller's CPU time (curl's process, or ours)
    hub_cpu_s: float  # the hub's CPU time meanwhile


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _hub_cpu_s(hub: subprocess.Popen[bytes]) -> float:
    """The hub process's CPU seconds so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{hub.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _curl(manifest: SnapshotManifest, into: Path, hub: subprocess.Popen[bytes]) -> _Run:
    into.mkdir(parents=True)
    args = ["curl", "-s", "--fail"]
    for index, entry in enumerate(manifest.entries):
        args += ["-o", str(into / str(index)), entry.url]
    cpu, hub_cpu, started = _cpu_s(resource.RUSAGE_CHILDREN), _hub_cpu_s(hub), time.perf_counter()
    subprocess.run(args, check=True)
    elapsed = time.perf_counter() - started
    run = _Run(elapsed, _cpu_s(resource.RUSAGE_CHILDREN) - cpu, _hub_cpu_s(hub) - hub_cpu)
    shutil.rmtree(into)
    return run


def _ours(manifest: SnapshotManifest, cache: Path, hub: subprocess.Popen[bytes]) -> _Run:
    async def pull() -> None:
        fetcher = SnapshotFetcher(Store(cache / "cas"))
        try:
            await fetcher.fetch(manifest, ref=REF)
        finally:
            await fetcher.aclose()

    cpu, hub_cpu, started = _cpu_s(resource.RUSAGE_SELF), _hub_cpu_s(hub), time.perf_counter()
    asyncio.run(pull())
    elapsed = time.perf_counter() - started
    run = _Run(elapsed, _cpu_s(resource.RUSAGE_SELF) - cpu, _hub_cpu_s(hub) - hub_cpu)
    shutil.rmtree(cache)
    return run


def _on_disk(root: Path) -> int:
    """Bytes allocated under ``root`` (blocks, so sparse range files count what was written)."""
    total = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_blocks * 512
    return total


def _killed_and_resumed(hub_url: str, cache: Path, total: int) -> tuple[int, int]:
    """(bytes on disk when killed, bytes the resumed pull transferred)."""
    env = {**os.environ, "TENSORHUB_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "gen_worker.models.cli", "pull", REF, "--hub", hub_url]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    on_disk = 0
    while proc.poll() is None:
        on_disk = _on_disk(cache) if cache.exists() else 0
        if on_disk >= total // 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    match = re.search(r"\((\d+) bytes\)", done.stderr)
    return on_disk, int(match.group(1)) if match else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=1024, help="snapshot size in MiB")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("benchmarks/model_pull.py needs curl on PATH: curl -o is its floor")
    with tempfile.TemporaryDirectory(prefix="gw-pull-bench-") as tmp:
        work = Path(tmp)
        total = _make_source(work / "src", args.mib)
        publish(work / "hub", REF, work / "src", part_size_bytes=PART_BYTES)
        port = _free_port()
        hub_proc = _start_hub(work / "hub", port)
        hub_url = f"http://127.0.0.1:{port}"
        try:
            manifest = asyncio.run(_resolve(hub_url))
            curl_runs, ours_runs = [], []
            for round_ in range(args.rounds):
                curl_runs.append(_curl(manifest, work / f"curl-{round_}", hub_proc))
                ours_runs.append(_ours(manifest, work / f"ours-{round_}", hub_proc))
            killed_at, resent = _killed_and_resumed(hub_url, work / "killed", total)
        finally:
            hub_proc.send_signal(signal.SIGTERM)
            hub_proc.wait(timeout=15)
    print(f"snapshot: {total} bytes in {len(manifest.entries)} blobs; {args.rounds} rounds")
    for round_, (curl, ours) in enumerate(zip(curl_runs, ours_runs, strict=True), 1):
        print(
            f"round {round_}: curl {curl.seconds:.2f} s ({curl.cpu_s:.2f} CPU-s),"
            f" ours {ours.seconds:.2f} s ({ours.cpu_s:.2f} CPU-s)"
        )
    rates = []
    for name, runs in (("curl -o", curl_runs), ("ours   ", ours_runs)):
        seconds = statistics.median(r.seconds for r in runs)
        rates.append(total / seconds / 1e6)
        cpu = statistics.median(r.cpu_s for r in runs)
        hub_cpu = statistics.median(r.hub_cpu_s for r in runs)
        print(
            f"{name} : median {seconds:.2f} s  {rates[-1]:8.1f} MB/s"
            f"  (CPU: {cpu:.2f} s puller, {hub_cpu:.2f} s hub)"
        )
    ratio = rates[1] / rates[0]
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(f"ratio ours/curl: {ratio:.2f}x (target >= {TARGET_RATIO}x: {verdict})")
    share = resent / total
    verdict = "met" if share <= TARGET_RESUME else "MISSED"
    print(
        f"killed at {killed_at / total:.0%} on disk; the resumed pull transferred {resent} bytes"
        f" = {share:.1%} of the total (target <= {TARGET_RESUME:.0%}: {verdict})"
    )
    print(f"note: {os.cpu_count()} cores shared by the hub, curl and the puller")


async def _resolve(hub_url: str) -> SnapshotManifest:
    client = HubClient(hub_url)
    try:
        return await client.resolve(REF)
    finally:
        await client.aclose()


if __name__ == "__main__":
    main()
