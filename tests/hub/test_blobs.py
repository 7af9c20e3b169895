"""Blob downloads from a real hub: whole, every Range form, 416, signatures and expiry."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import blake3
import httpx
import msgspec
import pytest

from gen_worker.hub import HubServer, publish
from gen_worker.models.manifest import PartsFile

http = httpx.Client(timeout=30)
DATA = os.urandom(5000)
HEX = blake3.blake3(DATA).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hub(tmp_path: Path, clock: Clock) -> Iterator[HubServer]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob.bin").write_bytes(DATA)
    publish(tmp_path / "hub", "me/m", src)
    with HubServer(tmp_path / "hub", url_ttl_s=60, clock=clock) as server:
        yield server


def blob_url(hub: HubServer) -> str:
    answer = http.post(f"{hub.url}/api/v1/inference/repos/me/m/resolve", json={}).json()
    entry = answer["snapshot_manifest"]["entries"][0]
    assert entry["blake3"] == HEX
    return str(entry["url"])


def test_whole_blob_with_headers(hub: HubServer) -> None:
    response = http.get(blob_url(hub))
    assert response.status_code == 200
    assert response.content == DATA
    assert response.headers["content-length"] == str(len(DATA))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == f'"{HEX}"'
    assert "content-range" not in response.headers


def test_head_has_the_headers_and_no_body(hub: HubServer) -> None:
    response = http.head(blob_url(hub))
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(len(DATA))
    assert response.headers["etag"] == f'"{HEX}"'
    ranged = http.head(blob_url(hub), headers={"range": "bytes=10-19"})
    assert ranged.status_code == 206
    assert ranged.headers["content-range"] == "bytes 10-19/5000"
    assert ranged.headers["content-length"] == "10"


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=100-199", 100, 199),
        ("bytes=4990-9999", 4990, 4999),  # an end past the file is clamped
        ("bytes=4000-", 4000, 4999),
        ("bytes=0-", 0, 4999),
        ("bytes=-1", 4999, 4999),
        ("bytes=-300", 4700, 4999),
        ("bytes=-99999", 0, 4999),  # a suffix longer than the file is the whole file
        ("BYTES = 5 - 9", 5, 9),
    ],
)
def test_single_ranges_are_206_with_exact_bytes(
    hub: HubServer, header: str, first: int, last: int
) -> None:
    response = http.get(blob_url(hub), headers={"range": header})
    assert response.status_code == 206
    assert response.content == DATA[first : last + 1]
    assert response.headers["content-range"] == f"bytes {first}-{last}/5000"
    assert response.headers["content-length"] == str(last - first + 1)
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == f'"{HEX}"'


@pytest.mark.parametrize("header", ["bytes=5000-", "bytes=5000-6000", "bytes=-0", "bytes=9999-"])
def test_unsatisfiable_ranges_are_416(hub: HubServer, header: str) -> None:
    response = http.get(blob_url(hub), headers={"range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */5000"
    assert "outside the 5000 bytes" in response.json()["error"]


@pytest.mark.parametrize(
    "header", ["bytes=0-1,5-6", "bytes=9-3", "items=0-5", "bytes=abc", "bytes=-", "garbage"]
)
def test_multiple_or_malformed_ranges_get_the_whole_blob(hub: HubServer, header: str) -> None:
    response = http.get(blob_url(hub), headers={"range": header})
    assert response.status_code == 200
    assert response.content == DATA


def test_if_range_with_another_etag_gets_the_whole_blob(hub: HubServer) -> None:
    url = blob_url(hub)
    stale = http.get(url, headers={"range": "bytes=10-", "if-range": '"other"'})
    assert (stale.status_code, stale.content) == (200, DATA)
    fresh = http.get(url, headers={"range": "bytes=10-", "if-range": f'"{HEX}"'})
    assert (fresh.status_code, fresh.content) == (206, DATA[10:])


def test_expired_url_is_403(hub: HubServer, clock: Clock) -> None:
    url = blob_url(hub)
    clock.now += 59
    assert http.get(url).status_code == 200
    clock.now += 5
    response = http.get(url)
    assert response.status_code == 403
    assert "expired" in response.json()["error"]
    # A fresh URL works again.
    assert http.get(blob_url(hub)).content == DATA


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_tampered_signature_expiry_or_path_is_403(hub: HubServer) -> None:
    url = blob_url(hub)
    sig = dict(parse_qsl(urlsplit(url).query))["sig"]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    exp = dict(parse_qsl(urlsplit(url).query))["exp"]
    tampered = [
        with_query(url, sig=flipped),
        with_query(url, exp=str(int(exp) + 3600)),
        url.replace(HEX, "0" * 64),
    ]
    for bad in tampered:
        response = http.get(bad)
        assert response.status_code == 403, bad
        error = response.json()["error"]
        assert "signature does not match" in error
        assert sig not in error and flipped not in error
    unsigned = url.split("?")[0]
    response = http.get(unsigned)
    assert response.status_code == 403
    assert "exp and sig query parameter is missing" in response.json()["error"]
    assert http.get(with_query(url, sig="short")).status_code == 403


def test_another_hub_start_does_not_accept_the_url(hub: HubServer, tmp_path: Path) -> None:
    url = blob_url(hub)
    with HubServer(tmp_path / "hub") as other:
        response = http.get(url.replace(hub.url, other.url))
    assert response.status_code == 403
    # With the same signing key, a restart keeps URLs valid.
    key = b"k" * 32
    with HubServer(tmp_path / "hub", signing_key=key) as first:
        keyed = blob_url(first)
    with HubServer(tmp_path / "hub", signing_key=key) as second:
        assert http.get(keyed.replace(first.url, second.url)).content == DATA


def test_unknown_blob_with_a_valid_signature_is_404(hub: HubServer) -> None:
    path = "/api/v1/blobs/" + "ab" * 32
    response = http.get(hub.url + hub.hub.signer.sign(path))
    assert response.status_code == 404
    assert response.json() == {"error": f"no blob {'ab' * 32} on this hub"}


def test_parts_reassemble_to_the_whole_file(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "unet.safetensors").write_bytes(data)
    publish(tmp_path / "hub", "me/split", src, part_size_bytes=4096)
    with HubServer(tmp_path / "hub") as hub:
        answer = http.post(f"{hub.url}/api/v1/inference/repos/me/split/resolve", json={}).json()
        entries = {e["path"]: e for e in answer["snapshot_manifest"]["entries"]}
        assert sorted(entries) == [
            "unet.safetensors.part0000",
            "unet.safetensors.part0001",
            "unet.safetensors.part0002",
            "unet.safetensors.parts.json",
        ]
        listing_bytes = http.get(entries["unet.safetensors.parts.json"]["url"]).content
        listing = msgspec.json.decode(listing_bytes, type=PartsFile)
        assert [p.path for p in listing.parts] == sorted(entries)[:3]
        whole = bytearray()
        for part in listing.parts:
            body = http.get(entries[part.path]["url"]).content
            assert (len(body), blake3.blake3(body).hexdigest()) == (part.size_bytes, part.blake3)
            whole += body
    assert blake3.blake3(whole).hexdigest() == listing.blake3 == blake3.blake3(data).hexdigest()
    assert listing.size_bytes == len(whole) == 10_000


def test_a_large_blob_streams_in_chunks_and_ranges_across_chunk_edges(tmp_path: Path) -> None:
    data = os.urandom(9 << 20)  # more than two 4 MiB chunks
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(data)
    publish(tmp_path / "hub", "me/large", src)
    with HubServer(tmp_path / "hub") as hub:
        answer = http.post(f"{hub.url}/api/v1/inference/repos/me/large/resolve", json={}).json()
        url = answer["snapshot_manifest"]["entries"][0]["url"]
        with http.stream("GET", url) as response:
            received = b"".join(response.iter_bytes())
        assert received == data
        first, last = (4 << 20) - 7, (8 << 20) + 7
        ranged = http.get(url, headers={"range": f"bytes={first}-{last}"})
        assert ranged.content == data[first : last + 1]


def test_stop_cuts_a_stalled_transfer_after_the_grace_period(tmp_path: Path) -> None:
    data = os.urandom(24 << 20)  # more than the socket buffers hold: the sends stall
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(data)
    publish(tmp_path / "hub", "me/stall", src)
    hub = HubServer(tmp_path / "hub", grace_s=0.3).start()
    answer = http.post(f"{hub.url}/api/v1/inference/repos/me/stall/resolve", json={}).json()
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", answer["snapshot_manifest"]["entries"][0]["url"]) as response,
    ):
        chunks = response.iter_raw(65536)
        received = len(next(chunks))
        started = time.monotonic()
        hub.stop()
        took = time.monotonic() - started
        # A short body then a close (or a reset, when unsent bytes were still queued).
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            for chunk in chunks:
                received += len(chunk)
    assert 0.3 <= took < 3
    assert received < len(data)
