"""Resolving refs against a real hub on 127.0.0.1:0: tags, digests, attributes, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import blake3
import httpx
import pytest

from gen_worker.hub import HubServer, publish
from gen_worker.models.manifest import SnapshotManifest


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# One client for the module: building an httpx client (its TLS context) costs more than a call.
http = httpx.Client(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub") as server:
        yield server


def resolve(hub: HubServer, repo: str, body: Any) -> httpx.Response:
    url = f"{hub.url}/api/v1/inference/repos/{repo}/resolve"
    if isinstance(body, bytes):
        return http.post(url, content=body, headers={"content-type": "application/json"})
    return http.post(url, json=body)


def entries(answer: dict[str, Any]) -> list[tuple[str, int, str]]:
    return [
        (e["path"], e["size_bytes"], e["blake3"]) for e in answer["snapshot_manifest"]["entries"]
    ]


def as_tuples(manifest: SnapshotManifest) -> list[tuple[str, int, str]]:
    return [(e.path, e.size_bytes, e.blake3) for e in manifest.entries]


def test_resolve_by_tag_answers_the_manifest_with_working_signed_urls(
    hub: HubServer, tmp_path: Path
) -> None:
    src = tree(tmp_path / "src", {"model.safetensors": b"weights!", "config.json": b"{}"})
    manifest = publish(hub.root, "me/model:v1", src)

    response = resolve(hub, "me/model", {"tag": "v1"})
    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == {"checkpoint_id", "snapshot_manifest"}
    assert answer["checkpoint_id"] == manifest.digest
    assert entries(answer) == as_tuples(manifest)
    for entry in answer["snapshot_manifest"]["entries"]:
        assert set(entry) == {"path", "size_bytes", "blake3", "url"}
        url = urlsplit(entry["url"])
        assert f"{url.scheme}://{url.netloc}" == hub.url
        assert url.path == f"/api/v1/blobs/{entry['blake3']}"
        assert "exp=" in url.query and "sig=" in url.query
        blob = http.get(entry["url"])
        assert blob.status_code == 200
        assert blake3.blake3(blob.content).hexdigest() == entry["blake3"]


def test_missing_tag_means_latest_and_the_newest_move_wins(hub: HubServer, tmp_path: Path) -> None:
    publish(hub.root, "me/m", tree(tmp_path / "a", {"f": b"old"}))
    newest = publish(hub.root, "me/m:latest", tree(tmp_path / "b", {"f": b"new"}))
    for body in ({}, {"tag": "latest"}, b""):
        response = resolve(hub, "me/m", body)
        assert response.status_code == 200, response.text
        assert response.json()["checkpoint_id"] == newest.digest


def test_publish_while_the_server_runs_is_visible_at_once(hub: HubServer, tmp_path: Path) -> None:
    assert resolve(hub, "me/live", {}).status_code == 404
    manifest = publish(hub.root, "me/live", tree(tmp_path / "s", {"f": b"1"}))
    assert resolve(hub, "me/live", {}).json()["checkpoint_id"] == manifest.digest


def test_resolve_by_digest_wins_over_tag_and_attributes(hub: HubServer, tmp_path: Path) -> None:
    old = publish(hub.root, "me/m:t", tree(tmp_path / "a", {"f": b"1"}), attributes={"x": "1"})
    publish(hub.root, "me/m:t", tree(tmp_path / "b", {"f": b"2"}), attributes={"x": "2"})
    for digest in (old.digest, old.hex):
        body = {"digest": digest, "tag": "t", "attributes": {"x": "2"}}
        response = resolve(hub, "me/m", body)
        assert response.status_code == 200
        assert response.json()["checkpoint_id"] == old.digest
        assert entries(response.json()) == as_tuples(old)


def test_attributes_pick_the_newest_matching_snapshot_of_the_tag(
    hub: HubServer, tmp_path: Path
) -> None:
    fp16 = publish(
        hub.root,
        "me/m:prod",
        tree(tmp_path / "a", {"f": b"a"}),
        attributes={"dtype": "fp16", "arch": "sdxl"},
    )
    bf16_old = publish(
        hub.root,
        "me/m:prod",
        tree(tmp_path / "b", {"f": b"b"}),
        attributes={"dtype": "bf16", "arch": "sdxl"},
    )
    bf16_new = publish(
        hub.root,
        "me/m:prod",
        tree(tmp_path / "c", {"f": b"c"}),
        attributes={"dtype": "bf16", "arch": "sdxl"},
    )
    other_tag = publish(
        hub.root, "me/m:dev", tree(tmp_path / "d", {"f": b"d"}), attributes={"dtype": "int8"}
    )

    def pick(attributes: dict[str, str]) -> str:
        response = resolve(hub, "me/m", {"tag": "prod", "attributes": attributes})
        assert response.status_code == 200, response.text
        return str(response.json()["checkpoint_id"])

    assert pick({"dtype": "fp16"}) == fp16.digest
    assert pick({"dtype": "bf16", "arch": "sdxl"}) == bf16_new.digest
    assert pick({"arch": "sdxl"}) == bf16_new.digest
    assert pick({}) == bf16_new.digest
    assert bf16_old.digest != bf16_new.digest
    # Another tag's snapshot is not a candidate for this tag.
    response = resolve(hub, "me/m", {"tag": "prod", "attributes": {"dtype": "int8"}})
    assert response.status_code == 409
    assert other_tag.digest not in response.text


def test_no_matching_attributes_is_409_saying_what_was_asked_and_what_exists(
    hub: HubServer, tmp_path: Path
) -> None:
    a = publish(hub.root, "me/m", tree(tmp_path / "a", {"f": b"a"}), attributes={"dtype": "fp16"})
    b = publish(hub.root, "me/m", tree(tmp_path / "b", {"f": b"b"}), attributes={"dtype": "bf16"})
    response = resolve(hub, "me/m", {"attributes": {"dtype": "fp8"}})
    assert response.status_code == 409
    body = response.json()
    assert body["asked"] == {"tag": "latest", "attributes": {"dtype": "fp8"}}
    assert body["available"] == [
        {"checkpoint_id": b.digest, "attributes": {"dtype": "bf16"}},
        {"checkpoint_id": a.digest, "attributes": {"dtype": "fp16"}},
    ]
    assert "me/m:latest" in body["error"] and "fp8" in body["error"]


def test_unknown_repo_tag_and_digest_are_404(hub: HubServer, tmp_path: Path) -> None:
    mine = publish(hub.root, "me/m:v1", tree(tmp_path / "a", {"f": b"a"}))
    theirs = publish(hub.root, "you/other", tree(tmp_path / "b", {"f": b"b"}))
    cases = [
        ("nobody/none", {}, "no repo nobody/none"),
        ("me/m", {"tag": "v2"}, "has no tag 'v2'; its tags: ['v1']"),
        ("me/m", {}, "has no tag 'latest'"),
        ("me/m", {"digest": "blake3:" + "0" * 64}, "is not in repo me/m"),
        ("me/m", {"digest": theirs.digest}, f"snapshot {theirs.digest} is not in repo me/m"),
    ]
    for repo, body, message in cases:
        response = resolve(hub, repo, body)
        assert response.status_code == 404, (repo, body)
        assert message in response.json()["error"]
    assert resolve(hub, "me/m", {"digest": mine.digest}).status_code == 200


@pytest.mark.parametrize(
    ("repo", "body", "message"),
    [
        ("me/m", b"{not json", "not valid JSON"),
        ("me/m", b"[1, 2]", 'expected {"digest"'),
        ("me/m", {"tags": "latest"}, "unknown field `tags`"),
        ("me/m", {"tag": 3}, "Expected `str | null`"),
        ("me/m", {"attributes": {"dtype": 16}}, "Expected `str`"),
        ("me/m", {"digest": "blake3:abc"}, "expected blake3:<64 lower-case hex>"),
        ("me/m", {"digest": "sha256:" + "a" * 64}, "expected blake3:<64 lower-case hex>"),
        ("me/m", {"tag": "bad tag"}, "does not match"),
        ("me/m", {"tag": ":x"}, "invalid model ref"),
        ("-me/m", {}, "the owner '-me' does not match"),
    ],
)
def test_bad_requests_are_400_saying_what_is_valid(
    hub: HubServer, tmp_path: Path, repo: str, body: Any, message: str
) -> None:
    publish(hub.root, "me/m", tree(tmp_path / "a", {"f": b"a"}))
    response = resolve(hub, repo, body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def test_upper_case_repo_parts_are_canonicalised(hub: HubServer, tmp_path: Path) -> None:
    manifest = publish(hub.root, "me/model", tree(tmp_path / "a", {"f": b"a"}))
    response = resolve(hub, "Me/Model", {"tag": "LATEST"})
    assert response.status_code == 200
    assert response.json()["checkpoint_id"] == manifest.digest


def test_public_url_is_the_base_of_handed_out_urls(tmp_path: Path) -> None:
    publish(tmp_path / "hub", "me/m", tree(tmp_path / "a", {"f": b"a"}))
    with HubServer(tmp_path / "hub", public_url="https://hub.example/") as server:
        answer = resolve(server, "me/m", {}).json()
    url = answer["snapshot_manifest"]["entries"][0]["url"]
    assert url.startswith("https://hub.example/api/v1/blobs/")


def test_unknown_routes_and_methods_answer_json(hub: HubServer) -> None:
    response = http.get(f"{hub.url}/api/v2/nothing")
    assert response.status_code == 404
    assert "no route /api/v2/nothing" in response.json()["error"]
    response = http.get(f"{hub.url}/api/v1/inference/repos/me/m/resolve")
    assert response.status_code == 405
    assert response.json() == {
        "error": "GET is not allowed on /api/v1/inference/repos/me/m/resolve"
    }
    assert http.get(f"{hub.url}/healthz").json() == {"ok": True}
