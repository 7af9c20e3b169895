"""Single flight and crash resume: the same blob wanted by several coroutines, threads and
processes at once downloads once; a download killed halfway resumes from what it wrote."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
from servers.flaky_http import FlakyServer

from gen_worker.models.download import (
    BlobSource,
    DownloadPolicy,
    DownloadResult,
    download_blob,
    make_client,
)
from gen_worker.models.ranges import completed_ranges

SIZE = 2 << 20
NAME = "vae/diffusion_pytorch_model.safetensors"
POLICY = DownloadPolicy(
    backoff_base_s=0.01,
    jitter_s=0.0,
    read_timeout_s=10.0,
    chunk_bytes=64 << 10,
    parallel_min_bytes=1 << 40,
)
PARALLEL = DownloadPolicy(
    backoff_base_s=0.01,
    jitter_s=0.0,
    read_timeout_s=10.0,
    chunk_bytes=64 << 10,
    parallel_min_bytes=1 << 20,
    range_bytes=256 << 10,
    range_workers=2,
)

# A download in a child process: prints "ready" just before it starts, then its result.
CHILD = r"""
import asyncio, json, sys
from pathlib import Path
from gen_worker.models.download import BlobSource, DownloadPolicy, download_blob, make_client

url, size, digest, dest, parallel = sys.argv[1:]
policy = DownloadPolicy(
    backoff_base_s=0.01, jitter_s=0.0, chunk_bytes=64 << 10,
    parallel_min_bytes=(1 << 20) if parallel == "1" else (1 << 40),
    range_bytes=256 << 10, range_workers=2,
)

async def main():
    async with make_client(policy) as client:
        print("ready", flush=True)
        source = BlobSource("vae/diffusion_pytorch_model.safetensors", url, int(size), digest)
        r = await download_blob(client, source, Path(dest), policy=policy)
    print(json.dumps([str(r.path), r.size_bytes, r.blake3, r.bytes_transferred]), flush=True)

asyncio.run(main())
"""


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with FlakyServer() as s:
        yield s


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def child(url: str, data: bytes, dest: Path, *, parallel: bool = False) -> subprocess.Popen[str]:
    args = [url, str(len(data)), b3(data), str(dest), "1" if parallel else "0"]
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def part_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_coroutines_of_one_loop_share_one_download(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("hold")
    dest = tmp_path / "blob"
    deltas: list[list[int]] = [[] for _ in range(5)]

    async def go() -> list[DownloadResult]:
        async with make_client(POLICY) as client:
            tasks = [
                asyncio.create_task(
                    download_blob(
                        client,
                        BlobSource(NAME, url, SIZE, b3(data)),
                        dest,
                        policy=POLICY,
                        on_progress=d.append,
                    )
                )
                for d in deltas
            ]
            while server.arrivals == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            server.release()
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    assert all(r is results[0] for r in results)  # one shared task, one result
    assert results[0].bytes_transferred == SIZE
    assert len(server.requests) == 1 and server.bytes_served() == SIZE
    assert [sum(d) for d in deltas] == [SIZE] * 5
    assert listing(tmp_path) == ["blob"]


def test_threads_and_processes_download_the_blob_once(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("hold")
    dest = tmp_path / "blob"
    processes = [child(url, data, dest) for _ in range(2)]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        results: list[DownloadResult | BaseException] = []

        def in_thread() -> None:
            async def one() -> DownloadResult:
                async with make_client(POLICY) as client:
                    source = BlobSource(NAME, url, SIZE, b3(data))
                    return await download_blob(client, source, dest, policy=POLICY)

            try:
                results.append(asyncio.run(one()))
            except BaseException as exc:  # reported by the assertions below
                results.append(exc)

        threads = [threading.Thread(target=in_thread) for _ in range(8)]
        for thread in threads:
            thread.start()
        wait_for(lambda: server.arrivals >= 1, "the first request")
        time.sleep(0.5)  # everyone else is now waiting on the lock
        assert server.arrivals == 1
        server.release()
        for thread in threads:
            thread.join(timeout=30)
        outputs = [json.loads(p.communicate(timeout=30)[0].strip()) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [p.returncode for p in processes] == [0, 0]
    assert all(isinstance(r, DownloadResult) for r in results), results
    thread_results = [r for r in results if isinstance(r, DownloadResult)]
    assert len(thread_results) == 8
    summaries = [[str(r.path), r.size_bytes, r.blake3, r.bytes_transferred] for r in thread_results]
    everyone = summaries + outputs
    assert {(s[0], s[1], s[2]) for s in everyone} == {(str(dest), SIZE, b3(data))}
    assert sorted(s[3] for s in everyone) == [0] * 9 + [SIZE]  # one transferred, nine found it
    assert [(r.range, r.status, r.sent) for r in server.requests] == [(None, 200, SIZE)]
    assert dest.read_bytes() == data
    assert listing(tmp_path) == ["blob"]


def test_a_killed_download_resumes_with_the_rest_only(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("trickle", after_bytes=SIZE // 2, delay_s=0.05, piece_bytes=1024)
    dest = tmp_path / "blob"
    part = tmp_path / "blob.part"
    process = child(url, data, dest)
    try:
        wait_for(lambda: part_size(part) >= SIZE // 2, "half of the blob on disk")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    kept = part_size(part)
    assert SIZE // 2 <= kept < SIZE and not dest.exists()
    assert part.read_bytes() == data[:kept]

    server.clear_faults()
    server.reset_requests()

    async def resume() -> DownloadResult:
        async with make_client(POLICY) as client:
            source = BlobSource(NAME, url, SIZE, b3(data))
            return await download_blob(client, source, dest, policy=POLICY)

    result = asyncio.run(resume())
    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={kept}-", 206)]
    assert server.bytes_served() == SIZE - kept <= 0.55 * SIZE
    assert (result.resumed_from, result.bytes_transferred) == (kept, SIZE - kept)
    assert result.blake3 == b3(data) and dest.read_bytes() == data
    assert listing(tmp_path) == ["blob"]  # the dead process's lock file is gone too


def test_a_killed_parallel_download_fetches_only_the_missing_ranges(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    step = 256 << 10
    stuck = 5 * step  # this range sends half, then stalls
    server.fault("trickle", after_bytes=step // 2, delay_s=5.0, range_start=stuck)
    dest = tmp_path / "blob"
    state = tmp_path / "blob.part.state"

    def stalled_head() -> int:
        """Bytes of the stalled range the sidecar records, when it records all the rest."""
        done = completed_ranges(state)
        if len(done) != 2 or done[0][0] != 0 or done[1] != (stuck + step, SIZE):
            return 0
        return done[0][1] - stuck

    process = child(url, data, dest, parallel=True)
    try:
        # Seven ranges and (at least one block of) the stalled one's first half, checkpointed
        # while it waits.
        wait_for(lambda: stalled_head() >= 64 << 10, "the sidecar to record the rest")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    head = stalled_head()
    assert 64 << 10 <= head <= step // 2
    part = (tmp_path / "blob.part").read_bytes()
    assert all(part[s:e] == data[s:e] for s, e in completed_ranges(state))

    server.clear_faults()
    server.reset_requests()

    async def resume() -> DownloadResult:
        async with make_client(PARALLEL) as client:
            source = BlobSource(NAME, url, SIZE, b3(data))
            return await download_blob(client, source, dest, policy=PARALLEL)

    result = asyncio.run(resume())
    assert [(r.range, r.status) for r in server.requests] == [
        (f"bytes={stuck + head}-{stuck + step - 1}", 206)
    ]
    assert (result.resumed_from, result.bytes_transferred) == (SIZE - step + head, step - head)
    assert dest.read_bytes() == data and listing(tmp_path) == ["blob"]


def test_canceling_every_waiter_stops_the_download_and_keeps_the_part(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("trickle", after_bytes=SIZE // 2, delay_s=0.05, piece_bytes=1024)
    dest = tmp_path / "blob"
    part = tmp_path / "blob.part"
    lock = tmp_path / "blob.lock"
    source = BlobSource(NAME, url, SIZE, b3(data))

    async def go() -> DownloadResult:
        async with make_client(POLICY) as client:
            first, second = (
                asyncio.create_task(download_blob(client, source, dest, policy=POLICY))
                for _ in range(2)
            )
            while part_size(part) < SIZE // 2:
                await asyncio.sleep(0.01)
            first.cancel()
            await asyncio.sleep(0.1)
            assert not second.done()  # one waiter left: the download goes on
            second.cancel()
            for task in (first, second):
                with pytest.raises(asyncio.CancelledError):
                    await task
            while lock.exists():  # the shared task lets go of the lock once canceled
                await asyncio.sleep(0.01)
            kept = part_size(part)
            assert kept >= SIZE // 2 and not dest.exists()
            server.clear_faults()
            server.reset_requests()
            result = await download_blob(client, source, dest, policy=POLICY)
            assert [(r.range, r.status) for r in server.requests] == [(f"bytes={kept}-", 206)]
            return result

    result = asyncio.run(go())
    assert result.blake3 == b3(data) and dest.read_bytes() == data
    assert listing(tmp_path) == ["blob"]
