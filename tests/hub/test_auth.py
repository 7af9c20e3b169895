"""Bearer tokens on a real hub: 401 without one, 403 with a wrong one, signed URLs without."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import blake3
import httpx
import pytest

from gen_worker.hub import HubServer, publish

http = httpx.Client(timeout=30)
TOKEN = "tok-" + "s3cr3t" * 4
OTHER = "second-token-value"


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(b"model bytes")
    publish(tmp_path / "hub", "me/m", src)
    with HubServer(tmp_path / "hub", tokens=[TOKEN, OTHER]) as server:
        yield server


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def calls(hub: HubServer) -> list[tuple[str, str, dict[str, object] | None]]:
    files = f"{hub.url}/api/v1/files"
    return [
        ("POST", f"{hub.url}/api/v1/inference/repos/me/m/resolve", {}),
        ("POST", f"{files}/uploads", {"ref": "a.txt", "size_bytes": 1}),
        ("POST", f"{files}/uploads/{'0' * 32}/complete", {"parts": []}),
        ("DELETE", f"{files}/uploads/{'0' * 32}", None),
        ("GET", f"{files}/a.txt", None),
    ]


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer"}],
    ids=["none", "basic", "empty"],
)
def test_missing_token_is_401_with_an_explanation(hub: HubServer, headers: dict[str, str]) -> None:
    for method, url, body in calls(hub):
        response = http.request(method, url, json=body, headers=headers)
        assert response.status_code == 401, (method, url)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "requires a bearer token" in response.json()["error"]


def test_wrong_token_is_403_and_never_echoed(hub: HubServer) -> None:
    wrong = "not-the-token-" + TOKEN[::-1]
    for method, url, body in calls(hub):
        response = http.request(method, url, json=body, headers=bearer(wrong))
        assert response.status_code == 403, (method, url)
        assert response.json() == {"error": "the bearer token is not one this hub accepts"}
        assert wrong not in response.text and TOKEN not in response.text


def test_either_token_works_and_signed_urls_need_none(hub: HubServer) -> None:
    for token in (TOKEN, OTHER):
        response = http.post(
            f"{hub.url}/api/v1/inference/repos/me/m/resolve", json={}, headers=bearer(token)
        )
        assert response.status_code == 200
    entry = response.json()["snapshot_manifest"]["entries"][0]
    blob = http.get(entry["url"])  # no bearer: the URL's signature is the authority
    assert blob.status_code == 200
    assert blake3.blake3(blob.content).hexdigest() == entry["blake3"]

    started = http.post(
        f"{hub.url}/api/v1/files/uploads",
        headers=bearer(TOKEN),
        json={"ref": "out/a.txt", "size_bytes": 3},
    ).json()
    stored = http.put(started["parts"][0]["url"], content=b"abc")
    assert stored.status_code == 200
    parts = [{"part_number": 1, "blake3": stored.json()["blake3"]}]
    url = f"{hub.url}/api/v1/files/uploads/{started['upload_id']}/complete"
    assert http.post(url, json={"parts": parts}).status_code == 401
    assert http.post(url, json={"parts": parts}, headers=bearer(OTHER)).status_code == 200
    assert http.get(f"{hub.url}/api/v1/files/out/a.txt").status_code == 401
    got = http.get(
        f"{hub.url}/api/v1/files/out/a.txt", headers={"authorization": f"bearer {TOKEN}"}
    )
    assert (got.status_code, got.content) == (200, b"abc")


def test_an_open_hub_needs_no_token(tmp_path: Path) -> None:
    with HubServer(tmp_path / "hub") as hub:
        response = http.post(f"{hub.url}/api/v1/files/uploads", json={"ref": "a", "size_bytes": 0})
    assert response.status_code == 200


def test_tokens_with_whitespace_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no whitespace"):
        HubServer(tmp_path / "hub", tokens=["two words"])
    with pytest.raises(ValueError, match="non-empty"):
        HubServer(tmp_path / "hub", tokens=[""])
