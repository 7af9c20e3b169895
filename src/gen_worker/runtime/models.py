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
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gen_worker.config import ModelSettings
from gen_worker.errors import DownloadError, GenWorkerError, ModelInUseError
from gen_worker.logs import log
from gen_worker.models.manifest import ManifestEntry, SnapshotManifest
from gen_worker.models.store import Store
from gen_worker.protocol import messages as m

if TYPE_CHECKING:
    # Imported when first needed: the download stack (httpx) costs startup time, and a worker
    # whose endpoint config lists no models never uses it.
    from gen_worker.injection import CachedModels
    from gen_worker.models.source import ModelSource

__all__ = ["WorkerModels", "availability_changes", "manifest_of"]

Emit = Callable[[str, dict[str, Any]], None]

#: How long a download waits for the scheduler's fresh URLs before it fails (retryable).
REFRESH_TIMEOUT_S = 30.0


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
        #: The engine's model provider (the model cache): what is hot and loading, and the
        #: scheduler's load and unload commands. None when no function injects a model.
        self.provider: CachedModels | None = None
        self._bare_store: Store | None = None
        #: Writes a message to the scheduler (set by the worker); URL refreshes go through it.
        self.send: Callable[[Any], None] | None = None
        self._refreshes: dict[str, list[asyncio.Future[m.ResolvedModel]]] = {}
        #: The endpoint config's resolutions by ref (a load command names only the ref).
        self.resolutions: dict[str, m.ResolvedModel] = {}

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            from gen_worker.models.source import build_model_source  # noqa: PLC0415

            self._source = build_model_source(self.settings)
        return self._source

    async def aclose(self) -> None:
        if self._source is not None:
            await self._source.aclose()

    def _store(self) -> Store:
        # The source's store once it exists; before that a store of its own, so that the
        # registration can list warm models without importing the download stack.
        if self._source is not None:
            return self._source.store
        if self._bare_store is None:
            self._bare_store = Store(self.settings.store_root)
        return self._bare_store

    def warm(self) -> list[str]:
        """Refs (or digests) of the complete snapshots in the store."""
        store = self._store()
        names = {digest: ref for ref, digest in sorted(store.refs().items())}
        return sorted(names.get(info.digest, info.digest) for info in store.inventory())

    def inventory(self) -> m.ModelInventory:
        """Hot (in memory), warm (on disk), downloading and loading models, by ref."""
        held = self.provider.inventory() if self.provider is not None else {}
        hot = set(held.get("hot", []))
        warm = set(held.get("warm", []))
        try:
            warm.update(self.warm())
        except OSError as exc:  # a report: never let it fail the heartbeat
            log("warning", "model inventory unavailable", error=type(exc).__name__)
        return m.ModelInventory(
            hot=sorted(hot),
            warm=sorted(warm - hot),
            downloading=sorted(self.downloading | set(held.get("downloading", []))),
            loading=sorted(held.get("loading", [])),
        )

    async def refresh(self, ref: str) -> SnapshotManifest:
        """Fresh URLs for ``ref``'s snapshot from the scheduler (its signed URLs expired: a
        download got 403). Concurrent refreshes of one ref share the answer."""
        send = self.send
        if send is None:
            raise DownloadError(f"{ref}: a download URL expired and no scheduler is connected")
        future: asyncio.Future[m.ResolvedModel] = asyncio.get_running_loop().create_future()
        waiting = self._refreshes.setdefault(ref, [])
        waiting.append(future)
        if len(waiting) == 1:
            send(m.ModelUrlRefreshRequest(model_ref=ref))
        try:
            resolved = await asyncio.wait_for(future, REFRESH_TIMEOUT_S)
        except TimeoutError:
            raise DownloadError(
                f"{ref}: a download URL expired and the scheduler sent no fresh one within "
                f"{REFRESH_TIMEOUT_S:g} s"
            ) from None
        finally:
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._refreshes.pop(ref, None)
        return manifest_of(resolved)

    def on_refreshed(self, message: m.ModelUrlRefreshResponse) -> None:
        """The scheduler's answer to a refresh: fresh URLs, or why there are none."""
        model = message.model
        if model is not None and model.ref in self._refreshes:
            refs = [model.ref]
        else:  # a refusal names no ref: it answers the oldest question
            refs = list(self._refreshes)[:1]
        for ref in refs:
            for future in self._refreshes.pop(ref, []):
                if future.done():
                    continue
                if model is not None and model.snapshot_digest:
                    future.set_result(model)
                else:
                    reason = message.error_message or "no resolution"
                    future.set_exception(
                        DownloadError(f"{ref}: the scheduler could not refresh its URLs: {reason}")
                    )

    async def command(self, message: m.LoadModel | m.UnloadModel, emit: Emit) -> Any:
        """Carry out the scheduler's load or unload command; the result message to send."""
        ref = message.model_id
        loading = isinstance(message, m.LoadModel)
        kind = m.LoadModelResult if loading else m.UnloadModelResult
        prefix = "model.load" if loading else "model.unload"
        if self.provider is None:
            text = "this worker's functions inject no models: there is nothing to load or unload"
            emit(f"{prefix}.failed", {"model_id": ref, "reason": "no_models"})
            return kind(model_id=ref, ok=False, reason="no_models", error_message=text)
        started = time.monotonic()
        emit(f"{prefix}.started", {"model_id": ref})
        try:
            if loading:
                await self.provider.load_model(ref, self.resolutions)
            else:
                self.provider.unload_model(ref)
        except GenWorkerError as exc:
            reason = "in_use" if isinstance(exc, ModelInUseError) else exc.error_type
            emit(f"{prefix}.failed", {"model_id": ref, "reason": reason, "error_message": str(exc)})
            return kind(model_id=ref, ok=False, reason=reason, error_message=str(exc))
        except Exception as exc:  # a loader's bug must not take the worker down
            emit(f"{prefix}.failed", {"model_id": ref, "reason": "internal"})
            return kind(model_id=ref, ok=False, reason="internal", error_message=type(exc).__name__)
        ms = round((time.monotonic() - started) * 1000, 1)
        emit(f"{prefix}.completed", {"model_id": ref, "duration_ms": ms})
        return kind(model_id=ref, ok=True)

    async def prefetch(self, config: m.EndpointConfig, emit: Emit) -> None:
        """Fetch every model of ``config``; report each outcome, then the inventory."""
        if self.provider is not None and config.keyspaces:
            self.provider.set_keyspaces({f: k.models for f, k in config.keyspaces.items()})
        resolved = {r.ref: r for r in config.resolved_models if r.snapshot_digest}
        self.resolutions.update(resolved)  # for a later load command naming only the ref
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
                        manifest_of(resolution),
                        ref=ref,
                        on_event=emit,
                        refresh=functools.partial(self.refresh, ref),
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
