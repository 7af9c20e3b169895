"""Building a snapshot directory: checking the manifest, reassembling split files, linking.

:func:`plan_snapshot` is pure: it refuses unsafe paths, malformed entries, a digest that does
not match the entries, duplicate or clashing paths and incomplete part sets, and says which
files the snapshot directory will hold. The snapshot digest covers the entries exactly as
published (``X.partNNNN`` and ``X.parts.json`` included, ``X`` itself not), which is what the
hub hashes; the directory then holds ``X`` and neither the parts nor the parts file.

:func:`check_parts_file` reads one ``X.parts.json`` against the manifest. A fetch downloads a
split file whole when it can (:func:`plan_joined`: each part written straight at its offset,
see ``download.download_parts``); parts already in the store are joined by :func:`reassemble`,
which copies them into one file and checks the whole (and the parts only when the whole is
wrong, to name the culprit). :func:`resolve_files` says which blob each file of the snapshot is
(reassembling what has to be), and :func:`link_tree` builds the directory with a
:class:`Linker` under a temporary name and renames it into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import blake3
import msgspec

from gen_worker.errors import BlobMissingError, DigestMismatchError, FatalError
from gen_worker.models.inventory import transient_name
from gen_worker.models.manifest import (
    PARTS_SUFFIX,
    ManifestEntry,
    PartsFile,
    SnapshotManifest,
    check_blake3_hex,
    check_relative_path,
    part_name,
    snapshot_digest,
    split_digest,
)

__all__ = [
    "READ_ONLY",
    "BlobMissingError",
    "BlobStore",
    "JoinedFile",
    "LinkMode",
    "Linker",
    "SnapshotPlan",
    "SplitFile",
    "check_parts_file",
    "hash_file",
    "link_tree",
    "move_into_place",
    "plan_joined",
    "plan_snapshot",
    "read_parts_file",
    "reassemble",
    "resolve_files",
]

CHUNK_BYTES = 8 << 20
# copy_file_range refused: another filesystem (EXDEV, before Linux 5.19), not supported by
# the filesystem or the kernel, or not allowed here (a seccomp filter answers EPERM).
_NO_COPY_FILE_RANGE = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
)
#: Blobs and copies are read-only: a snapshot file is a hard link to its blob, so a loader
#: that opened one for writing would change the blob under every snapshot that shares it.
READ_ONLY = 0o444
LinkMode = Literal["hardlink", "symlink", "copy"]


class BlobStore(Protocol):
    """What building a snapshot needs of the store."""

    def blob_path(self, hex_digest: str) -> Path: ...
    def has_blob(self, hex_digest: str) -> bool: ...
    def ensure_space(self, needed_bytes: int) -> None: ...
    def place_verified_blob(self, source: Path, hex_digest: str) -> None: ...


@dataclass(frozen=True, slots=True)
class SplitFile:
    """A file that travels as parts: ``path`` is reassembled from ``parts`` (in order)."""

    path: str
    index: ManifestEntry  # the "<path>.parts.json" entry
    parts: tuple[ManifestEntry, ...]

    @property
    def size_bytes(self) -> int:
        return sum(p.size_bytes for p in self.parts)


@dataclass(frozen=True, slots=True)
class SnapshotPlan:
    """A checked manifest: the files placed as they are, and the files built from parts."""

    digest: str
    hex: str
    entries: tuple[ManifestEntry, ...]  # as published: what the digest covers
    files: tuple[ManifestEntry, ...]
    splits: tuple[SplitFile, ...]

    @property
    def size_bytes(self) -> int:
        """Bytes of the snapshot directory's files."""
        return sum(e.size_bytes for e in self.files) + sum(s.size_bytes for s in self.splits)

    @property
    def file_count(self) -> int:
        return len(self.files) + len(self.splits)


def plan_snapshot(manifest: SnapshotManifest) -> SnapshotPlan:
    """Check ``manifest`` completely without touching the disk; raise on the first problem.

    ``UnsafePathError`` for a path with ``..``, ``/``-prefix, backslash...;
    ``DigestMismatchError`` when the digest is not ``snapshot_digest(entries)``;
    ``FatalError`` for malformed entries, duplicates, clashes and incomplete part sets.
    """
    hex_digest = split_digest(manifest.digest)
    for entry in manifest.entries:
        check_relative_path(entry.path)
    for entry in manifest.entries:
        _check_entry(manifest.digest, entry)
    computed = snapshot_digest(manifest.entries)
    if computed != manifest.digest:
        raise DigestMismatchError(
            f"snapshot manifest ({len(manifest.entries)} entries)",
            manifest.digest,
            computed,
            what="snapshot digest",
        )
    by_path: dict[str, ManifestEntry] = {}
    for entry in manifest.entries:
        if entry.path in by_path:
            raise FatalError(
                f"snapshot {manifest.digest}: path {entry.path!r} is listed twice; "
                "every path of a snapshot must be unique"
            )
        by_path[entry.path] = entry
    splits = tuple(
        _split_file(manifest.digest, entry, by_path)
        for entry in manifest.entries
        if entry.path.endswith(PARTS_SUFFIX)
    )
    claimed = {e.path for s in splits for e in (s.index, *s.parts)}
    files = tuple(e for e in manifest.entries if e.path not in claimed)
    _check_no_clash(manifest.digest, [e.path for e in files] + [s.path for s in splits])
    return SnapshotPlan(manifest.digest, hex_digest, manifest.entries, files, splits)


def _check_entry(digest: str, entry: ManifestEntry) -> None:
    if entry.size_bytes < 0:
        raise FatalError(
            f"snapshot {digest}: {entry.path!r} has size {entry.size_bytes}; "
            "sizes must be 0 or more bytes"
        )
    try:
        check_blake3_hex(entry.blake3, what=f"blake3 of {entry.path!r}")
    except ValueError as exc:
        raise FatalError(f"snapshot {digest}: {exc}; the store needs every file's blake3") from None


def _split_file(digest: str, index: ManifestEntry, by_path: dict[str, ManifestEntry]) -> SplitFile:
    target = index.path[: -len(PARTS_SUFFIX)]
    if not target or target.endswith("/"):
        raise FatalError(
            f"snapshot {digest}: {index.path!r} names no file; a parts file is "
            f"'<path>{PARTS_SUFFIX}' for a non-empty <path>"
        )
    if target in by_path:
        raise FatalError(
            f"snapshot {digest}: {target!r} is listed both as a file and as parts "
            f"({index.path!r}); a file is either whole or split"
        )
    pattern = re.compile(re.escape(target) + r"\.part(\d{4,})")
    numbered = sorted((int(m.group(1)), path) for path in by_path if (m := pattern.fullmatch(path)))
    parts = []
    for expected_index, (_, path) in enumerate(numbered):
        if path != part_name(target, expected_index):
            raise FatalError(
                f"snapshot {digest}: parts of {target!r} must be numbered from "
                f"{part_name(target, 0)!r} without gaps; expected "
                f"{part_name(target, expected_index)!r}, found {path!r}"
            )
        parts.append(by_path[path])
    return SplitFile(target, index, tuple(parts))


def _check_no_clash(digest: str, paths: list[str]) -> None:
    # Duplicates were refused already (a split target listed as a file too, or a path twice).
    final = set(paths)
    for path in final:
        segments = path.split("/")
        for depth in range(1, len(segments)):
            parent = "/".join(segments[:depth])
            if parent in final:
                raise FatalError(
                    f"snapshot {digest}: {parent!r} is a file and also the directory of "
                    f"{path!r}; a path cannot be both"
                )


def check_parts_file(data: bytes, split: SplitFile) -> PartsFile:
    """Decode ``split``'s parts file and check it lists exactly the manifest's parts.

    A part whose size or blake3 differs between the parts file and the manifest is a
    ``DigestMismatchError`` naming the part; a parts file that is not one, or lists other
    parts, a ``FatalError`` naming it.
    """
    name = split.index.path
    try:
        parts_file = msgspec.json.decode(data, type=PartsFile)
        check_blake3_hex(parts_file.blake3, what="whole-file blake3")
    except (msgspec.DecodeError, ValueError) as exc:
        raise FatalError(
            f"{name}: not a valid parts file ({exc}); expected JSON with path, size_bytes, "
            "blake3 and parts [{path, size_bytes, blake3}]"
        ) from None
    if parts_file.path != split.path:
        raise FatalError(f"{name}: describes {parts_file.path!r}, expected {split.path!r}")
    listed = [p.path for p in parts_file.parts]
    expected = [p.path for p in split.parts]
    if listed != expected:
        raise FatalError(
            f"{name}: lists parts {listed}, but the manifest has {expected}; "
            "the two must name the same parts in the same order"
        )
    for listed_part, entry in zip(parts_file.parts, split.parts, strict=True):
        if listed_part.size_bytes != entry.size_bytes:
            raise DigestMismatchError(
                entry.path,
                str(entry.size_bytes),
                str(listed_part.size_bytes),
                what=f"size listed in {name}",
            )
        if listed_part.blake3 != entry.blake3:
            raise DigestMismatchError(
                entry.path, entry.blake3, listed_part.blake3, what=f"blake3 listed in {name}"
            )
    if parts_file.size_bytes != split.size_bytes:
        raise DigestMismatchError(
            split.path,
            str(parts_file.size_bytes),
            str(split.size_bytes),
            what="size (sum of the parts)",
        )
    return parts_file


def reassemble(parts_file: PartsFile, blob_of: Callable[[str], Path], out: Path) -> None:
    """Concatenate the parts (``blob_of(hex)`` is where each lies) into the new file ``out``.

    The parts are blobs, named by digests verified when they were stored, so only their sizes
    are checked before the copy (in the kernel where it can) and the whole afterwards. A whole
    that does not match has each part's bytes checked: a part that is not its digest is a
    ``DigestMismatchError`` naming the part (the first such in order); every part matching, one
    naming the file. A part of the wrong size is named at once. The caller removes ``out`` on
    failure.
    """
    total = 0
    for part in parts_file.parts:
        size = blob_of(part.blake3).stat().st_size
        if size != part.size_bytes:
            raise DigestMismatchError(
                part.path, str(part.size_bytes), str(size), what="size (bytes)"
            )
        total += size
    if total != parts_file.size_bytes:
        raise DigestMismatchError(
            parts_file.path, str(parts_file.size_bytes), str(total), what="size (bytes)"
        )
    with out.open("xb") as sink:
        for part in parts_file.parts:
            with blob_of(part.blake3).open("rb") as source:
                _copy(source.fileno(), sink.fileno(), part.size_bytes)
    whole = hash_file(out)
    if whole == parts_file.blake3:
        return
    for part in parts_file.parts:
        actual = hash_file(blob_of(part.blake3))
        if actual != part.blake3:
            raise DigestMismatchError(part.path, part.blake3, actual)
    raise DigestMismatchError(parts_file.path, parts_file.blake3, whole)


def _copy(source: int, sink: int, size: int) -> None:
    """Append ``size`` bytes of ``source`` (from its position) to ``sink``.

    ``copy_file_range`` keeps the bytes in the kernel (or shares the blocks, on filesystems
    that can); where it is refused (another filesystem, no support), a plain copy.
    """
    left = size
    if hasattr(os, "copy_file_range"):
        try:
            while left > 0:
                copied = os.copy_file_range(source, sink, min(left, CHUNK_BYTES << 4))
                if copied == 0:
                    break  # the source ended early: the sizes were checked, so it shrank
                left -= copied
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE or left != size:
                raise
    while left > 0:
        chunk = os.read(source, min(left, CHUNK_BYTES))
        if not chunk:
            raise OSError(errno.EIO, f"a part ended {left} bytes early while being joined")
        view = memoryview(chunk)
        while view:
            view = view[os.write(sink, view) :]
        left -= len(chunk)


class Linker:
    """Places a blob at a path of a snapshot being built: the first of ``modes`` that works.

    Hard links cost no space and survive the blob's name; a symlink works across devices;
    a copy works everywhere. Override a method (or ``modes``) to change the strategy.
    """

    modes: tuple[LinkMode, ...] = ("hardlink", "symlink", "copy")

    def place(self, blob: Path, dest: Path) -> LinkMode:
        methods: dict[LinkMode, Callable[[Path, Path], None]] = {
            "hardlink": self.hardlink,
            "symlink": self.symlink,
            "copy": self.copy,
        }
        failures: list[str] = []
        for mode in self.modes:
            try:
                methods[mode](blob, dest)
            except OSError as exc:  # EXDEV, EPERM, EMLINK, ENOTSUP...: try the next way
                failures.append(f"{mode}: {exc.strerror or exc}")
                dest.unlink(missing_ok=True)
                continue
            return mode
        raise OSError(f"cannot place {blob} at {dest} ({'; '.join(failures) or 'no modes'})")

    def hardlink(self, blob: Path, dest: Path) -> None:
        # A blob that came in through another door (a downloader's own rename) is made
        # read-only before a snapshot shares its inode.
        with contextlib.suppress(OSError):
            blob.chmod(READ_ONLY)
        os.link(blob, dest)

    def symlink(self, blob: Path, dest: Path) -> None:
        # Relative, so the store can move as a whole; the temporary build directory and the
        # final one are siblings, so the link stays right across the rename.
        dest.symlink_to(os.path.relpath(blob, dest.parent))

    def copy(self, blob: Path, dest: Path) -> None:
        shutil.copyfile(blob, dest)
        dest.chmod(READ_ONLY)


def hash_file(path: Path) -> str:
    """The blake3 hex of a file (memory-mapped, hashed on several threads when large)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def move_into_place(source: Path, dest: Path, tmp_dir: Path) -> None:
    """Rename ``source`` to ``dest``; across devices, copy it into ``tmp_dir`` (on ``dest``'s
    device) first, so ``dest`` still appears by one rename and never names a partial copy."""
    try:
        source.replace(dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = tmp_dir / transient_name("blob")
        try:
            shutil.copyfile(source, tmp)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        source.unlink()


def read_parts_file(blobs: BlobStore, split: SplitFile) -> PartsFile:
    """``split``'s parts file, read from its blob and checked against the manifest."""
    return check_parts_file(blobs.blob_path(split.index.blake3).read_bytes(), split)


def resolve_files(plan: SnapshotPlan, blobs: BlobStore, tmp_dir: Path) -> list[tuple[str, str]]:
    """``(path, blob hex)`` for every file of the snapshot, reassembling split files.

    Every absent blob is reported at once (``BlobMissingError``) before any reassembly; a
    blob of the wrong size is a ``DigestMismatchError`` naming the file.
    """
    absent = [e for e in plan.files if not blobs.has_blob(e.blake3)]
    files = [(e.path, e.blake3, e.size_bytes) for e in plan.files]
    to_join: list[tuple[SplitFile, PartsFile]] = []
    for split in plan.splits:
        if not blobs.has_blob(split.index.blake3):
            absent.append(split.index)
            continue
        parts_file = read_parts_file(blobs, split)
        if blobs.has_blob(parts_file.blake3):
            files.append((split.path, parts_file.blake3, parts_file.size_bytes))
            continue
        absent.extend(p for p in split.parts if not blobs.has_blob(p.blake3))
        to_join.append((split, parts_file))
    if absent:
        raise _missing_error(plan, absent)
    for path, blob_hex, size in files:
        actual = blobs.blob_path(blob_hex).stat().st_size
        if actual != size:
            raise DigestMismatchError(path, str(size), str(actual), what="size (bytes)")
    for split, parts_file in to_join:
        _join_parts(parts_file, blobs, tmp_dir)
        files.append((split.path, parts_file.blake3, parts_file.size_bytes))
    return [(path, blob_hex) for path, blob_hex, _ in files]


@dataclass(frozen=True, slots=True)
class JoinedFile:
    """A split file to download whole: each part written straight at its offset of the file."""

    path: str
    blake3: str  # the whole file's, from its parts file
    size_bytes: int
    parts: tuple[ManifestEntry, ...]  # the manifest's entries (with URLs), in order


def plan_joined(
    manifest: SnapshotManifest, blobs: BlobStore, missing: list[ManifestEntry]
) -> tuple[list[ManifestEntry], list[JoinedFile]]:
    """Which of ``missing`` (as ``Store.missing_blobs`` lists them) to download as blobs, and
    which split files to download whole instead of as parts to join afterwards.

    A split file is downloaded whole when its parts file is in the store (download the parts
    files first: they name the whole blob), the whole blob is not, no part is (a fetch of the
    parts that stopped half way finishes that way) and no part's bytes are another entry's
    too (the parts are then exactly the blobs it replaces). Its parts leave the list.
    """
    plan = plan_snapshot(manifest)
    uses = Counter(e.blake3 for e in plan.entries)
    joined: list[JoinedFile] = []
    for split in plan.splits:
        if not blobs.has_blob(split.index.blake3):
            continue
        parts_file = read_parts_file(blobs, split)
        if blobs.has_blob(parts_file.blake3):
            continue
        if any(uses[p.blake3] > 1 or blobs.has_blob(p.blake3) for p in split.parts):
            continue
        joined.append(JoinedFile(split.path, parts_file.blake3, parts_file.size_bytes, split.parts))
    replaced = {p.blake3 for j in joined for p in j.parts}
    return [e for e in missing if e.blake3 not in replaced], joined


def _missing_error(plan: SnapshotPlan, absent: list[ManifestEntry]) -> BlobMissingError:
    listed = ", ".join(f"{e.path!r} (blake3 {e.blake3}, {e.size_bytes} bytes)" for e in absent[:5])
    more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
    return BlobMissingError(
        f"snapshot {plan.digest}: {len(absent)} blob(s) not in the store: {listed}{more}; "
        "download them first (Store.missing_blobs lists them)"
    )


def _join_parts(parts_file: PartsFile, blobs: BlobStore, tmp_dir: Path) -> None:
    blobs.ensure_space(parts_file.size_bytes)
    out = tmp_dir / transient_name("join")
    try:
        reassemble(parts_file, blobs.blob_path, out)
        blobs.place_verified_blob(out, parts_file.blake3)
    except DigestMismatchError as exc:
        corrupt = {p.path: p.blake3 for p in parts_file.parts}.get(exc.name)
        if corrupt is not None:  # dropped, so that the next fetch downloads it again
            blobs.blob_path(corrupt).unlink(missing_ok=True)
        raise
    finally:
        out.unlink(missing_ok=True)


def link_tree(
    placements: list[tuple[str, str]],
    blob_path: Callable[[str], Path],
    linker: Linker,
    tmp: Path,
    final: Path,
) -> None:
    """Build the directory ``tmp`` (a new sibling of ``final``) and rename it to ``final``.

    ``tmp`` is gone afterwards, whatever happened. A ``final`` that appeared meanwhile (built
    by someone who did not take the lock) is kept as it is: snapshots are immutable.
    """
    tmp.mkdir()
    try:
        for relative, blob_hex in placements:
            dest = tmp.joinpath(*relative.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            linker.place(blob_path(blob_hex), dest)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
