"""Atomic, hashed file writes: a hidden ``.partial`` file beside the destination, then a rename.

Both outputs and downloaded inputs are written this way, so a reader of the directory never
sees a half-written file (the final name appears only through ``os.replace``), the sha256 and
blake3 digests cost no second pass over the data, and a size limit stops a write as soon as
it would be passed. Crash durability is not a goal (no fsync): these files live for one
request.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

__all__ = ["CHUNK_BYTES", "Digest", "HashingWriter", "hash_file"]

CHUNK_BYTES = 1 << 20
# mkstemp creates 0600 files; outputs are served and read by other processes of the same user
# or group (the dev runner, a sidecar), so the finished file gets ordinary permissions.
_FINAL_MODE = 0o644


@dataclass(frozen=True, slots=True)
class Digest:
    """Size and digests of one finished file."""

    size_bytes: int
    sha256: str
    blake3: str


class HashingWriter:
    """Writes one file through a ``.partial`` temporary beside ``final``, hashing as it goes.

    ``commit()`` renames the temporary into place; ``discard()`` (also done on any failure of
    ``write`` or ``commit``) removes it. ``too_large(size)`` builds the exception raised when a
    write would take the file past ``max_bytes``.
    """

    def __init__(
        self,
        final: Path,
        *,
        max_bytes: int | None = None,
        too_large: Callable[[int], Exception] | None = None,
    ) -> None:
        self.final = final
        self.size = 0
        self._max_bytes = max_bytes
        self._too_large = too_large or (lambda n: ValueError(f"file would pass {max_bytes} bytes"))
        # Same directory as the destination, so os.replace is a rename and never a copy.
        prefix = "." + final.name[:64] + "."
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=prefix, suffix=".partial")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._sha256 = hashlib.sha256()
        self._blake3 = blake3.blake3()
        self._closed = False

    @property
    def temp_path(self) -> Path:
        """The temporary file (gone once committed or discarded)."""
        return self._tmp

    def write(self, data: bytes) -> None:
        """Append ``data``; past the size limit, discard everything and raise ``too_large``."""
        if self._closed:
            raise ValueError("this file writer is already closed")
        new_size = self.size + len(data)
        if self._max_bytes is not None and new_size > self._max_bytes:
            self.discard()
            raise self._too_large(new_size)
        try:
            self._file.write(data)
        except BaseException:
            self.discard()
            raise
        self._sha256.update(data)
        self._blake3.update(data)
        self.size = new_size

    def commit(self) -> Digest:
        """Move the finished file into place and describe it."""
        if self._closed:
            raise ValueError("this file writer is already closed")
        try:
            os.fchmod(self._file.fileno(), _FINAL_MODE)
            self._file.close()
            self._tmp.replace(self.final)  # atomic: readers see the old file or the new one
        except BaseException:
            self.discard()
            raise
        self._closed = True
        return Digest(self.size, self._sha256.hexdigest(), self._blake3.hexdigest())

    def discard(self) -> None:
        """Remove the temporary file; safe to call more than once and after a failure."""
        self._closed = True
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def hash_file(path: Path) -> Digest:
    """Size and digests of an existing file, read in chunks."""
    sha256 = hashlib.sha256()
    b3 = blake3.blake3()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha256.update(chunk)
            b3.update(chunk)
            size += len(chunk)
    return Digest(size, sha256.hexdigest(), b3.hexdigest())
