"""The hub's disk: blake3-addressed blobs, snapshot records, and per-repo tags and membership.

Layout under the root (every file written to a temporary name in the same directory tree and
renamed into place, so a reader sees the old file or the new one, never half of one)::

    blobs/<h[0:2]>/<h>                 file contents, named by their blake3
    snapshots/<hex>.json               SnapshotRecord: digest, entries, attributes, repo, created_at
    repos/<owner>/<repo>/index.json    RepoIndex: the repo's snapshots by digest (``blake3:<hex>``,
                                       with the attributes they were published with) and each
                                       tag's history, newest last
    repos/<owner>/<repo>/.lock         serialises read-modify-write of index.json across processes
    tmp/                               temporaries on the same filesystem as the blobs
    files/<ref>, files-meta/<ref>.json the file API's stored files and their digests
    uploads/<upload_id>/               the file API's uploads in progress (see files_api)

A snapshot record describes content, and the same content can be published twice (another
repo, other attributes): the record keeps its first publication's ``repo`` and
``attributes``, while each repo's index is the authority on which snapshots belong to it and
with which attributes. Nothing is cached in memory: the server reads the disk on each request,
so a publish made by another process while the server runs is visible at once.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import blake3
import filelock
import msgspec

from gen_worker.models.manifest import check_blake3_hex

__all__ = [
    "BlobWriter",
    "HubStorage",
    "RepoIndex",
    "RepoSnapshot",
    "SnapshotRecord",
    "StoredEntry",
    "TagMove",
    "atomic_write",
    "utc_now",
]

_T = TypeVar("_T")
_LOCK_TIMEOUT_S = 60.0


class StoredEntry(msgspec.Struct, frozen=True):
    """One file of a snapshot as stored: its path, size and blob."""

    path: str
    size_bytes: int
    blake3: str


class SnapshotRecord(msgspec.Struct, frozen=True):
    """``snapshots/<hex>.json``: a snapshot's content and its first publication."""

    digest: str
    entries: tuple[StoredEntry, ...]
    attributes: dict[str, str]
    repo: str
    created_at: datetime


class TagMove(msgspec.Struct, frozen=True):
    """A tag pointed at ``digest`` from ``moved_at`` on."""

    digest: str
    moved_at: datetime


class RepoSnapshot(msgspec.Struct, frozen=True):
    """A snapshot's membership in one repo, with the attributes it was published with."""

    attributes: dict[str, str]
    published_at: datetime


class RepoIndex(msgspec.Struct):
    """``repos/<owner>/<repo>/index.json``."""

    repo: str
    snapshots: dict[str, RepoSnapshot] = {}
    tags: dict[str, list[TagMove]] = {}

    def candidates(self, tag: str) -> list[tuple[str, dict[str, str]]]:
        """The snapshots ``tag`` has pointed to, newest first, once each, with attributes."""
        seen: set[str] = set()
        found: list[tuple[str, dict[str, str]]] = []
        for move in reversed(self.tags.get(tag, [])):
            if move.digest in seen:
                continue
            seen.add(move.digest)
            member = self.snapshots.get(move.digest)
            found.append((move.digest, dict(member.attributes) if member else {}))
        return found


def utc_now() -> datetime:
    return datetime.now(UTC)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary beside it and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name[:64] + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path, into: type[_T]) -> _T | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return msgspec.json.decode(data, type=into)


class BlobWriter:
    """Streams one blob into ``tmp/`` while hashing it; ``commit()`` files it by its blake3.

    Used as a context manager, a failure before ``commit()`` removes the temporary file.
    """

    def __init__(self, storage: HubStorage) -> None:
        self._storage = storage
        fd, tmp = tempfile.mkstemp(dir=storage.tmp_dir, prefix="blob.", suffix=".tmp")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._hasher = blake3.blake3()
        self.size = 0
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hasher.update(data)
        self.size += len(data)

    def commit(self) -> str:
        """Move the blob into ``blobs/`` (unless the same content is already there); its hex."""
        self._file.close()
        self._done = True
        hex_digest = self._hasher.hexdigest()
        final = self._storage.blob_path(hex_digest)
        if final.is_file() and final.stat().st_size == self.size:
            self._tmp.unlink(missing_ok=True)
            return hex_digest
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._tmp.chmod(0o644)
            # Two publishers of the same content race harmlessly: both renames carry equal bytes.
            self._tmp.replace(final)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        return hex_digest

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._done = True
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done or exc_type is not None:
            self.discard()


class HubStorage:
    """The hub's files under ``root``; every method reads or writes the disk directly."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.snapshots_dir = self.root / "snapshots"
        self.repos_dir = self.root / "repos"
        self.tmp_dir = self.root / "tmp"
        self.files_dir = self.root / "files"
        self.files_meta_dir = self.root / "files-meta"
        self.uploads_dir = self.root / "uploads"

    def ensure(self) -> HubStorage:
        """Create the directory layout (idempotent); returns ``self``."""
        for folder in (
            self.blobs_dir,
            self.snapshots_dir,
            self.repos_dir,
            self.tmp_dir,
            self.files_dir,
            self.files_meta_dir,
            self.uploads_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    # -- blobs ----------------------------------------------------------------------------

    def blob_path(self, hex_digest: str) -> Path:
        check_blake3_hex(hex_digest, what="blob digest")
        return self.blobs_dir / hex_digest[:2] / hex_digest

    def has_blob(self, hex_digest: str) -> bool:
        return self.blob_path(hex_digest).is_file()

    def blob_writer(self) -> BlobWriter:
        return BlobWriter(self)

    # -- snapshots and repos --------------------------------------------------------------

    def snapshot(self, hex_digest: str) -> SnapshotRecord | None:
        check_blake3_hex(hex_digest, what="snapshot digest")
        return _read_json(self.snapshots_dir / f"{hex_digest}.json", SnapshotRecord)

    def repo_dir(self, repo_id: str) -> Path:
        owner, _, repo = repo_id.partition("/")
        return self.repos_dir / owner / repo

    def repo(self, repo_id: str) -> RepoIndex | None:
        """The repo's index, or None when nothing was ever published to it."""
        return _read_json(self.repo_dir(repo_id) / "index.json", RepoIndex)

    def record_publish(self, record: SnapshotRecord, tag: str) -> None:
        """Store ``record`` (if new), make it a member of its repo and move ``tag`` to it."""
        hex_digest = record.digest.removeprefix("blake3:")
        record_path = self.snapshots_dir / f"{hex_digest}.json"
        if not record_path.exists():
            atomic_write(record_path, msgspec.json.encode(record))
        folder = self.repo_dir(record.repo)
        folder.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(folder / ".lock", timeout=_LOCK_TIMEOUT_S):
            index = self.repo(record.repo) or RepoIndex(repo=record.repo)
            now = utc_now()
            index.snapshots[record.digest] = RepoSnapshot(dict(record.attributes), now)
            index.tags.setdefault(tag, []).append(TagMove(record.digest, now))
            atomic_write(folder / "index.json", msgspec.json.encode(index))
