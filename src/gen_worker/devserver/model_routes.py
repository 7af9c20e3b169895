"""The dev runner's model routes: prefetch, load, unload, warmup and status.

``POST /v1/models/prefetch`` pulls models into the local store (through the hub named by
``TENSORHUB_URL``, Hugging Face for ``hf:`` refs, or what the store already holds) and answers
``{results: [{model_id, ok, duration_ms, path?, error_type?, error_message?}]}``; a body
without a ``models`` list is a 400 that says what is valid. ``POST /v1/models/load`` and
``/unload`` (body ``{model_id}``) move a model into and out of the model cache (unloading one a
request is using is a 409); ``POST /v1/warmup/{function}`` resolves and loads a function's
models without calling it. ``GET /v1/models/status`` lists hot models (in memory), the store's
snapshots (warm on disk) and what is downloading or loading now.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gen_worker.authoring import FunctionSpec, ModelRefSource
from gen_worker.devserver.responses import error_body
from gen_worker.errors import GenWorkerError, ModelInUseError, ValidationError
from gen_worker.injection import CachedModels
from gen_worker.models.source import ModelSource, parse_prefetch_body
from gen_worker.refs import normalize_ref

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
        #: The engine's model provider (the model cache); set by the runner that builds both.
        self.provider: CachedModels | None = None
        #: The declared models' readiness: ref -> None while fetching, "" when on disk, else
        #: why it is not (``/readyz``).
        self._declared: dict[str, str | None] = {}
        self._prefetching: asyncio.Task[None] | None = None
        #: Fetch the declared models as the runner starts (``--no-prefetch`` turns it off).
        self.prefetch_on_start = True

    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self._source = self._make_source(self)
        return self._source

    async def aclose(self) -> None:
        if self._prefetching is not None:
            self._prefetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prefetching
        if self._source is not None:
            await self._source.aclose()

    # -- readiness: the declared models on disk ----------------------------------------------

    def start_prefetch(self) -> None:
        """Fetch every model the endpoint declares into the store, in the background."""
        provider = self.provider
        if provider is None or not self.prefetch_on_start:
            return
        refs = [*provider.declared.values()]
        refs += [ref for keys in provider.keyspaces.values() for ref in keys.values()]
        self._declared = dict.fromkeys(dict.fromkeys(refs))
        if self._declared:
            self._prefetching = asyncio.ensure_future(self._prefetch_declared(provider))

    async def _prefetch_declared(self, provider: CachedModels) -> None:
        async def one(ref: str) -> None:
            try:
                await provider.finder.find(ref, emit=self.on_event)
            except GenWorkerError as exc:
                self._declared[ref] = str(exc)
            except Exception as exc:  # a bug must not leave readiness pending forever
                self._declared[ref] = f"{type(exc).__name__}: {exc}"
            else:
                self._declared[ref] = ""

        await asyncio.gather(*(one(ref) for ref in self._declared))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once every declared model is on disk; else what is pending or failed."""
        pending = sorted(ref for ref, why in self._declared.items() if why is None)
        failed = {ref: why for ref, why in sorted(self._declared.items()) if why}
        if pending:
            return False, {"reason": "declared models are downloading", "pending": pending,
                           "failed": failed}  # fmt: skip
        if failed:
            return False, {"reason": "declared models are not available", "failed": failed}
        return True, {}

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
                "hot": self.provider.inventory()["hot"] if self.provider else [],
                "loading": self.provider.inventory()["loading"] if self.provider else [],
                "warm": warm,
                "downloading": sorted(self._downloading),
                "cache": self.provider.cache.get_stats() if self.provider else None,
            }
        )

    # -- the model cache --------------------------------------------------------------------

    def _provider(self) -> CachedModels:
        if self.provider is None:
            raise ValidationError("this runner has no model cache (no model is declared)")
        return self.provider

    async def load(self, request: Request) -> Response:
        started = time.monotonic()
        try:
            ref = _model_id(await request.body())
            keys = await self._provider().load_model(ref)
        except GenWorkerError as exc:
            return _json(_failure(exc), _status(exc))
        return _json({"ok": True, "model_id": ref, "loaded": keys, "duration_ms": _ms(started)})

    async def unload(self, request: Request) -> Response:
        try:
            ref = _model_id(await request.body())
            unloaded = self._provider().unload_model(ref)
        except GenWorkerError as exc:
            return _json(_failure(exc), _status(exc))
        return _json({"ok": True, "model_id": ref, "unloaded": unloaded})

    async def warmup(self, request: Request, spec: FunctionSpec | None) -> Response:
        """Resolve and load ``spec``'s models without calling it.

        A PAYLOAD parameter loads the key the body's payload names, or every key of the
        function's keyspace when the body has none.
        """
        started = time.monotonic()
        request_id = f"warmup-{uuid.uuid4().hex[:12]}"
        if spec is None:
            name = request.path_params["function"]
            return _json(error_body("not_found", f"no function named {name!r}"), 404)
        try:
            body = await request.body()
            payload = msgspec.json.decode(body) if body.strip() else {}
            if spec.injections:
                provider = self._provider()
                for ref in _warmup_refs(provider, spec, payload):
                    await provider.load_model(ref)
        except msgspec.DecodeError as exc:
            return _json(error_body("validation", f"the body is not JSON ({exc})"), 400)
        except GenWorkerError as exc:
            return _json({**_failure(exc), "request_id": request_id}, _status(exc))
        return _json({"ok": True, "request_id": request_id, "duration_ms": _ms(started)})


def _warmup_refs(provider: CachedModels, spec: FunctionSpec, payload: Any) -> list[str]:
    """The refs a warmup of ``spec`` loads (``payload``: the body, a payload or envelope)."""
    if isinstance(payload, dict) and isinstance(payload.get("payload"), dict):
        payload = payload["payload"]
    if not isinstance(payload, dict):
        raise ValidationError("the warmup body must be a JSON object (a payload)")
    refs: list[str] = []
    for injection in spec.injections:
        if injection.source is ModelRefSource.FIXED:
            refs.append(provider.declared[injection.key])
            continue
        keyspace = provider.keyspaces.get(spec.name, {})
        chosen = payload.get(injection.key)
        if chosen is None:
            refs.extend(keyspace.values())
        elif chosen in keyspace:
            refs.append(keyspace[chosen])
        else:
            raise ValidationError(
                f"{injection.key}={chosen!r} is not a model of function "
                f"'{spec.name}'; choose one of {sorted(keyspace)}"
            )
    return list(dict.fromkeys(refs))


def _model_id(body: bytes) -> str:
    try:
        decoded = msgspec.json.decode(body) if body.strip() else None
    except msgspec.DecodeError as exc:
        raise ValidationError(
            f'the body is not JSON ({exc}); expected {{"model_id": "owner/repo:tag"}}'
        ) from exc
    model = decoded.get("model_id") if isinstance(decoded, dict) else None
    if not isinstance(model, str) or not model:
        raise ValidationError('\'model_id\' is missing; expected {"model_id": "owner/repo:tag"}')
    try:
        parsed, _changed = normalize_ref(model)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc
    return parsed.canonical


def _failure(exc: GenWorkerError) -> dict[str, Any]:
    return {"ok": False, "error_type": exc.error_type, "error_message": str(exc)}


def _status(exc: GenWorkerError) -> int:
    if isinstance(exc, ModelInUseError):
        return 409
    if isinstance(exc, ValidationError):
        return 400
    return 500


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
