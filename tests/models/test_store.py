"""The store's layout, blobs, and building snapshots: links, fallbacks, atomicity, refusals."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from gen_worker.errors import DigestMismatchError, FatalError, UnsafePathError
from gen_worker.models.manifest import ManifestEntry, SnapshotManifest, snapshot_digest
from gen_worker.models.store import BlobMissingError, Linker, LinkMode, Store

from .test_store_support import (
    b3,
    blob_files,
    entry,
    files_under,
    listing,
    manifest_of,
    put,
    snapshot_with,
    transient_leftovers,
)

FILES = {
    "model_index.json": b'{"_class_name": "Tiny"}',
    "unet/config.json": b'{"layers": 2}',
    "unet/diffusion_pytorch_model.safetensors": bytes(range(256)) * 64,
    "text_encoder/model.safetensors": b"\x00" * 3000,
}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "cas")


# -- layout --------------------------------------------------------------------------------


def test_layout_follows_the_spec(tmp_path: Path) -> None:
    store = Store.from_cache_dir(tmp_path / "cache")
    root = (tmp_path / "cache" / "cas").resolve()
    h = "ab" + "cd" + "e" * 60
    assert store.root == root
    assert store.blob_path(h) == root / "blobs" / "blake3" / "ab" / "cd" / h
    assert store.blob_part_path(h) == root / "blobs" / "blake3" / "ab" / "cd" / (h + ".part")
    assert store.blob_lock_path(h) == root / "locks" / "blobs" / f"{h}.lock"
    assert not store.blob_lock_path(h).is_relative_to(root / "blobs")
    assert store.snapshot_path("blake3:" + h) == root / "snapshots" / h
    assert store.blob_lock_path(h).parent.is_dir()  # a downloader can lock at once
    assert not store.has_blob(h)
    assert not store.has_snapshot("blake3:" + h)


@pytest.mark.parametrize("bad", ["", "../" + "a" * 61, "A" * 64, "a" * 63])
def test_blob_names_must_be_blake3_hex(store: Store, bad: str) -> None:
    with pytest.raises(ValueError, match=r"blob digest .* is not 64 lower-case hex characters"):
        store.blob_path(bad)
    with pytest.raises(ValueError, match="must look like blake3:<64 hex>"):
        store.snapshot_path(bad)


# -- blobs ---------------------------------------------------------------------------------


def test_add_blob_moves_the_file_in_read_only(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "download"
    source.write_bytes(b"weights" * 1000)
    hex_digest = store.add_blob_from_file(source)
    assert hex_digest == b3(b"weights" * 1000)
    assert not source.exists()
    blob = store.blob_path(hex_digest)
    assert blob.read_bytes() == b"weights" * 1000
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert store.has_blob(hex_digest)


def test_add_blob_twice_keeps_one(store: Store, tmp_path: Path) -> None:
    first = put(store, b"same")
    again = tmp_path / "again"
    again.write_bytes(b"same")
    assert store.add_blob_from_file(again, first) == first
    assert not again.exists()
    assert blob_files(store) == {first}


def test_add_blob_with_the_wrong_digest_adds_nothing(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "download"
    source.write_bytes(b"corrupted")
    expected = b3(b"original")
    with pytest.raises(DigestMismatchError) as caught:
        store.add_blob_from_file(source, expected)
    assert str(caught.value) == (
        f"{source}: blake3 mismatch: expected {expected}, got {b3(b'corrupted')}"
    )
    assert blob_files(store) == set()
    assert not source.exists()
    assert transient_leftovers(store) == []


def test_add_blob_across_devices_copies_then_renames(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "other-device"
    elsewhere.mkdir()
    source = elsewhere / "download"
    source.write_bytes(b"far away")
    real_replace = Path.replace
    renamed_from: list[Path] = []

    def replace(self: Path, target: str | os.PathLike[str]) -> Path:
        if self.parent == elsewhere:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        renamed_from.append(self.parent)
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    hex_digest = store.add_blob_from_file(source)
    assert store.blob_path(hex_digest).read_bytes() == b"far away"
    assert not source.exists()
    assert renamed_from == [store.root / "tmp"]  # the copy was renamed in from the store's tmp/
    assert transient_leftovers(store) == []


# -- materialize: links and fallbacks ------------------------------------------------------


def test_materialize_hard_links_every_file(store: Store) -> None:
    manifest = snapshot_with(store, FILES)
    path = store.materialize(manifest)
    assert path == store.root / "snapshots" / manifest.hex
    assert store.has_snapshot(manifest.digest)
    assert files_under(path) == FILES
    for relative, data in FILES.items():
        placed = path / relative
        blob = store.blob_path(b3(data))
        assert not placed.is_symlink()
        assert placed.stat().st_ino == blob.stat().st_ino
        assert placed.stat().st_nlink == 2
        assert stat.S_IMODE(placed.stat().st_mode) == 0o444
    # The loader sees only the model's files: no record, lease or lock inside.
    assert listing(path) == [
        "model_index.json",
        "text_encoder",
        "text_encoder/model.safetensors",
        "unet",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert transient_leftovers(store) == []


def test_a_blob_written_by_a_downloader_becomes_read_only_when_linked(store: Store) -> None:
    blob = store.blob_path(b3(b"downloaded"))
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"downloaded")  # what a downloader's own rename leaves: mode 0o644
    blob.chmod(0o644)
    path = store.materialize(manifest_of([entry("w.bin", b"downloaded")]))
    assert stat.S_IMODE((path / "w.bin").stat().st_mode) == 0o444
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444


class NoHardLinks(Linker):
    def hardlink(self, blob: Path, dest: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")


class NoLinksAtAll(NoHardLinks):
    def symlink(self, blob: Path, dest: Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")


def test_materialize_falls_back_to_relative_symlinks(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", linker=NoHardLinks())
    manifest = snapshot_with(store, FILES)
    path = store.materialize(manifest)
    assert files_under(path) == FILES
    for relative, data in FILES.items():
        placed = path / relative
        assert placed.is_symlink()
        assert not placed.readlink().is_absolute()
        assert placed.resolve() == store.blob_path(b3(data))


def test_materialize_falls_back_to_read_only_copies(tmp_path: Path) -> None:
    store = Store(tmp_path / "cas", linker=NoLinksAtAll())
    manifest = snapshot_with(store, FILES)
    path = store.materialize(manifest)
    assert files_under(path) == FILES
    for relative, data in FILES.items():
        placed = path / relative
        assert not placed.is_symlink()
        assert placed.stat().st_ino != store.blob_path(b3(data)).stat().st_ino
        assert placed.stat().st_nlink == 1
        assert stat.S_IMODE(placed.stat().st_mode) == 0o444


def test_linker_modes_choose_the_strategy(tmp_path: Path) -> None:
    class CopiesOnly(Linker):
        modes = ("copy",)

    store = Store(tmp_path / "cas", linker=CopiesOnly())
    path = store.materialize(snapshot_with(store, {"a": b"x"}))
    assert (path / "a").stat().st_nlink == 1
    assert Linker().place(store.blob_path(b3(b"x")), tmp_path / "linked") == "hardlink"
    assert NoHardLinks().place(store.blob_path(b3(b"x")), tmp_path / "sym") == "symlink"
    assert NoLinksAtAll().place(store.blob_path(b3(b"x")), tmp_path / "copied") == "copy"


def test_when_no_way_of_placing_works_nothing_appears(tmp_path: Path) -> None:
    class Nothing(NoLinksAtAll):
        def copy(self, blob: Path, dest: Path) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    store = Store(tmp_path / "cas", linker=Nothing())
    manifest = snapshot_with(store, FILES)
    with pytest.raises(OSError, match=r"hardlink: Invalid cross-device link; symlink: Operation"):
        store.materialize(manifest)
    assert not store.has_snapshot(manifest.digest)
    assert transient_leftovers(store) == []


# -- materialize: atomic, checked -----------------------------------------------------------


def test_a_missing_last_blob_fails_and_leaves_no_directory(store: Store) -> None:
    present = {p: d for p, d in FILES.items() if p != "unet/config.json"}
    for data in present.values():
        put(store, data)
    manifest = manifest_of([entry(p, d) for p, d in FILES.items()])
    assert [e.path for e in store.missing_blobs(manifest)] == ["unet/config.json"]
    with pytest.raises(BlobMissingError) as caught:
        store.materialize(manifest)
    assert str(caught.value) == (
        f"snapshot {manifest.digest}: 1 blob(s) not in the store: 'unet/config.json' "
        f"(blake3 {b3(FILES['unet/config.json'])}, 13 bytes); download them first "
        "(Store.missing_blobs lists them)"
    )
    assert caught.value.retryable
    assert not store.has_snapshot(manifest.digest)
    assert listing(store.root / "snapshots") == []
    assert transient_leftovers(store) == []
    put(store, FILES["unet/config.json"])  # the next attempt, once fetched, succeeds
    assert files_under(store.materialize(manifest)) == FILES


def test_a_failure_halfway_through_linking_leaves_nothing(tmp_path: Path) -> None:
    placed: list[str] = []

    class FailsOnLast(Linker):
        def place(self, blob: Path, dest: Path) -> LinkMode:
            if len(placed) == len(FILES) - 1:
                raise OSError(errno.EIO, "Input/output error")
            placed.append(dest.name)
            return super().place(blob, dest)

    store = Store(tmp_path / "cas", linker=FailsOnLast())
    manifest = snapshot_with(store, FILES)
    with pytest.raises(OSError, match="Input/output error"):
        store.materialize(manifest)
    assert len(placed) == len(FILES) - 1
    assert not store.has_snapshot(manifest.digest)
    assert listing(store.root / "snapshots") == []
    assert transient_leftovers(store) == []


def test_a_manifest_whose_digest_is_not_its_entries_is_refused(store: Store) -> None:
    good = snapshot_with(store, FILES)
    forged = SnapshotManifest("blake3:" + "f" * 64, good.entries)
    before = listing(store.root)
    with pytest.raises(DigestMismatchError) as caught:
        store.materialize(forged)
    assert str(caught.value) == (
        f"snapshot manifest (4 entries): snapshot digest mismatch: expected blake3:{'f' * 64}, "
        f"got {good.digest}"
    )
    assert listing(store.root) == before


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a\\b", "unet/../../x", "a//b"])
def test_unsafe_paths_are_refused_before_anything_is_written(
    store: Store, tmp_path: Path, bad: str
) -> None:
    for data in FILES.values():
        put(store, data)
    entries = [entry(p, d) for p, d in FILES.items()] + [entry(bad, FILES["unet/config.json"])]
    manifest = manifest_of(entries)  # a correct digest: only the path is wrong
    before = listing(store.root)
    with pytest.raises(UnsafePathError) as caught:
        store.materialize(manifest)
    assert caught.value.path == bad
    with pytest.raises(UnsafePathError):
        store.missing_blobs(manifest)
    with pytest.raises(UnsafePathError), store.lease(manifest.digest, manifest=manifest):
        pass
    assert listing(store.root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cas"]  # nothing written beside it


def test_a_blob_of_the_wrong_size_is_refused(store: Store) -> None:
    put(store, b"12345")
    manifest = manifest_of([ManifestEntry("a.bin", 4, b3(b"12345"))])
    with pytest.raises(
        DigestMismatchError, match=r"^a.bin: size \(bytes\) mismatch: expected 4, got 5$"
    ):
        store.materialize(manifest)
    assert not store.has_snapshot(manifest.digest)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [ManifestEntry("a", 1, b3(b"x")), ManifestEntry("a", 1, b3(b"x"))],
            "path 'a' is listed twice",
        ),
        (
            [ManifestEntry("a", 1, b3(b"x")), ManifestEntry("a/b", 1, b3(b"x"))],
            "'a' is a file and also the directory of 'a/b'",
        ),
        ([ManifestEntry("a", 1, "")], "blake3 of 'a' '' is not 64 lower-case hex characters"),
        ([ManifestEntry("a", -1, b3(b"x"))], "'a' has size -1"),
    ],
)
def test_malformed_manifests_are_refused(
    store: Store, entries: list[ManifestEntry], message: str
) -> None:
    manifest = SnapshotManifest(snapshot_digest(entries), tuple(entries))
    with pytest.raises(FatalError, match=message):
        store.materialize(manifest)
    assert listing(store.root / "snapshots") == []


def test_materialize_again_returns_the_same_directory(store: Store) -> None:
    manifest = snapshot_with(store, FILES)
    first = store.materialize(manifest)
    inode = first.stat().st_ino
    assert store.materialize(manifest) == first
    assert first.stat().st_ino == inode
    assert store.missing_blobs(manifest) == []


def test_missing_blobs_lists_each_absent_blob_once_in_order(store: Store) -> None:
    put(store, b"have")
    entries = [
        entry("a", b"need-1"),
        entry("b", b"have"),
        entry("c", b"need-2"),
        entry("copy-of-a", b"need-1"),
    ]
    manifest = manifest_of(entries)
    assert store.missing_blobs(manifest) == [entries[0], entries[2]]


def test_an_empty_file_and_an_empty_snapshot_build(store: Store) -> None:
    manifest = snapshot_with(store, {"empty": b""})
    assert files_under(store.materialize(manifest)) == {"empty": b""}
    nothing = manifest_of([])
    assert listing(store.materialize(nothing)) == []
