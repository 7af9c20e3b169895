"""Disk budget and eviction (least recently used, never in use, shared blobs kept), the
inventory, and the refs index."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from gen_worker.errors import InsufficientDiskError, InvalidModelRefError
from gen_worker.models.manifest import SnapshotManifest
from gen_worker.models.store import SnapshotInUseError, Store

from .test_store_support import b3, blob_files, entry, manifest_of, put, snapshot_with

KB = 1000


def build(store: Store, name: str, size: int = KB, *, at: float | None = None) -> SnapshotManifest:
    """A one-file snapshot of ``size`` unique bytes, built, last used at ``at``."""
    manifest = snapshot_with(store, {f"{name}.bin": os.urandom(size)})
    store.materialize(manifest)
    if at is not None:
        store.touch(manifest.digest, at=at)
    return manifest


def present(store: Store, *manifests: SnapshotManifest) -> list[bool]:
    return [store.has_snapshot(m.digest) for m in manifests]


def test_eviction_takes_the_least_recently_used_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=3 * KB + 500)
    a = build(store, "a", at=100)
    b = build(store, "b", at=300)
    c = build(store, "c", at=200)
    assert store.total_bytes() == 3 * KB
    store.ensure_space(500)  # fits: nothing evicted
    assert present(store, a, b, c) == [True, True, True]
    store.ensure_space(1200)
    assert present(store, a, b, c) == [False, True, True]
    assert store.total_bytes() == 2 * KB
    store.ensure_space(2400)
    assert present(store, a, b, c) == [False, True, False]
    assert blob_files(store) == {b.entries[0].blake3}


def test_a_touch_makes_a_snapshot_recent(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=2 * KB)
    a = build(store, "a", at=100)
    b = build(store, "b", at=200)
    store.touch(a.digest)  # now
    store.ensure_space(KB)
    assert present(store, a, b) == [True, False]


def test_a_snapshot_in_use_is_never_evicted(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=3 * KB)
    a = build(store, "a", at=100)
    b = build(store, "b", at=200)
    c = build(store, "c", at=300)
    with store.lease(a.digest):
        store.ensure_space(KB)
        assert present(store, a, b, c) == [True, False, True]
        store.ensure_space(2 * KB)
        assert present(store, a, b, c) == [True, False, False]
        with pytest.raises(InsufficientDiskError) as caught:
            store.ensure_space(3 * KB)
        assert str(caught.value) == (
            f"not enough disk space under {store.root}: need 3000 bytes, 2000 bytes free "
            "(free space, or lower the snapshot size)"
        )
        assert (caught.value.needed_bytes, caught.value.free_bytes) == (3000, 2000)
        assert present(store, a) == [True]
    store.ensure_space(3 * KB)  # once released it may go
    assert present(store, a) == [False]


def test_when_only_snapshots_in_use_could_make_room_nothing_is_evicted(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=3 * KB)
    a = build(store, "a", at=100)
    b = build(store, "b", at=200)
    c = build(store, "c", at=300)
    with store.lease(a.digest), store.lease(b.digest):
        # Evicting c alone would free 1000 bytes of the 2500 needed: c is kept too.
        with pytest.raises(InsufficientDiskError, match="need 2500 bytes, 0 bytes free"):
            store.ensure_space(2500)
        assert present(store, a, b, c) == [True, True, True]
    with pytest.raises(InsufficientDiskError, match="need 3001 bytes, 0 bytes free"):
        store.ensure_space(3 * KB + 1)  # more than the whole budget
    assert present(store, a, b, c) == [True, True, True]


def test_a_blob_shared_by_two_snapshots_survives_the_eviction_of_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=4 * KB)
    shared, own_1, own_2 = os.urandom(KB), os.urandom(KB), os.urandom(KB)
    first = snapshot_with(store, {"shared.bin": shared, "own.bin": own_1})
    second = snapshot_with(store, {"weights/shared.bin": shared, "own.bin": own_2})
    store.materialize(first)
    store.materialize(second)
    store.touch(first.digest, at=100)
    store.touch(second.digest, at=200)
    store.ensure_space(1500)
    assert present(store, first, second) == [False, True]
    assert blob_files(store) == {b3(shared), b3(own_2)}
    assert (store.snapshot_path(second.digest) / "weights" / "shared.bin").read_bytes() == shared
    assert store.total_bytes() == 2 * KB


def test_free_disk_space_is_honoured_without_a_budget(tmp_path: Path) -> None:
    capacity = 3 * KB

    def free_bytes(path: Path) -> int:
        assert path == (tmp_path / "cas").resolve()
        return capacity - store.total_bytes()

    store = Store(tmp_path / "cas", free_bytes=free_bytes)
    a = build(store, "a", at=100)
    b = build(store, "b", at=200)
    assert store.available_bytes() == KB
    store.ensure_space(1500)
    assert present(store, a, b) == [False, True]
    capacity = 0  # the disk filled up with something else
    with pytest.raises(InsufficientDiskError, match="need 1 bytes, 0 bytes free"):
        store.ensure_space(1)
    assert present(store, b) == [True]


def test_remove_snapshot(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")
    a = build(store, "a")
    store.set_ref("owner/a:latest", a.digest)
    with store.lease(a.digest):
        with pytest.raises(SnapshotInUseError) as caught:
            store.remove_snapshot(a.digest)
        assert str(caught.value) == (
            f"snapshot {a.digest} is in use (leased by process {os.getpid()}); remove it once "
            "no request uses it"
        )
    assert store.remove_snapshot(a.digest) is True
    assert not store.has_snapshot(a.digest)
    assert blob_files(store) == set()
    assert store.refs() == {}  # a ref to a snapshot that is gone would mislead `models ls`
    assert store.remove_snapshot(a.digest) is False


def test_a_snapshot_whose_lock_is_held_is_neither_removed_nor_evicted(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=KB)
    a = build(store, "a")
    with store.snapshot_lock(a.digest):
        with pytest.raises(SnapshotInUseError, match="is being built or downloaded"):
            store.remove_snapshot(a.digest)
        with pytest.raises(InsufficientDiskError, match="need 1000 bytes, 0 bytes free"):
            store.ensure_space(KB)
        assert store.has_snapshot(a.digest)
    store.ensure_space(KB)
    assert not store.has_snapshot(a.digest)


def test_an_abandoned_build_is_evicted_with_its_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=3 * KB)
    done = build(store, "done", at=time.time())
    abandoned = manifest_of([entry("x.bin", b"x" * 2 * KB)])
    with store.lease(abandoned.digest, manifest=abandoned):
        put(store, b"x" * 2 * KB)  # downloaded, then the build never happened
    assert not store.has_snapshot(abandoned.digest)
    store.touch(abandoned.digest, at=100)
    store.ensure_space(1500)
    assert not store.has_blob(b3(b"x" * 2 * KB))
    assert present(store, done) == [True]


def test_old_orphan_blobs_go_first_and_fresh_ones_stay(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=4 * KB)
    a = build(store, "a", at=100)
    old_orphan, fresh_orphan = put(store, os.urandom(KB)), put(store, os.urandom(KB))
    os.utime(store.blob_path(old_orphan), (1000, 1000))
    stale_part = store.blob_part_path("c" * 64)
    stale_part.parent.mkdir(parents=True)
    stale_part.write_bytes(b"p" * 500)
    os.utime(stale_part, (1000, 1000))
    store.ensure_space(1 * KB + 500)
    assert not store.has_blob(old_orphan) and not stale_part.exists()
    assert store.has_blob(fresh_orphan)
    assert present(store, a) == [True]


def test_inventory_reports_each_complete_snapshot(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=10**6)
    files = {"model_index.json": b"{}", "unet/w.bin": b"w" * 300}
    m1 = snapshot_with(store, files)
    store.materialize(m1)
    m2 = build(store, "other", 50)
    store.touch(m1.digest, at=1_700_000_000)
    store.touch(m2.digest, at=1_700_000_500)
    store.set_ref("owner/repo:latest", m1.digest)
    store.set_ref("hf:owner/repo@0123abc", m1.digest)
    unbuilt = manifest_of([entry("never.bin", b"n")])
    # The unbuilt one has a record but no directory: not in the inventory.
    with store.lease(unbuilt.digest, manifest=unbuilt), store.lease(m1.digest):
        inventory = store.inventory()
        payload = store.disk_inventory()
    assert [i.digest for i in inventory] == [m2.digest, m1.digest]  # most recent first
    info = inventory[1]
    assert info.path == store.snapshot_path(m1.digest)
    assert (info.size_bytes, info.file_count) == (302, 2)
    assert info.last_used == 1_700_000_000
    assert info.in_use is True
    assert info.refs == ("hf:owner/repo@0123abc", "owner/repo:latest")
    assert (inventory[0].size_bytes, inventory[0].in_use, inventory[0].refs) == (50, False, ())
    assert payload["cache_dir"] == str(store.root)
    assert payload["budget_bytes"] == 10**6
    assert payload["total_bytes"] == 352
    assert payload["snapshot_count"] == 2
    assert payload["snapshots"][1] == {
        "digest": m1.digest,
        "path": str(store.snapshot_path(m1.digest)),
        "size_bytes": 302,
        "file_count": 2,
        "last_used": 1_700_000_000,
        "in_use": True,
        "refs": ["hf:owner/repo@0123abc", "owner/repo:latest"],
    }
    json.dumps(payload)  # ready for an event


def test_refs_index(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")
    d1, d2 = "blake3:" + "1" * 64, "blake3:" + "2" * 64
    assert store.get_ref("owner/repo:latest") is None
    store.set_ref("owner/repo:latest", d1)
    store.set_ref("hf:owner/repo@abc", d2)
    store.set_ref("owner/repo:latest", d2)  # the tag moved
    assert store.get_ref("owner/repo:latest") == d2
    assert store.refs() == {"hf:owner/repo@abc": d2, "owner/repo:latest": d2}
    assert Store(store.root).refs() == store.refs()  # on disk, for offline use
    assert json.loads((store.root / "refs.json").read_bytes()) == store.refs()
    with pytest.raises(ValueError, match="must look like blake3:<64 hex>"):
        store.set_ref("owner/repo:x", "sha256:" + "1" * 64)
    with pytest.raises(InvalidModelRefError, match="non-empty, without surrounding spaces"):
        store.set_ref(" owner/repo", d1)
    with pytest.raises(InvalidModelRefError):
        store.set_ref("", d1)


def test_refs_set_from_many_threads_are_all_kept(tmp_path: Path) -> None:
    stores = [Store(tmp_path / "cas") for _ in range(4)]
    digest = "blake3:" + "3" * 64

    def set_some(store: Store, start: int) -> None:
        for i in range(start, start + 10):
            store.set_ref(f"owner/repo:t{i}", digest)

    threads = [threading.Thread(target=set_some, args=(s, 10 * n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(stores[0].refs()) == sorted(f"owner/repo:t{i}" for i in range(40))


def test_an_unreadable_refs_index_or_record_is_ignored(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")
    a = build(store, "a", 10)
    (store.root / "refs.json").write_bytes(b"{not json")
    (store.root / "meta" / f"{a.hex}.json").write_bytes(b"[]")
    assert store.refs() == {}
    (info,) = store.inventory()  # size and count then come from the directory itself
    assert (info.size_bytes, info.file_count) == (10, 1)
    store.set_ref("owner/repo:latest", a.digest)
    assert store.refs() == {"owner/repo:latest": a.digest}
