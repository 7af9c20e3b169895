"""Outputs saved under a local directory: the dev runner's :class:`OutputSink`.

The ref ``jobs/<rid>/outputs/a/b.png`` is written to ``<root>/jobs/<rid>/outputs/a/b.png``
through :class:`HashingWriter`, so a reader never sees a half-written output and a failed
save leaves nothing behind. Re-saving a ref replaces the file atomically.
"""

from __future__ import annotations

import abc
import mimetypes
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from gen_worker.authoring import Asset, Tensors
from gen_worker.errors import OutputTooLargeError, ValidationError
from gen_worker.files.hashing import CHUNK_BYTES, Digest, HashingWriter
from gen_worker.files.refs import check_request_id, output_ref

__all__ = ["LocalOutputSink", "LocalOutputStream", "OutputStreamBase"]

_DEFAULT_MIME = "application/octet-stream"


def _mime_type(ref: str) -> str:
    return mimetypes.guess_type(ref, strict=False)[0] or _DEFAULT_MIME


class OutputStreamBase(abc.ABC):
    """What every incremental output does as a context manager: finalize when the block
    succeeds (unless the function already finalized or aborted it), abort when it raises."""

    @property
    @abc.abstractmethod
    def finished(self) -> bool:
        """True once finalized or aborted."""

    @abc.abstractmethod
    def finalize(self) -> Asset:
        """Make the output visible and describe it."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the partial output."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.finished:
            self.finalize()


class LocalOutputStream(OutputStreamBase):
    """An incremental output; ``finalize()`` makes it visible, ``abort()`` drops it.

    As a context manager it finalizes when the block succeeds and aborts when it raises.
    """

    def __init__(self, writer: HashingWriter, finish: Callable[[], Asset]) -> None:
        self._writer = writer
        self._finish = finish  # commits the writer and describes the output
        self._state = "open"

    def _check_open(self) -> None:
        if self._state == "finalized":
            raise ValueError("already finalized")
        if self._state == "aborted":
            raise ValueError("this output stream was aborted")

    @property
    def finished(self) -> bool:
        """True once finalized or aborted."""
        return self._state != "open"

    def write(self, data: bytes) -> int:
        """Append ``data``; past WORKER_MAX_UPLOAD_BYTES the stream is aborted and raises."""
        self._check_open()
        try:
            self._writer.write(data)
        except BaseException:
            self._state = "aborted"
            raise
        return len(data)

    def finalize(self) -> Asset:
        """Move the output into place and describe it; a second call raises ValueError."""
        self._check_open()
        # Whatever happens now, this stream is done: a failed commit already removed the file.
        self._state = "finalized"
        return self._finish()

    def abort(self) -> None:
        """Drop the partial output; does nothing once finalized or aborted."""
        if self._state == "open":
            self._state = "aborted"
            self._writer.discard()


class LocalOutputSink:
    """Persists one request's outputs under ``root`` (structurally an ``OutputSink``)."""

    def __init__(self, root: Path, request_id: str, *, max_upload_bytes: int | None = None) -> None:
        self._request_id = check_request_id(request_id)
        # Resolved once, so the containment check compares real paths with a real path.
        self._root = Path(root).resolve()
        self._max_bytes = max_upload_bytes
        self._saved: list[Asset] = []
        # A function may save outputs from several threads at once.
        self._lock = threading.Lock()

    @property
    def saved(self) -> list[Asset]:
        """Every asset finalized through this sink, in order."""
        with self._lock:
            return list(self._saved)

    # -- public API -------------------------------------------------------------------

    def save_bytes(self, ref: str, data: bytes) -> Asset:
        """Write ``data`` as the output ``ref``."""
        self._check_size(len(data))
        full, final = self._target(ref)
        return self._as_asset(full, final, self._write(full, final, [data]))

    def save_file(self, ref: str, local_path: Path) -> Asset:
        """Copy the file at ``local_path`` to the output ``ref``, in chunks."""
        full, final, digest = self._copy_file(ref, local_path)
        return self._as_asset(full, final, digest)

    def open_stream(self, ref: str) -> LocalOutputStream:
        """An incremental writer for the output ``ref``."""
        full, final = self._target(ref)
        writer = self._new_writer(final)
        return LocalOutputStream(writer, lambda: self._as_asset(full, final, _commit(full, writer)))

    def save_checkpoint(self, ref: str, local_path: Path, format: str) -> Tensors:
        """Copy a weight artifact to the output ``ref``."""
        _check_format(format)
        full, _, digest = self._copy_file(ref, local_path)
        return _as_tensors(full, format, digest)

    def save_checkpoint_bytes(self, ref: str, data: bytes, format: str) -> Tensors:
        """Write a weight artifact given as bytes to the output ``ref``."""
        _check_format(format)
        self._check_size(len(data))
        full, final = self._target(ref)
        return _as_tensors(full, format, self._write(full, final, [data]))

    def path_of(self, full_ref: str) -> Path:
        """Where the saved output ``full_ref`` (as returned in an Asset's ``ref``) lies."""
        return self._root / full_ref

    # -- helpers ----------------------------------------------------------------------

    def _check_size(self, size: int) -> None:
        if self._max_bytes is not None and size > self._max_bytes:
            raise OutputTooLargeError(size, self._max_bytes, "WORKER_MAX_UPLOAD_BYTES")

    def _target(self, ref: str) -> tuple[str, Path]:
        """The full ref and the real path it is written to, with its directory created."""
        full = output_ref(ref, self._request_id)
        path = self._root / full
        # Checked before mkdir too, so a symlink pointing out is never used to create dirs.
        self._inside_root(full, path.parent)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ValidationError(
                f"output ref {full!r} conflicts with an existing output: a parent is a file"
            ) from exc
        return full, self._inside_root(full, path.parent) / path.name

    def _inside_root(self, full: str, directory: Path) -> Path:
        resolved = directory.resolve()
        if not resolved.is_relative_to(self._root):
            raise ValidationError(
                f"output ref {full!r} resolves outside the output directory through a "
                "symlink; refusing to write it"
            )
        return resolved

    def _new_writer(self, final: Path) -> HashingWriter:
        max_bytes = self._max_bytes
        return HashingWriter(
            final,
            max_bytes=max_bytes,
            too_large=lambda n: OutputTooLargeError(n, max_bytes or 0, "WORKER_MAX_UPLOAD_BYTES"),
        )

    def _write(self, full: str, final: Path, chunks: Iterable[bytes]) -> Digest:
        writer = self._new_writer(final)
        try:
            for chunk in chunks:
                writer.write(chunk)
            return _commit(full, writer)
        finally:
            writer.discard()  # a no-op after a commit; removes the .partial after a failure

    def _copy_file(self, ref: str, local_path: Path) -> tuple[str, Path, Digest]:
        with _open_source(Path(local_path)) as f:
            self._check_size(os.fstat(f.fileno()).st_size)
            full, final = self._target(ref)
            return full, final, self._write(full, final, _chunks(f.read))

    def _as_asset(self, full: str, final: Path, digest: Digest) -> Asset:
        asset = Asset(
            ref=full,
            size_bytes=digest.size_bytes,
            sha256=digest.sha256,
            blake3=digest.blake3,
            mime_type=_mime_type(full),
            local_path=str(final),
        )
        with self._lock:
            self._saved.append(asset)
        return asset


def _commit(full: str, writer: HashingWriter) -> Digest:
    try:
        return writer.commit()
    except IsADirectoryError as exc:
        raise ValidationError(
            f"cannot save output {full!r}: a directory of other outputs has that name"
        ) from exc


def _open_source(source: Path) -> BinaryIO:
    # Checked before opening: opening a FIFO or a device would block or read forever.
    if not source.is_file():
        what = "it is not a regular file" if source.exists() else "it does not exist"
        raise ValidationError(f"cannot save output from {source}: {what}")
    try:
        return source.open("rb")
    except FileNotFoundError as exc:  # removed between the check and the open
        raise ValidationError(f"cannot save output from {source}: it does not exist") from exc


def _chunks(read: Callable[[int], bytes]) -> Iterator[bytes]:
    while chunk := read(CHUNK_BYTES):
        yield chunk


def _check_format(format: str) -> None:
    if not isinstance(format, str) or not format:
        raise ValidationError(f"checkpoint format must be a non-empty string, got {format!r}")


def _as_tensors(full: str, format: str, digest: Digest) -> Tensors:
    return Tensors(
        ref=full,
        format=format,
        size_bytes=digest.size_bytes,
        sha256=digest.sha256,
        blake3=digest.blake3,
    )
