"""Parallel byte ranges of one large file, and the sidecar that lets a killed download resume.

The partial file is extended to its full size and each range is written at its own offset
by a small pool of workers, one connection each. The file is one blob, or the concatenation of
several (a split file's parts, each a :class:`Segment` with its own URL): ranges never cross a
segment's end. ``<part>.state`` (rewritten, never half, as ranges complete and every
``_CHECKPOINT_S`` while they run) lists the byte intervals known to be written, so a download
that was killed fetches only what is missing, gaps between written intervals included; a
partial file without a sidecar is a sequential download's and its bytes count from byte 0.

The file is hashed from byte 0 as far as the finished ranges reach while the later ranges
still download, so verifying it costs little after the last range lands; the blocks of the
earliest range are hashed from memory as they are written, and with one worker that is all
of them.

The first request doubles as the probe: a server that ignores ``Range`` sends the caller
back to one stream from zero, having cost one request. Once a ``206`` with the right
``Content-Range`` has come back, the other workers start as soon as the event loop is seen
idle half the time (``DownloadPolicy.parallel_when_idle``): the network then holds the
stream back, and more connections beat a per-connection limit. A loop kept busy says the CPU
is the limit (a fast local hub, a small machine), and more streams would only share it: the
first worker stays alone and asks for several ranges per request.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from gen_worker.errors import DownloadError
from gen_worker.models.blob_io import Cursor, Digests, PrefixHash, Progress
from gen_worker.models.transfer import (
    Attempts,
    DownloadPolicy,
    Forbidden,
    RangeRejected,
    Segment,
    Target,
    Transient,
    describe,
    retry_after_s,
    transport_errors,
)

__all__ = ["busy_s", "completed_ranges", "fill_parallel", "state_path_of"]

_PART_MODE = 0o644
_STATE_VERSION = 1
# A killed download loses what was written since the last checkpoint: at loopback speeds
# (~500 MB/s) 0.25 s was 10% of a 1 GiB pull; a checkpoint costs a few microseconds.
_CHECKPOINT_S = 0.02
_SCHEDSTAT = Path("/proc/thread-self/schedstat")
# How many ranges a worker left alone asks for at once (each request costs the event loop
# ~4 ms here, its connection included; 4 x 32 MiB: a helper that joins later still finds work).
_ALONE_RANGES = 4
# How long the event loop is watched at a time, deciding on helpers for a large blob.
_IDLE_WINDOW_S = 0.25
# One page: Linux never cuts a write of one page short for a kill (it checks between pages).
_SIDECAR_BYTES = 4096

Interval = tuple[int, int]  # [start, end) in bytes


class _State(msgspec.Struct, frozen=True):
    """The sidecar's content. The digests tie it to one file; ``done`` is sorted and merged."""

    version: int
    size_bytes: int
    blake3: str
    sha256: str
    done: list[Interval]


def busy_s() -> float:
    """Seconds the calling thread has run or waited for a CPU (Linux's schedstat; elsewhere
    only its CPU time, so a thread starved of CPU looks idler than it is)."""
    try:
        running, waiting = _SCHEDSTAT.read_bytes().split()[:2]
        return (int(running) + int(waiting)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


def state_path_of(part: Path) -> Path:
    """``<dest>.part`` -> ``<dest>.part.state``."""
    return part.with_name(part.name + ".state")


def completed_ranges(state_path: Path) -> list[Interval]:
    """The ``[start, end)`` intervals a sidecar records as written (empty if there is none)."""
    try:
        return list(msgspec.json.decode(state_path.read_bytes(), type=_State).done)
    except (FileNotFoundError, msgspec.DecodeError):
        return []


def _merge(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _first_gap(done: list[Interval], pos: int) -> int:
    """The first byte at or after ``pos`` that no interval of ``done`` covers."""
    for start, end in done:
        if start <= pos < end:
            return end
    return pos


def _gaps(done: list[Interval], start: int, end: int) -> list[Interval]:
    """The parts of ``[start, end)`` that no interval of ``done`` (merged) covers."""
    gaps: list[Interval] = []
    pos = start
    for s, e in done:
        if e <= pos:
            continue
        if s >= end:
            break
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
    if pos < end:
        gaps.append((pos, end))
    return gaps


def _size_if_file(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


class _Sidecar:
    """The state file, rewritten in place while a download runs.

    It is created (by a rename, so it appears whole) ``_SIDECAR_BYTES`` long and then each
    state is written over it with one ``pwrite`` of a page, padded with spaces (JSON allows
    them): a process killed meanwhile leaves the old state or the new one, never half, and a
    checkpoint costs ~2 µs instead of the ~0.2 ms of a new file and a rename. A state too long
    for that (many gaps) is written to a new file and renamed over the old one.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        if len(data) <= _SIDECAR_BYTES and self._fd is not None:
            os.pwrite(self._fd, data.ljust(_SIDECAR_BYTES), 0)
            return
        self.close()
        fits = len(data) <= _SIDECAR_BYTES
        tmp = self._path.with_name(self._path.name + ".tmp")
        tmp.write_bytes(data.ljust(_SIDECAR_BYTES) if fits else data)
        tmp.replace(self._path)
        if fits:
            self._fd = os.open(self._path, os.O_WRONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(slots=True)
class _Range:
    start: int  # file offsets; the range lies within ``segment``
    end: int
    segment: Segment


class _Parallel:
    def __init__(
        self,
        target: Target,
        segments: Sequence[Segment],
        *,
        policy: DownloadPolicy,
        progress: Progress,
        part: Path,
        state: Path,
    ) -> None:
        self.target = target
        self.segments = segments
        self.policy = policy
        self.progress = progress
        self.part = part
        self.state = state
        self.done: list[Interval] = []
        self.failures: list[DownloadError] = []
        self.ranges_ok = asyncio.Event()
        # Once the loop was seen busy and while the first worker is alone, it takes several
        # ranges per request: fewer requests, and nothing to split the work with.
        self.alone = False
        self.hasher: PrefixHash
        self._active: dict[int, tuple[int, Cursor]] = {}  # ranges under way: start, cursor
        self._saved: list[Interval] | None = None
        self.sidecar = _Sidecar(state)

    def _read_state(self) -> list[Interval] | None:
        try:
            state = msgspec.json.decode(self.state.read_bytes(), type=_State)
        except (FileNotFoundError, msgspec.DecodeError):
            return None
        target = self.target
        if (state.version, state.size_bytes, state.blake3, state.sha256) != (
            _STATE_VERSION,
            target.size_bytes,
            target.blake3,
            target.sha256,
        ):
            return None
        if any(not 0 <= s < e <= target.size_bytes for s, e in state.done):
            return None
        return _merge(state.done)

    def _written(self) -> list[Interval]:
        """Every byte known to be on disk: finished ranges and the written head of the others."""
        heads = [
            (start, cursor.pos) for start, cursor in self._active.values() if cursor.pos > start
        ]
        return _merge([*self.done, *heads])

    def _write_state(self) -> None:
        written = self._written()
        if written == self._saved:
            return
        target = self.target
        self.sidecar.write(
            msgspec.json.encode(
                _State(_STATE_VERSION, target.size_bytes, target.blake3, target.sha256, written)
            )
        )
        self._saved = written

    async def _checkpoints(self) -> None:
        """Record the ranges under way now and then, so a killed download loses a moment of
        work rather than every range it had started; and let the hashing follow them."""
        while True:
            await asyncio.sleep(_CHECKPOINT_S)
            self._write_state()
            self.hasher.advance(_first_gap(self._written(), 0))

    def _known_done(self) -> list[Interval]:
        """What the partial file already holds, discarding anything that cannot be trusted."""
        size = self.target.size_bytes
        have = _size_if_file(self.part)
        if have is None:
            self.state.unlink(missing_ok=True)
            return []
        if self.state.exists():
            done = self._read_state()
            if done is not None and have <= size and all(e <= have for _, e in done):
                return done
        elif have <= size:
            return [(0, have)] if have else []  # a sequential download's bytes, from byte 0
        self.part.unlink()
        self.state.unlink(missing_ok=True)
        return []

    def covered(self) -> int:
        return sum(end - start for start, end in self._written())

    def _todo(self) -> deque[_Range]:
        """Every missing byte, in ranges of at most ``range_bytes`` within one segment."""
        step = self.policy.range_bytes
        todo: deque[_Range] = deque()
        for segment in self.segments:
            for start in range(segment.offset, segment.end, step):
                end = min(start + step, segment.end)
                todo.extend(_Range(s, e, segment) for s, e in _gaps(self.done, start, end))
        return todo

    async def run(self) -> tuple[int, Digests] | None:
        self.done = self._known_done()
        kept = self.covered()
        # The sidecar first: a partial file extended to full size always has one.
        self._write_state()
        size = self.target.size_bytes
        todo = self._todo()
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, _PART_MODE)
        try:
            os.ftruncate(fd, size)
            self.hasher = PrefixHash(fd, size, with_sha256=bool(self.target.sha256))
        except BaseException:
            os.close(fd)
            raise
        checkpoints = asyncio.create_task(self._checkpoints())
        try:
            self.progress.set(kept)
            self.hasher.advance(_first_gap(self.done, 0))
            if todo and not await self._run_workers(fd, todo):
                return None
            if self.failures:
                raise self.failures[0]
            return kept, await self.hasher.finish(size)
        finally:
            checkpoints.cancel()
            try:
                self._write_state()  # the workers have stopped: what they wrote is final
            finally:
                self.sidecar.close()
                self.hasher.close()
                os.close(fd)

    async def _run_workers(self, fd: int, todo: deque[_Range]) -> bool:
        """Download ``todo``; False when the server turned out to ignore ``Range``."""
        tasks = [asyncio.create_task(self._worker(fd, todo))]
        probe = asyncio.create_task(self.ranges_ok.wait())
        try:
            await asyncio.wait((tasks[0], probe), return_when=asyncio.FIRST_COMPLETED)
            probe.cancel()
            if self.ranges_ok.is_set() and await self._helpers_wanted(tasks[0]):
                self.alone = False
                workers = min(self.policy.range_workers, len(todo) + 1)
                tasks += [asyncio.create_task(self._worker(fd, todo)) for _ in range(workers - 1)]
            await asyncio.gather(*tasks)
        except BaseException as exc:
            probe.cancel()
            await _stop(tasks)
            if isinstance(exc, RangeRejected):
                return False
            raise
        return True

    async def _helpers_wanted(self, first: asyncio.Task[None]) -> bool:
        """Whether ``first`` (the only worker so far) should get helpers: True as soon as the
        event loop spends ``parallel_when_idle`` of ``_IDLE_WINDOW_S`` idle (the network is
        then the limit); False once ``first`` has ended (done, or failed: then no range
        starts anyway)."""
        share = self.policy.parallel_when_idle
        if share <= 0:
            return True
        loop = asyncio.get_running_loop()
        while not first.done():
            busy, started = busy_s(), loop.time()
            await asyncio.wait((first,), timeout=_IDLE_WINDOW_S)
            elapsed = loop.time() - started
            if not first.done() and elapsed - (busy_s() - busy) >= share * elapsed:
                return True
            self.alone = True
        return False

    async def _worker(self, fd: int, todo: deque[_Range]) -> None:
        # After a range ran out of retries no new range starts: the server is likely down,
        # and the ranges under way still finish, to be kept for the next attempt.
        while todo and not self.failures:
            item = todo.popleft()
            limit = item.start + _ALONE_RANGES * self.policy.range_bytes
            while self.alone and todo and todo[0].end <= limit:
                after = todo[0]  # the next range, if it follows on in the same segment
                if after.segment is not item.segment or after.start != item.end:
                    break
                item = _Range(item.start, todo.popleft().end, item.segment)
            try:
                await self._fetch(fd, item)
            except DownloadError as exc:
                self.failures.append(exc)
                return
            self._write_state()
            self.hasher.advance(_first_gap(self.done, 0))

    async def _fetch(self, fd: int, item: _Range) -> None:
        cursor = Cursor(item.start)
        self._active[item.start] = (item.start, cursor)
        try:
            await self._fetch_from(fd, item, cursor)
        finally:
            # Finished or not, what the range wrote is kept (a partial head is resumed later).
            del self._active[item.start]
            if cursor.pos > item.start:
                self.done = _merge([*self.done, (item.start, cursor.pos)])

    async def _fetch_from(self, fd: int, item: _Range, cursor: Cursor) -> None:
        fetcher = item.segment.fetcher
        base = item.segment.offset  # file offset of the segment's byte 0
        where = f" (bytes {item.start - base}-{item.end - base - 1})"
        attempts = Attempts(self.policy, fetcher.source.name, where)
        while cursor.pos < item.end:
            before = cursor.pos
            try:
                async with fetcher.open(cursor.pos - base, item.end - base - 1) as response:
                    if response.status_code != 206:
                        raise RangeRejected(f"HTTP {response.status_code} to a Range request")
                    self.ranges_ok.set()
                    # A body that runs past the range is cut there: those bytes are another's.
                    await fetcher.pump(response, fd, cursor, item.end, self.hasher)
                if cursor.pos < item.end:
                    raise Transient(f"the body ended early, at byte {cursor.pos - base}{where}")
            except Forbidden as denied:
                await fetcher.url.forbidden(denied)
            except (Transient, transport_errors()) as exc:
                await attempts.failed(
                    describe(exc),
                    progressed=cursor.pos > before,
                    url=fetcher.url.value,
                    kept=self.covered(),
                    retry_after_s=retry_after_s(exc),
                )


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, even if canceled meanwhile.

    The workers write into a descriptor the caller closes next; one still running then could
    write into whatever file reuses that number.
    """
    for task in tasks:
        task.cancel()
    canceled = False
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            canceled = True
    if canceled:
        raise asyncio.CancelledError


async def fill_parallel(
    target: Target,
    segments: Sequence[Segment],
    *,
    policy: DownloadPolicy,
    progress: Progress,
    part: Path,
    state: Path,
) -> tuple[int, Digests] | None:
    """Fill ``part`` with ``target`` by parallel ranges, keeping what an earlier run wrote.

    ``segments`` say where each byte comes from (one blob, or a split file's parts in order).
    Returns how many bytes were already there (the resumed part) and the file's digests, or
    None when the server ignores ``Range``: then the caller discards ``part`` and ``state`` and
    streams from zero. Raises ``DownloadError`` when a range ran out of retries (``part`` and
    ``state`` are kept), and whatever a request raises that retrying cannot fix.
    """
    return await _Parallel(
        target, segments, policy=policy, progress=progress, part=part, state=state
    ).run()
