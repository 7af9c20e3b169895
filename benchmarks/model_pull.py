"""Model pull: a 1 GiB snapshot from the local hub into an empty store, against ``curl -o``.

Setup: four files of random bytes (600 + 300 + 100 + 24 MiB; the largest above the 256 MiB
part threshold, so it travels as parts and is reassembled) are published into a local hub,
served by ``gen-worker hub serve`` in its own process on loopback.

* curl: one ``curl -s -o`` process fetching every blob URL of the resolved manifest in turn.
* ours: ``SnapshotFetcher.fetch`` into an empty store: downloads (parallel blobs and ranges),
  blake3 verification of every blob, part reassembly with its whole-file check, and the
  snapshot's atomic appearance. Target: at least 0.8x curl's throughput.
* kill at 50%: ``gen-worker models pull`` in a subprocess is SIGKILLed once half the bytes are
  on disk, then run again; the bytes the second run transfers are reported (target: at most
  55% of the total).

Rounds alternate curl and ours so machine noise hits both alike; medians are reported.
Run: `uv run python benchmarks/model_pull.py [--rounds 3] [--mib 1024]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def _curl(manifest: SnapshotManifest, into: Path) -> float:
    into.mkdir(parents=True)
    args = ["curl", "-s", "--fail"]
    for index, entry in enumerate(manifest.entries):
        args += ["-o", str(into / str(index)), entry.url]
    started = time.perf_counter()
    subprocess.run(args, check=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(into)
    return elapsed


def _ours(manifest: SnapshotManifest, cache: Path) -> float:
    async def pull() -> None:
        fetcher = SnapshotFetcher(Store(cache / "cas"))
        try:
            await fetcher.fetch(manifest, ref=REF)
        finally:
            await fetcher.aclose()

    started = time.perf_counter()
    asyncio.run(pull())
    elapsed = time.perf_counter() - started
    shutil.rmtree(cache)
    return elapsed


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
    with tempfile.TemporaryDirectory(prefix="gw-pull-bench-") as tmp:
        work = Path(tmp)
        total = _make_source(work / "src", args.mib)
        publish(work / "hub", REF, work / "src", part_size_bytes=PART_BYTES)
        port = _free_port()
        hub_proc = _start_hub(work / "hub", port)
        hub_url = f"http://127.0.0.1:{port}"
        try:
            manifest = asyncio.run(_resolve(hub_url))
            curl_s, ours_s = [], []
            for round_ in range(args.rounds):
                curl_s.append(_curl(manifest, work / f"curl-{round_}"))
                ours_s.append(_ours(manifest, work / f"ours-{round_}"))
            killed_at, resent = _killed_and_resumed(hub_url, work / "killed", total)
        finally:
            hub_proc.send_signal(signal.SIGTERM)
            hub_proc.wait(timeout=15)
    curl_rate = total / statistics.median(curl_s) / 1e6
    ours_rate = total / statistics.median(ours_s) / 1e6
    ratio = ours_rate / curl_rate
    print(f"snapshot: {total} bytes in {len(manifest.entries)} blobs; {args.rounds} rounds")
    print(f"curl -o : median {statistics.median(curl_s):.2f} s  {curl_rate:8.1f} MB/s")
    print(f"ours    : median {statistics.median(ours_s):.2f} s  {ours_rate:8.1f} MB/s")
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
