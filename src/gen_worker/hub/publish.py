"""Publishing a local directory (or one file) into the hub as a snapshot, and moving a tag.

Everything that can be wrong with the input is checked before the first byte is written:
the ref, the attributes, and the whole file tree (unsafe names, names reserved for split
files, symlinks that leave the directory or loop, things that are not regular files). Then
each file is streamed into the blob store while it is hashed; a file larger than the part
threshold is stored as ``<path>.partNNNN`` blobs plus a ``<path>.parts.json`` blob
(:class:`~gen_worker.models.manifest.PartsFile`). The snapshot digest covers the published
entries (parts and parts files, not the whole split file). Last, the snapshot record is
written and the tag moved, under the repo's file lock, so concurrent publishes are all
recorded. A failed publish leaves no snapshot and no tag move; blobs it finished are complete,
content-addressed and harmless.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

import blake3
import msgspec

from gen_worker.errors import UnsafePathError, ValidationError
from gen_worker.hub.storage import HubStorage, SnapshotRecord, StoredEntry, utc_now
from gen_worker.models.manifest import (
    PARTS_SUFFIX,
    ManifestEntry,
    PartEntry,
    PartsFile,
    SnapshotManifest,
    check_relative_path,
    part_name,
    snapshot_digest,
)
from gen_worker.refs import DEFAULT_TAG, parse_cozy_ref

__all__ = ["DEFAULT_PART_SIZE_BYTES", "collect_files", "parse_publish_ref", "publish"]

#: Files larger than this are published as parts.
DEFAULT_PART_SIZE_BYTES = 256 << 20
_CHUNK_BYTES = 1 << 20
_RESERVED = re.compile(r"\.part\d{4,}$")


def parse_publish_ref(ref: str) -> tuple[str, str]:
    """``owner/repo[:tag]`` -> (repo id, tag); the tag defaults to ``latest``, and digests and
    flavors are refused."""
    parsed = parse_cozy_ref(ref)
    if parsed.digest is not None:
        raise ValidationError(
            f"cannot publish to {ref!r}: a digest names an existing snapshot; "
            "publish to owner/repo[:tag] and the hub computes the digest"
        )
    if parsed.flavor is not None:
        raise ValidationError(
            f"cannot publish to {ref!r}: a '#flavor' is not published separately; "
            "publish to owner/repo[:tag] and describe variants with attributes (--attr k=v)"
        )
    return parsed.repo_id, parsed.tag or DEFAULT_TAG


def _check_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not key.strip() or not isinstance(value, str):
            raise ValidationError(
                f"invalid attribute {key!r}={value!r}: attributes map non-empty string keys "
                "to string values, e.g. {'dtype': 'bf16'}"
            )
        checked[key] = value
    return checked


def _check_name(rel: str) -> str:
    check_relative_path(rel)
    if rel.endswith(PARTS_SUFFIX) or _RESERVED.search(rel):
        raise ValidationError(
            f"cannot publish {rel!r}: names ending in '{PARTS_SUFFIX}' or '.partNNNN' are "
            "reserved for the parts of split files; rename the file"
        )
    return rel


def _walk(folder: Path, root: Path, prefix: str, chain: frozenset[Path]) -> list[tuple[str, Path]]:
    """The files under ``folder`` as (relative name, path), sorted; symlinks are followed
    only while they stay inside ``root`` and do not loop."""
    found: list[tuple[str, Path]] = []
    for path in sorted(folder.iterdir()):
        rel = f"{prefix}{path.name}"
        target = path
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                raise UnsafePathError(rel, f"it is a symlink to {target}, outside {root}")
            if not target.exists():
                raise ValidationError(f"cannot publish {rel!r}: it is a dangling symlink")
        mode = target.stat().st_mode
        if stat.S_ISDIR(mode):
            real = target.resolve()
            if real in chain:
                raise ValidationError(f"cannot publish {rel!r}: a symlink loop leads back to it")
            found.extend(_walk(target, root, rel + "/", chain | {real}))
        elif stat.S_ISREG(mode):
            found.append((_check_name(rel), target))
        else:
            raise ValidationError(
                f"cannot publish {rel!r}: it is not a regular file or directory "
                "(a socket, FIFO or device)"
            )
    return found


def collect_files(path: Path) -> list[tuple[str, Path]]:
    """The files to publish from ``path`` (a directory or one file), checked, sorted by name."""
    if not path.exists():
        raise ValidationError(f"cannot publish {str(path)!r}: no such file or directory")
    if path.is_file():
        return [(_check_name(path.name), path)]
    if not path.is_dir():
        raise ValidationError(f"cannot publish {str(path)!r}: not a regular file or directory")
    root = path.resolve()
    files = _walk(root, root, "", frozenset({root}))
    if not files:
        raise ValidationError(f"cannot publish {str(path)!r}: the directory holds no files")
    return files


class _Publisher:
    """Streams files into one storage's blob store, splitting above ``part_size_bytes``."""

    def __init__(self, storage: HubStorage, part_size_bytes: int) -> None:
        self.storage = storage
        self.part_size_bytes = part_size_bytes
        self._buffer = bytearray(_CHUNK_BYTES)

    def _blob(
        self, f: io.BufferedReader, length: int, whole: blake3.blake3, rel: str
    ) -> tuple[int, str]:
        """Copy ``length`` bytes from ``f`` into one new blob; (size, blake3 hex)."""
        view = memoryview(self._buffer)
        with self.storage.blob_writer() as writer:
            left = length
            while left > 0:
                n = f.readinto(view[: min(left, _CHUNK_BYTES)])
                if not n:
                    raise ValidationError(f"cannot publish {rel!r}: it shrank while being read")
                writer.write(view[:n])
                whole.update(view[:n])
                left -= n
            return writer.size, writer.commit()

    def store(self, rel: str, src: Path) -> list[StoredEntry]:
        """The entries one source file becomes: itself, or its parts and its parts file."""
        with src.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            whole = blake3.blake3()
            if size <= self.part_size_bytes:
                n, digest = self._blob(f, size, whole, rel)
                entries = [StoredEntry(rel, n, digest)]
            else:
                entries = self._store_parts(f, rel, size, whole)
            if f.read(1):
                raise ValidationError(f"cannot publish {rel!r}: it grew while being read")
        return entries

    def _store_parts(
        self, f: io.BufferedReader, rel: str, size: int, whole: blake3.blake3
    ) -> list[StoredEntry]:
        parts: list[PartEntry] = []
        offset = 0
        while offset < size:
            length = min(self.part_size_bytes, size - offset)
            n, digest = self._blob(f, length, whole, rel)
            parts.append(PartEntry(part_name(rel, len(parts)), n, digest))
            offset += n
        listing = PartsFile(rel, size, whole.hexdigest(), tuple(parts))
        encoded = msgspec.json.encode(listing)
        with self.storage.blob_writer() as writer:
            writer.write(encoded)
            listing_digest = writer.commit()
        entries = [StoredEntry(p.path, p.size_bytes, p.blake3) for p in parts]
        entries.append(StoredEntry(rel + PARTS_SUFFIX, len(encoded), listing_digest))
        return entries


def publish(
    root: Path | str,
    ref: str,
    path: Path | str,
    *,
    attributes: Mapping[str, str] | None = None,
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
) -> SnapshotManifest:
    """Publish ``path`` into the hub at ``root`` as a snapshot of ``ref``'s repo; move its tag.

    Returns the snapshot (digest and entries, without URLs). Raises ``ValidationError`` (or
    its subclasses ``InvalidModelRefError`` and ``UnsafePathError``) for bad input, before
    anything is written.
    """
    repo_id, tag = parse_publish_ref(ref)
    attrs = _check_attributes(attributes or {})
    if (
        isinstance(part_size_bytes, bool)
        or not isinstance(part_size_bytes, int)
        or (part_size_bytes < 1)
    ):
        raise ValidationError(
            f"part size {part_size_bytes!r} must be a positive number of bytes "
            f"(default {DEFAULT_PART_SIZE_BYTES})"
        )
    files = collect_files(Path(path))
    storage = HubStorage(Path(root)).ensure()
    publisher = _Publisher(storage, part_size_bytes)
    stored: list[StoredEntry] = []
    for rel, src in files:
        stored.extend(publisher.store(rel, src))
    stored.sort(key=lambda e: e.path)
    entries = tuple(ManifestEntry(e.path, e.size_bytes, e.blake3) for e in stored)
    digest = snapshot_digest(entries)
    record = SnapshotRecord(digest, tuple(stored), attrs, repo_id, utc_now())
    storage.record_publish(record, tag)
    return SnapshotManifest(digest, entries)
