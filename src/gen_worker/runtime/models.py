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
from typing import TYPE_CHECKING, Any

from gen_worker.config import ModelSettings
from gen_worker.errors import GenWorkerError
from gen_worker.models.manifest import ManifestEntry, SnapshotManifest
from gen_worker.protocol import messages as m

if TYPE_CHECKING:
    # Imported when first needed: the download stack (httpx) costs startup time, and a worker
    # whose endpoint config lists no models never uses it.
    from gen_worker.models.source import ModelSource

__all__ = ["WorkerModels", "availability_changes", "manifest_of"]

Emit = Callable[[str, dict[str, Any]], None]


def availability_changes(
    before: set[str], disabled: set[str], known: set[str]
) -> list[m.FunctionAvailability]:
    """What to tell the scheduler when an endpoint config changes the disabled functions."""
    changes = []
    for name in sorted((disabled ^ before) & known):
        available = name not in disabled
        reason = "" if available else "disabled by the endpoint config"
        changes.append(
            m.FunctionAvailability(function_name=name, available=available, reason=reason)
        )
    return changes


def manifest_of(model: m.ResolvedModel) -> SnapshotManifest:
    """The snapshot a scheduler resolution describes."""
    return SnapshotManifest(
        model.snapshot_digest,
        tuple(ManifestEntry(f.path, f.size_bytes, f.blake3, f.url) for f in model.files),
    )


class WorkerModels:
    """Prefetches the endpoint's models into the store and reports the store's contents."""

    def __init__(self, settings: ModelSettings, source: ModelSource | None = None) -> None:
        self.settings = settings
        self._source = source
        self._limit = asyncio.Semaphore(max(1, settings.max_concurrent_downloads))
        self.downloading: set[str] = set()

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            from gen_worker.models.source import build_model_source  # noqa: PLC0415

            self._source = build_model_source(self.settings)
        return self._source

    async def aclose(self) -> None:
        if self._source is not None:
            await self._source.aclose()

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
