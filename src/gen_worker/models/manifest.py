"""Snapshot manifests, the parts format, and the path rules every model component shares.

A snapshot is an immutable set of files, each named by a relative path and stored as a blob
addressed by its blake3 digest. Its identity (``checkpoint_id`` on the wire, the directory name
in the store) is ``blake3:<hex>`` of the canonical manifest: the entries sorted by path, each
``path\\0size\\0blake3\\n``, hashed. The hub computes it when publishing and the store checks
it before a snapshot appears, so the two agree by construction.

Large files may travel as parts: ``<path>.partNNNN`` blobs plus a ``<path>.parts.json`` blob
(:class:`PartsFile`) that lists each part's size and digest and the whole file's. The store
reassembles them into one blob named ``<path>`` and checks the whole-file size and digest.
"""

from __future__ import annotations

import re

import blake3
import msgspec

from gen_worker.errors import UnsafePathError

__all__ = [
    "DIGEST_PREFIX",
    "PARTS_SUFFIX",
    "ManifestEntry",
    "PartEntry",
    "PartsFile",
    "SnapshotManifest",
    "check_blake3_hex",
    "check_relative_path",
    "part_name",
    "snapshot_digest",
    "split_digest",
]

DIGEST_PREFIX = "blake3:"
PARTS_SUFFIX = ".parts.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ManifestEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One file of a snapshot: where it goes, how big it is, its blake3, and where to get it.

    ``url`` is empty when the bytes are already local (the hub's own storage, a store that has
    the blob). ``sha256`` is set only by sources that publish sha256 and not blake3 (Hugging
    Face LFS files); then ``blake3`` may be empty until the bytes have been read once.
    """

    path: str
    size_bytes: int
    blake3: str = ""
    url: str = ""
    sha256: str = ""


class SnapshotManifest(msgspec.Struct, frozen=True):
    """A snapshot: its digest (``blake3:<hex>``) and its entries."""

    digest: str
    entries: tuple[ManifestEntry, ...]

    @property
    def hex(self) -> str:
        """The digest without its ``blake3:`` prefix (the store's directory name)."""
        return split_digest(self.digest)

    @property
    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries)


class PartEntry(msgspec.Struct, frozen=True):
    """One part of a split file, in order."""

    path: str  # the part's own manifest path, "<path>.partNNNN"
    size_bytes: int
    blake3: str


class PartsFile(msgspec.Struct, frozen=True):
    """The content of ``<path>.parts.json``: the whole file and its parts, in order."""

    path: str
    size_bytes: int
    blake3: str
    parts: tuple[PartEntry, ...]


def part_name(path: str, index: int) -> str:
    """``weights.bin`` part 3 -> ``weights.bin.part0003``."""
    return f"{path}.part{index:04d}"


def check_blake3_hex(value: str, *, what: str = "blake3 digest") -> str:
    """Return ``value`` if it is 64 lower-case hex characters, else raise ``ValueError``."""
    if not _HEX64.fullmatch(value):
        raise ValueError(f"{what} {value[:80]!r} is not 64 lower-case hex characters")
    return value


def split_digest(digest: str) -> str:
    """``blake3:<hex>`` -> ``<hex>``; anything else is a ``ValueError`` naming the form."""
    if not digest.startswith(DIGEST_PREFIX):
        raise ValueError(f"snapshot digest {digest[:80]!r} must look like blake3:<64 hex>")
    return check_blake3_hex(digest[len(DIGEST_PREFIX) :], what="snapshot digest")


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a snapshot, else raise.

    Refused: empty, absolute (``/x``, ``C:x``), backslashes, ``.``/``..``/empty segments,
    NUL and other control characters.
    """
    if not path:
        raise UnsafePathError(path, "empty path")
    if "\\" in path:
        raise UnsafePathError(path, "backslash in path")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        raise UnsafePathError(path, "absolute path")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise UnsafePathError(path, "control character in path")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafePathError(path, f"segment {segment!r} is not allowed")
    return path


def snapshot_digest(entries: tuple[ManifestEntry, ...] | list[ManifestEntry]) -> str:
    """The snapshot identity: ``blake3:`` + blake3 of the canonical listing of ``entries``."""
    hasher = blake3.blake3()
    for entry in sorted(entries, key=lambda e: e.path):
        hasher.update(f"{entry.path}\0{entry.size_bytes}\0{entry.blake3}\n".encode())
    return DIGEST_PREFIX + hasher.hexdigest()
