"""The worker's output sink: outputs are staged on local disk, then uploaded through a file API.

``ctx.save_bytes`` and friends are synchronous (they are called from sync functions in worker
threads and from async functions on the event loop alike), so the sink never uploads inline:
each output is written and hashed locally by a :class:`LocalOutputSink`, its upload is started
on the event loop at once, and the returned :class:`Asset` already carries the final ref and
digests. The engine awaits :meth:`UploadingOutputSink.finish` before it reports the request's
result, so a failed upload fails the request instead of being swallowed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from gen_worker.authoring import Asset, Tensors
from gen_worker.files.file_api import FileApi, UploadedFile
from gen_worker.files.hashing import Digest
from gen_worker.files.outputs import LocalOutputSink, LocalOutputStream, OutputStreamBase

__all__ = ["UploadingOutputSink", "UploadingOutputStream"]


class UploadingOutputStream(OutputStreamBase):
    """A staged incremental output whose ``finalize()`` also starts its upload."""

    def __init__(self, inner: LocalOutputStream, sink: UploadingOutputSink) -> None:
        self._inner = inner
        self._sink = sink

    @property
    def finished(self) -> bool:
        return self._inner.finished

    def write(self, data: bytes) -> int:
        return self._inner.write(data)

    def finalize(self) -> Asset:
        asset = self._inner.finalize()
        self._sink._upload_asset(asset)
        return asset

    def abort(self) -> None:
        self._inner.abort()


class UploadingOutputSink:
    """Stages one request's outputs under ``staging`` and uploads each through ``api``."""

    def __init__(
        self, staging: LocalOutputSink, api: FileApi, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._staging = staging
        self._api = api
        self._loop = loop
        self._uploads: list[concurrent.futures.Future[UploadedFile]] = []

    @property
    def saved(self) -> list[Asset]:
        return self._staging.saved

    def save_bytes(self, ref: str, data: bytes) -> Asset:
        return self._upload_asset(self._staging.save_bytes(ref, data))

    def save_file(self, ref: str, local_path: Path) -> Asset:
        return self._upload_asset(self._staging.save_file(ref, local_path))

    def open_stream(self, ref: str) -> UploadingOutputStream:
        return UploadingOutputStream(self._staging.open_stream(ref), self)

    def save_checkpoint(self, ref: str, local_path: Path, format: str) -> Tensors:
        return self._upload_tensors(self._staging.save_checkpoint(ref, local_path, format))

    def save_checkpoint_bytes(self, ref: str, data: bytes, format: str) -> Tensors:
        return self._upload_tensors(self._staging.save_checkpoint_bytes(ref, data, format))

    async def finish(self) -> list[UploadedFile]:
        """Wait for every upload started so far; the first failure is raised."""
        done: list[UploadedFile] = []
        try:
            while self._uploads:  # an upload may be added while others are awaited
                pending, self._uploads = self._uploads, []
                done.extend(await asyncio.gather(*(asyncio.wrap_future(f) for f in pending)))
        finally:
            await self._api.aclose()
        return done

    def cancel(self) -> None:
        """Stop uploads still running (the request failed or was canceled)."""
        for upload in self._uploads:
            upload.cancel()

    # -- helpers ----------------------------------------------------------------------------

    def _start(self, ref: str, path: Path, digest: Digest) -> None:
        coro = self._api.upload(ref, path, expected=digest)
        # Thread-safe from a worker thread and from the loop's own thread alike.
        self._uploads.append(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _upload_asset(self, asset: Asset) -> Asset:
        assert asset.ref is not None and asset.local_path is not None  # set by the staging sink
        digest = Digest(asset.size_bytes or 0, asset.sha256 or "", asset.blake3 or "")
        self._start(asset.ref, Path(asset.local_path), digest)
        return asset

    def _upload_tensors(self, tensors: Tensors) -> Tensors:
        digest = Digest(tensors.size_bytes or 0, tensors.sha256 or "", tensors.blake3 or "")
        self._start(tensors.ref, self._staging.path_of(tensors.ref), digest)
        return tensors
