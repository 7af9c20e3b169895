"""Snapshots from the real local hub into the store: SnapshotFetcher and ModelSource."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import huggingface_hub.constants
import msgspec
import pytest
from servers.fake_hf import FakeHfHub

from gen_worker.errors import HubNotFoundError, ValidationError
from gen_worker.hub import HubServer, publish
from gen_worker.models.fetch import SnapshotFetcher
from gen_worker.models.hub_client import HubClient
from gen_worker.models.manifest import ManifestEntry, SnapshotManifest
from gen_worker.models.source import ModelSource, PrefetchItem
from gen_worker.models.store import Store

BIG = os.urandom(300_000)  # above the 100 kB part size below: travels as 3 parts
FILES = {"model_index.json": b'{"a": 1}', "unet/weights.safetensors": BIG, "vae/c.json": b"{}"}


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    return root


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    root = tmp_path / "hub"
    publish(root, "acme/sd:latest", _write(tmp_path / "src", FILES), part_size_bytes=100_000)
    with HubServer(root) as server:
        yield server


def _resolve(hub: HubServer, ref: str = "acme/sd") -> SnapshotManifest:
    async def go() -> SnapshotManifest:
        client = HubClient(hub.url)
        try:
            return await client.resolve(ref)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _fetch(store: Store, manifest: SnapshotManifest, **kwargs: Any) -> Path:
    async def go() -> Path:
        fetcher = SnapshotFetcher(store)
        try:
            return await fetcher.fetch(manifest, **kwargs)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def _leftovers(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith((".part", ".state", ".tmp")) or ".partial" in p.name
    )


def test_fetch_builds_the_snapshot_and_reports_it(hub: HubServer, tmp_path: Path) -> None:
    manifest = _resolve(hub)
    assert any(e.path.endswith(".parts.json") for e in manifest.entries)
    store = Store(tmp_path / "cas")
    events: list[tuple[str, dict[str, Any]]] = []
    progress: list[tuple[int, int]] = []
    path = _fetch(
        store,
        manifest,
        ref="acme/sd:latest",
        on_event=lambda kind, payload: events.append((kind, payload)),
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert path == store.snapshot_path(manifest.digest)
    found = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert found == set(FILES)
    assert (path / "unet/weights.safetensors").read_bytes() == BIG
    assert [kind for kind, _ in events] == ["model.download.started", "model.download.completed"]
    completed = events[1][1]
    assert completed["model_id"] == "acme/sd:latest"
    assert completed["digest"] == manifest.digest
    assert completed["bytes_transferred"] == manifest.size_bytes
    assert progress[-1] == (manifest.size_bytes, manifest.size_bytes)
    assert store.get_ref("acme/sd:latest") == manifest.digest
    assert _leftovers(tmp_path / "cas") == []

    # Again: nothing to download, no events, the same directory.
    events.clear()
    again = _fetch(store, manifest, on_event=lambda k, p: events.append((k, p)))
    assert again == path and events == []


def test_threads_fetching_one_snapshot_download_it_once(hub: HubServer, tmp_path: Path) -> None:
    manifest = _resolve(hub)
    store = Store(tmp_path / "cas")
    events: list[str] = []
    lock = threading.Lock()
    paths: list[Path] = []

    def one() -> None:
        def record(kind: str, payload: dict[str, Any]) -> None:
            with lock:
                events.append(kind)

        got = _fetch(Store(tmp_path / "cas"), manifest, on_event=record)
        with lock:
            paths.append(got)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert paths == [store.snapshot_path(manifest.digest)] * 6
    assert events == ["model.download.started", "model.download.completed"]


def test_an_expired_url_is_refreshed_once(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    publish(root, "acme/tiny:latest", _write(tmp_path / "src", {"a.bin": b"abc" * 1000}))
    now = [1_000_000.0]
    with HubServer(root, clock=lambda: now[0], url_ttl_s=60) as server:
        stale = _resolve(server, "acme/tiny")
        now[0] += 3600  # every URL of `stale` has expired
        refreshed: list[int] = []

        async def refresh() -> SnapshotManifest:
            refreshed.append(1)
            client = HubClient(server.url)
            try:
                return await client.resolve("acme/tiny")
            finally:
                await client.aclose()

        path = _fetch(Store(tmp_path / "cas"), stale, refresh=refresh)
    assert (path / "a.bin").read_bytes() == b"abc" * 1000
    assert refreshed == [1]


def test_a_failed_fetch_reports_and_can_be_retried(hub: HubServer, tmp_path: Path) -> None:
    good = _resolve(hub)
    # A validly signed URL of a blob the hub does not have: 404.
    gone = hub.url + hub.hub.signer.sign("/api/v1/blobs/" + "0" * 64)
    broken = SnapshotManifest(
        good.digest,
        tuple(
            ManifestEntry(e.path, e.size_bytes, e.blake3, gone) if e.path == "vae/c.json" else e
            for e in good.entries
        ),
    )
    store = Store(tmp_path / "cas")
    events: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(HubNotFoundError, match=r"vae/c\.json"):
        _fetch(store, broken, ref="acme/sd:latest", on_event=lambda k, p: events.append((k, p)))
    assert events[-1][0] == "model.download.failed"
    assert events[-1][1]["error_type"] == "fatal"
    assert "sig=" not in events[-1][1]["error_message"]
    assert not store.has_snapshot(good.digest)
    # The same process can build it on the next try; verified blobs are not fetched again
    # (which others finished before the 404 stopped the fetch depends on timing).
    absent = {e.blake3: e.size_bytes for e in good.entries if not store.has_blob(e.blake3)}
    assert absent  # at least the 404'd one
    events.clear()
    _fetch(store, good, on_event=lambda k, p: events.append((k, p)))
    assert store.has_snapshot(good.digest)
    assert len(b"{}") <= events[-1][1]["bytes_transferred"] <= sum(absent.values())


def _source(store: Store, hub: HubServer | None, **kwargs: Any) -> ModelSource:
    client = HubClient(hub.url) if hub is not None else None
    return ModelSource(SnapshotFetcher(store), hub=client, **kwargs)


def test_prefetch_reports_each_model(hub: HubServer, tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")

    async def go() -> list[dict[str, Any]]:
        source = _source(store, hub)
        try:
            items = [PrefetchItem("acme/sd"), PrefetchItem("acme/missing"), PrefetchItem("a/b/c")]
            return [msgspec.structs.asdict(r) for r in await source.prefetch(items)]
        finally:
            await source.aclose()

    results = asyncio.run(go())
    by_id = {r["model_id"]: r for r in results}
    assert by_id["acme/sd"]["ok"] is True
    digest = store.get_ref("acme/sd:latest")
    assert digest is not None
    assert by_id["acme/sd"]["path"] == str(store.snapshot_path(digest))
    assert by_id["acme/missing"]["ok"] is False
    assert by_id["acme/missing"]["error_type"] == "fatal"
    assert "acme/missing:latest" in by_id["acme/missing"]["error_message"]
    assert by_id["a/b/c"]["error_type"] == "validation"


def test_without_a_hub_the_store_still_serves_what_it_has(hub: HubServer, tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")

    async def pull(source: ModelSource, ref: str) -> Path:
        try:
            return await source.pull(ref)
        finally:
            await source.aclose()

    online = asyncio.run(pull(_source(store, hub), "acme/sd"))
    assert asyncio.run(pull(_source(store, None), "Acme/SD:latest")) == online
    with pytest.raises(ValidationError, match="no hub is configured; set TENSORHUB_URL"):
        asyncio.run(pull(_source(store, None), "acme/other"))


def test_hugging_face_refs_land_in_the_same_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Telemetry would also call huggingface.co: never leave loopback.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    weights = os.urandom(50_000)
    fake = FakeHfHub()
    commit = fake.push(
        "acme/bert",
        {
            "config.json": b'{"model_type": "bert"}',
            "model.safetensors": weights,
            "pytorch_model.bin": b"pickle, never downloaded",
            "README.md": b"docs",
        },
    )
    store = Store(tmp_path / "cas")
    with fake.serve() as url:

        async def go() -> Path:
            source = ModelSource(SnapshotFetcher(store), hf_endpoint=url)
            try:
                return await source.pull("hf:acme/bert")
            finally:
                await source.aclose()

        path = asyncio.run(go())
        downloaded = [p for p in fake.requested_paths() if "/resolve/" in p or "/cdn/" in p]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert (path / "model.safetensors").read_bytes() == weights
    assert not any("pytorch_model.bin" in p for p in downloaded)
    digest = store.get_ref(f"hf:acme/bert@{commit}")
    assert digest is not None and store.get_ref("hf:acme/bert") == digest
    blob = store.blob_path(blake3.blake3(weights).hexdigest())
    assert blob.read_bytes() == weights
    assert _leftovers(tmp_path / "cas") == []


def test_two_refs_of_one_snapshot_fetched_at_once_are_both_indexed(
    hub: HubServer, tmp_path: Path
) -> None:
    """Two tags of one checkpoint, asked for at the same time: one download, both refs known."""
    manifest = _resolve(hub)
    store = Store(tmp_path / "store")

    async def go() -> list[Path]:
        fetcher = SnapshotFetcher(store)
        try:
            return list(
                await asyncio.gather(
                    fetcher.fetch(manifest, ref="acme/sd:latest"),
                    fetcher.fetch(manifest, ref="acme/sd:v1"),
                )
            )
        finally:
            await fetcher.aclose()

    first, second = asyncio.run(go())
    assert first == second == store.snapshot_path(manifest.digest)
    assert store.refs() == {"acme/sd:latest": manifest.digest, "acme/sd:v1": manifest.digest}
