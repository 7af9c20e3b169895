"""Bytes landing in a partial file: written by threads, hashed on the way, counted.

A body is written in blocks by a small pool of threads (:class:`BlockWriter`) while the next
block arrives, so the disk and the hashing (``pwritev``, blake3 and sha256 all release the GIL)
overlap the network instead of adding to it. :class:`InlineHash` hashes a sequential download
as it is written; :class:`PrefixHash` hashes a file filled by parallel ranges from byte 0 as
far as the finished ranges reach, while the later ones still download; :func:`hash_file` is the
pass over a whole file for what neither covered (a resumed download).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

__all__ = [
    "BlockWriter",
    "Cursor",
    "Digests",
    "InlineHash",
    "PrefixHash",
    "Progress",
    "hash_file",
]

_HASH_SPAN_BYTES = 64 << 20  # read and hashed per thread call: bounds a wait on cancellation
_HASH_READ_BYTES = 8 << 20


class Progress:
    """Turns "bytes now present" into forward-only deltas for ``emit``.

    ``covered`` is how many bytes of the blob the partial file holds; it drops when a download
    restarts from zero. Only growth past the highest value reported so far is emitted, so the
    deltas never go negative and add up to the blob's size once it is complete.
    """

    def __init__(self, emit: Callable[[int], None]) -> None:
        self._emit = emit
        self.covered = 0
        self._reported = 0

    def add(self, n: int) -> None:
        self.set(self.covered + n)

    def set(self, covered: int) -> None:
        self.covered = covered
        if covered > self._reported:
            delta = covered - self._reported
            self._reported = covered
            self._emit(delta)


@dataclass(slots=True)
class Cursor:
    """Where the next body byte goes; advanced only past bytes written to the file."""

    pos: int


@dataclass(frozen=True, slots=True)
class Digests:
    blake3: str
    sha256: str  # empty unless the source gave one to check


class InlineHash:
    """Hashes bytes as they are written, while they cover the file from byte 0 without a gap."""

    def __init__(self, with_sha256: bool) -> None:
        self.upto = 0
        self._blake3 = blake3.blake3()
        self._sha256 = hashlib.sha256() if with_sha256 else None

    def update(self, data: bytes | memoryview) -> None:
        self._blake3.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        self.upto += len(data)

    def digests(self) -> Digests:
        sha = self._sha256.hexdigest() if self._sha256 is not None else ""
        return Digests(self._blake3.hexdigest(), sha)


def _blake3_of(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def _sha256_of(path: Path) -> str:
    with path.open("rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def hash_file(path: Path, *, with_sha256: bool) -> Digests:
    """Digests of a whole file, off the event loop (blake3 on every core, sha256 beside it)."""
    if not with_sha256:
        return Digests(await asyncio.to_thread(_blake3_of, path), "")
    b3, sha = await asyncio.gather(
        asyncio.to_thread(_blake3_of, path), asyncio.to_thread(_sha256_of, path)
    )
    return Digests(b3, sha)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _write_block(fd: int, pieces: list[bytes], offset: int, inline: InlineHash | None) -> int:
    """Write ``pieces`` at ``offset`` (and hash them, in order); runs in a worker thread."""
    size = sum(len(p) for p in pieces)
    written = os.pwritev(fd, pieces, offset)
    if written < size:  # a short write to a regular file: finish it the plain way
        _pwrite_all(fd, memoryview(b"".join(pieces))[written:], offset + written)
    if inline is not None:
        for piece in pieces:
            inline.update(piece)
    return size


_EXECUTOR_LOCK = threading.Lock()
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
# Disk writes get their own threads: the default executor may be filled by callers that block
# in it for long (waiting on a lock), and a stalled write would stall the download.
_WRITER_THREADS = 8


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _EXECUTOR  # noqa: PLW0603  # one pool per process, made on first use
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
                _WRITER_THREADS, thread_name_prefix="gen-worker-download"
            )
        return _EXECUTOR


class BlockWriter:
    """Hands blocks of a body to a writer thread, one at a time and in order.

    ``cursor`` (and progress) advance only once a block is on disk. :meth:`settle` waits for
    the block in flight and writes what is left, so no thread is still writing into the file
    when the body's reader returns (a caller may truncate the file next).
    """

    def __init__(
        self, fd: int, cursor: Cursor, end: int, inline: InlineHash | None, progress: Progress
    ) -> None:
        self._fd = fd
        self._cursor = cursor
        self._end = end
        self._inline = inline
        self._progress = progress
        self._pieces: list[bytes] = []
        self._size = 0
        self._queued_to = cursor.pos
        self._in_flight: concurrent.futures.Future[int] | None = None

    def add(self, piece: bytes) -> int:
        self._pieces.append(piece)
        self._size += len(piece)
        return self._size

    def _take(self) -> tuple[list[bytes], bool]:
        """The pending pieces cut at ``end``, and whether anything lay beyond it."""
        pieces, room = self._pieces, self._end - self._queued_to
        overflow = self._size > room
        if overflow:
            data = b"".join(pieces)[:room]
            pieces = [data] if data else []
        self._pieces, self._size = [], 0
        return pieces, overflow

    def _landed(self, future: concurrent.futures.Future[int]) -> None:
        self._in_flight = None
        written = future.result()
        self._cursor.pos += written
        self._progress.add(written)

    def _landed_if_current(self, future: concurrent.futures.Future[int]) -> None:
        # Counted as soon as it lands, not when the next block comes: a stalled body must not
        # hide written bytes from progress or from a checkpoint of the partial file.
        if self._in_flight is future and future.exception() is None:
            self._landed(future)

    async def drain(self) -> bool:
        """Wait for the block in flight; always False (no overflow), for ``push() or drain()``."""
        if self._in_flight is not None:
            future = self._in_flight
            # Shielded: a canceled download must not cancel a write that has not started yet,
            # or settle() would find the block neither written nor pending.
            await asyncio.shield(asyncio.wrap_future(future))
            if self._in_flight is future:
                self._landed(future)
        return False

    async def push(self) -> bool:
        """Start writing the pending pieces (after the previous block); True on overflow."""
        await self.drain()
        pieces, overflow = self._take()
        if pieces:
            size = sum(len(p) for p in pieces)
            future = _executor().submit(
                _write_block, self._fd, pieces, self._queued_to, self._inline
            )
            self._in_flight = future
            self._queued_to += size
            loop = asyncio.get_running_loop()
            future.add_done_callback(
                lambda f: loop.call_soon_threadsafe(self._landed_if_current, f)
            )
        if overflow:
            await self.drain()
        return overflow

    def settle(self) -> None:
        """Finish the block in flight and write the rest, here and now (failure paths)."""
        if self._in_flight is not None:
            self._landed(self._in_flight)  # blocks for at most one block's write
        pieces, _ = self._take()
        if pieces:
            size = _write_block(self._fd, pieces, self._queued_to, self._inline)
            self._queued_to += size
            self._cursor.pos += size
            self._progress.add(size)


class PrefixHash:
    """Hashes a file being filled out of order, from byte 0 up to the first gap, in a thread.

    :meth:`advance` says how far the file is now complete; hashing catches up in the
    background. :meth:`finish` hashes the rest and returns the digests; :meth:`close` (always
    call it, before closing ``fd``) waits for a thread still reading.
    """

    def __init__(self, fd: int, *, with_sha256: bool) -> None:
        self._fd = fd
        self._hash = InlineHash(with_sha256)
        self._target = 0
        self._task: asyncio.Task[None] | None = None
        self._in_flight: concurrent.futures.Future[None] | None = None

    def advance(self, complete_to: int) -> None:
        self._target = max(self._target, complete_to)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._catch_up())

    async def _catch_up(self) -> None:
        while self._hash.upto < self._target:
            end = min(self._target, self._hash.upto + _HASH_SPAN_BYTES)
            self._in_flight = _executor().submit(_hash_span, self._fd, end, self._hash)
            await asyncio.shield(asyncio.wrap_future(self._in_flight))
            self._in_flight.result()
            self._in_flight = None

    async def finish(self, size: int) -> Digests:
        self.advance(size)
        if self._task is not None:
            await self._task
        return self._hash.digests()

    def close(self) -> None:
        if self._task is not None:
            if self._task.done() and not self._task.cancelled():
                self._task.exception()  # retrieved: the failure that matters is raised elsewhere
            self._task.cancel()
        if self._in_flight is not None:
            # Blocks for at most one span: the thread must be done with fd before it closes.
            concurrent.futures.wait([self._in_flight])


def _hash_span(fd: int, end: int, into: InlineHash) -> None:
    while into.upto < end:
        data = os.pread(fd, min(_HASH_READ_BYTES, end - into.upto), into.upto)
        if not data:
            raise OSError(f"the partial file ended at byte {into.upto}, before byte {end}")
        into.update(data)
