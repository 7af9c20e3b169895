"""The content-addressed store: blobs named by their blake3, snapshots as directories of links.

Layout under ``${TENSORHUB_CACHE_DIR}/cas`` (SPEC 13.2)::

    blobs/blake3/<h[0:2]>/<h[2:4]>/<h>     verified blobs (read-only); "<h>.part" while downloading
    snapshots/<hex>/<relative paths>       complete snapshots: hard links to blobs, else
                                           symlinks, else copies
    snapshots/.tmp.<hex>.<pid>.<token>     a snapshot being built, renamed into place when done
    meta/ leases/ refs.json locks/         what the store knows about snapshots (inventory.py)
    tmp/                                   reassembled files and cross-device copies

A snapshot directory appears by one rename, so it exists only complete. Building one holds the
snapshot's lock (:meth:`Store.snapshot_lock`, which the fetcher also holds while downloading)
and a lease. Eviction holds the store-wide lock and never removes a snapshot that is leased
(in use) or whose lock is held (being built), nor a blob that any remaining snapshot record
lists; the first lease of a snapshot in a process is taken under the same lock, so an eviction
never decides between a reader's check and its lease. A caller that downloads blobs should hold
``lease(digest, manifest=...)`` from before it lists the missing blobs until the snapshot is
built: the record written then keeps the blobs it already found from being evicted meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_worker.errors import (
    DigestMismatchError,
    InsufficientDiskError,
    SnapshotInUseError,
)
from gen_worker.models.inventory import (
    Guard,
    Leases,
    Records,
    RefIndex,
    SnapshotInfo,
    SnapshotRecord,
    Victim,
    disk_bytes,
    file_lock,
    is_leftover,
    orphan_blobs,
    reclaimable_bytes,
    transient_name,
    tree_size,
)
from gen_worker.models.manifest import (
    DIGEST_PREFIX,
    ManifestEntry,
    SnapshotManifest,
    check_blake3_hex,
    split_digest,
)
from gen_worker.models.parts import (
    READ_ONLY,
    BlobMissingError,
    Linker,
    LinkMode,
    SnapshotPlan,
    hash_file,
    link_tree,
    move_into_place,
    plan_snapshot,
    read_parts_file,
    resolve_files,
)

if TYPE_CHECKING:
    import filelock

__all__ = [
    "ORPHAN_GRACE_S",
    "BlobMissingError",
    "LinkMode",
    "Linker",
    "SnapshotInUseError",
    "SnapshotInfo",
    "Store",
]

#: Blobs that no snapshot record lists (a fetch killed before it built its snapshot) are kept
#: this long for a retry to reuse, then become the first thing eviction removes.
ORPHAN_GRACE_S = 3600.0


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


class Store:
    """The on-disk content-addressed store of blobs and snapshots under ``root``."""

    def __init__(
        self,
        root: str | Path,
        *,
        budget_bytes: int | None = None,
        linker: Linker | None = None,
        free_bytes: Callable[[Path], int] | None = None,
        orphan_grace_s: float = ORPHAN_GRACE_S,
    ) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes is {budget_bytes}; expected None or 0 or more")
        self.root = Path(root).expanduser().resolve()
        self.budget_bytes = budget_bytes
        self.linker = linker or Linker()
        self._free_bytes = free_bytes or _disk_free
        self._orphan_grace_s = orphan_grace_s
        self._blobs = self.root / "blobs" / "blake3"
        self._snapshots = self.root / "snapshots"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        for directory in (self._blobs, self._snapshots, self._tmp, self._locks / "blobs"):
            directory.mkdir(parents=True, exist_ok=True)
        (self._locks / "snapshots").mkdir(exist_ok=True)
        self._records = Records(self.root / "meta")
        self._leases = Leases(self.root / "leases")
        self._refs = RefIndex(self.root / "refs.json", Guard(self._locks / "refs.lock"))
        self._gc = Guard(self._locks / "store.lock")
        self._clean_leftovers()

    @classmethod
    def from_cache_dir(
        cls,
        cache_dir: str | Path,
        budget_bytes: int | None = None,
        *,
        linker: Linker | None = None,
        free_bytes: Callable[[Path], int] | None = None,
    ) -> Store:
        """The store of a cache directory (``TENSORHUB_CACHE_DIR``): ``<cache_dir>/cas``."""
        root = Path(cache_dir).expanduser() / "cas"
        return cls(root, budget_bytes=budget_bytes, linker=linker, free_bytes=free_bytes)

    # -- layout ----------------------------------------------------------------------------

    def blob_path(self, hex_digest: str) -> Path:
        check_blake3_hex(hex_digest, what="blob digest")
        return self._blobs / hex_digest[0:2] / hex_digest[2:4] / hex_digest

    def has_blob(self, hex_digest: str) -> bool:
        return self.blob_path(hex_digest).is_file()

    def blob_part_path(self, hex_digest: str) -> Path:
        """Where a download of the blob writes until it is verified."""
        path = self.blob_path(hex_digest)
        return path.with_name(path.name + ".part")

    def blob_lock_path(self, hex_digest: str) -> Path:
        check_blake3_hex(hex_digest, what="blob digest")
        return self._locks / "blobs" / f"{hex_digest}.lock"

    def blob_lock(self, hex_digest: str) -> filelock.FileLock:
        """The process-wide lock of one blob's download (see ``inventory.file_lock``)."""
        return file_lock(self.blob_lock_path(hex_digest))

    def snapshot_path(self, digest: str) -> Path:
        return self._snapshots / split_digest(digest)

    def has_snapshot(self, digest: str) -> bool:
        """Whether the snapshot is here; it is then complete (it appears by one rename)."""
        return self.snapshot_path(digest).is_dir()

    def snapshot_lock(self, digest: str) -> filelock.FileLock:
        """The lock held while a snapshot's blobs download and while it is built.

        One instance per path in a process, not per thread: it may be released by another
        thread than the one that acquired it, and re-entered by the builder while held.
        """
        return file_lock(self._snapshot_lock_path(split_digest(digest)))

    def _snapshot_lock_path(self, hex_digest: str) -> Path:
        return self._locks / "snapshots" / f"{hex_digest}.lock"

    def _snapshot_guard(self, hex_digest: str) -> Guard:
        return Guard(self._snapshot_lock_path(hex_digest))

    # -- blobs -----------------------------------------------------------------------------

    def add_blob_from_file(self, path: str | Path, expected_hex: str | None = None) -> str:
        """Move a finished file into the store as a blob; returns its blake3 hex.

        The file is consumed: renamed into place (copied when the store is on another
        device), or deleted when the store already has the blob or when its digest is not
        ``expected_hex`` (``DigestMismatchError``; nothing is added).
        """
        source = Path(path)
        if expected_hex is not None:
            check_blake3_hex(expected_hex, what="expected blob digest")
        actual = hash_file(source)
        if expected_hex is not None and actual != expected_hex:
            source.unlink(missing_ok=True)
            raise DigestMismatchError(str(source), expected_hex, actual)
        self.place_verified_blob(source, actual)
        return actual

    def place_verified_blob(self, source: Path, hex_digest: str) -> None:
        """Move a file the caller has already hashed to ``hex_digest`` into the store (no
        second hash); consumed like :meth:`add_blob_from_file`'s."""
        dest = self.blob_path(hex_digest)
        if dest.is_file():  # same name, same bytes
            source.unlink(missing_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        move_into_place(source, dest, self._tmp)
        with contextlib.suppress(OSError):  # hard links share the mode: keep loaders read-only
            dest.chmod(READ_ONLY)

    def missing_blobs(self, manifest: SnapshotManifest) -> list[ManifestEntry]:
        """The entries still to fetch before :meth:`materialize` can build the snapshot.

        One entry per blob, in manifest order. A split file whose whole blob is here (known
        from its parts file) needs neither its parts nor anything else; a split file whose
        parts file is not here needs the parts file and every absent part.
        """
        plan = plan_snapshot(manifest)
        if self.has_snapshot(manifest.digest):
            return []
        wanted = [e for e in plan.files if not self.has_blob(e.blake3)]
        for split in plan.splits:
            if self.has_blob(split.index.blake3):
                if self.has_blob(read_parts_file(self, split).blake3):
                    continue
            else:
                wanted.append(split.index)
            wanted.extend(p for p in split.parts if not self.has_blob(p.blake3))
        wanted_paths = {e.path for e in wanted}
        unique: dict[str, ManifestEntry] = {}
        for entry in manifest.entries:
            if entry.path in wanted_paths:
                unique.setdefault(entry.blake3, entry)
        return list(unique.values())

    # -- snapshots -------------------------------------------------------------------------

    def materialize(self, manifest: SnapshotManifest) -> Path:
        """Build the snapshot directory from blobs (reassembling split files); its path.

        Everything about the manifest is checked before the disk is touched (``UnsafePathError``,
        ``DigestMismatchError`` for a digest other than ``snapshot_digest(entries)``,
        ``FatalError`` for malformed entries). Absent blobs are a ``BlobMissingError`` naming
        them. Safe to call from many threads and processes at once: one builds, the others
        find it built.
        """
        plan = plan_snapshot(manifest)
        final = self.snapshot_path(manifest.digest)
        if not final.is_dir():
            with self.lease(manifest.digest, manifest=manifest), self._snapshot_guard(plan.hex):
                if not final.is_dir():
                    self._build(plan, final)
        self.touch(manifest.digest)
        return final

    def _build(self, plan: SnapshotPlan, final: Path) -> None:
        # Under the snapshot's lock every builder of this snapshot waits, so any temporary
        # directory of it is what a killed builder left.
        for leftover in self._snapshots.glob(f".tmp.{plan.hex}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        placements = resolve_files(plan, self, self._tmp)
        tmp = self._snapshots / transient_name(f".tmp.{plan.hex}")
        link_tree(placements, self.blob_path, self.linker, tmp, final)
        self._record_complete(plan, placements)

    def _record_pending(self, plan: SnapshotPlan) -> None:
        """Write (or widen) the record of a snapshot about to be fetched or built, so its
        blobs, parts and already-known whole files included, are kept by eviction."""
        if self.snapshot_path(plan.digest).is_dir():
            return
        blobs = {e.blake3 for e in plan.entries}
        for split in plan.splits:
            if self.has_blob(split.index.blake3):
                blobs.add(read_parts_file(self, split).blake3)
        existing = self._records.read(plan.hex)
        if existing is not None:
            if blobs <= set(existing.blobs):
                return
            blobs |= set(existing.blobs)
        self._write_record(plan, blobs)

    def _record_complete(self, plan: SnapshotPlan, placements: list[tuple[str, str]]) -> None:
        # Kept: the files' blobs and the small parts files (they tell a later fetch which whole
        # blob a split file is). Dropped: parts, which the whole blob now duplicates.
        kept = {blob_hex for _, blob_hex in placements} | {s.index.blake3 for s in plan.splits}
        with self._gc:
            before = self._records.read(plan.hex)
            self._write_record(plan, kept)
            if before is not None:
                self._remove_unreferenced(set(before.blobs) - kept)

    def _write_record(self, plan: SnapshotPlan, blobs: set[str]) -> None:
        # URLs are left out: they may be presigned, and a record outlives them anyway.
        kept_entries = tuple(ManifestEntry(e.path, e.size_bytes, e.blake3) for e in plan.entries)
        self._records.write(
            SnapshotRecord(
                plan.digest, plan.size_bytes, plan.file_count, tuple(sorted(blobs)), kept_entries
            )
        )

    # -- leases and use --------------------------------------------------------------------

    @contextmanager
    def lease(self, digest: str, *, manifest: SnapshotManifest | None = None) -> Iterator[Path]:
        """Mark the snapshot in use (for this process and others) while the block runs.

        With ``manifest``, also record the snapshot's blobs so that eviction keeps them: hold
        such a lease from before listing missing blobs until the snapshot is built.
        """
        hex_digest = split_digest(digest)
        then: Callable[[], None] | None = None
        if manifest is not None:
            if manifest.digest != digest:
                raise ValueError(f"lease of {digest} given the manifest of {manifest.digest}")
            then = functools.partial(self._record_pending, plan_snapshot(manifest))

        self._leases.acquire(hex_digest, lambda: self._gc, then)
        try:
            yield self.snapshot_path(digest)
        finally:
            self._leases.release(hex_digest)

    def in_use(self, digest: str) -> bool:
        """Whether this process or another holds a lease on the snapshot."""
        return self._leases.is_live(split_digest(digest))

    def touch(self, digest: str, at: float | None = None) -> None:
        """Record a use of the snapshot now (or at unix time ``at``); nothing if it is gone."""
        hex_digest = split_digest(digest)
        when = time.time() if at is None else at
        if not self._records.touch(hex_digest, when):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self._snapshots / hex_digest, (when, when))

    # -- refs ------------------------------------------------------------------------------

    def set_ref(self, ref: str, digest: str) -> None:
        """Remember that ``ref`` (``owner/repo:tag``, ``hf:owner/repo@sha``...) is ``digest``."""
        self._refs.set(ref, digest)

    def get_ref(self, ref: str) -> str | None:
        return self._refs.get(ref)

    def refs(self) -> dict[str, str]:
        return self._refs.all()

    # -- inventory -------------------------------------------------------------------------

    def _snapshot_hexes(self) -> list[str]:
        return sorted(p.name for p in self._snapshots.iterdir() if len(p.name) == 64 and p.is_dir())

    def inventory(self) -> list[SnapshotInfo]:
        """Every complete snapshot, most recently used first."""
        live = self._leases.live()
        refs_of: dict[str, list[str]] = {}
        for ref, digest in self.refs().items():
            refs_of.setdefault(digest, []).append(ref)
        infos = []
        for hex_digest in self._snapshot_hexes():
            path = self._snapshots / hex_digest
            record = self._records.read(hex_digest)
            if record is not None:
                size, count = record.size_bytes, record.file_count
            else:
                size, count = tree_size(path)
            digest = DIGEST_PREFIX + hex_digest
            infos.append(
                SnapshotInfo(
                    digest=digest,
                    path=path,
                    size_bytes=size,
                    file_count=count,
                    last_used=self._last_used(hex_digest),
                    in_use=hex_digest in live or self._leases.count_here(hex_digest) > 0,
                    refs=tuple(sorted(refs_of.get(digest, []))),
                )
            )
        return sorted(infos, key=lambda i: (-i.last_used, i.digest))

    def disk_inventory(self) -> dict[str, Any]:
        """The ``models.disk_inventory`` event's payload."""
        snapshots = self.inventory()
        return {
            "cache_dir": str(self.root),
            "total_bytes": self.total_bytes(),
            "budget_bytes": self.budget_bytes,
            "free_bytes": self._free_bytes(self.root),
            "snapshot_count": len(snapshots),
            "snapshots": [s.as_dict() for s in snapshots],
        }

    def _last_used(self, hex_digest: str) -> float:
        recorded = self._records.last_used(hex_digest)
        if recorded is not None:
            return recorded
        try:
            return (self._snapshots / hex_digest).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def total_bytes(self) -> int:
        """Bytes the store holds on disk (each file once, however many links name it)."""
        return disk_bytes([self._blobs, self._snapshots, self._tmp])

    # -- space -----------------------------------------------------------------------------

    def available_bytes(self) -> int:
        """What may still be written: free disk, and what the budget leaves (if any)."""
        free = self._free_bytes(self.root)
        if self.budget_bytes is not None:
            free = min(free, self.budget_bytes - self.total_bytes())
        return free

    def ensure_space(self, needed_bytes: int) -> None:
        """Make ``needed_bytes`` fit, evicting least-recently-used snapshots not in use.

        Blobs no remaining snapshot lists go with them (a shared blob stays); stale orphan
        blobs go first. When even evicting every unused snapshot could not make room, raise
        ``InsufficientDiskError`` at once, having evicted nothing.
        """
        if needed_bytes < 0:
            raise ValueError(f"needed_bytes is {needed_bytes}; expected 0 or more")
        with self._gc:
            available = self.available_bytes()
            if needed_bytes <= available:
                return
            records = self._records.all()
            victims = self._victims(records)
            orphans = orphan_blobs(
                self._blobs, records.values(), time.time() - self._orphan_grace_s
            )
            reclaimable = reclaimable_bytes(
                victims, orphans, records, self.blob_path, self._snapshots
            )
            if available + reclaimable < needed_bytes:
                raise InsufficientDiskError(str(self.root), needed_bytes, max(available, 0))
            for orphan in orphans:
                orphan.unlink(missing_ok=True)
            for victim in victims:
                if self.available_bytes() >= needed_bytes:
                    return
                self._evict(victim.hex)
            available = self.available_bytes()
            if needed_bytes > available:
                raise InsufficientDiskError(str(self.root), needed_bytes, max(available, 0))

    def remove_snapshot(self, digest: str) -> bool:
        """Remove a snapshot and the blobs only it used; ``False`` if it was not here."""
        hex_digest = split_digest(digest)
        with self._gc:
            if not (self.has_snapshot(digest) or self._records.read(hex_digest) is not None):
                return False
            holders = self._leases.live().get(hex_digest, set())
            if self._leases.count_here(hex_digest) > 0:
                holders.add(os.getpid())
            if holders:
                pids = ", ".join(str(p) for p in sorted(holders))
                raise SnapshotInUseError(
                    f"snapshot {digest} is in use (leased by process {pids}); remove it "
                    "once no request uses it"
                )
            if not self._evict(hex_digest):
                raise SnapshotInUseError(
                    f"snapshot {digest} is being built or downloaded (its lock is held); "
                    "remove it once that finishes"
                )
        return True

    def _victims(self, records: dict[str, SnapshotRecord]) -> list[Victim]:
        """Snapshots not in use (complete, or records of abandoned builds), oldest use first."""
        live = self._leases.live()
        hexes = set(records) | set(self._snapshot_hexes())
        victims = [
            Victim(h, self._last_used(h), records.get(h))
            for h in hexes
            if h not in live and self._leases.count_here(h) == 0
        ]
        return sorted(victims, key=lambda v: (v.last_used, v.hex))

    def _evict(self, hex_digest: str) -> bool:
        """Remove one snapshot not in use (the store lock is held); ``False`` if it is busy."""
        if self._leases.is_live(hex_digest):
            return False
        guard = self._snapshot_guard(hex_digest)
        if not guard.try_acquire():
            return False
        try:
            record = self._records.read(hex_digest)
            directory = self._snapshots / hex_digest
            if directory.is_dir():
                # Renamed away first: the snapshot disappears at once, never half-deleted.
                trash = self._snapshots / transient_name(f".trash.{hex_digest}")
                directory.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            self._records.remove(hex_digest)
            self._refs.drop_digest(DIGEST_PREFIX + hex_digest)
            if record is not None:
                self._remove_unreferenced(set(record.blobs))
        finally:
            guard.release()
        return True

    def _remove_unreferenced(self, candidates: set[str]) -> None:
        """Delete those of ``candidates`` that no record lists (the store lock is held)."""
        listed = {h for r in self._records.all().values() for h in r.blobs}
        for hex_digest in candidates - listed:
            self.blob_path(hex_digest).unlink(missing_ok=True)

    def _clean_leftovers(self) -> None:
        """Remove what killed processes left: build and trash directories, temporary files,
        stale leases."""
        for path in self._snapshots.iterdir():
            if path.name.startswith((".tmp.", ".trash.")) and is_leftover(path.name):
                shutil.rmtree(path, ignore_errors=True)
        for path in self._tmp.iterdir():
            if is_leftover(path.name):
                path.unlink(missing_ok=True)
        for path in self.root.glob(".*.tmp"):  # the refs index being replaced
            if is_leftover(path.name.removesuffix(".tmp")):
                path.unlink(missing_ok=True)
        self._records.clean()
        self._leases.clean()
