"""Where models get pulled: one object that turns any model ref into a snapshot directory.

* ``owner/repo[:tag][#flavor]`` and ``owner/repo@blake3:<hex>``: resolved by the hub (or, with
  no hub, from the store's ref index when the snapshot is already there: offline works), then
  fetched into the store.
* ``hf:owner/repo[@rev]``: listed with huggingface_hub, only the files a load needs, fetched
  with our downloader, hashed into the store, and indexed under ``hf:owner/repo@<sha>``.

Used by ``gen-worker models pull``, the dev runner's ``/v1/models/prefetch`` and the worker's
endpoint-config prefetch, so the three behave the same. ``prefetch`` runs at most
``max_concurrent`` models at once (``WORKER_MAX_CONCURRENT_DOWNLOADS``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from gen_worker.config import ModelSettings
from gen_worker.errors import GenWorkerError, HubError, ValidationError
from gen_worker.models.fetch import EventSink, ProgressSink, SnapshotFetcher
from gen_worker.models.hub_client import AttributeValues, HubClient
from gen_worker.models.manifest import SnapshotManifest
from gen_worker.models.store import Store
from gen_worker.refs import CozyRef, HfRef, normalize_ref

__all__ = [
    "ModelSource",
    "PrefetchItem",
    "PrefetchResult",
    "build_model_source",
    "parse_prefetch_body",
]


class PrefetchItem(msgspec.Struct, forbid_unknown_fields=True):
    """One model of a prefetch request: a ref, acceptable dtypes, other attributes."""

    ref: str
    dtypes: list[str] | None = None
    attributes: dict[str, str | list[str]] | None = None

    def wanted(self) -> dict[str, AttributeValues]:
        wanted: dict[str, AttributeValues] = dict(self.attributes or {})
        if self.dtypes and "dtype" not in wanted:
            wanted["dtype"] = list(self.dtypes)
        return wanted


class PrefetchResult(msgspec.Struct, omit_defaults=True):
    model_id: str
    ok: bool
    duration_ms: float
    path: str | None = None
    error_type: str | None = None
    error_message: str | None = None


_PREFETCH_FORM = (
    'expected {"models": ["owner/repo[:tag]", {"ref": "...", "dtypes": ["bf16"], '
    '"attributes": {"k": "v"}}]}'
)


def parse_prefetch_body(body: bytes) -> list[PrefetchItem]:
    """The models of a ``/v1/models/prefetch`` body; a ValidationError says what is valid."""
    try:
        decoded = msgspec.json.decode(body) if body.strip() else None
    except msgspec.DecodeError as exc:
        raise ValidationError(f"the body is not JSON ({exc}); {_PREFETCH_FORM}") from exc
    if not isinstance(decoded, dict) or "models" not in decoded:
        raise ValidationError(f"'models' is missing; {_PREFETCH_FORM}")
    models = decoded["models"]
    if not isinstance(models, list):
        raise ValidationError(
            f"'models' must be a list, got {type(models).__name__}; {_PREFETCH_FORM}"
        )
    items = []
    for index, model in enumerate(models):
        if isinstance(model, str):
            items.append(PrefetchItem(model))
            continue
        try:
            items.append(msgspec.convert(model, PrefetchItem))
        except msgspec.ValidationError as exc:
            raise ValidationError(
                f"models[{index}]: {exc}; {_PREFETCH_FORM}".replace("$", f"models[{index}]")
            ) from exc
    return items


def build_model_source(
    settings: ModelSettings,
    *,
    store: Store | None = None,
    on_event: EventSink | None = None,
) -> ModelSource:
    """The model source the settings describe (hub from TENSORHUB_URL, store in the cache)."""
    hub = (
        HubClient(settings.tensorhub_url, settings.tensorhub_token or "")
        if settings.tensorhub_url
        else None
    )
    return ModelSource(
        SnapshotFetcher(store or Store(settings.store_root)),
        hub=hub,
        hf_endpoint=settings.hf_endpoint,
        hf_token=settings.hf_token,
        max_concurrent=settings.max_concurrent_downloads,
        on_event=on_event,
    )


class ModelSource:
    """Pulls model refs into the fetcher's store."""

    def __init__(
        self,
        fetcher: SnapshotFetcher,
        *,
        hub: HubClient | None = None,
        hf_endpoint: str | None = None,
        hf_token: str | None = None,
        max_concurrent: int = 2,
        on_event: EventSink | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.store = fetcher.store
        self.hub = hub
        self._hf_endpoint = hf_endpoint
        self._hf_token = hf_token
        self._limit = asyncio.Semaphore(max(1, max_concurrent))
        self._on_event = on_event

    async def aclose(self) -> None:
        await self.fetcher.aclose()
        if self.hub is not None:
            await self.hub.aclose()

    async def pull(
        self,
        ref: str,
        *,
        attributes: Mapping[str, AttributeValues] | None = None,
        token: str | None = None,
        on_progress: ProgressSink | None = None,
        on_event: EventSink | None = None,
    ) -> Path:
        """The snapshot directory of ``ref``, downloading what the store lacks.

        ``on_event`` receives this pull's ``model.download.*`` events (a request's own events,
        when a request triggered it) instead of the source's sink.
        """
        parsed, _changed = normalize_ref(ref)
        events = on_event if on_event is not None else self._on_event
        if isinstance(parsed, HfRef):
            return await self._pull_hf(parsed, on_progress, events)
        return await self._pull_cozy(parsed, attributes, token, on_progress, events)

    async def prefetch(self, items: Sequence[PrefetchItem]) -> list[PrefetchResult]:
        """Pull each item (a few at once); one failure does not stop the others."""

        async def one(item: PrefetchItem) -> PrefetchResult:
            async with self._limit:
                started = time.monotonic()
                try:
                    path = await self.pull(item.ref, attributes=item.wanted())
                except GenWorkerError as exc:
                    return PrefetchResult(
                        model_id=item.ref,
                        ok=False,
                        duration_ms=_ms(started),
                        error_type=exc.error_type,
                        error_message=str(exc),
                    )
                return PrefetchResult(
                    model_id=item.ref, ok=True, duration_ms=_ms(started), path=str(path)
                )

        return list(await asyncio.gather(*(one(item) for item in items)))

    # -- cozy refs --------------------------------------------------------------------------

    async def _pull_cozy(
        self,
        ref: CozyRef,
        attributes: Mapping[str, AttributeValues] | None,
        token: str | None,
        on_progress: ProgressSink | None,
        on_event: EventSink | None,
    ) -> Path:
        key = ref.canonical
        if ref.digest is not None and self.store.has_snapshot(f"blake3:{ref.digest}"):
            self.store.touch(f"blake3:{ref.digest}")
            return self.store.snapshot_path(f"blake3:{ref.digest}")
        if self.hub is None:
            known = self.store.get_ref(key)
            if known is not None and self.store.has_snapshot(known) and not attributes:
                self.store.touch(known)
                return self.store.snapshot_path(known)
            raise ValidationError(
                f"model {key} is not in the local store and no hub is configured; set "
                "TENSORHUB_URL (or --hub) to a hub that has it"
            )
        hub = self.hub
        manifest = await hub.resolve(ref, attributes=attributes, token=token)

        async def refresh() -> SnapshotManifest:
            again = await hub.resolve(ref, attributes=attributes, token=token)
            if again.digest != manifest.digest:
                raise HubError(
                    f"{key} moved to {again.digest} while {manifest.digest} was downloading"
                )
            return again

        return await self.fetcher.fetch(
            manifest,
            ref=key,
            refresh=refresh,
            on_event=on_event,
            on_progress=on_progress,
        )

    # -- hugging face refs ------------------------------------------------------------------

    async def _pull_hf(
        self, ref: HfRef, on_progress: ProgressSink | None, on_event: EventSink | None
    ) -> Path:
        from gen_worker.models.hf import hf_auth_headers, plan_hf_snapshot  # noqa: PLC0415

        known = self.store.get_ref(ref.canonical) if ref.revision is not None else None
        if known is not None and self.store.has_snapshot(known):
            self.store.touch(known)
            return self.store.snapshot_path(known)
        plan = await asyncio.to_thread(
            plan_hf_snapshot, ref, endpoint=self._hf_endpoint, token=self._hf_token
        )
        known = self.store.get_ref(plan.ref)
        if known is not None and self.store.has_snapshot(known):
            self.store.touch(known)
            return self.store.snapshot_path(known)
        path = await self.fetcher.fetch_unhashed(
            list(plan.entries),
            ref=plan.ref,
            headers=hf_auth_headers(self._hf_token),
            on_event=on_event,
            on_progress=on_progress,
        )
        if ref.canonical != plan.ref:  # e.g. hf:o/r (whatever main is) -> this snapshot
            digest = self.store.get_ref(plan.ref)
            if digest is not None:
                self.store.set_ref(ref.canonical, digest)
        return path


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
