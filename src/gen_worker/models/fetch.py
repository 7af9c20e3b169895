"""Bring a snapshot into the store: the one path every model download takes.

``SnapshotFetcher.fetch(manifest)``: if the snapshot is already complete, touch it and return
its directory. Otherwise, under the snapshot's file lock (so two processes build it once):
check and make disk space, download the missing blobs (largest first, a bounded number at
once, each through the verified resumable downloader with its own lock), materialise the
snapshot atomically, and record the ref -> digest index. Concurrent calls for the same
snapshot in one process share one task. Events (``model.download.started/completed/failed``)
go to ``on_event``; byte progress to ``on_progress(done, total)``.

A failed fetch leaves every verified blob and every ``.part`` in place, so the next request
(or ``gen-worker models pull``) resumes where this one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import blake3
import filelock
import httpx

from gen_worker.errors import GenWorkerError, HubError
from gen_worker.models.download import (
    BlobSource,
    DownloadPolicy,
    DownloadResult,
    Target,
    download_blob,
    download_parts,
    make_client,
)
from gen_worker.models.manifest import (
    DIGEST_PREFIX,
    PARTS_SUFFIX,
    ManifestEntry,
    SnapshotManifest,
    snapshot_digest,
)
from gen_worker.models.parts import JoinedFile, plan_joined
from gen_worker.models.store import Store

__all__ = ["EventSink", "ProgressSink", "SnapshotFetcher"]

_log = logging.getLogger("gen_worker.models")
_T = TypeVar("_T")

EventSink = Callable[[str, dict[str, Any]], None]
ProgressSink = Callable[[int, int], None]
#: Returns the same snapshot with fresh URLs (a presigned URL expired: 403).
Refresh = Callable[[], Awaitable[SnapshotManifest]]


class SnapshotFetcher:
    """Downloads snapshots into one :class:`Store`."""

    def __init__(
        self,
        store: Store,
        *,
        policy: DownloadPolicy | None = None,
        blob_concurrency: int = 4,
        client: httpx.AsyncClient | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self._policy = policy or DownloadPolicy()
        self._blob_concurrency = max(1, blob_concurrency)
        self._client_given = client
        self._headers = headers or {}
        self._inflight: dict[str, asyncio.Task[Path]] = {}

    def _client(self) -> httpx.AsyncClient:
        if self._client_given is None:
            self._client_given = make_client(self._policy, headers=self._headers)
        return self._client_given

    async def aclose(self) -> None:
        if self._client_given is not None:
            await self._client_given.aclose()
            self._client_given = None

    async def fetch(
        self,
        manifest: SnapshotManifest,
        *,
        ref: str | None = None,
        refresh: Refresh | None = None,
        on_event: EventSink | None = None,
        on_progress: ProgressSink | None = None,
    ) -> Path:
        """The snapshot's directory, downloading what is missing."""
        if self.store.has_snapshot(manifest.digest):
            self.store.touch(manifest.digest)
            if ref is not None:
                self.store.set_ref(ref, manifest.digest)
            return self.store.snapshot_path(manifest.digest)
        task = self._inflight.get(manifest.digest)
        if task is None or task.done():
            task = asyncio.ensure_future(self._fetch(manifest, ref, refresh, on_event, on_progress))
            self._inflight[manifest.digest] = task
            task.add_done_callback(lambda _: self._inflight.pop(manifest.digest, None))
        # Shielded: one caller giving up (a canceled request) must not cancel the others' fetch.
        path = await asyncio.shield(task)
        if ref is not None:
            # A caller that joined another ref's fetch of the same snapshot (two tags of one
            # checkpoint) must find its own ref in the index too.
            self.store.set_ref(ref, manifest.digest)
        return path

    async def _fetch(
        self,
        manifest: SnapshotManifest,
        ref: str | None,
        refresh: Refresh | None,
        on_event: EventSink | None,
        on_progress: ProgressSink | None,
    ) -> Path:
        name = ref or manifest.digest
        emit = _safe(on_event)
        async with _exclusive(self.store, manifest.digest):
            if self.store.has_snapshot(manifest.digest):  # another process built it meanwhile
                self.store.touch(manifest.digest)
                return self._finish(manifest, ref)
            # The lease (with the manifest) keeps the blobs found present below from being
            # evicted by another process before the snapshot is built from them.
            with self.store.lease(manifest.digest, manifest=manifest):
                missing = self.store.missing_blobs(manifest)
                total = sum(e.size_bytes for e in missing)
                started = time.monotonic()
                emit(
                    "model.download.started",
                    {
                        "model_id": name,
                        "digest": manifest.digest,
                        "files": len(missing),
                        "bytes": total,
                        "snapshot_bytes": manifest.size_bytes,
                    },
                )
                try:
                    await asyncio.to_thread(self.store.ensure_space, total)
                    transferred = await self._download_all(manifest, missing, refresh, on_progress)
                    await asyncio.to_thread(self.store.materialize, manifest)
                except BaseException as exc:
                    emit("model.download.failed", _failure(name, manifest.digest, exc))
                    raise
            emit(
                "model.download.completed", _completed(name, manifest, total, transferred, started)
            )
            return self._finish(manifest, ref)

    async def fetch_unhashed(
        self,
        entries: list[ManifestEntry],
        *,
        ref: str,
        headers: dict[str, str] | None = None,
        on_event: EventSink | None = None,
        on_progress: ProgressSink | None = None,
    ) -> Path:
        """Fetch files known by URL, size and maybe sha256 but not blake3 (Hugging Face).

        Each file is downloaded (resumably, verified against its sha256 when known) into the
        store's incoming area, hashed into a blob, and the snapshot is built from the blake3
        digests found; ``ref`` (which must pin a revision) is indexed to it.
        """
        emit = _safe(on_event)
        # Locked by ref: until the bytes are read, the snapshot's digest is unknown.
        async with _exclusive(self.store, DIGEST_PREFIX + blake3.blake3(ref.encode()).hexdigest()):
            known = self.store.get_ref(ref)
            if known is not None and self.store.has_snapshot(known):
                self.store.touch(known)
                return self.store.snapshot_path(known)
            total = sum(e.size_bytes for e in entries)
            started = time.monotonic()
            emit(
                "model.download.started",
                {"model_id": ref, "files": len(entries), "bytes": total, "snapshot_bytes": total},
            )
            try:
                await asyncio.to_thread(self.store.ensure_space, 2 * total)
                filled, transferred = await self._download_unhashed(
                    entries, headers or {}, on_progress
                )
                manifest = SnapshotManifest(snapshot_digest(filled), tuple(filled))
                await asyncio.to_thread(self.store.materialize, manifest)
            except BaseException as exc:
                emit("model.download.failed", _failure(ref, "", exc))
                raise
            emit("model.download.completed", _completed(ref, manifest, total, transferred, started))
            return self._finish(manifest, ref)

    async def _download_unhashed(
        self,
        entries: list[ManifestEntry],
        headers: dict[str, str],
        on_progress: ProgressSink | None,
    ) -> tuple[list[ManifestEntry], int]:
        incoming = self.store.root / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        total = sum(e.size_bytes for e in entries)
        done = 0
        transferred = 0

        def progress(delta: int) -> None:
            nonlocal done
            done += delta
            if on_progress is not None:
                with contextlib.suppress(Exception):
                    on_progress(done, total)

        client = make_client(self._policy, headers=headers) if headers else self._client()
        limit = asyncio.Semaphore(self._blob_concurrency)

        async def one(entry: ManifestEntry) -> ManifestEntry:
            nonlocal transferred
            # Named by what identifies the bytes before they are read, so a resume finds them.
            name = entry.sha256 or _url_key(entry)
            dest = incoming / name
            async with limit:
                result = await download_blob(
                    client,
                    BlobSource(entry.path, entry.url, entry.size_bytes, "", entry.sha256),
                    dest,
                    policy=self._policy,
                    on_progress=progress,
                    lock_path=incoming / f"{name}.lock",
                )
            transferred += result.bytes_transferred
            digest = await asyncio.to_thread(self.store.add_blob_from_file, dest, result.blake3)
            return ManifestEntry(entry.path, entry.size_bytes, digest)

        try:
            ordered = sorted(entries, key=lambda e: e.size_bytes, reverse=True)
            filled = await _gather_all([one(e) for e in ordered])
        finally:
            if client is not self._client_given:
                await client.aclose()
        return filled, transferred

    def _finish(self, manifest: SnapshotManifest, ref: str | None) -> Path:
        if ref is not None:
            self.store.set_ref(ref, manifest.digest)
        return self.store.snapshot_path(manifest.digest)

    async def _download_all(
        self,
        manifest: SnapshotManifest,
        missing: list[ManifestEntry],
        refresh: Refresh | None,
        on_progress: ProgressSink | None,
    ) -> int:
        total = sum(e.size_bytes for e in missing)
        done = 0

        def progress(delta: int) -> None:
            nonlocal done
            done += delta
            if on_progress is not None:
                with contextlib.suppress(Exception):  # progress must never break a download
                    on_progress(done, total)

        fresh: dict[str, str] = {}
        refreshing: asyncio.Lock = asyncio.Lock()

        def refresher(entry: ManifestEntry) -> Callable[[], Awaitable[str]] | None:
            if refresh is None:
                return None

            async def new_url() -> str:
                async with refreshing:  # one refresh serves every blob that hit the 403
                    if entry.path not in fresh:
                        renewed = await refresh()
                        fresh.update({e.path: e.url for e in renewed.entries})
                url = fresh.get(entry.path)
                if not url:
                    raise HubError(f"{entry.path}: the refreshed manifest no longer lists it")
                return url

            return new_url

        limit = asyncio.Semaphore(self._blob_concurrency)
        transferred = 0

        async def one(entry: ManifestEntry | JoinedFile) -> None:
            nonlocal transferred
            async with limit:
                if isinstance(entry, JoinedFile):
                    parts = [_source(manifest, p) for p in entry.parts]
                    result = await self._download_joined(entry, parts, refresher, progress)
                else:
                    result = await download_blob(
                        self._client(),
                        _source(manifest, entry),
                        self.store.blob_path(entry.blake3),
                        policy=self._policy,
                        refresh_url=refresher(entry),
                        on_progress=progress,
                        lock_path=self.store.blob_lock_path(entry.blake3),
                    )
                transferred += result.bytes_transferred

        # Parts files first (they are small): they say which split files can be downloaded
        # whole, each part written at its offset, rather than as parts joined afterwards.
        indexes = [e for e in missing if e.path.endswith(PARTS_SUFFIX)]
        await _gather_all([one(e) for e in indexes])
        blobs, joined = plan_joined(manifest, self.store, [e for e in missing if e not in indexes])
        # Largest first: the long transfers start at once and the small ones fill the gaps.
        todo: list[ManifestEntry | JoinedFile] = [*blobs, *joined]
        todo.sort(key=lambda e: e.size_bytes, reverse=True)
        await _gather_all([one(e) for e in todo])
        return transferred

    async def _download_joined(
        self,
        joined: JoinedFile,
        parts: list[BlobSource],
        refresher: Callable[[ManifestEntry], Callable[[], Awaitable[str]] | None],
        progress: Callable[[int], None],
    ) -> DownloadResult:
        renew = {p.path: refresher(p) for p in joined.parts}

        async def part_url(part: BlobSource) -> str:
            new_url = renew[part.name]
            if new_url is None:
                raise HubError(f"{part.name}: download refused and no way to refresh its URL")
            return await new_url()

        return await download_parts(
            self._client(),
            Target(joined.path, joined.size_bytes, joined.blake3),
            parts,
            self.store.blob_path(joined.blake3),
            policy=self._policy,
            refresh_url=part_url if any(renew.values()) else None,
            on_progress=progress,
            lock_path=self.store.blob_lock_path(joined.blake3),
        )


# Threads of this process building the same snapshot (each with its own event loop) exclude
# each other here; the store's file lock excludes other processes but is re-entrant within one.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
_LOCK_POLL_S = 0.02


@contextlib.asynccontextmanager
async def _exclusive(store: Store, digest: str) -> AsyncIterator[None]:
    """Hold the snapshot against other threads and processes without blocking the loop.

    Polled rather than acquired in a worker thread: a canceled wait then never leaves a lock
    acquired behind the caller's back.
    """
    with _THREAD_LOCKS_GUARD:
        local = _THREAD_LOCKS.setdefault(f"{store.root}\0{digest}", threading.Lock())
    while not local.acquire(blocking=False):
        await asyncio.sleep(_LOCK_POLL_S)
    try:
        shared = store.snapshot_lock(digest)
        while True:
            try:
                shared.acquire(timeout=0)
                break
            except filelock.Timeout:
                await asyncio.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            shared.release()
    finally:
        local.release()


async def _gather_all(coros: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run ``coros`` at once; on the first failure cancel the rest, wait for them, re-raise."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _source(manifest: SnapshotManifest, entry: ManifestEntry) -> BlobSource:
    if not entry.url:
        raise HubError(
            f"{entry.path} of {manifest.digest} is not in the store and the manifest "
            "has no URL for it"
        )
    return BlobSource(entry.path, entry.url, entry.size_bytes, entry.blake3)


def _url_key(entry: ManifestEntry) -> str:
    return blake3.blake3(f"{entry.url}\0{entry.size_bytes}".encode()).hexdigest()


def _completed(
    name: str, manifest: SnapshotManifest, total: int, transferred: int, started: float
) -> dict[str, Any]:
    return {
        "model_id": name,
        "digest": manifest.digest,
        "bytes": total,
        "bytes_transferred": transferred,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }


def _failure(name: str, digest: str, exc: BaseException) -> dict[str, Any]:
    return {
        "model_id": name,
        "digest": digest,
        "error_type": getattr(exc, "error_type", "internal"),
        # Our errors' messages are written to be shown; anything else may hold a URL.
        "error_message": str(exc) if isinstance(exc, GenWorkerError) else type(exc).__name__,
    }


def _safe(on_event: EventSink | None) -> EventSink:
    def emit(event_type: str, payload: dict[str, Any]) -> None:
        if on_event is None:
            return
        try:
            on_event(event_type, payload)
        except Exception:  # events are best-effort: never fail a download over one
            _log.warning("model event handler failed for %s", event_type, exc_info=True)

    return emit
