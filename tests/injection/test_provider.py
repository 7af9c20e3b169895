"""The model provider over a real local hub, store and model cache, with torch-free models.

Models here are plain classes with a ``from_pretrained(path)`` classmethod: the cache, the
single-flight loads, pinning, locking, leases and the snapshot sources are what is tested
(real torch models are in test_torch_models.py).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest

from gen_worker import ModelRef, ModelRefSource, RequestContext, worker_function
from gen_worker.authoring import InjectionSpec, get_function_spec
from gen_worker.config import ModelSettings
from gen_worker.errors import FatalError, ModelInUseError, ModelLoadError, ValidationError
from gen_worker.hub import HubServer, publish
from gen_worker.injection import CachedModels, SnapshotFinder
from gen_worker.model_cache import ModelCache
from gen_worker.models.source import ModelSource, build_model_source


def synchronously(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop (fixtures still come from its signature)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


class Weights:
    """A 'model' whose loads are counted; slow enough for concurrent requests to overlap."""

    loads = 0
    _count = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = (path / "weights.txt").read_text()

    @classmethod
    def from_pretrained(cls, path: str) -> Weights:
        with cls._count:
            cls.loads += 1
        time.sleep(0.1)
        return cls(Path(path))


class Broken:
    @classmethod
    def from_pretrained(cls, path: str) -> Broken:
        raise OSError(f"no weights.bin in {path}")


class Input(msgspec.Struct):
    model: str


@worker_function()
def pick(
    ctx: RequestContext,
    weights: Annotated[Weights, ModelRef(ModelRefSource.PAYLOAD, "model")],
    payload: Input,
) -> Input:
    return payload


@dataclass
class Holder:
    """Stands for a request's run: what the provider keys its pins and locks by."""

    name: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def emit(self, event_type: str, payload: dict[str, Any]) -> None:
        self.events.append((event_type, payload))


@dataclass(frozen=True)
class Load:
    model_id: str
    injection: InjectionSpec
    device: str
    holder: Holder
    resolved: dict[str, Any] = field(default_factory=dict)

    @property
    def emit(self) -> Any:
        return self.holder.emit


def injection(target: Any, key: str = "m", source: ModelRefSource = ModelRefSource.FIXED) -> Any:
    return InjectionSpec(param="model", type=target, source=source, key=key)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    for name, text in (("alpha", "alpha weights"), ("beta", "beta weights")):
        folder = tmp_path / "src" / name
        folder.mkdir(parents=True)
        (folder / "weights.txt").write_text(text)
        publish(tmp_path / "hub", f"acme/{name}:v1", folder)
    with HubServer(tmp_path / "hub") as server:
        yield server


def make_source(hub: HubServer, tmp_path: Path) -> ModelSource:
    settings = ModelSettings(tensorhub_url=hub.url, cache_dir=str(tmp_path / "cache"))
    return build_model_source(settings)


async def resolution_of(hub: HubServer, tmp_path: Path, ref: str) -> dict[str, Any]:
    """What a scheduler sends for ``ref``: the snapshot digest and its files' signed URLs."""
    from gen_worker.refs import parse_ref

    resolver = make_source(hub, tmp_path / "resolver")
    assert resolver.hub is not None
    manifest = await resolver.hub.resolve(parse_ref(ref))  # type: ignore[arg-type]
    await resolver.aclose()
    files = [
        {"path": e.path, "size_bytes": e.size_bytes, "blake3": e.blake3, "url": e.url}
        for e in manifest.entries
    ]
    return {"snapshot_digest": manifest.digest, "files": files}


def provider(
    hub: HubServer, tmp_path: Path, *, allow_hub: bool = True, cache: ModelCache | None = None
) -> tuple[CachedModels, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    source = make_source(hub, tmp_path)
    finder = SnapshotFinder(lambda: source, allow_hub=allow_hub)
    models = CachedModels(
        cache or ModelCache(max_vram_gb=1.0, model_cache_dir=tmp_path / "cache"),
        finder,
        declared={"m": "acme/alpha:v1"},
        keyspaces={"pick": {"a": "acme/alpha:v1", "b": "acme/beta:v1"}},
        on_event=lambda t, p: events.append((t, p)),
    )
    return models, events


@synchronously
async def test_concurrent_requests_load_a_model_once_and_then_share_it(
    hub: HubServer, tmp_path: Path
) -> None:
    models, events = provider(hub, tmp_path)
    Weights.loads = 0
    assert models.cache_state("acme/alpha:v1") == "cold_remote"
    holders = [Holder(f"r{i}") for i in range(5)]
    loads = [models.load(Load("acme/alpha:v1", injection(Weights), "cpu", h)) for h in holders]
    objects = await asyncio.gather(*loads)
    assert Weights.loads == 1
    assert all(o is objects[0] for o in objects)
    assert objects[0].text == "alpha weights"
    assert models.cache_state("acme/alpha:v1") == "hot_vram"
    assert models.inventory()["hot"] == ["acme/alpha:v1"]
    cached = [p for t, p in events if t == "model.cached"]
    assert len(cached) == 1 and cached[0]["model_id"] == "acme/alpha:v1"
    assert cached[0]["loader"] == "from_pretrained:Weights.from_pretrained"
    # The download was reported to the request that caused it, and to no other.
    downloads = [[t for t, _ in h.events if t.startswith("model.download")] for h in holders]
    assert sorted(map(len, downloads)) == [0, 0, 0, 0, 2]
    assert ["model.download.started", "model.download.completed"] in downloads
    # Each request pinned it: the cache counts five uses until each releases.
    assert models.cache.get_stats()["in_use"] == {"acme/alpha:v1::Weights": 5}
    for holder in holders:
        models.release(holder)
    assert models.cache.get_stats()["in_use"] == {}
    await models.aclose()


@synchronously
async def test_payload_selection_is_checked_against_the_functions_keyspace(
    hub: HubServer, tmp_path: Path
) -> None:
    models, _ = provider(hub, tmp_path)
    spec = get_function_spec(pick)
    chosen = injection(Weights, key="model", source=ModelRefSource.PAYLOAD)
    assert await models.resolve(spec, chosen, Input("b")) == "acme/beta:v1"
    with pytest.raises(ValidationError) as refused:
        await models.resolve(spec, chosen, Input("acme/beta:v1"))
    assert "choose one of ['a', 'b']" in str(refused.value)
    with pytest.raises(FatalError, match="declares no \\[models\\] key 'other'"):
        await models.resolve(spec, injection(Weights, key="other"), Input("a"))
    await models.aclose()


@synchronously
async def test_a_model_in_use_is_not_unloaded_until_its_requests_release_it(
    hub: HubServer, tmp_path: Path
) -> None:
    models, _ = provider(hub, tmp_path)
    holder = Holder("r1")
    await models.load(Load("acme/alpha:v1", injection(Weights), "cpu", holder))
    with pytest.raises(ModelInUseError) as refused:
        models.unload_model("acme/alpha:v1")
    assert refused.value.uses == 1 and refused.value.retryable
    assert models.cache_state("acme/alpha:v1") == "hot_vram"
    models.release(holder)
    assert models.unload_model("acme/alpha:v1") is True
    # Unloaded from memory, still on disk.
    assert models.cache_state("acme/alpha:v1") == "warm_disk"
    assert models.inventory() == {
        "hot": [],
        "warm": ["acme/alpha:v1"],
        "downloading": [],
        "loading": [],
    }
    await models.aclose()


@synchronously
async def test_stateful_models_serve_one_request_at_a_time(hub: HubServer, tmp_path: Path) -> None:
    models, _ = provider(hub, tmp_path)
    first, second = Holder("r1"), Holder("r2")
    for holder in (first, second):
        await models.load(Load("acme/alpha:v1", injection(Weights), "cpu", holder))
    await models.lock(first, ["acme/alpha:v1"])
    waiting = asyncio.ensure_future(models.lock(second, ["acme/alpha:v1"]))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the second request waits for the first to stop
    models.release(first)
    await asyncio.wait_for(waiting, 2)
    models.release(second)
    await models.aclose()


@synchronously
async def test_a_path_parameter_gets_the_snapshot_leased_while_the_request_runs(
    hub: HubServer, tmp_path: Path
) -> None:
    models, _ = provider(hub, tmp_path)
    holder = Holder("r1")
    path = await models.load(Load("acme/alpha:v1", injection(Path), "cpu", holder))
    assert isinstance(path, Path) and (path / "weights.txt").read_text() == "alpha weights"
    text = await models.load(Load("acme/alpha:v1", injection(str), "cpu", Holder("r2")))
    assert text == str(path)
    store = models.finder.source.store  # type: ignore[union-attr]
    (info,) = store.inventory()
    assert info.in_use is True
    models.release(holder)
    models.release(Holder("r2"))  # a holder that holds nothing: nothing to do
    assert models.cache.get_vram_models() == []  # a path is never "in memory"
    await models.aclose()


@synchronously
async def test_a_failed_load_names_the_ref_and_the_loader_and_can_be_retried(
    hub: HubServer, tmp_path: Path
) -> None:
    models, _ = provider(hub, tmp_path)
    with pytest.raises(ModelLoadError) as failed:
        await models.load(Load("acme/alpha:v1", injection(Broken), "cpu", Holder("r1")))
    assert failed.value.ref == "acme/alpha:v1"
    assert failed.value.loader == "from_pretrained:Broken.from_pretrained"
    assert "OSError: no weights.bin in" in str(failed.value)
    assert models.inventory()["loading"] == []
    # Unsupported annotations say what would be valid.
    with pytest.raises(ModelLoadError, match="annotate the parameter as Path, str"):
        await models.load(Load("acme/alpha:v1", injection(int), "cpu", Holder("r2")))
    await models.aclose()


@synchronously
async def test_a_worker_uses_the_schedulers_resolution_and_never_asks_the_hub_itself(
    hub: HubServer, tmp_path: Path
) -> None:
    models, _ = provider(hub, tmp_path, allow_hub=False)
    with pytest.raises(FatalError, match="WORKER_ALLOW_TENSORHUB_API_RESOLVE"):
        await models.load(Load("acme/alpha:v1", injection(Weights), "cpu", Holder("r1")))
    # The scheduler's resolution: digest and files with signed URLs (what the hub answers).
    resolution = await resolution_of(hub, tmp_path, "acme/alpha:v1")
    holder = Holder("r2")
    obj = await models.load(
        Load("acme/alpha:v1", injection(Weights), "cpu", holder, {"acme/alpha:v1": resolution})
    )
    assert obj.text == "alpha weights"
    assert [t for t, _ in holder.events] == ["model.download.started", "model.download.completed"]
    models.release(holder)
    await models.aclose()


@worker_function()
def broken(
    ctx: RequestContext,
    weights: Annotated[Broken, ModelRef(ModelRefSource.FIXED, "m")],
    payload: Input,
) -> Input:
    return payload


@synchronously
async def test_a_failed_load_fails_the_request_with_the_ref_and_loader_in_its_event(
    hub: HubServer, tmp_path: Path
) -> None:
    from gen_worker.engine import Engine, Event, Failure, RequestMeta

    models, _ = provider(hub, tmp_path)
    spec = get_function_spec(broken)
    engine = Engine([spec], models=models)
    try:
        outcomes = [
            o async for o in engine.run(spec, b'{"model": "a"}', RequestMeta(request_id="r1"))
        ]
    finally:
        await engine.shutdown(grace_s=1)
        await models.aclose()
    failure = outcomes[-1]
    assert isinstance(failure, Failure)
    assert (failure.error_type, failure.retryable) == ("fatal", False)
    assert failure.safe_message.startswith(
        "could not load acme/alpha:v1 with from_pretrained:Broken.from_pretrained: "
        "OSError: no weights.bin in "
    )
    (failed,) = [
        o.payload
        for o in outcomes
        if isinstance(o, Event) and o.event_type == "request.model_load.failed"
    ]
    assert failed["error"] == "ModelLoadError"
    assert failed["ref"] == "acme/alpha:v1"
    assert failed["loader"] == "from_pretrained:Broken.from_pretrained"
    (job,) = [o.payload for o in outcomes if isinstance(o, Event) and o.event_type == "metrics.job"]
    assert (job["cache_state"], job["error_type"]) == ("cold_remote", "fatal")
    assert job["models"] == {"weights": "acme/alpha:v1"}
    assert "model_load_ms" not in job  # the load never completed


@synchronously
async def test_an_unloaded_model_is_freed_while_the_loop_runs_on(
    hub: HubServer, tmp_path: Path
) -> None:
    """Nothing of ours keeps a model alive once the cache lets go of it (an asyncio future's
    result once did, until the event loop ended: GPU memory that eviction could not free)."""
    import gc
    import weakref

    models, _ = provider(hub, tmp_path)
    holder = Holder("r1")
    obj = await models.load(Load("acme/alpha:v1", injection(Weights), "cpu", holder))
    alive = weakref.ref(obj)
    del obj
    models.release(holder)
    assert models.unload_model("acme/alpha:v1") is True
    gc.collect()
    assert alive() is None
    await models.aclose()


def test_read_ahead_reads_weights_in_a_thread_unless_they_would_crowd_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gen_worker.injection import loaders
    from gen_worker.low_vram import probes

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"\0" * 300_000)
    (tmp_path / "config.json").write_text("{}")  # not a weight file: never read ahead
    monkeypatch.setattr(probes, "available_ram_bytes", lambda: 10_000_000)
    # Just written, so in the page cache: nothing to read ahead.
    assert loaders._in_page_cache([tmp_path / "unet" / "w.safetensors"])
    assert loaders.read_ahead(tmp_path) is None
    monkeypatch.setattr(loaders, "_in_page_cache", lambda files: False)
    thread = loaders.read_ahead(tmp_path)
    assert thread is not None and thread.daemon
    thread.join(5)
    assert not thread.is_alive()
    monkeypatch.setattr(probes, "available_ram_bytes", lambda: 500_000)  # 300 kB > half of it
    assert loaders.read_ahead(tmp_path) is None
    monkeypatch.setattr(probes, "available_ram_bytes", lambda: None)  # the host does not say
    assert loaders.read_ahead(tmp_path) is None
    assert loaders.read_ahead(tmp_path / "unet" / "missing") is None  # nothing to read


def test_the_page_cache_probe_says_no_when_a_read_would_wait_or_cannot_be_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gen_worker.injection import loaders

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\1" * 100_000)
    assert loaders._in_page_cache([weights])
    real = os.preadv
    probed: list[int] = []

    def on_disk_past_half(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        probed.append(offset)
        if offset >= 50_000:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", on_disk_past_half)
    assert not loaders._in_page_cache([weights])
    assert probed[0] == 0 and probed[-1] == 50_000  # evenly spaced; stops at the first miss
    monkeypatch.setattr(os, "preadv", real)
    monkeypatch.delattr(os, "RWF_NOWAIT")
    assert not loaders._in_page_cache([weights])  # no way to ask: read ahead


@synchronously
async def test_a_request_without_its_own_resolution_uses_the_endpoint_configs(
    hub: HubServer, tmp_path: Path
) -> None:
    models, _ = provider(hub, tmp_path, allow_hub=False)
    models.finder.resolutions = {"acme/beta:v1": await resolution_of(hub, tmp_path, "acme/beta:v1")}
    holder = Holder("r1")
    obj = await models.load(Load("acme/beta:v1", injection(Weights), "cpu", holder))
    assert obj.text == "beta weights"
    models.release(holder)
    await models.aclose()
