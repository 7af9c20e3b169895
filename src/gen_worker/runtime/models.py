"""The worker's side of the model store: endpoint-config prefetch and the disk inventory.

When the scheduler sends an endpoint config, every resolved model it lists (a snapshot digest
and its files with URLs) is fetched into the store in the background, at most
``WORKER_MAX_CONCURRENT_DOWNLOADS`` at once, with ``model.download.*`` events and one
``model.ready`` per model; a required model the scheduler did not resolve is resolved through
the hub when ``WORKER_ALLOW_TENSORHUB_API_RESOLVE`` allows it, and otherwise reported as not
prefetched. After each prefetch a ``models.disk_inventory`` event lists what the store holds.
Nothing here can fail a request or the worker: failures become events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from gen_worker.config import ModelSettings
from gen_worker.errors import GenWorkerError
from gen_worker.models.manifest import ManifestEntry, SnapshotManifest
from gen_worker.models.source import ModelSource
from gen_worker.protocol import messages as m

__all__ = ["WorkerModels", "manifest_of"]

Emit = Callable[[str, dict[str, Any]], None]


def manifest_of(model: m.ResolvedModel) -> SnapshotManifest:
    """The snapshot a scheduler resolution describes."""
    return SnapshotManifest(
        model.snapshot_digest,
        tuple(ManifestEntry(f.path, f.size_bytes, f.blake3, f.url) for f in model.files),
    )


class WorkerModels:
    """Prefetches the endpoint's models into the store and reports the store's contents."""

    def __init__(self, source: ModelSource, settings: ModelSettings) -> None:
        self.source = source
        self.settings = settings
        self._limit = asyncio.Semaphore(max(1, settings.max_concurrent_downloads))
        self.downloading: set[str] = set()

    async def aclose(self) -> None:
        await self.source.aclose()

    def warm(self) -> list[str]:
        """Refs (or digests) of the complete snapshots in the store."""
        store = self.source.store
        names = {digest: ref for ref, digest in sorted(store.refs().items())}
        return sorted(names.get(info.digest, info.digest) for info in store.inventory())

    async def prefetch(self, config: m.EndpointConfig, emit: Emit) -> None:
        """Fetch every model of ``config``; report each outcome, then the inventory."""
        resolved = {r.ref: r for r in config.resolved_models if r.snapshot_digest}
        wanted = list(dict.fromkeys([*resolved, *config.required_models]))
        if not wanted:
            return
        await asyncio.gather(*(self._one(ref, resolved.get(ref), emit) for ref in wanted))
        try:
            inventory = await asyncio.to_thread(self.source.store.disk_inventory)
        except Exception as exc:  # the inventory is a report; never let it fail the worker
            emit("models.disk_inventory", {"error_message": type(exc).__name__})
            return
        emit("models.disk_inventory", inventory)

    async def _one(self, ref: str, resolution: m.ResolvedModel | None, emit: Emit) -> None:
        async with self._limit:
            started = time.monotonic()
            self.downloading.add(ref)
            try:
                if resolution is not None:
                    path = await self.source.fetcher.fetch(
                        manifest_of(resolution), ref=ref, on_event=emit
                    )
                elif self.settings.allow_hub_resolve and self.source.hub is not None:
                    path = await self.source.pull(ref)
                else:
                    emit(
                        "model.download.failed",
                        {
                            "model_id": ref,
                            "error_type": "fatal",
                            "error_message": (
                                "the scheduler sent no resolution for this model and resolving "
                                "through the hub is off (WORKER_ALLOW_TENSORHUB_API_RESOLVE, "
                                "TENSORHUB_URL)"
                            ),
                        },
                    )
                    return
            except GenWorkerError as exc:
                # The fetcher already sent model.download.failed with the details.
                if resolution is None:
                    emit(
                        "model.download.failed",
                        {"model_id": ref, "error_type": exc.error_type, "error_message": str(exc)},
                    )
                return
            except Exception as exc:  # a bug must not take the worker down with it
                emit(
                    "model.download.failed",
                    {
                        "model_id": ref,
                        "error_type": "internal",
                        "error_message": type(exc).__name__,
                    },
                )
                return
            finally:
                self.downloading.discard(ref)
            emit(
                "model.ready",
                {
                    "model_id": ref,
                    "path": str(path),
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                },
            )
