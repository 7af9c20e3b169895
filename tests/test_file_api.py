"""The file API client and the uploading output sink, against the real local hub on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import blake3
import httpx
import pytest

from gen_worker.errors import HubAuthError, HubError, HubNotFoundError, ValidationError
from gen_worker.files import LocalOutputSink
from gen_worker.files.file_api import FileApi
from gen_worker.files.hub_sink import UploadingOutputSink
from gen_worker.hub import HubServer

TOKEN = "file-api-token"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub", tokens=(TOKEN,)) as server:
        yield server


def _api(hub: HubServer, **kwargs: object) -> FileApi:
    return FileApi(f"{hub.url}/api/v1/files", TOKEN, **kwargs)  # type: ignore[arg-type]


def test_upload_in_parts_then_download_by_ref(hub: HubServer, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "video.bin"
    source.write_bytes(data)

    async def go() -> None:
        api = _api(hub, part_bytes=1024 * 1024)
        try:
            stored = await api.upload("jobs/r1/outputs/video.bin", source)
            assert stored.ref == "jobs/r1/outputs/video.bin"
            assert stored.size_bytes == len(data)
            assert stored.blake3 == blake3.blake3(data).hexdigest()
            assert stored.sha256 == hashlib.sha256(data).hexdigest()
            digest = await api.download("jobs/r1/outputs/video.bin", tmp_path / "back.bin")
            assert digest.blake3 == stored.blake3
        finally:
            await api.aclose()

    asyncio.run(go())
    assert (tmp_path / "back.bin").read_bytes() == data
    # Four parts of 1 MiB: the hub kept nothing of the upload once it completed.
    assert not any((hub.root / "uploads").glob("*/*"))


def test_a_failing_part_is_retried_alone(hub: HubServer, tmp_path: Path) -> None:
    source = tmp_path / "a.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024))
    puts: list[str] = []
    failed: set[str] = set()

    async def flaky(request: httpx.Request) -> None:
        if request.method == "PUT":
            puts.append(request.url.path)
            if request.url.path.endswith("/parts/2") and request.url.path not in failed:
                failed.add(request.url.path)
                raise httpx.ConnectError("injected failure")

    async def go() -> None:
        client = httpx.AsyncClient(event_hooks={"request": [flaky]})
        api = _api(hub, client=client, part_bytes=1024 * 1024, backoff_s=0.01)
        try:
            stored = await api.upload("jobs/r2/outputs/a.bin", source)
            assert stored.size_bytes == 2 * 1024 * 1024
        finally:
            await client.aclose()

    asyncio.run(go())
    assert sorted(p.rsplit("/", 1)[1] for p in puts) == ["1", "2", "2"]


def test_auth_and_missing_files_are_named(hub: HubServer, tmp_path: Path) -> None:
    source = tmp_path / "a.txt"
    source.write_bytes(b"hello")

    async def go() -> None:
        bad = FileApi(f"{hub.url}/api/v1/files", "wrong-token")
        with pytest.raises(
            HubAuthError, match=r"start the upload of jobs/r3/outputs/a.txt \(HTTP 403\)"
        ):
            await bad.upload("jobs/r3/outputs/a.txt", source)
        await bad.aclose()
        api = _api(hub)
        with pytest.raises(HubNotFoundError, match=r"download of inputs/none.png \(HTTP 404\)"):
            await api.download("inputs/none.png", tmp_path / "none.png")
        with pytest.raises(ValidationError, match="file ref"):
            await api.upload("../escape", source)
        await api.aclose()

    asyncio.run(go())
    assert not (tmp_path / "none.png").exists()
    assert not list(tmp_path.glob(".none.png*"))
    assert "wrong-token" not in str(HubAuthError("x"))


def test_download_respects_the_size_limit(hub: HubServer, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 5000)

    async def go() -> None:
        api = _api(hub)
        await api.upload("inputs/big.bin", source)
        with pytest.raises(ValidationError, match="larger than the limit of 1000 bytes"):
            await api.download("inputs/big.bin", tmp_path / "got.bin", max_bytes=1000)
        await api.aclose()

    asyncio.run(go())
    assert not (tmp_path / "got.bin").exists()


def test_uploading_sink_uploads_every_kind_of_output(hub: HubServer, tmp_path: Path) -> None:
    local = tmp_path / "local.bin"
    local.write_bytes(b"file-bytes")

    async def go() -> list[str]:
        api = _api(hub)
        staging = LocalOutputSink(tmp_path / "staging", "req-1")
        sink = UploadingOutputSink(staging, api, asyncio.get_running_loop())

        def in_thread() -> None:  # as a sync endpoint function would, from a worker thread
            sink.save_bytes("a.txt", b"alpha")
            sink.save_file("b.bin", local)
            with sink.open_stream("c/d.txt") as stream:
                stream.write(b"gam")
                stream.write(b"ma")
            sink.save_checkpoint_bytes("w.safetensors", b"weights", "safetensors")

        await asyncio.to_thread(in_thread)
        sink.save_bytes("from-loop.txt", b"loop")  # as an async function would, on the loop
        uploaded = await sink.finish()
        await api.aclose()
        return sorted(u.ref for u in uploaded)

    refs = asyncio.run(go())
    assert refs == [
        "jobs/req-1/outputs/a.txt",
        "jobs/req-1/outputs/b.bin",
        "jobs/req-1/outputs/c/d.txt",
        "jobs/req-1/outputs/from-loop.txt",
        "jobs/req-1/outputs/w.safetensors",
    ]
    files = hub.root / "files" / "jobs" / "req-1" / "outputs"
    assert (files / "c" / "d.txt").read_bytes() == b"gamma"
    assert (files / "b.bin").read_bytes() == b"file-bytes"
    assert (files / "w.safetensors").read_bytes() == b"weights"


def test_an_uploading_stream_left_by_an_exception_uploads_nothing(
    hub: HubServer, tmp_path: Path
) -> None:
    async def go() -> list[str]:
        api = _api(hub)
        staging = tmp_path / "staging"
        sink = UploadingOutputSink(
            LocalOutputSink(staging, "req-3"), api, asyncio.get_running_loop()
        )
        with pytest.raises(RuntimeError, match="boom"), sink.open_stream("half.bin") as stream:
            stream.write(b"half")
            raise RuntimeError("boom")
        assert stream.finished
        sink.save_bytes("whole.txt", b"w")
        uploaded = await sink.finish()
        await api.aclose()
        assert not [p.name for p in staging.rglob("*") if "half" in p.name]
        return [u.ref for u in uploaded]

    assert asyncio.run(go()) == ["jobs/req-3/outputs/whole.txt"]
    files = hub.root / "files" / "jobs" / "req-3" / "outputs"
    assert (files / "whole.txt").read_bytes() == b"w"
    assert not (files / "half.bin").exists()


def test_a_failed_upload_fails_finish(tmp_path: Path) -> None:
    async def go() -> None:
        # Nothing listens on this port: the upload cannot succeed, and finish() must say so.
        api = FileApi("http://127.0.0.1:9/api/v1/files", max_attempts=1)
        sink = UploadingOutputSink(
            LocalOutputSink(tmp_path / "staging", "req-2"), api, asyncio.get_running_loop()
        )
        sink.save_bytes("a.txt", b"alpha")
        with pytest.raises(HubError, match=r"start the upload of jobs/req-2/outputs/a\.txt failed"):
            await sink.finish()
        await api.aclose()

    asyncio.run(go())


def test_input_refs_are_read_from_the_file_api(hub: HubServer, tmp_path: Path) -> None:
    from gen_worker.authoring import Asset
    from gen_worker.files import AssetFetcher

    source = tmp_path / "photo.png"
    source.write_bytes(b"\x89PNG fake")

    async def go() -> None:
        api = _api(hub)
        await api.upload("inputs/photo.png", source)
        await api.aclose()
        files = (f"{hub.url}/api/v1/files", TOKEN)
        # The hub's file API as the fetcher's default (TENSORHUB_URL in a worker) ...
        fetcher = AssetFetcher(tmp_path / "inputs", files_url=files[0], files_token=TOKEN)
        asset = Asset(ref="inputs/photo.png")
        await fetcher.fetch_all([asset], "req-9")
        assert asset.local_path is not None
        assert Path(asset.local_path).read_bytes() == b"\x89PNG fake"
        assert asset.blake3 == blake3.blake3(b"\x89PNG fake").hexdigest()
        missing = Asset(ref="inputs/none.png")
        with pytest.raises(ValidationError, match=r"input file not found: inputs/none\.png"):
            await fetcher.fetch_all([missing], "req-9")
        await fetcher.aclose()
        # ... or the job's own file API, given per request.
        plain = AssetFetcher(tmp_path / "inputs2")
        again = Asset(ref="inputs/photo.png")
        await plain.fetch_all([again], "req-10", files)
        assert again.size_bytes == len(b"\x89PNG fake")
        await plain.aclose()

    asyncio.run(go())
