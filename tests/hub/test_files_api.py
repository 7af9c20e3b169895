"""The file API of a real hub: multipart uploads, per-part retry, complete, abort, downloads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest

from gen_worker.hub import HubServer

http = httpx.Client(timeout=30)
REF = "jobs/req-1/outputs/video.mp4"
DATA = os.urandom(10)


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hub(tmp_path: Path, clock: Clock) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub", url_ttl_s=60, clock=clock) as server:
        yield server


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def start(hub: HubServer, ref: str = REF, size: int = 10, part: int | None = 4) -> dict[str, Any]:
    body: dict[str, Any] = {"ref": ref, "size_bytes": size}
    if part is not None:
        body["part_size_bytes"] = part
    response = http.post(f"{hub.url}/api/v1/files/uploads", json=body)
    assert response.status_code == 200, response.text
    started: dict[str, Any] = response.json()
    return started


def put(url: str, data: bytes) -> httpx.Response:
    return http.put(url, content=data)


def complete(hub: HubServer, upload_id: str, parts: list[dict[str, Any]]) -> httpx.Response:
    url = f"{hub.url}/api/v1/files/uploads/{upload_id}/complete"
    return http.post(url, json={"parts": parts})


def test_upload_in_three_parts_with_a_retried_part_then_download(hub: HubServer) -> None:
    started = start(hub)
    assert started["part_size_bytes"] == 4
    assert [p["part_number"] for p in started["parts"]] == [1, 2, 3]
    for part in started["parts"]:
        assert part["url"].startswith(f"{hub.url}/api/v1/files/uploads/{started['upload_id']}/")
        assert "exp=" in part["url"] and "sig=" in part["url"]
    urls = [p["url"] for p in started["parts"]]
    chunks = [DATA[0:4], DATA[4:8], DATA[8:10]]

    first = put(urls[0], chunks[0])
    assert first.json() == {"part_number": 1, "size_bytes": 4, "blake3": b3(chunks[0])}
    wrong = put(urls[1], b"XY")  # a bad attempt, then the retry replaces it
    assert wrong.json() == {"part_number": 2, "size_bytes": 2, "blake3": b3(b"XY")}
    retried = put(urls[1], chunks[1])
    assert retried.json() == {"part_number": 2, "size_bytes": 4, "blake3": b3(chunks[1])}
    assert put(urls[2], chunks[2]).status_code == 200

    parts = [{"part_number": i + 1, "blake3": b3(c)} for i, c in enumerate(chunks)]
    done = complete(hub, started["upload_id"], parts)
    assert done.status_code == 200, done.text
    assert done.json() == {
        "ref": REF,
        "size_bytes": 10,
        "sha256": hashlib.sha256(DATA).hexdigest(),
        "blake3": b3(DATA),
        "mime_type": "video/mp4",
    }
    assert (hub.root / "files" / REF).read_bytes() == DATA
    assert not (hub.root / "uploads" / started["upload_id"]).exists()

    whole = http.get(f"{hub.url}/api/v1/files/{REF}")
    assert whole.status_code == 200 and whole.content == DATA
    assert whole.headers["etag"] == f'"{b3(DATA)}"'
    assert whole.headers["content-type"] == "video/mp4"
    ranged = http.get(f"{hub.url}/api/v1/files/{REF}", headers={"range": "bytes=3-6"})
    assert ranged.status_code == 206
    assert ranged.content == DATA[3:7]
    assert ranged.headers["content-range"] == "bytes 3-6/10"
    tail = http.get(f"{hub.url}/api/v1/files/{REF}", headers={"range": "bytes=-2"})
    assert (tail.status_code, tail.content) == (206, DATA[8:])
    beyond = http.get(f"{hub.url}/api/v1/files/{REF}", headers={"range": "bytes=10-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == "bytes */10"
    # Completing again: the upload is gone.
    again = complete(hub, started["upload_id"], parts)
    assert again.status_code == 404 and "completed, aborted or never started" in again.text


def test_default_part_size_and_an_empty_file(hub: HubServer) -> None:
    started = start(hub, ref="inputs/empty.txt", size=0, part=None)
    assert started["part_size_bytes"] == 8 << 20
    assert len(started["parts"]) == 1
    assert put(started["parts"][0]["url"], b"").json()["size_bytes"] == 0
    done = complete(hub, started["upload_id"], [{"part_number": 1, "blake3": b3(b"")}])
    assert done.json()["size_bytes"] == 0 and done.json()["mime_type"] == "text/plain"
    got = http.get(f"{hub.url}/api/v1/files/inputs/empty.txt")
    assert (got.status_code, got.content) == (200, b"")


def upload_parts(started: dict[str, Any], chunks: list[bytes]) -> list[dict[str, Any]]:
    for part, chunk in zip(started["parts"], chunks, strict=False):
        assert put(part["url"], chunk).status_code == 200
    return [{"part_number": i + 1, "blake3": b3(c)} for i, c in enumerate(chunks)]


def test_complete_with_a_part_never_put_is_409_and_can_be_retried(hub: HubServer) -> None:
    started = start(hub)
    parts = upload_parts(started, [DATA[0:4], DATA[4:8]])
    parts.append({"part_number": 3, "blake3": b3(DATA[8:])})
    response = complete(hub, started["upload_id"], parts)
    assert response.status_code == 409
    assert response.json()["error"] == "part 3 was never put; PUT it to its URL first"
    assert not (hub.root / "files" / REF).exists()
    put(started["parts"][2]["url"], DATA[8:])
    assert complete(hub, started["upload_id"], parts).status_code == 200


def test_complete_with_a_part_missing_from_the_list_is_400(hub: HubServer) -> None:
    started = start(hub)
    parts = upload_parts(started, [DATA[0:4], DATA[4:8], DATA[8:]])
    response = complete(hub, started["upload_id"], [parts[0], parts[2]])
    assert response.status_code == 400
    assert "each of 1 to 3 once; missing [2], unknown or repeated []" in response.json()["error"]
    response = complete(hub, started["upload_id"], [*parts, parts[0]])
    assert response.status_code == 400 and "repeated [1]" in response.json()["error"]
    response = complete(hub, started["upload_id"], [*parts, {"part_number": 9, "blake3": "a"}])
    assert response.status_code == 400 and "repeated [9]" in response.json()["error"]


def test_complete_with_a_wrong_digest_is_409_naming_the_part(hub: HubServer) -> None:
    started = start(hub)
    parts = upload_parts(started, [DATA[0:4], DATA[4:8], DATA[8:]])
    bad = [*parts[:1], {"part_number": 2, "blake3": b3(b"something else")}, parts[2]]
    response = complete(hub, started["upload_id"], bad)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error.startswith("part 2: the blake3 sent (")
    assert b3(DATA[4:8]) in error and b3(b"something else") in error
    assert not (hub.root / "files" / REF).exists()
    # Nothing was lost: the right digests complete the same upload.
    assert complete(hub, started["upload_id"], parts).status_code == 200
    not_hex = [*parts[:2], {"part_number": 3, "blake3": "Z" * 64}]
    assert "64 lower-case hex" in complete(hub, start(hub)["upload_id"], not_hex).text


def test_complete_with_the_wrong_total_size_is_409(hub: HubServer) -> None:
    started = start(hub)
    parts = upload_parts(started, [DATA[0:4], DATA[4:8], DATA[8:9]])  # 9 bytes, 10 declared
    response = complete(hub, started["upload_id"], parts)
    assert response.status_code == 409
    assert (
        "the parts hold 9 bytes in all, but the upload declared size_bytes 10"
        in (response.json()["error"])
    )
    assert not (hub.root / "files" / REF).exists()


def test_a_part_over_the_part_size_is_413_and_unknown_parts_400(hub: HubServer) -> None:
    started = start(hub)
    response = put(started["parts"][0]["url"], b"12345")
    assert response.status_code == 413
    assert "at most 4" in response.json()["error"]
    url = started["parts"][0]["url"].replace("/parts/1?", "/parts/7?")
    assert put(url, b"1").status_code == 403  # the signature covers the part number
    signed = hub.hub.signer.sign(f"/api/v1/files/uploads/{started['upload_id']}/parts/7")
    response = put(hub.url + signed, b"1")
    assert response.status_code == 400
    assert response.json()["error"] == "part 7 does not exist: this upload has parts 1 to 3"


def test_abort_removes_the_parts_and_ends_the_upload(hub: HubServer) -> None:
    started = start(hub)
    upload_parts(started, [DATA[0:4]])
    folder = hub.root / "uploads" / started["upload_id"]
    assert any(p.suffix == ".part" for p in folder.iterdir())
    response = http.delete(f"{hub.url}/api/v1/files/uploads/{started['upload_id']}")
    assert response.json() == {"upload_id": started["upload_id"], "aborted": True}
    assert not folder.exists()
    assert put(started["parts"][1]["url"], DATA[4:8]).status_code == 404
    again = http.delete(f"{hub.url}/api/v1/files/uploads/{started['upload_id']}")
    assert again.status_code == 404
    assert http.delete(f"{hub.url}/api/v1/files/uploads/not-an-id").status_code == 404


def test_expired_or_tampered_part_urls_are_403(hub: HubServer, clock: Clock) -> None:
    started = start(hub)
    url = started["parts"][0]["url"]
    assert put(url.replace("sig=", "sig=0"), b"1").status_code == 403
    clock.now += 120
    response = put(url, DATA[0:4])
    assert response.status_code == 403 and "expired" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"ref": "../etc/passwd", "size_bytes": 1}, "segment '..' is not allowed"),
        ({"ref": "/abs", "size_bytes": 1}, "absolute path"),
        ({"ref": "a//b", "size_bytes": 1}, "segment '' is not allowed"),
        ({"ref": "a", "size_bytes": -1}, "size_bytes -1 must be 0 or more"),
        ({"ref": "a", "size_bytes": 1, "part_size_bytes": 0}, "between 1 and"),
        ({"ref": "a"}, "missing required field `size_bytes`"),
        ({"ref": "a", "size_bytes": 1, "extra": 1}, "unknown field `extra`"),
    ],
)
def test_bad_upload_requests_are_400(hub: HubServer, body: dict[str, Any], message: str) -> None:
    response = http.post(f"{hub.url}/api/v1/files/uploads", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_part_size_needing_too_many_parts_is_raised(hub: HubServer) -> None:
    started = start(hub, ref="many.bin", size=100_001, part=10)
    assert started["part_size_bytes"] == 11  # the least that needs at most 10,000 parts
    assert len(started["parts"]) == 9091
    assert started["parts"][-1]["part_number"] == 9091


def test_refs_that_collide_with_stored_files_are_409(hub: HubServer) -> None:
    started = start(hub, ref="out/a", size=1, part=None)
    parts = upload_parts(started, [b"x"])
    assert complete(hub, started["upload_id"], parts).status_code == 200
    response = http.post(
        f"{hub.url}/api/v1/files/uploads", json={"ref": "out/a/b", "size_bytes": 1}
    )
    assert response.status_code == 409 and "'out/a' is a stored file" in response.text
    response = http.post(f"{hub.url}/api/v1/files/uploads", json={"ref": "out", "size_bytes": 1})
    assert response.status_code == 409 and "is a directory" in response.text


def test_downloads_of_missing_or_unsafe_refs(hub: HubServer) -> None:
    response = http.get(f"{hub.url}/api/v1/files/jobs/none.png")
    assert response.status_code == 404
    assert response.json() == {"error": "no file is stored at 'jobs/none.png'"}
    (hub.root / "files" / "dir").mkdir()
    assert http.get(f"{hub.url}/api/v1/files/dir").status_code == 404
    response = http.get(f"{hub.url}/api/v1/files/a/%2E%2E/secret")
    assert response.status_code == 400 and "'..'" in response.json()["error"]


def test_a_file_placed_by_hand_is_served(hub: HubServer) -> None:
    target = hub.root / "files" / "inputs" / "x.png"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x89PNG....")
    response = http.get(f"{hub.url}/api/v1/files/inputs/x.png")
    assert response.status_code == 200 and response.content == b"\x89PNG...."
    assert response.headers["content-type"] == "image/png"
    assert response.headers["etag"].startswith('"8-')


def test_max_file_bytes_refuses_large_uploads(tmp_path: Path) -> None:
    with HubServer(tmp_path / "hub", max_file_bytes=5) as hub:
        response = http.post(f"{hub.url}/api/v1/files/uploads", json={"ref": "a", "size_bytes": 6})
    assert response.status_code == 413
    assert "more than this hub stores per file (5 bytes)" in response.json()["error"]
