"""Helpers shared by the store tests (no tests here): manifests built from real bytes, blobs put
into a real store, listings of what lies on disk, and a child process that uses a store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blake3
import msgspec

from gen_worker.models.manifest import (
    ManifestEntry,
    PartEntry,
    PartsFile,
    SnapshotManifest,
    part_name,
    snapshot_digest,
)
from gen_worker.models.store import Store


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def entry(path: str, data: bytes) -> ManifestEntry:
    return ManifestEntry(path, len(data), b3(data))


def manifest_of(entries: list[ManifestEntry]) -> SnapshotManifest:
    return SnapshotManifest(snapshot_digest(entries), tuple(entries))


def put(store: Store, data: bytes) -> str:
    """Add ``data`` as a blob through the public API (a file moved into the store)."""
    incoming = store.root.parent / f"incoming-{b3(data)[:16]}-{os.getpid()}"
    incoming.write_bytes(data)
    return store.add_blob_from_file(incoming, b3(data))


def snapshot_with(store: Store, files: dict[str, bytes]) -> SnapshotManifest:
    """A manifest of ``files`` whose blobs are all in ``store``."""
    for data in files.values():
        put(store, data)
    return manifest_of([entry(p, d) for p, d in files.items()])


def split(path: str, data: bytes, sizes: list[int]) -> tuple[list[ManifestEntry], list[bytes]]:
    """The manifest entries (parts, then the parts file) and blobs of ``data`` cut at ``sizes``."""
    assert sum(sizes) == len(data)
    chunks, offset = [], 0
    for size in sizes:
        chunks.append(data[offset : offset + size])
        offset += size
    parts = [entry(part_name(path, i), c) for i, c in enumerate(chunks)]
    parts_file = PartsFile(
        path, len(data), b3(data), tuple(PartEntry(p.path, p.size_bytes, p.blake3) for p in parts)
    )
    index = msgspec.json.encode(parts_file)
    return [*parts, entry(path + ".parts.json", index)], [*chunks, index]


def files_under(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (links followed) -> its bytes, by relative POSIX path."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (directories and files), relative, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def transient_leftovers(store: Store) -> list[str]:
    """Temporary build/trash directories and temporary files the store left behind."""
    found = [p.name for p in (store.root / "snapshots").iterdir() if p.name.startswith(".")]
    found += [p.name for p in (store.root / "tmp").iterdir()]
    found += [p.name for p in (store.root / "meta").iterdir() if p.name.startswith(".")]
    found += [p.name for p in (store.root / "leases").iterdir() if p.name.startswith(".")]
    return sorted(found)


def blob_files(store: Store) -> set[str]:
    """Names of the files in the blob tree (blobs and ``.part`` files)."""
    return {p.name for p in (store.root / "blobs").rglob("*") if p.is_file()}


# A child process using the store: `lease <root> <digest>` holds a lease until its stdin closes;
# `materialize <root> <manifest.json> <go-file> <threads>` prints "ready", waits for the go-file,
# materialises from that many threads at once, and prints one line per thread and then
# "placed <n>": how many files it placed (0 when another builder built the snapshot).
CHILD = r"""
import sys, threading, time
from pathlib import Path
import msgspec
from gen_worker.models.manifest import SnapshotManifest
from gen_worker.models.store import Linker, Store

placed = []
class Counting(Linker):
    def place(self, blob, dest):
        placed.append(dest)
        return super().place(blob, dest)

command, root = sys.argv[1], Path(sys.argv[2])
store = Store(root, linker=Counting())
if command == "lease":
    with store.lease(sys.argv[3]):
        print("leased", flush=True)
        sys.stdin.read()
elif command == "materialize":
    manifest = msgspec.json.decode(Path(sys.argv[3]).read_bytes(), type=SnapshotManifest)
    go = Path(sys.argv[4])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.002)
    results = []
    def run():
        try:
            results.append(str(store.materialize(manifest)))
        except BaseException as exc:
            results.append(f"error {type(exc).__name__}: {exc}")
    threads = [threading.Thread(target=run) for _ in range(int(sys.argv[5]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n".join(results), flush=True)
    print(f"placed {len(placed)}", flush=True)
"""


def child(*args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
