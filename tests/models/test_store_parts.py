"""Split files: ``X.partNNNN`` + ``X.parts.json`` reassembled into ``X``, checked, and refused
when anything does not match."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gen_worker.errors import DigestMismatchError, FatalError
from gen_worker.models import parts as parts_module
from gen_worker.models.manifest import ManifestEntry, PartEntry, PartsFile
from gen_worker.models.store import BlobMissingError, Store

from .test_store_support import (
    b3,
    blob_files,
    entry,
    files_under,
    manifest_of,
    put,
    split,
    transient_leftovers,
)

WHOLE = os.urandom(10_000)
CONFIG = b'{"hidden_size": 8}'


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "cas")


def split_snapshot(
    store: Store, sizes: list[int], *, data: bytes = WHOLE, add: bool = True
) -> tuple[list[ManifestEntry], list[bytes]]:
    entries, blobs = split("unet/w.bin", data, sizes)
    if add:
        for blob in [*blobs, CONFIG]:
            put(store, blob)
    return [entry("config.json", CONFIG), *entries], blobs


def test_parts_are_reassembled_into_one_file(store: Store) -> None:
    entries, blobs = split_snapshot(store, [4000, 5000, 1000])
    manifest = manifest_of(entries)
    path = store.materialize(manifest)
    assert files_under(path) == {"config.json": CONFIG, "unet/w.bin": WHOLE}
    whole_blob = store.blob_path(b3(WHOLE))
    assert (path / "unet" / "w.bin").stat().st_ino == whole_blob.stat().st_ino
    # The parts are dropped (the whole blob duplicates them); the small parts file stays, so a
    # later fetch knows the whole blob without downloading the parts again.
    assert blob_files(store) == {b3(WHOLE), b3(CONFIG), b3(blobs[-1])}
    assert transient_leftovers(store) == []
    record = msgspec.json.decode((store.root / "meta" / f"{manifest.hex}.json").read_bytes())
    assert record["size_bytes"] == len(WHOLE) + len(CONFIG)
    assert record["file_count"] == 2
    assert sorted(record["blobs"]) == sorted([b3(WHOLE), b3(CONFIG), b3(blobs[-1])])


def test_missing_blobs_asks_for_parts_only_while_the_whole_file_is_unknown(store: Store) -> None:
    entries, blobs = split_snapshot(store, [6000, 4000], add=False)
    manifest = manifest_of(entries)
    parts_and_index = entries[1:]
    assert store.missing_blobs(manifest) == entries  # config, both parts, the parts file
    put(store, blobs[-1])  # the parts file alone says which whole blob is needed
    assert store.missing_blobs(manifest) == [entries[0], *parts_and_index[:2]]
    put(store, WHOLE)  # another snapshot brought the whole file already
    assert store.missing_blobs(manifest) == [entries[0]]
    put(store, CONFIG)
    assert store.missing_blobs(manifest) == []
    path = store.materialize(manifest)  # built without ever having the parts
    assert files_under(path) == {"config.json": CONFIG, "unet/w.bin": WHOLE}


def test_a_second_snapshot_sharing_the_file_needs_nothing_more(store: Store) -> None:
    entries, _ = split_snapshot(store, [5000, 5000])
    store.materialize(manifest_of(entries))
    other = manifest_of([*entries[1:], entry("README.md", b"# other")])
    assert store.missing_blobs(other) == [entry("README.md", b"# other")]
    put(store, b"# other")
    assert files_under(store.materialize(other)) == {"README.md": b"# other", "unet/w.bin": WHOLE}


def test_a_corrupt_part_is_refused_naming_it(store: Store) -> None:
    entries, blobs = split_snapshot(store, [3000, 3000, 4000])
    corrupt = store.blob_path(b3(blobs[1]))
    corrupt.chmod(0o644)
    corrupt.write_bytes(b"X" + blobs[1][1:])
    manifest = manifest_of(entries)
    with pytest.raises(DigestMismatchError) as caught:
        store.materialize(manifest)
    assert caught.value.name == "unet/w.bin.part0001"
    assert str(caught.value) == (
        f"unet/w.bin.part0001: blake3 mismatch: expected {b3(blobs[1])}, "
        f"got {b3(b'X' + blobs[1][1:])}"
    )
    assert not store.has_snapshot(manifest.digest)
    assert not store.has_blob(b3(WHOLE))
    assert not store.has_blob(b3(blobs[1]))  # dropped, so the next fetch gets it again
    assert store.has_blob(b3(blobs[0])) and store.has_blob(b3(blobs[2]))
    assert store.missing_blobs(manifest) == [entries[2]]
    assert transient_leftovers(store) == []


def test_a_truncated_part_is_refused_naming_it(store: Store) -> None:
    entries, blobs = split_snapshot(store, [3000, 7000])
    truncated = store.blob_path(b3(blobs[0]))
    truncated.chmod(0o644)
    truncated.write_bytes(blobs[0][:10])
    with pytest.raises(DigestMismatchError) as caught:
        store.materialize(manifest_of(entries))
    assert str(caught.value) == "unet/w.bin.part0000: size (bytes) mismatch: expected 3000, got 10"
    assert transient_leftovers(store) == []


def parts_file_entries(store: Store, parts_file: PartsFile) -> list[ManifestEntry]:
    """The manifest of WHOLE cut in two, with ``parts_file`` as its (possibly wrong) index."""
    entries, blobs = split("w.bin", WHOLE, [5000, 5000])
    for blob in blobs[:-1]:
        put(store, blob)
    index = msgspec.json.encode(parts_file)
    put(store, index)
    return [*entries[:-1], entry("w.bin.parts.json", index)]


def good_parts_file() -> PartsFile:
    return msgspec.json.decode(split("w.bin", WHOLE, [5000, 5000])[1][-1], type=PartsFile)


def test_a_whole_file_digest_that_does_not_match_is_refused_naming_the_file(store: Store) -> None:
    wrong = msgspec.structs.replace(good_parts_file(), blake3="e" * 64)
    manifest = manifest_of(parts_file_entries(store, wrong))
    with pytest.raises(DigestMismatchError) as caught:
        store.materialize(manifest)
    assert str(caught.value) == f"w.bin: blake3 mismatch: expected {'e' * 64}, got {b3(WHOLE)}"
    assert not store.has_blob("e" * 64) and not store.has_blob(b3(WHOLE))
    assert not store.has_snapshot(manifest.digest)
    assert transient_leftovers(store) == []


def test_a_parts_file_listing_another_part_digest_is_refused(store: Store) -> None:
    good = good_parts_file()
    listed = PartEntry(good.parts[1].path, good.parts[1].size_bytes, "d" * 64)
    wrong = msgspec.structs.replace(good, parts=(good.parts[0], listed))
    with pytest.raises(DigestMismatchError) as caught:
        store.materialize(manifest_of(parts_file_entries(store, wrong)))
    assert str(caught.value) == (
        f"w.bin.part0001: blake3 listed in w.bin.parts.json mismatch: "
        f"expected {good.parts[1].blake3}, got {'d' * 64}"
    )


def test_a_parts_file_with_another_whole_size_is_refused(store: Store) -> None:
    wrong = msgspec.structs.replace(good_parts_file(), size_bytes=9999)
    with pytest.raises(DigestMismatchError) as caught:
        store.materialize(manifest_of(parts_file_entries(store, wrong)))
    assert str(caught.value) == "w.bin: size (sum of the parts) mismatch: expected 9999, got 10000"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"path": "other.bin"}, "w.bin.parts.json: describes 'other.bin', expected 'w.bin'"),
        ({"parts": ()}, r"w.bin.parts.json: lists parts \[\], but the manifest has"),
        ({"blake3": "nope"}, "w.bin.parts.json: not a valid parts file"),
    ],
)
def test_a_parts_file_that_disagrees_with_the_manifest_is_refused(
    store: Store, change: dict[str, object], message: str
) -> None:
    wrong = msgspec.structs.replace(good_parts_file(), **change)
    with pytest.raises(FatalError, match=message):
        store.materialize(manifest_of(parts_file_entries(store, wrong)))


def test_a_parts_file_that_is_not_json_is_refused(store: Store) -> None:
    entries, blobs = split("w.bin", WHOLE, [10_000])
    put(store, blobs[0])
    put(store, b"not json")
    manifest = manifest_of([entries[0], entry("w.bin.parts.json", b"not json")])
    with pytest.raises(FatalError, match=r"^w.bin.parts.json: not a valid parts file \("):
        store.materialize(manifest)


def test_parts_must_be_numbered_without_gaps(store: Store) -> None:
    entries, _ = split("w.bin", WHOLE, [4000, 3000, 3000])
    gappy = [entries[0], entries[2], entries[3]]  # part0000, part0002, parts.json
    with pytest.raises(FatalError, match=r"expected 'w\.bin\.part0001', found 'w\.bin\.part0002'"):
        store.materialize(manifest_of(gappy))


def test_a_file_cannot_be_both_whole_and_split(store: Store) -> None:
    entries, _ = split("w.bin", WHOLE, [10_000])
    with pytest.raises(FatalError, match=r"'w\.bin' is listed both as a file and as parts"):
        store.materialize(manifest_of([entry("w.bin", WHOLE), *entries]))


def test_absent_parts_are_reported_before_any_work(store: Store) -> None:
    entries, blobs = split_snapshot(store, [5000, 5000], add=False)
    for blob in (blobs[0], blobs[2], CONFIG):
        put(store, blob)
    with pytest.raises(
        BlobMissingError, match=r"1 blob\(s\) not in the store: 'unet/w.bin.part0001'"
    ):
        store.materialize(manifest_of(entries))
    assert list((store.root / "tmp").iterdir()) == []


@settings(max_examples=30, deadline=None)
@given(
    data=st.binary(min_size=2, max_size=3000),
    cuts=st.sets(st.integers(min_value=1, max_value=2999), min_size=1, max_size=6),
    corrupt_at=st.integers(min_value=0),
)
def test_any_split_reassembles_and_any_corrupt_part_is_named(
    data: bytes, cuts: set[int], corrupt_at: int
) -> None:
    # At least two parts: a single part is the whole file, the very same blob.
    points = sorted({c % (len(data) - 1) + 1 for c in cuts})
    sizes = [b - a for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    root = Path(tempfile.mkdtemp(prefix="store-parts-"))
    try:
        store = Store(root / "cas")
        entries, blobs = split("w.bin", data, sizes)
        for blob in blobs:
            put(store, blob)
        path = store.materialize(manifest_of(entries))
        assert (path / "w.bin").read_bytes() == data
        assert store.has_blob(b3(data))
        assert files_under(path) == {"w.bin": data}

        # The same parts under another name, one of them corrupted on disk.
        other = Store(root / "other")
        renamed, blobs = split("v.bin", data, sizes)
        for blob in blobs:
            put(other, blob)
        bad = corrupt_at % len(sizes)
        target = other.blob_path(b3(blobs[bad]))
        target.chmod(0o644)
        target.write_bytes(bytes([blobs[bad][0] ^ 0xFF]) + blobs[bad][1:])
        with pytest.raises(DigestMismatchError) as caught:
            other.materialize(manifest_of(renamed))
        # Equal parts are one blob: the first part reading the corrupted blob is named.
        first = next(i for i, b in enumerate(blobs) if b == blobs[bad])
        assert caught.value.name == f"v.bin.part{first:04d}"
        assert not other.has_blob(b3(data))
        assert transient_leftovers(other) == []
    finally:
        shutil.rmtree(root)


def test_parts_are_joined_by_a_plain_copy_where_the_kernel_refuses_to(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    entries, _ = split_snapshot(store, [4000, 5000, 1000])
    path = store.materialize(manifest_of(entries))
    assert files_under(path) == {"config.json": CONFIG, "unet/w.bin": WHOLE}


def test_a_right_whole_is_hashed_once_and_its_parts_not_again(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parts are blobs named by digests checked when they were stored: the whole's digest
    # covers them, and only a wrong whole would send the check back to each part.
    hashed: list[str] = []
    real = parts_module.hash_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(parts_module, "hash_file", counting)
    entries, _ = split_snapshot(store, [4000, 5000, 1000])
    store.materialize(manifest_of(entries))
    assert len(hashed) == 1 and hashed[0].startswith("join")
