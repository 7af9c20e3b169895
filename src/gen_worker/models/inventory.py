"""What the store knows about its snapshots besides their files: records, leases, refs, locks.

Kept outside the snapshot directories, so a model loader reading one sees only the model's
files::

    meta/<hex>.json                      SnapshotRecord; the file's mtime is the last use
    leases/<hex>.<pid>.<token>.lease     one per process using the snapshot
    refs.json                            ref -> snapshot digest
    locks/...                            file locks (never beside blobs)

A lease file is held with ``flock`` by the process that made it, so whether its holder lives
is answered by the kernel (a killed process drops its locks), not by a pid that a container
restart may have given to someone else; the pid inside is the fallback where ``flock`` is not
supported. Names of transient files carry their creator's pid, so leftovers of a killed process
are recognised and removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gen_worker.errors import InvalidModelRefError
from gen_worker.logs import log
from gen_worker.models.manifest import ManifestEntry, split_digest

if TYPE_CHECKING:
    import filelock

__all__ = [
    "Guard",
    "Leases",
    "Records",
    "RefIndex",
    "SnapshotInfo",
    "SnapshotRecord",
    "Victim",
    "disk_bytes",
    "file_lock",
    "is_leftover",
    "orphan_blobs",
    "path_size",
    "pid_alive",
    "reclaimable_bytes",
    "regular_files",
    "transient_name",
    "tree_size",
    "write_atomically",
]

_TRANSIENT = re.compile(r"\.(\d+)\.[0-9a-f]{12}(?:\.[a-z]+)?$")


def transient_name(stem: str, suffix: str = "") -> str:
    """A unique name for a transient file or directory, carrying this process's pid."""
    return f"{stem}.{os.getpid()}.{secrets.token_hex(6)}{suffix}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_leftover(name: str) -> bool:
    """Whether a :func:`transient_name` belongs to a process that no longer exists."""
    match = _TRANSIENT.search(name)
    return match is not None and not pid_alive(int(match.group(1)))


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old content or the new, never a mix."""
    tmp = path.with_name(transient_name("." + path.name, ".tmp"))
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Locks

_THREAD_LOCKS: dict[str, threading.RLock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def file_lock(path: Path) -> filelock.FileLock:
    """The process-wide lock on ``path`` (one instance per path, not per thread).

    Not thread-local, so a caller may acquire it in one thread and release it in another (the
    fetcher acquires through ``asyncio.to_thread``); within the process it is re-entrant, which
    is why :class:`Guard` adds a thread lock for exclusion between threads.
    """
    # Imported when first needed: it is ~30 ms of every worker's cold start otherwise.
    import filelock  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(path, thread_local=False, is_singleton=True)


class Guard:
    """Excludes other threads of this process (a lock per path) and other processes (a file
    lock on the same path)."""

    def __init__(self, path: Path) -> None:
        with _THREAD_LOCKS_GUARD:
            self._thread_lock = _THREAD_LOCKS.setdefault(str(path), threading.RLock())
        self._path = path
        self._file_lock: filelock.FileLock | None = None

    @property
    def file_lock(self) -> filelock.FileLock:
        # Made on first use: a store that is opened and only read (a worker's registration)
        # never imports filelock.
        if self._file_lock is None:
            self._file_lock = file_lock(self._path)
        return self._file_lock

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            self.file_lock.acquire()
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def try_acquire(self) -> bool:
        """Take the guard only if nobody, in this process or another, holds it now."""
        if not self._thread_lock.acquire(blocking=False):
            return False
        # Held in this process outside a Guard (the fetcher holds it while downloading).
        if self.file_lock.is_locked:
            self._thread_lock.release()
            return False
        try:
            self.file_lock.acquire(blocking=False)
        except TimeoutError:  # filelock.Timeout is one
            self._thread_lock.release()
            return False
        return True

    def release(self) -> None:
        self.file_lock.release()
        self._thread_lock.release()


# ---------------------------------------------------------------------------------------------
# Leases


@dataclass
class _LeaseState:
    lock: threading.Lock
    count: int = 0
    fd: int = -1
    path: Path | None = None


_LEASE_STATES: dict[tuple[str, str], _LeaseState] = {}
_LEASE_STATES_LOCK = threading.Lock()


class Leases:
    """Which snapshots are in use: a per-process count and one lease file per using process."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _state(self, hex_digest: str) -> _LeaseState:
        key = (str(self.directory), hex_digest)
        with _LEASE_STATES_LOCK:
            state = _LEASE_STATES.get(key)
            if state is None:
                state = _LEASE_STATES[key] = _LeaseState(threading.Lock())
            return state

    def acquire(
        self,
        hex_digest: str,
        under: Callable[[], AbstractContextManager[None]],
        then: Callable[[], None] | None = None,
    ) -> None:
        """Count one more use; the first use in this process creates the lease file.

        ``under`` (the store's eviction lock) is held while the file appears and while ``then``
        runs, so an eviction never decides on a snapshot between its check and the lease.
        """
        state = self._state(hex_digest)
        with state.lock:
            if state.count == 0 or then is not None:
                with under():
                    created = state.count == 0
                    if created:
                        self._create(state, hex_digest)
                    try:
                        if then is not None:
                            then()
                    except BaseException:
                        if created:
                            self._drop(state)
                        raise
            state.count += 1

    def release(self, hex_digest: str) -> None:
        state = self._state(hex_digest)
        with state.lock:
            if state.count <= 0:
                raise RuntimeError(f"snapshot {hex_digest} is not leased by this process")
            state.count -= 1
            if state.count == 0:
                self._drop(state)

    def count_here(self, hex_digest: str) -> int:
        """Uses in this process (read without the state lock: a racing first use is not yet a
        use, and is serialised against eviction by the eviction lock)."""
        return self._state(hex_digest).count

    def _create(self, state: _LeaseState, hex_digest: str) -> None:
        name = transient_name(hex_digest)
        tmp = self.directory / f".{name}.tmp"
        final = self.directory / f"{name}.lease"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with contextlib.suppress(OSError):  # no flock here: the pid inside is the fallback
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            # Registered, and locked, before its name appears: a checker (another thread of
            # this process, or another process) never takes a live lease for a leftover.
            state.fd, state.path = fd, final
            tmp.replace(final)
        except BaseException:
            state.fd, state.path = -1, None
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def _drop(state: _LeaseState) -> None:
        if state.path is not None:
            state.path.unlink(missing_ok=True)
        if state.fd >= 0:
            os.close(state.fd)
        state.fd, state.path = -1, None

    def live(self) -> dict[str, set[int]]:
        """Snapshot hex -> pids of the processes holding a lease; stale lease files removed."""
        held: dict[str, set[int]] = {}
        for path in self._lease_files():
            hex_digest, pid = path.name.split(".")[:2]
            if self._holder_alive(path, hex_digest, int(pid)):
                held.setdefault(hex_digest, set()).add(int(pid))
            else:
                path.unlink(missing_ok=True)
        return held

    def is_live(self, hex_digest: str) -> bool:
        """Whether any process (this one included) holds a lease on the snapshot."""
        return self.count_here(hex_digest) > 0 or hex_digest in self.live()

    def clean(self) -> None:
        """Remove stale lease files and half-made ones of dead processes."""
        self.live()
        for path in self.directory.glob(".*.tmp"):
            if is_leftover(path.name.removesuffix(".tmp")):
                path.unlink(missing_ok=True)

    def _lease_files(self) -> Iterator[Path]:
        for path in self.directory.iterdir():
            parts = path.name.split(".")
            if len(parts) == 4 and parts[3] == "lease" and parts[1].isdigit():
                yield path

    def _holder_alive(self, path: Path, hex_digest: str, pid: int) -> bool:
        if pid == os.getpid():
            # Ours if our registry holds it; else a leftover of an earlier process with our pid.
            return self._state(hex_digest).path == path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return True
            return pid_alive(pid)
        finally:
            os.close(fd)  # also drops the lock we may have just taken
        return False


# ---------------------------------------------------------------------------------------------
# Records


class SnapshotRecord(msgspec.Struct, frozen=True):
    """What the store remembers of one snapshot (URLs never kept: they may be signed)."""

    digest: str
    size_bytes: int
    file_count: int
    blobs: tuple[str, ...]  # hex of every blob the snapshot keeps alive
    entries: tuple[ManifestEntry, ...] = ()


class Records:
    """One :class:`SnapshotRecord` per snapshot (complete, or being built), ``meta/<hex>.json``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, hex_digest: str) -> Path:
        return self.directory / f"{hex_digest}.json"

    def read(self, hex_digest: str) -> SnapshotRecord | None:
        try:
            data = self.path(hex_digest).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(data, type=SnapshotRecord)
        except msgspec.DecodeError as exc:
            # A cache record: ignoring it costs at most a re-download, failing would cost more.
            log(
                "warning",
                "ignoring an unreadable snapshot record",
                path=str(self.path(hex_digest)),
                error=str(exc),
            )
            return None

    def hexes(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.json") if len(p.stem) == 64)

    def all(self) -> dict[str, SnapshotRecord]:
        records = {}
        for hex_digest in self.hexes():
            record = self.read(hex_digest)
            if record is not None:
                records[hex_digest] = record
        return records

    def write(self, record: SnapshotRecord) -> None:
        write_atomically(self.path(split_digest(record.digest)), msgspec.json.encode(record))

    def remove(self, hex_digest: str) -> None:
        self.path(hex_digest).unlink(missing_ok=True)

    def last_used(self, hex_digest: str) -> float | None:
        try:
            return self.path(hex_digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def touch(self, hex_digest: str, at: float) -> bool:
        """Set the last use; ``False`` when there is no record."""
        try:
            os.utime(self.path(hex_digest), (at, at))
        except FileNotFoundError:
            return False
        return True

    def clean(self) -> None:
        for path in self.directory.glob(".*.tmp"):
            if is_leftover(path.name.removesuffix(".tmp")):
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Refs


class RefIndex:
    """``ref -> snapshot digest`` in one JSON file, replaced atomically under a lock."""

    def __init__(self, path: Path, guard: Guard) -> None:
        self.path = path
        self._guard = guard

    def all(self) -> dict[str, str]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return msgspec.json.decode(data, type=dict[str, str])
        except msgspec.DecodeError as exc:
            log("warning", "ignoring an unreadable refs index", path=str(self.path), error=str(exc))
            return {}

    def get(self, ref: str) -> str | None:
        return self.all().get(ref)

    def set(self, ref: str, digest: str) -> None:
        if not ref or ref != ref.strip() or any(ord(c) < 0x20 or c == "\x7f" for c in ref):
            raise InvalidModelRefError(
                ref,
                "a ref in the index must be non-empty, without surrounding spaces or "
                "control characters",
            )
        split_digest(digest)
        with self._guard:
            refs = self.all()
            if refs.get(ref) != digest:
                refs[ref] = digest
                self._write(refs)

    def drop_digest(self, digest: str) -> list[str]:
        """Forget every ref pointing at ``digest``; returns them."""
        with self._guard:
            refs = self.all()
            dropped = sorted(r for r, d in refs.items() if d == digest)
            if dropped:
                self._write({r: d for r, d in refs.items() if d != digest})
        return dropped

    def _write(self, refs: dict[str, str]) -> None:
        write_atomically(self.path, msgspec.json.encode(dict(sorted(refs.items()))))


# ---------------------------------------------------------------------------------------------
# Inventory entries


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One complete snapshot as ``Store.inventory()`` reports it."""

    digest: str
    path: Path
    size_bytes: int
    file_count: int
    last_used: float  # unix seconds
    in_use: bool
    refs: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the ``models.disk_inventory`` event, ``models ls --json``)."""
        return {
            "digest": self.digest,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "file_count": self.file_count,
            "last_used": self.last_used,
            "in_use": self.in_use,
            "refs": list(self.refs),
        }


# ---------------------------------------------------------------------------------------------
# Disk accounting


def path_size(path: Path) -> int:
    """Size of a file, 0 when it is gone."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def regular_files(top: Path) -> Iterator[os.stat_result]:
    """``lstat`` of every regular file under ``top`` (symlinks are neither followed nor
    counted: they take no space of their own)."""
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            try:
                st = (Path(dirpath) / name).lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield st


def disk_bytes(tops: Iterable[Path]) -> int:
    """Bytes of the regular files under ``tops``, each inode once (hard links share one)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in tops:
        for st in regular_files(top):
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def tree_size(directory: Path) -> tuple[int, int]:
    """Bytes and file count of a directory as a loader reads it (links followed)."""
    size = count = 0
    for path in directory.rglob("*"):
        if path.is_file():
            size += path_size(path)
            count += 1
    return size, count


# ---------------------------------------------------------------------------------------------
# Eviction planning


@dataclass(frozen=True, slots=True)
class Victim:
    """A snapshot that eviction may remove (not in use), with its record if it has one."""

    hex: str
    last_used: float
    record: SnapshotRecord | None


def orphan_blobs(blobs_dir: Path, records: Iterable[SnapshotRecord], cutoff: float) -> list[Path]:
    """Blobs and ``.part`` files that no record lists and nobody touched since ``cutoff``:
    what a fetch killed before it built its snapshot left."""
    listed = {h for r in records for h in r.blobs}
    orphans = []
    for path in blobs_dir.glob("*/*/*"):
        with contextlib.suppress(FileNotFoundError):
            if path.name.removesuffix(".part") not in listed and path.stat().st_mtime < cutoff:
                orphans.append(path)
    return orphans


def reclaimable_bytes(
    victims: list[Victim],
    orphans: list[Path],
    records: dict[str, SnapshotRecord],
    blob_path: Callable[[str], Path],
    snapshots_dir: Path,
) -> int:
    """Bytes that removing every victim and orphan would free: blobs no other record lists,
    the orphans, and copies (files that are not links to a blob) inside the victims."""
    gone = {v.hex for v in victims}
    kept = {h for key, r in records.items() if key not in gone for h in r.blobs}
    freed = {h for v in victims if v.record is not None for h in v.record.blobs} - kept
    total = sum(path_size(blob_path(h)) for h in freed) + sum(path_size(p) for p in orphans)
    for victim in victims:
        files = regular_files(snapshots_dir / victim.hex)
        total += sum(st.st_size for st in files if st.st_nlink == 1)
    return total
