"""Where a model's snapshot directory comes from, in order of preference.

1. a local folder given for the ref (the dev runner's ``--model REF=DIR``);
2. the resolution the scheduler sent with the request (digest + files with URLs): fetched
   into the store, or found there;
3. the hub, when this process may ask it (the dev runner; a worker with
   ``WORKER_ALLOW_TENSORHUB_API_RESOLVE``), which also finds snapshots already in the store;
4. the store's ref index (a snapshot a prefetch or an earlier pull put there).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from gen_worker.errors import FatalError
from gen_worker.models.manifest import ManifestEntry, SnapshotManifest
from gen_worker.models.source import ModelSource

__all__ = ["SnapshotFinder", "manifest_from_resolution"]

Emit = Callable[[str, dict[str, Any]], None]
Progress = Callable[[int, int], None]


def manifest_from_resolution(resolution: Any) -> SnapshotManifest | None:
    """A scheduler resolution (a ``ResolvedModel`` or its dict form) as a manifest."""
    if resolution is None:
        return None
    data = resolution if isinstance(resolution, Mapping) else msgspec.to_builtins(resolution)
    digest = data.get("snapshot_digest") or ""
    files = data.get("files") or []
    if not digest or not files:
        return None
    return SnapshotManifest(
        digest,
        tuple(
            ManifestEntry(
                f["path"], int(f.get("size_bytes") or 0), f.get("blake3") or "", f.get("url") or ""
            )
            for f in files
        ),
    )


class SnapshotFinder:
    """Turns a canonical ref into a complete snapshot directory on this machine."""

    def __init__(
        self,
        source: Callable[[], ModelSource] | None,
        *,
        folders: Mapping[str, Path] | None = None,
        allow_hub: bool = True,
        attributes: Mapping[str, Mapping[str, list[str]]] | None = None,
    ) -> None:
        self._source_factory = source
        self._source: ModelSource | None = None
        self.folders = dict(folders or {})
        self.allow_hub = allow_hub
        self.attributes = {ref: dict(a) for ref, a in (attributes or {}).items()}
        #: Fresh URLs for a scheduler-resolved snapshot whose signed URLs expired (the worker
        #: asks the scheduler); None: such a download fails on its first 403.
        self.refresher: Callable[[str], Awaitable[SnapshotManifest]] | None = None
        #: Resolutions known beyond a request's own (the worker's endpoint config), by ref.
        self.resolutions: Mapping[str, Any] = {}

    @property
    def source(self) -> ModelSource | None:
        if self._source is None and self._source_factory is not None:
            self._source = self._source_factory()
        return self._source

    def local(self, ref: str) -> Path | None:
        """The snapshot directory if it is on this machine now (no download, no hub)."""
        folder = self.folders.get(ref)
        if folder is not None:
            return folder
        source = self.source
        if source is None:
            return None
        digest = source.store.get_ref(ref)
        if digest is None and "@blake3:" in ref:  # a digest ref names its snapshot itself
            digest = ref.split("@", 1)[1].split("#", 1)[0]
        if digest is not None and source.store.has_snapshot(digest):
            return source.store.snapshot_path(digest)
        return None

    async def find(
        self,
        ref: str,
        *,
        resolution: Any = None,
        emit: Emit | None = None,
        on_progress: Progress | None = None,
    ) -> Path:
        folder = self.folders.get(ref)
        if folder is not None:
            return folder
        source = self.source
        if source is None:
            raise FatalError(
                f"model {ref} is not available: no model store is configured and no local "
                f"folder was given for it (--model {ref}=DIR)"
            )
        manifest = manifest_from_resolution(resolution or self.resolutions.get(ref))
        if manifest is not None:
            refresh = self.refresher
            return await source.fetcher.fetch(
                manifest,
                ref=ref,
                on_event=emit,
                on_progress=on_progress,
                refresh=functools.partial(refresh, ref) if refresh is not None else None,
            )
        if self.allow_hub and (source.hub is not None or ref.startswith("hf:")):
            # Hugging Face refs need no hub of ours: the source lists them with
            # huggingface_hub (HF_ENDPOINT) and downloads them into the same store.
            return await source.pull(
                ref,
                attributes=self.attributes.get(ref) or None,
                on_event=emit,
                on_progress=on_progress,
            )
        known = self.local(ref)
        if known is not None:
            source.store.touch(f"blake3:{known.name}")
            return known
        if self.allow_hub:
            raise FatalError(
                f"model {ref} is not in the local store and no hub is configured; set "
                f"TENSORHUB_URL to a hub that has it, or serve a folder with --model {ref}=DIR"
            )
        raise FatalError(
            f"model {ref} is not on this worker: the scheduler sent no resolution for it and "
            "resolving through the hub is off (set WORKER_ALLOW_TENSORHUB_API_RESOLVE=true and "
            "TENSORHUB_URL to allow it)"
        )

    async def aclose(self) -> None:
        if self._source is not None:
            await self._source.aclose()
