"""Bytes on their way from a connection to a partial file: written by threads, hashed on the
way, counted (the connections themselves are :mod:`.net_stream`'s).

A body is written in blocks by a small pool of threads (:class:`BlockWriter`) while the next
blocks arrive, so the disk and the hashing (``pwritev``, blake3 and sha256 all release the
GIL) overlap the network instead of adding to it. :class:`InlineHash` hashes a sequential
download as it is written; :class:`PrefixHash` hashes a file filled by parallel ranges from
byte 0 as far as the finished ranges reach, while the later ones still download;
:func:`hash_file` is the pass over a whole file for what neither covered (a resumed download).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3

__all__ = [
    "BlockWriter",
    "Cursor",
    "Digests",
    "Hashing",
    "InlineHash",
    "PrefixHash",
    "Progress",
    "blake3_of_range",
    "hash_file",
]

_HASH_SPAN_BYTES = 64 << 20  # hashed per thread call: bounds a wait on cancellation
# The most bytes one write hands the kernel. The page cache takes a write into a folio sized
# after it, and here (a VM, Linux 6.18, ext4) a process's first downloads written 1 MiB at a
# time spent ~5x the CPU copying into the page cache (all of a 512 MiB pull: 0.9 s against
# 0.2); written 256 KiB or 512 KiB at a time they never did, for a few more system calls.
_WRITE_BYTES = 256 << 10


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


_Pieces = Sequence[bytes | memoryview]


class Hashing(Protocol):
    """What a :class:`BlockWriter` tells about the blocks it wrote (in a writer thread)."""

    def written(self, pieces: _Pieces, offset: int) -> None: ...


class InlineHash:
    """Hashes bytes as they are written, while they cover the file from byte 0 without a gap."""

    def __init__(self, with_sha256: bool, *, threads: int = 1) -> None:
        self.upto = 0
        self._blake3 = blake3.blake3(max_threads=threads)
        self._sha256 = hashlib.sha256() if with_sha256 else None

    def update(self, data: bytes | memoryview) -> None:
        self._blake3.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        self.upto += len(data)

    def written(self, pieces: _Pieces, offset: int) -> None:
        """Bytes of the file at ``offset`` are on disk (a writer thread calls this)."""
        del offset  # a sequential download writes in order, from where the hash is
        for piece in pieces:
            self.update(piece)

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


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    written = os.pwritev(fd, views, offset)
    if written < sum(v.nbytes for v in views):  # short, to a regular file: finish plainly
        rest = memoryview(b"".join(views))[written:]
        offset += written
        while rest:
            written = os.pwrite(fd, rest, offset)
            rest = rest[written:]
            offset += written


def _write_block(fd: int, pieces: _Pieces, offset: int, inline: Hashing | None) -> int:
    """Write ``pieces`` at ``offset`` (and hash them, in order); runs in a worker thread.

    The bytes go to the kernel ``_WRITE_BYTES`` at a time, whatever the pieces' sizes.
    """
    batch: list[memoryview] = []
    room = _WRITE_BYTES
    pos = offset
    for piece in pieces:
        view = memoryview(piece)
        while view:
            part, view = view[:room], view[room:]
            batch.append(part)
            room -= part.nbytes
            if not room:
                _pwritev_all(fd, batch, pos)
                pos += _WRITE_BYTES
                batch, room = [], _WRITE_BYTES
    if batch:
        _pwritev_all(fd, batch, pos)
        pos += _WRITE_BYTES - room
    if inline is not None:
        inline.written(pieces, offset)
    return pos - offset


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
    """Hands blocks of a body to a writer thread, which writes (and hashes) them in order, back
    to back: the reader waits only when it is ``depth`` blocks ahead (:meth:`push`), or, with
    blocks of its own buffers (:meth:`write_soon`), until one is free again (:meth:`recycled`).

    ``cursor`` (and progress) advance only once a block is on disk, as soon as it lands.
    :meth:`settle` waits for the thread and writes what is left, so no thread is still writing
    into the file when the body's reader returns (a caller may truncate the file next).
    """

    def __init__(
        self,
        fd: int,
        cursor: Cursor,
        end: int,
        inline: Hashing | None,
        progress: Progress,
        *,
        depth: int = 2,
    ) -> None:
        self._fd = fd
        self._cursor = cursor
        self._end = end
        self._inline = inline
        self._progress = progress
        self._depth = depth
        self._pieces: list[bytes] = []
        self._size = 0
        self._queued_to = cursor.pos
        self._pending = 0  # blocks queued and not landed yet
        self._free: collections.deque[memoryview] = collections.deque()  # landed, reusable
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Shared with the writer thread, under _lock: the blocks to write (pieces, offset,
        # whether the buffer is the reader's), whether a thread is on them, what it wrote.
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[_Pieces, int, bool]] = collections.deque()
        self._running = False
        self._written = 0
        self._counted = 0  # of _written, added to the cursor (on the loop's thread)
        self._failure: BaseException | None = None
        self._job: concurrent.futures.Future[None] | None = None  # the latest thread's

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

    async def push(self) -> bool:
        """Queue the pending pieces as a block (waiting while ``depth`` are queued); True on
        overflow (the block was cut at ``end``, and everything is on disk)."""
        pieces, overflow = self._take()
        if pieces:
            self._enqueue(pieces, recycle=False)
        while self._pending > self._depth:
            await self._changed()
        if overflow:
            await self.drain()
        return overflow

    def write_soon(self, block: memoryview) -> None:
        """Queue ``block`` (it must fit before ``end``); :meth:`recycled` gives it back."""
        if block.nbytes > self._end - self._queued_to:
            raise ValueError("a block must not run past the end of the range it fills")
        self._enqueue([block], recycle=True)

    async def recycled(self) -> list[memoryview]:
        """The blocks of :meth:`write_soon`'s now on disk, to fill again (waits for one)."""
        while not self._free:
            if self._pending == 0:
                raise RuntimeError("no block is being written: none will come back")
            await self._changed()
        return self.take_free()

    def take_free(self) -> list[memoryview]:
        """:meth:`recycled` without waiting: possibly none."""
        free = list(self._free)
        self._free.clear()
        return free

    async def drain(self) -> bool:
        """Wait until every queued block is on disk; always False, for ``push() or drain()``."""
        while self._pending:
            await self._changed()
        return False

    def settle(self) -> None:
        """Wait for the thread, then write the rest here and now (failure paths)."""
        if self._job is not None:
            concurrent.futures.wait([self._job])  # blocks for the queued blocks' writes at most
        self._count()
        pieces, _ = self._take()
        if pieces and self._failure is None:
            size = _write_block(self._fd, pieces, self._queued_to, self._inline)
            self._queued_to += size
            self._cursor.pos += size
            self._progress.add(size)

    def _enqueue(self, pieces: _Pieces, *, recycle: bool) -> None:
        if self._failure is not None:
            raise self._failure
        self._loop = asyncio.get_running_loop()
        with self._lock:
            self._queue.append((pieces, self._queued_to, recycle))
            start, self._running = not self._running, True
        self._queued_to += sum(len(p) for p in pieces)
        self._pending += 1
        if start:  # the thread that ran the queue dry has stopped touching the file
            self._job = _executor().submit(self._write_queue)

    def _write_queue(self) -> None:
        """The writer thread: every queued block, in order, until none is left."""
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                pieces, offset, recycle = self._queue[0]
            try:
                size = _write_block(self._fd, pieces, offset, self._inline)
            except BaseException as exc:  # handed to the reader, which raises it
                with self._lock:
                    self._failure = exc
                    self._queue.clear()
                    self._running = False
                self._post(None)
                return
            with self._lock:
                self._queue.popleft()
                self._written += size
            self._post(pieces[0] if recycle else None)

    def _post(self, block: memoryview | bytes | None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._landed, block)

    def _landed(self, block: memoryview | bytes | None) -> None:
        # Counted as soon as it lands, not when the reader next looks: a stalled body must not
        # hide written bytes from progress or from a checkpoint of the partial file.
        self._pending -= 1
        if isinstance(block, memoryview):
            self._free.append(block)
        self._count()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _count(self) -> None:
        with self._lock:
            written = self._written
        if written > self._counted:
            self._cursor.pos += written - self._counted
            self._progress.add(written - self._counted)
            self._counted = written

    async def _changed(self) -> None:
        if self._failure is not None:
            raise self._failure
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter
        if self._failure is not None:
            raise self._failure


class PrefixHash:
    """Hashes a file being filled out of order, from byte 0 up to the first gap.

    A block written right where the hash has got to is hashed by its writer thread, from
    memory (:meth:`written`); the rest is read back from the file in another thread:
    :meth:`advance` says how far the file is now complete, and hashing catches up in the
    background. With one range at a time nothing is read back; with several, the blocks of
    the earliest one. :meth:`finish` hashes the rest and returns the digests; :meth:`close`
    (always call it, before closing ``fd``) waits for a thread still reading.

    The file is read through a memory map of its ``size`` bytes (it must already be that long):
    the hash reads the page cache in place, which costs less than copying it out with
    ``pread`` (about 15% of the hashing time per GiB measured here).
    """

    def __init__(self, fd: int, size: int, *, with_sha256: bool) -> None:
        self._fd = fd
        self._size = size
        self._hash = InlineHash(with_sha256, threads=blake3.blake3.AUTO)
        self._lock = threading.Lock()  # one hashing thread at a time, in file order
        self._map: mmap.mmap | None = None
        self._target = 0
        self._task: asyncio.Task[None] | None = None
        self._in_flight: concurrent.futures.Future[None] | None = None

    def written(self, pieces: _Pieces, offset: int) -> None:
        # Never waits: while the reading thread holds the hash, these bytes are left to it.
        if self._lock.acquire(blocking=False):
            try:
                if offset == self._hash.upto:
                    for piece in pieces:
                        self._hash.update(piece)
            finally:
                self._lock.release()

    def advance(self, complete_to: int) -> None:
        self._target = max(self._target, complete_to)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._catch_up())

    async def _catch_up(self) -> None:
        while self._hash.upto < self._target:
            end = min(self._target, self._hash.upto + _HASH_SPAN_BYTES)
            self._in_flight = _executor().submit(self._hash_span, end)
            await asyncio.shield(asyncio.wrap_future(self._in_flight))
            self._in_flight.result()
            self._in_flight = None

    def _hash_span(self, end: int) -> None:
        with self._lock:
            start = self._hash.upto  # a writer thread may have hashed past it meanwhile
            if start >= end:
                return
            if self._map is None:
                self._map = mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ)
            with memoryview(self._map) as view, view[start:end] as span:
                self._hash.update(span)

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
        if self._map is not None:
            self._map.close()
            self._map = None


def blake3_of_range(fd: int, start: int, end: int) -> str:
    """The blake3 hex of bytes ``[start, end)`` of the open file ``fd`` (read in place)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if end > start:
        with (
            mmap.mmap(fd, end, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as view,
            view[start:end] as span,
        ):
            hasher.update(span)
    return hasher.hexdigest()
