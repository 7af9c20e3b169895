"""The dev runner's model routes that the store serves: prefetch and status.

``POST /v1/models/prefetch`` pulls models into the local store (through the hub named by
``TENSORHUB_URL``, Hugging Face for ``hf:`` refs, or what the store already holds) and answers
``{results: [{model_id, ok, duration_ms, path?, error_type?, error_message?}]}``; a body
without a ``models`` list is a 400 that says what is valid. ``GET /v1/models/status`` lists the
store's snapshots (warm on disk) and what is downloading now. Loading into memory
(``/v1/models/load``, ``/unload``, ``/v1/warmup``) belongs to the model cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gen_worker.devserver.responses import error_body
from gen_worker.errors import ValidationError
from gen_worker.models.source import ModelSource, parse_prefetch_body

__all__ = ["ModelRoutes"]

_encoder = msgspec.json.Encoder()


def _json(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status, media_type="application/json")


class ModelRoutes:
    """Prefetch and status over one :class:`ModelSource`, built on first use (so a runner
    that never touches models never creates a store on disk)."""

    def __init__(self, make_source: Callable[[ModelRoutes], ModelSource]) -> None:
        self._make_source = make_source
        self._source: ModelSource | None = None
        self._downloading: dict[str, int] = {}

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self._source = self._make_source(self)
        return self._source

    async def aclose(self) -> None:
        if self._source is not None:
            await self._source.aclose()

    def on_event(self, event_type: str, payload: dict[str, Any]) -> None:
        """Track downloads in flight from the fetcher's model events."""
        model = str(payload.get("model_id", ""))
        if event_type == "model.download.started":
            self._downloading[model] = self._downloading.get(model, 0) + 1
        elif event_type in ("model.download.completed", "model.download.failed"):
            left = self._downloading.get(model, 0) - 1
            if left > 0:
                self._downloading[model] = left
            else:
                self._downloading.pop(model, None)

    async def prefetch(self, request: Request) -> Response:
        try:
            items = parse_prefetch_body(await request.body())
        except ValidationError as exc:
            return _json(error_body("validation", str(exc)), 400)
        results = await self.source.prefetch(items)
        return _json({"results": [msgspec.to_builtins(r) for r in results]})

    async def status(self, request: Request) -> Response:
        del request
        store = self.source.store
        infos = await asyncio.to_thread(store.inventory)
        refs: dict[str, list[str]] = {}
        for ref, digest in (await asyncio.to_thread(store.refs)).items():
            refs.setdefault(digest, []).append(ref)
        warm = [
            {
                "digest": info.digest,
                "refs": sorted(refs.get(info.digest, [])),
                "size_bytes": info.size_bytes,
                "files": info.file_count,
                "last_used": info.last_used,
                "in_use": info.in_use,
            }
            for info in infos
        ]
        return _json(
            {
                "store": str(store.root),
                "hub": self.source.hub.base_url if self.source.hub is not None else None,
                "hot": [],
                "warm": warm,
                "downloading": sorted(self._downloading),
            }
        )
