"""The disk side of ``ModelCache`` over a real content-addressed store in ``tmp_path``: refs and
digests of complete snapshots are on disk, the store's eviction is what the cache then
reports, and the store is opened lazily (queries never create it)."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from gen_worker.errors import InsufficientDiskError
from gen_worker.model_cache import ModelCache
from gen_worker.models.manifest import ManifestEntry, SnapshotManifest, snapshot_digest
from gen_worker.models.store import Store

KB = 1000


def publish(store: Store, ref: str, size: int = KB, *, at: float | None = None) -> str:
    """Build a one-file snapshot of ``size`` random bytes through the store's API, name it
    ``ref`` in the ref index, and return its digest."""
    data = os.urandom(size)
    incoming = store.root.parent / f"incoming-{ref.replace('/', '_').replace(':', '_')}"
    incoming.write_bytes(data)
    hex_digest = store.add_blob_from_file(incoming)
    assert hex_digest == blake3.blake3(data).hexdigest()
    entries = (ManifestEntry("model.safetensors", size, hex_digest),)
    manifest = SnapshotManifest(snapshot_digest(list(entries)), entries)
    store.materialize(manifest)
    if at is not None:
        store.touch(manifest.digest, at=at)
    store.set_ref(ref, manifest.digest)
    return manifest.digest


def test_store_refs_and_digests_are_on_disk(tmp_path: Path) -> None:
    store = Store.from_cache_dir(tmp_path / "cache")
    digest = publish(store, "acme/sd:latest")
    cache = ModelCache(max_vram_gb=8.0, model_cache_dir=tmp_path / "cache", vram_probe=lambda: 0)
    assert cache.is_on_disk("acme/sd:latest")
    assert cache.is_on_disk(digest)
    assert not cache.is_on_disk("acme/other:latest")
    assert not cache.is_on_disk("blake3:not-a-digest")
    assert cache.get_disk_models() == ["acme/sd:latest"]
    assert cache.cache_state("acme/sd:latest") == "warm_disk"
    assert cache.cache_state("acme/other:latest") == "cold_remote"
    assert cache.has_model("acme/sd:latest")
    assert cache.inventory()["warm"] == ["acme/sd:latest"]

    cache.mark_loaded_to_vram("acme/sd:latest", object(), 1.0)
    assert cache.cache_state("acme/sd:latest") == "hot_vram"
    assert cache.inventory() == {
        "hot": ["acme/sd:latest"],
        "warm": [],
        "downloading": [],
        "loading": [],
    }
    # Evicted from VRAM, still on disk; forgetting the marks cannot forget the store's files.
    assert cache.make_room(8.0) == ["acme/sd:latest"]
    assert cache.cache_state("acme/sd:latest") == "warm_disk"
    cache.unload_model("acme/sd:latest")
    assert cache.cache_state("acme/sd:latest") == "warm_disk"


def test_a_ref_whose_snapshot_is_not_complete_is_not_on_disk(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")
    absent = "blake3:" + "ab" * 32
    store.set_ref("acme/pending:latest", absent)
    cache = ModelCache(max_vram_gb=8.0, store=store, vram_probe=lambda: 0)
    assert not cache.is_on_disk("acme/pending:latest")
    assert cache.get_disk_models() == []


def test_queries_never_create_the_store(tmp_path: Path) -> None:
    cache_dir = tmp_path / "fresh"
    cache = ModelCache(max_vram_gb=8.0, model_cache_dir=cache_dir, vram_probe=lambda: 0)
    cache.mark_loaded_to_vram("a", object(), 1.0)
    assert not cache.is_on_disk("a")
    assert cache.get_disk_models() == []
    assert cache.cache_state("b") == "cold_remote"
    assert cache.get_stats()["disk_models"] == []
    assert not cache_dir.exists()
    cache.ensure_disk_space(0)  # preparing a download opens (creates) it
    assert (cache_dir / "cas" / "snapshots").is_dir()
    # Created by someone else after the first query: found on the next one.
    publish(Store.from_cache_dir(cache_dir), "acme/late:v1")
    assert cache.get_disk_models() == ["acme/late:v1"]


def test_the_store_is_found_from_the_environment_then_the_home_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = tmp_path / "from-env"
    publish(Store.from_cache_dir(from_env), "acme/env:v1")
    monkeypatch.setenv("TENSORHUB_CACHE_DIR", str(from_env))
    cache = ModelCache(max_vram_gb=8.0, vram_probe=lambda: 0)
    assert cache.get_disk_models() == ["acme/env:v1"]

    monkeypatch.delenv("TENSORHUB_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = ModelCache(max_vram_gb=8.0, vram_probe=lambda: 0)
    assert cache.get_disk_models() == []
    assert not (tmp_path / "home").exists()
    cache.ensure_disk_space(0)
    assert (tmp_path / "home" / ".cache" / "tensorhub" / "cas" / "blobs").is_dir()


def test_an_argument_dir_beats_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(Store.from_cache_dir(tmp_path / "env"), "acme/env:v1")
    publish(Store.from_cache_dir(tmp_path / "arg"), "acme/arg:v1")
    monkeypatch.setenv("TENSORHUB_CACHE_DIR", str(tmp_path / "env"))
    cache = ModelCache(1.0, None, tmp_path / "arg", vram_probe=lambda: 0)
    assert cache.get_disk_models() == ["acme/arg:v1"]


def test_disk_eviction_by_the_store_removes_the_cache_knowledge(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=3 * KB)
    old = publish(store, "acme/old:v1", at=100)
    used = publish(store, "acme/used:v1", at=200)
    publish(store, "acme/new:v1", at=300)
    cache = ModelCache(max_vram_gb=8.0, store=store, vram_probe=lambda: 0)
    for ref, digest in (("acme/old:v1", old), ("acme/used:v1", used)):
        cache.mark_cached_to_disk(ref, store.snapshot_path(digest), KB / 1e9)
    assert cache.get_disk_models() == ["acme/new:v1", "acme/old:v1", "acme/used:v1"]

    with store.lease(used):
        cache.ensure_disk_space(2 * KB)  # the oldest not in use go: old, then new
        assert cache.get_disk_models() == ["acme/used:v1"]
        assert not cache.is_on_disk("acme/old:v1")
        assert cache.cache_state("acme/old:v1") == "cold_remote"
        assert cache.get_stats()["disk_models"] == ["acme/used:v1"]
        with pytest.raises(InsufficientDiskError) as caught:
            cache.ensure_disk_space(3 * KB)  # only the leased snapshot is left
        assert (caught.value.needed_bytes, caught.value.free_bytes) == (3 * KB, 2 * KB)
        assert cache.is_on_disk("acme/used:v1")


def test_a_marked_path_that_disappears_is_forgotten(tmp_path: Path) -> None:
    cache = ModelCache(max_vram_gb=8.0, model_cache_dir=tmp_path / "c", vram_probe=lambda: 0)
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    cache.mark_cached_to_disk("local-model", snapshot, 1.0)
    cache.mark_loaded_to_vram("local-model", object(), 1.0)
    cache.make_room(8.0)
    assert cache.cache_state("local-model") == "warm_disk"  # survives the VRAM eviction
    snapshot.rmdir()
    assert not cache.is_on_disk("local-model")
    snapshot.mkdir()  # the mark was dropped, not merely hidden
    assert not cache.is_on_disk("local-model")
    cache.mark_cached_to_disk("local-model", snapshot, 1.0)
    assert cache.get_disk_models() == ["local-model"]
