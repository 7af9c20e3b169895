"""Publishing into the hub's storage: entries, parts, records, tags, refusals, concurrency."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import blake3
import msgspec
import pytest

from gen_worker.errors import InvalidModelRefError, UnsafePathError, ValidationError
from gen_worker.hub import HubStorage, publish
from gen_worker.models.manifest import ManifestEntry, PartsFile, snapshot_digest


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_publish_directory_stores_blobs_record_and_tag(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"b.txt": b"bee", "a/x.json": b"{}", "a/y": b""})
    hub = tmp_path / "hub"
    manifest = publish(hub, "me/model:v1", src, attributes={"dtype": "bf16"})

    expected = (
        ManifestEntry("a/x.json", 2, b3(b"{}")),
        ManifestEntry("a/y", 0, b3(b"")),
        ManifestEntry("b.txt", 3, b3(b"bee")),
    )
    assert manifest.entries == expected
    assert manifest.digest == snapshot_digest(list(expected))
    storage = HubStorage(hub)
    for entry in expected:
        blob = storage.blob_path(entry.blake3)
        assert blob == hub / "blobs" / entry.blake3[:2] / entry.blake3
        assert blake3.blake3(blob.read_bytes()).hexdigest() == entry.blake3
    record = storage.snapshot(manifest.hex)
    assert record is not None
    assert record.digest == manifest.digest and record.repo == "me/model"
    assert record.attributes == {"dtype": "bf16"}
    assert [(e.path, e.size_bytes, e.blake3) for e in record.entries] == [
        (e.path, e.size_bytes, e.blake3) for e in expected
    ]
    index = storage.repo("me/model")
    assert index is not None
    assert [m.digest for m in index.tags["v1"]] == [manifest.digest]
    assert index.snapshots[manifest.digest].attributes == {"dtype": "bf16"}
    assert list((hub / "tmp").iterdir()) == []  # no temporaries left behind


def test_publish_single_file_and_default_tag(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", {"weights.bin": b"w" * 10})
    manifest = publish(tmp_path / "hub", "me/one", tmp_path / "src" / "weights.bin")
    assert manifest.entries == (ManifestEntry("weights.bin", 10, b3(b"w" * 10)),)
    index = HubStorage(tmp_path / "hub").repo("me/one")
    assert index is not None and list(index.tags) == ["latest"]


def test_tag_history_keeps_every_move_newest_last(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    first = publish(hub, "me/m:t", make_tree(tmp_path / "one", {"f": b"1"}))
    second = publish(hub, "me/m:t", make_tree(tmp_path / "two", {"f": b"2"}))
    again = publish(hub, "me/m:t", tmp_path / "one")
    index = HubStorage(hub).repo("me/m")
    assert index is not None
    assert [m.digest for m in index.tags["t"]] == [first.digest, second.digest, first.digest]
    assert again.digest == first.digest
    assert [d for d, _ in index.candidates("t")] == [first.digest, second.digest]


def test_large_file_becomes_parts_and_a_parts_file(tmp_path: Path) -> None:
    data = os.urandom(1000)
    src = make_tree(tmp_path / "src", {"w/model.bin": data, "small.txt": b"tiny"})
    hub = tmp_path / "hub"
    manifest = publish(hub, "me/big", src, part_size_bytes=300)

    paths = [e.path for e in manifest.entries]
    assert paths == [
        "small.txt",
        "w/model.bin.part0000",
        "w/model.bin.part0001",
        "w/model.bin.part0002",
        "w/model.bin.part0003",
        "w/model.bin.parts.json",
    ]
    sizes = {e.path: e.size_bytes for e in manifest.entries}
    assert [sizes[f"w/model.bin.part000{i}"] for i in range(4)] == [300, 300, 300, 100]
    assert manifest.digest == snapshot_digest(list(manifest.entries))

    storage = HubStorage(hub)
    by_path = {e.path: e for e in manifest.entries}
    listing_blob = storage.blob_path(by_path["w/model.bin.parts.json"].blake3).read_bytes()
    assert len(listing_blob) == by_path["w/model.bin.parts.json"].size_bytes
    listing = msgspec.json.decode(listing_blob, type=PartsFile)
    assert (listing.path, listing.size_bytes, listing.blake3) == ("w/model.bin", 1000, b3(data))
    assert [(p.path, p.size_bytes, p.blake3) for p in listing.parts] == [
        (e.path, e.size_bytes, e.blake3) for e in manifest.entries if ".part0" in e.path
    ]
    joined = b"".join(storage.blob_path(p.blake3).read_bytes() for p in listing.parts)
    assert joined == data and b3(joined) == listing.blake3
    # The whole file is not an entry of the snapshot.
    assert "w/model.bin" not in paths


def test_file_exactly_at_the_threshold_is_not_split(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"f": b"x" * 300})
    manifest = publish(tmp_path / "hub", "me/edge", src, part_size_bytes=300)
    assert [e.path for e in manifest.entries] == ["f"]


def test_symlink_escaping_the_directory_is_refused_and_nothing_is_recorded(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    src = make_tree(tmp_path / "src", {"ok.txt": b"fine"})
    (src / "leak.txt").symlink_to(secret)
    hub = tmp_path / "hub"
    with pytest.raises(UnsafePathError, match=r"leak\.txt.*symlink.*outside"):
        publish(hub, "me/m", src)
    assert not (hub / "snapshots").exists() or list((hub / "snapshots").iterdir()) == []
    assert HubStorage(hub).repo("me/m") is None


def test_symlinked_directory_escaping_is_refused(tmp_path: Path) -> None:
    outside = make_tree(tmp_path / "outside", {"x": b"x"})
    src = make_tree(tmp_path / "src", {"ok": b"1"})
    (src / "d").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside"):
        publish(tmp_path / "hub", "me/m", src)


def test_symlinks_inside_the_directory_are_followed(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"real/w.bin": b"weights"})
    (src / "alias.bin").symlink_to(src / "real" / "w.bin")
    (src / "linked").symlink_to(src / "real", target_is_directory=True)
    manifest = publish(tmp_path / "hub", "me/m", src)
    assert [(e.path, e.blake3) for e in manifest.entries] == [
        ("alias.bin", b3(b"weights")),
        ("linked/w.bin", b3(b"weights")),
        ("real/w.bin", b3(b"weights")),
    ]


def test_symlink_loop_and_dangling_symlink_are_refused(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"sub/f": b"1"})
    (src / "sub" / "back").symlink_to(src, target_is_directory=True)
    with pytest.raises(ValidationError, match="loop"):
        publish(tmp_path / "hub", "me/m", src)
    src2 = make_tree(tmp_path / "src2", {"f": b"1"})
    (src2 / "gone").symlink_to(src2 / "missing")
    with pytest.raises(ValidationError, match="dangling"):
        publish(tmp_path / "hub", "me/m", src2)


@pytest.mark.parametrize("name", ["w.bin.parts.json", "w.bin.part0001"])
def test_names_reserved_for_parts_are_refused(tmp_path: Path, name: str) -> None:
    src = make_tree(tmp_path / "src", {name: b"1"})
    with pytest.raises(ValidationError, match="reserved for the parts"):
        publish(tmp_path / "hub", "me/m", src)


def test_unsafe_file_names_are_refused(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a\\b": b"1"})
    with pytest.raises(UnsafePathError, match="backslash"):
        publish(tmp_path / "hub", "me/m", src)


def test_fifo_is_refused(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"f": b"1"})
    os.mkfifo(src / "pipe")
    with pytest.raises(ValidationError, match="not a regular file"):
        publish(tmp_path / "hub", "me/m", src)


@pytest.mark.parametrize(
    ("ref", "error", "message"),
    [
        ("me/m@blake3:" + "a" * 64, ValidationError, "a digest names an existing snapshot"),
        ("me/m:t#fp16", ValidationError, "flavor"),
        ("me/m/x", InvalidModelRefError, "more than one '/'"),
        ("Me/M", InvalidModelRefError, "lower-case"),
        ("hf:me/m", InvalidModelRefError, "provider prefixes are not allowed"),
    ],
)
def test_bad_refs_are_refused_before_writing(
    tmp_path: Path, ref: str, error: type[Exception], message: str
) -> None:
    src = make_tree(tmp_path / "src", {"f": b"1"})
    with pytest.raises(error, match=message):
        publish(tmp_path / "hub", ref, src)
    assert not (tmp_path / "hub").exists()


def test_bad_inputs_are_refused_before_writing(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"f": b"1"})
    hub = tmp_path / "hub"
    with pytest.raises(ValidationError, match="no such file"):
        publish(hub, "me/m", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="holds no files"):
        publish(hub, "me/m", tmp_path / "empty")
    with pytest.raises(ValidationError, match="positive number of bytes"):
        publish(hub, "me/m", src, part_size_bytes=0)
    with pytest.raises(ValidationError, match="string values"):
        publish(hub, "me/m", src, attributes={"k": 1})  # type: ignore[dict-item]
    assert not hub.exists()


def test_concurrent_publishes_in_threads_are_all_recorded(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    trees = [make_tree(tmp_path / f"t{i}", {"f": str(i).encode()}) for i in range(8)]
    barrier = threading.Barrier(8)
    digests: dict[int, str] = {}

    def one(i: int) -> None:
        barrier.wait()
        digests[i] = publish(hub, f"me/m:{'even' if i % 2 == 0 else 'odd'}", trees[i]).digest

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    index = HubStorage(hub).repo("me/m")
    assert index is not None
    assert sorted(m.digest for m in index.tags["even"]) == sorted(digests[i] for i in (0, 2, 4, 6))
    assert sorted(m.digest for m in index.tags["odd"]) == sorted(digests[i] for i in (1, 3, 5, 7))
    assert set(index.snapshots) == set(digests.values())


def test_concurrent_publishes_from_two_processes_are_all_recorded(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    script = (
        "import sys, pathlib\n"
        "from gen_worker.hub import publish\n"
        "hub, tag, base = sys.argv[1:]\n"
        "for i in range(6):\n"
        "    d = pathlib.Path(base) / f'{tag}{i}'\n"
        "    d.mkdir(parents=True)\n"
        "    (d / 'f').write_text(f'{tag}{i}')\n"
        "    print(publish(hub, f'me/m:{tag}', d).digest, flush=True)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(hub), tag, str(tmp_path / "src")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("alpha", "beta")
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    index = HubStorage(hub).repo("me/m")
    assert index is not None
    for tag, (stdout, _) in zip(("alpha", "beta"), outputs, strict=True):
        assert [m.digest for m in index.tags[tag]] == stdout.split()
    assert len(index.snapshots) == 12
