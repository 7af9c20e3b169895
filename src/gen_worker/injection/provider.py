"""The engine's model provider over the model cache, the store and the loaders (SPEC 13.5).

For each model parameter: the canonical ref (FIXED key or PAYLOAD selection, checked against
the function's keyspace) -> the live object from the cache, else the snapshot (downloaded if
needed) loaded by the loader for the annotated type, placed on the device, sized and cached.

* One load per model at a time: concurrent requests for a model that is loading wait for
  that load (a per-model asyncio lock) and then share the object.
* A model a request uses is pinned in the cache until the request's function has stopped,
  so it is never evicted under it; stateful objects (pipelines, tokenizers) are also locked
  for the request, taken in sorted order after every load so two requests cannot deadlock.
* Cache entries are keyed ``<ref>`` for ``object``-annotated parameters and
  ``<ref>::<Type>`` otherwise: one snapshot may be loaded as a tokenizer and as a model.
  Everything reported to the scheduler is by ref.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from gen_worker.authoring import FunctionSpec, InjectionSpec, ModelRefSource, selected_key
from gen_worker.errors import FatalError, ModelInUseError
from gen_worker.injection.loaders import Loaded, describe_loader, is_path_target, load_snapshot
from gen_worker.injection.snapshots import SnapshotFinder
from gen_worker.model_cache import BYTES_PER_GB, ModelCache

__all__ = ["CachedModels", "cache_key", "ref_of_key"]

Emit = Callable[[str, dict[str, Any]], None]


class LoadRequestLike(Protocol):
    """The engine's ``LoadRequest`` (the engine is a sibling layer: matched by shape)."""

    @property
    def model_id(self) -> str: ...
    @property
    def injection(self) -> InjectionSpec: ...
    @property
    def device(self) -> str: ...
    @property
    def holder(self) -> object: ...
    @property
    def resolved(self) -> Mapping[str, Any]: ...
    @property
    def emit(self) -> Emit: ...


def cache_key(ref: str, target: Any) -> str:
    if target is object or target is Any:
        return ref
    return f"{ref}::{getattr(target, '__qualname__', repr(target))}"


def ref_of_key(key: str) -> str:
    return key.split("::", 1)[0]


class _Hold:
    """What one request holds: pinned cache keys, per-model locks, store leases (rare)."""

    __slots__ = ("leases", "locks", "pins")

    def __init__(self) -> None:
        self.pins: list[str] = []
        self.locks: list[asyncio.Lock] = []
        self.leases: contextlib.ExitStack | None = None


class CachedModels:
    """Serves model parameters from the cache, loading them from snapshots when needed."""

    def __init__(
        self,
        cache: ModelCache,
        finder: SnapshotFinder,
        *,
        declared: Mapping[str, str],
        keyspaces: Mapping[str, Mapping[str, str]],
        functions: Sequence[FunctionSpec] = (),
        on_event: Emit | None = None,
        device: str = "cpu",
    ) -> None:
        self.cache = cache
        self.finder = finder
        self.declared = dict(declared)
        self.keyspaces = {fn: dict(keys) for fn, keys in keyspaces.items()}
        self.functions = list(functions)
        self.device = device
        self.on_event = on_event
        self._flights: dict[str, asyncio.Lock] = {}
        self._use_locks: dict[str, asyncio.Lock] = {}
        self._exclusive: set[str] = set()
        self._holds: dict[int, _Hold] = {}
        self._refs_by_obj: dict[int, str] = {}
        #: Every cache key a ref was ever loaded under (checked against the cache when used).
        self._keys_by_ref: dict[str, set[str]] = {}

    # -- resolution -----------------------------------------------------------------------

    async def resolve(
        self, spec: FunctionSpec, injection: InjectionSpec, payload: msgspec.Struct
    ) -> str:
        if injection.source is ModelRefSource.FIXED:
            ref = self.declared.get(injection.key)
            if ref is None:
                raise FatalError(
                    f"the endpoint declares no [models] key '{injection.key}' (function "
                    f"'{spec.name}'); declared keys: {sorted(self.declared)}"
                )
            return ref
        keyspace = self.keyspaces.get(spec.name, {})
        return keyspace[selected_key(spec, injection, payload, keyspace)]

    def set_keyspaces(self, keyspaces: Mapping[str, Mapping[str, str]]) -> None:
        """The scheduler's endpoint config names the keys and refs per function."""
        for function, keys in keyspaces.items():
            if keys:
                self.keyspaces[function] = dict(keys)

    # -- state ----------------------------------------------------------------------------

    def _keys_of(self, ref: str) -> list[str]:
        """The cache keys ``ref`` is hot under now (one per type it was loaded as)."""
        return [k for k in self._keys_by_ref.get(ref, ()) if self.cache.is_in_vram(k)]

    def cache_state(self, model_id: str) -> str:
        if self._keys_of(model_id):
            return "hot_vram"
        if self.finder.local(model_id) is not None:
            return "warm_disk"
        return "cold_remote"

    def inventory(self) -> dict[str, list[str]]:
        """Hot, warm, downloading and loading models by ref (registration, heartbeats)."""
        raw = self.cache.inventory()
        hot = sorted({ref_of_key(k) for k in raw.get("hot", [])})
        warm = {ref_of_key(k) for k in raw.get("warm", [])}
        warm.update(ref for ref in self.finder.folders if ref not in hot)
        return {
            "hot": hot,
            "warm": sorted(warm - set(hot)),
            "downloading": sorted({ref_of_key(k) for k in raw.get("downloading", [])}),
            "loading": sorted({ref_of_key(k) for k in raw.get("loading", [])}),
        }

    # -- loading --------------------------------------------------------------------------

    async def load(self, request: LoadRequestLike) -> Any:
        ref = request.model_id
        target = request.injection.type
        key = cache_key(ref, target)
        hold = self._holds.setdefault(id(request.holder), _Hold())
        obj = self._pin(key, hold)
        if obj is not _MISSING:
            return obj  # the hot path: a dict lookup and a use count
        if is_path_target(target):
            return await self._snapshot_for(ref, request, hold, target)
        flight = self._flights.setdefault(key, asyncio.Lock())
        async with flight:
            obj = self._pin(key, hold)
            if obj is not _MISSING:
                return obj  # another request loaded it while this one waited
            loaded = await self._load(
                ref, target, request.device, request.resolved, request.emit, hold=hold
            )
        return loaded.obj

    def _pin(self, key: str, hold: _Hold) -> Any:
        try:
            obj = self.cache.acquire(key)
        except KeyError:
            return _MISSING
        hold.pins.append(key)
        return obj

    async def _snapshot_for(
        self, ref: str, request: LoadRequestLike, hold: _Hold, target: Any
    ) -> Any:
        """A path parameter: the snapshot itself, leased while the request runs."""
        path = await self.finder.find(ref, resolution=request.resolved.get(ref), emit=request.emit)
        source = self.finder.source
        digest = f"blake3:{path.name}"
        if (
            source is not None
            and len(path.name) == 64
            and source.store.snapshot_path(digest) == path
        ):
            # Disk eviction must not remove the files under a running function.
            if hold.leases is None:
                hold.leases = contextlib.ExitStack()
            hold.leases.enter_context(source.store.lease(digest))
        return str(path) if target is str else path

    async def _load(
        self,
        ref: str,
        target: Any,
        device: str,
        resolved: Mapping[str, Any],
        emit: Emit,
        *,
        hold: _Hold | None = None,
    ) -> Loaded:
        """Load ``ref`` as ``target`` into the cache; pinned for ``hold`` when given (in the
        same step as it becomes hot, so that nothing can evict it in between)."""
        key = cache_key(ref, target)
        cache = self.cache
        cache.mark_loading(key)
        started = time.monotonic()
        try:
            snapshot = await self.finder.find(
                ref,
                resolution=resolved.get(ref),
                emit=emit,
                on_progress=lambda done, total: cache.mark_downloading(
                    ref, done / total if total else 0.0
                ),
            )
            cache.mark_cached_to_disk(ref, str(snapshot), _tree_gb(snapshot))
            if device.startswith("cuda"):
                cache.make_room(_tree_gb(snapshot))  # evict idle models before loading
            # The model comes back in a box emptied at once: an asyncio future keeps its
            # result alive as long as the loop holds the future (seen: until the run ends), and
            # an evicted model must free its memory when the cache lets go of it.
            box: list[Loaded] = []
            attributes = self.finder.attributes.get(ref)
            await asyncio.to_thread(
                lambda: box.append(
                    load_snapshot(
                        snapshot,
                        target,
                        model_id=ref,
                        device=device,
                        attributes=attributes,
                        emit=emit,
                    )
                )
            )
            loaded = box.pop()
        except BaseException:
            cache.clear_loading(key)
            cache.clear_downloading(ref)
            raise
        if loaded.kind == "path":
            cache.clear_loading(key)
            return loaded
        if loaded.exclusive:
            self._exclusive.add(key)
        self._refs_by_obj[id(loaded.obj)] = ref
        self._keys_by_ref.setdefault(ref, set()).add(key)
        evicted = cache.mark_loaded_to_vram(
            key, loaded.obj, loaded.size_bytes / BYTES_PER_GB, acquire=hold is not None
        )
        if hold is not None:
            hold.pins.append(key)
        self._event(
            "model.cached",
            {
                "model_id": ref,
                "loader": describe_loader(target, snapshot),
                "size_bytes": loaded.size_bytes,
                "device": device,
                "load_ms": round((time.monotonic() - started) * 1000, 1),
                "evicted": sorted({ref_of_key(k) for k in evicted}),
            },
        )
        return loaded

    async def lock(self, holder: object, model_ids: Sequence[str]) -> None:
        """Take the use locks of the stateful models ``holder`` pinned, in sorted order."""
        hold = self._holds.get(id(holder))
        if hold is None or not self._exclusive:
            return
        for key in sorted({k for k in hold.pins if k in self._exclusive}):
            use = self._use_locks.setdefault(key, asyncio.Lock())
            await use.acquire()
            hold.locks.append(use)

    def release(self, holder: object) -> None:
        """Unpin, unlock and un-lease what ``holder`` held (its function has stopped)."""
        hold = self._holds.pop(id(holder), None)
        if hold is None:
            return
        release = self.cache.release
        for key in hold.pins:
            with contextlib.suppress(ValueError, KeyError):  # unloaded meanwhile: nothing held
                release(key)
        for use in hold.locks:
            use.release()
        if hold.leases is not None:
            hold.leases.close()

    async def escalate(self, obj: Any, emit: Emit) -> bool:
        """One low-VRAM step for an injected pipeline after an OOM; True if it changed."""
        if not hasattr(obj, "enable_model_cpu_offload"):
            return False
        from gen_worker.low_vram import escalate  # noqa: PLC0415

        payload = await asyncio.to_thread(
            escalate, obj, model_id=self._refs_by_obj.get(id(obj)), emit=emit
        )
        return bool(payload.get("changed"))

    # -- scheduler / dev-runner commands ---------------------------------------------------

    def types_for(self, ref: str) -> list[Any]:
        """The annotated types the endpoint injects ``ref`` as (``object`` if none)."""
        types: list[Any] = []
        for spec in self.functions:
            for injection in spec.injections:
                if injection.source is ModelRefSource.FIXED:
                    refs = {self.declared.get(injection.key)}
                else:
                    refs = set(self.keyspaces.get(spec.name, {}).values())
                if ref in refs and injection.type not in types:
                    types.append(injection.type)
        return types or [object]

    async def load_model(self, ref: str, resolved: Mapping[str, Any] | None = None) -> list[str]:
        """Load ``ref`` as every type the endpoint injects it as; the cache keys now hot."""
        keys = []
        for target in self.types_for(ref):
            key = cache_key(ref, target)
            if is_path_target(target):
                await self.finder.find(ref, resolution=(resolved or {}).get(ref))
                continue
            async with self._flights.setdefault(key, asyncio.Lock()):
                if not self.cache.is_in_vram(key):
                    await self._load(ref, target, self.device, resolved or {}, self._event)
            keys.append(key)
        return keys

    def unload_model(self, ref: str) -> bool:
        """Drop ``ref`` from memory (every type); ModelInUseError if a request uses it."""
        keys = self._keys_of(ref)
        in_use = self.cache.get_stats().get("in_use", {})
        uses = sum(int(in_use.get(k, 0)) for k in keys)
        if uses:
            raise ModelInUseError(ref, uses)
        unloaded = False
        for key in keys:
            unloaded = self.cache.unload_from_vram(key) or unloaded
            self._exclusive.discard(key)
        return unloaded

    def forget(self, key: str, obj: Any) -> None:
        """The cache evicted ``key``: forget what we kept about its object."""
        self._exclusive.discard(key)
        self._refs_by_obj.pop(id(obj), None)

    def _event(self, event_type: str, payload: dict[str, Any]) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):  # events are best-effort
                self.on_event(event_type, payload)

    async def aclose(self) -> None:
        await self.finder.aclose()


_MISSING: Any = object()


def _tree_gb(path: Path) -> float:
    """Bytes of the snapshot's files, in GB (a first estimate of the loaded size)."""
    total = 0
    for item in path.rglob("*"):
        with contextlib.suppress(OSError):
            if item.is_file():
                total += item.stat().st_size
    return total / BYTES_PER_GB
