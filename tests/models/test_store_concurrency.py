"""Many builders at once, leases across processes, and what killed processes leave behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from gen_worker.errors import InsufficientDiskError
from gen_worker.models.store import Linker, LinkMode, SnapshotInUseError, Store

from .test_store_support import (
    child,
    entry,
    files_under,
    manifest_of,
    put,
    snapshot_with,
    split,
    transient_leftovers,
)

FILES = {f"shard-{i:02d}/weights.bin": os.urandom(2000 + i) for i in range(40)}
BIG = os.urandom(200_000)


def lease_files(store: Store) -> list[str]:
    return sorted(p.name for p in (store.root / "leases").iterdir())


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert finished.returncode == 0
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_processes_and_eight_threads_build_one_snapshot(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")
    parts, blobs = split("big.bin", BIG, [70_000, 70_000, 60_000])
    for data in [*FILES.values(), *blobs]:
        put(store, data)
    manifest = manifest_of([entry(p, d) for p, d in FILES.items()] + parts)
    manifest_file = tmp_path / "manifest.json"
    manifest_file.write_bytes(msgspec.json.encode(manifest))
    go = tmp_path / "go"
    children = [
        child("materialize", str(store.root), str(manifest_file), str(go), "4") for _ in range(2)
    ]
    barrier = threading.Barrier(9)
    results: list[str] = []
    placed: list[Path] = []

    class Counting(Linker):
        def place(self, blob: Path, dest: Path) -> LinkMode:
            placed.append(dest)
            return super().place(blob, dest)

    def build() -> None:
        barrier.wait()
        try:
            results.append(str(Store(store.root, linker=Counting()).materialize(manifest)))
        except BaseException as exc:
            results.append(f"error {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=build) for _ in range(8)]
    for thread in threads:
        thread.start()
    for proc in children:  # both children imported everything and wait for the go file
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
    go.touch()
    barrier.wait()
    for thread in threads:
        thread.join(timeout=60)
    outputs = [c.communicate(timeout=60) for c in children]

    expected = str(store.snapshot_path(manifest.digest))
    assert results == [expected] * 8
    placements = len(placed)
    for proc, (out, err) in zip(children, outputs, strict=True):
        assert proc.returncode == 0, err
        *paths, count = out.splitlines()
        assert paths == [expected] * 4
        placements += int(count.removeprefix("placed "))
    assert placements == len(FILES) + 1  # exactly one builder placed the files, once each
    assert [p.name for p in (store.root / "snapshots").iterdir()] == [manifest.hex]
    assert files_under(store.snapshot_path(manifest.digest)) == {**FILES, "big.bin": BIG}
    assert transient_leftovers(store) == []
    assert lease_files(store) == []
    assert not store.in_use(manifest.digest)


def test_the_snapshot_lock_works_across_threads_as_the_fetcher_uses_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")
    manifest = snapshot_with(store, {"a.bin": b"a" * 100, "b.bin": b"b" * 100})
    manifest_file = tmp_path / "manifest.json"
    manifest_file.write_bytes(msgspec.json.encode(manifest))
    lock = store.snapshot_lock(manifest.digest)
    assert store.snapshot_lock(manifest.digest) is lock

    acquirer = threading.Thread(target=lock.acquire)  # acquired in one thread...
    acquirer.start()
    acquirer.join()
    go = tmp_path / "go"
    go.touch()
    other = child("materialize", str(store.root), str(manifest_file), str(go), "1")
    assert other.stdout is not None
    assert other.stdout.readline() == "ready\n"
    time.sleep(0.5)
    assert other.poll() is None  # the other process waits for the lock this process holds
    assert not store.has_snapshot(manifest.digest)

    built: list[Path] = []
    builder = threading.Thread(target=lambda: built.append(store.materialize(manifest)))
    builder.start()  # ...the holder builds from another thread without deadlocking...
    builder.join(timeout=30)
    assert built == [store.snapshot_path(manifest.digest)]
    releaser = threading.Thread(target=lock.release)  # ...and releases from a third
    releaser.start()
    releaser.join()
    out, err = other.communicate(timeout=60)
    assert other.returncode == 0, err
    assert out.splitlines() == [str(store.snapshot_path(manifest.digest)), "placed 0"]


def test_a_lease_held_by_another_process_protects_the_snapshot(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=10_000)
    manifest = snapshot_with(store, {"w.bin": os.urandom(6000)})
    store.materialize(manifest)
    holder = child("lease", str(store.root), manifest.digest, stdin=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "leased\n"
        # Another instance, as a second worker process would see the store.
        fresh = Store(store.root, budget_bytes=10_000)
        assert fresh.in_use(manifest.digest)
        assert [i.in_use for i in fresh.inventory()] == [True]
        (lease,) = lease_files(fresh)
        assert lease.startswith(f"{manifest.hex}.{holder.pid}.") and lease.endswith(".lease")
        with pytest.raises(SnapshotInUseError) as caught:
            fresh.remove_snapshot(manifest.digest)
        assert str(caught.value) == (
            f"snapshot {manifest.digest} is in use (leased by process {holder.pid}); remove it "
            "once no request uses it"
        )
        with pytest.raises(InsufficientDiskError) as full:
            fresh.ensure_space(5000)
        assert str(full.value) == (
            f"not enough disk space under {store.root}: need 5000 bytes, 4000 bytes free "
            "(free space, or lower the snapshot size)"
        )
        assert fresh.has_snapshot(manifest.digest)
    finally:
        holder.kill()  # SIGKILL: no chance to remove its lease file
        holder.communicate(timeout=30)
    assert len(lease_files(store)) == 1  # left behind by the killed process...
    assert not store.in_use(manifest.digest)  # ...and recognised as stale
    assert lease_files(store) == []
    store.ensure_space(5000)
    assert not store.has_snapshot(manifest.digest)


def test_leases_count_within_a_process(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")
    twin = Store(tmp_path / "cas")
    digest = snapshot_with(store, {"a": b"a"}).digest
    store.materialize(manifest_of([entry("a", b"a")]))
    assert not store.in_use(digest)
    with store.lease(digest) as path:
        assert path == store.snapshot_path(digest)
        with twin.lease(digest):
            assert len(lease_files(store)) == 1
        assert store.in_use(digest) and twin.in_use(digest)
        assert len(lease_files(store)) == 1
    assert not store.in_use(digest)
    assert lease_files(store) == []


def test_a_lease_with_its_manifest_keeps_found_blobs_through_an_eviction(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", budget_bytes=12_000)
    shared = os.urandom(5000)
    old = snapshot_with(store, {"shared.bin": shared, "old.bin": os.urandom(5000)})
    store.materialize(old)
    store.touch(old.digest, at=1000)
    new = manifest_of([entry("shared.bin", shared), entry("new.bin", b"n" * 1000)])
    with store.lease(new.digest, manifest=new):
        assert store.missing_blobs(new) == [entry("new.bin", b"n" * 1000)]
        store.ensure_space(5000)  # evicts the old snapshot, but not the blob `new` found
        assert not store.has_snapshot(old.digest)
        assert store.has_blob(entry("shared.bin", shared).blake3)
        put(store, b"n" * 1000)
        assert files_under(store.materialize(new))["shared.bin"] == shared


def test_leftovers_of_killed_processes_are_cleaned(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas")
    manifest = snapshot_with(store, {"a.bin": b"a" * 10})
    hex_digest, gone, mine = manifest.hex, dead_pid(), os.getpid()
    stale_build = store.root / "snapshots" / f".tmp.{hex_digest}.{gone}.0123456789ab"
    (stale_build / "sub").mkdir(parents=True)
    (stale_build / "sub" / "half.bin").write_bytes(b"half")
    stale_trash = store.root / "snapshots" / f".trash.{'e' * 64}.{gone}.0123456789ab"
    stale_trash.mkdir()
    stale_tmp = store.root / "tmp" / f"join.{gone}.0123456789ab"
    stale_tmp.write_bytes(b"partial reassembly")
    stale_lease = store.root / "leases" / f"{hex_digest}.{gone}.0123456789ab.lease"
    stale_lease.write_text(f"{gone}\n")
    stale_record_tmp = store.root / "meta" / f".{hex_digest}.json.{gone}.0123456789ab.tmp"
    stale_record_tmp.write_bytes(b"{")
    stale_refs_tmp = store.root / f".refs.json.{gone}.0123456789ab.tmp"
    stale_refs_tmp.write_bytes(b"{")
    own_build = store.root / "snapshots" / f".tmp.{hex_digest}.{mine}.ba9876543210"
    own_build.mkdir()

    reopened = Store(store.root)
    for path in (
        stale_build,
        stale_trash,
        stale_tmp,
        stale_lease,
        stale_record_tmp,
        stale_refs_tmp,
    ):
        assert not path.exists(), path
    assert own_build.exists()  # could be a build in progress in this very process
    assert not reopened.in_use(manifest.digest)
    reopened.materialize(manifest)  # under the snapshot's lock, any of its temporaries is stale
    assert not own_build.exists()
    assert transient_leftovers(reopened) == []
    assert files_under(reopened.snapshot_path(manifest.digest)) == {"a.bin": b"a" * 10}
