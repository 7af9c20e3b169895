"""The hub resolve client against the real local hub on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from gen_worker.errors import HubAuthError, HubConflictError, HubNotFoundError, HubUnavailableError
from gen_worker.hub import HubServer, publish
from gen_worker.models.hub_client import HubClient
from gen_worker.models.manifest import SnapshotManifest

TOKEN = "resolve-token"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    root = tmp_path / "hub"
    for dtype in ("fp16", "bf16"):
        src = tmp_path / f"src-{dtype}"
        src.mkdir()
        (src / "config.json").write_text(f'{{"dtype": "{dtype}"}}')
        (src / "weights.safetensors").write_bytes(dtype.encode() * 1000)
        publish(root, "acme/sd:latest", src, attributes={"dtype": dtype})
    with HubServer(root, tokens=(TOKEN,)) as server:
        yield server


def _resolve(hub: HubServer, ref: str, token: str = TOKEN, **kwargs: object) -> SnapshotManifest:
    async def go() -> SnapshotManifest:
        client = HubClient(hub.url, token)
        try:
            return await client.resolve(ref, **kwargs)  # type: ignore[arg-type]
        finally:
            await client.aclose()

    return asyncio.run(go())


def _config_dtype(manifest: SnapshotManifest) -> str:
    import httpx

    entry = next(e for e in manifest.entries if e.path == "config.json")
    body = httpx.get(entry.url).content
    assert blake3.blake3(body).hexdigest() == entry.blake3
    return str(httpx.get(entry.url).json()["dtype"])


def test_resolve_by_tag_gives_the_newest_snapshot_with_urls(hub: HubServer) -> None:
    manifest = _resolve(hub, "acme/sd")
    assert manifest.digest.startswith("blake3:")
    assert sorted(e.path for e in manifest.entries) == ["config.json", "weights.safetensors"]
    assert _config_dtype(manifest) == "bf16"


def test_attributes_select_and_lists_are_preferences(hub: HubServer) -> None:
    assert _config_dtype(_resolve(hub, "acme/sd", attributes={"dtype": "fp16"})) == "fp16"
    preferred = _resolve(hub, "acme/sd", attributes={"dtype": ["fp8", "fp16", "bf16"]})
    assert _config_dtype(preferred) == "fp16"


def test_resolve_by_digest_beats_attributes(hub: HubServer) -> None:
    fp16 = _resolve(hub, "acme/sd", attributes={"dtype": "fp16"})
    again = _resolve(hub, f"acme/sd@{fp16.digest}", attributes={"dtype": "bf16"})
    assert again.digest == fp16.digest


def test_no_match_is_a_conflict_that_says_what_exists(hub: HubServer) -> None:
    with pytest.raises(HubConflictError) as caught:
        _resolve(hub, "acme/sd", attributes={"dtype": ["int4", "fp8"]})
    message = str(caught.value)
    assert "resolve acme/sd:latest with attributes {'dtype': 'fp8'} (HTTP 409)" in message
    assert "'dtype': 'fp16'" in message and "'dtype': 'bf16'" in message


def test_errors_by_status(hub: HubServer) -> None:
    with pytest.raises(HubNotFoundError, match="acme/nothing:latest"):
        _resolve(hub, "acme/nothing")
    with pytest.raises(HubAuthError) as caught:
        _resolve(hub, "acme/sd", token="not-the-token")
    assert "not-the-token" not in str(caught.value)
    with pytest.raises(HubAuthError, match="HTTP 401"):
        _resolve(hub, "acme/sd", token="")


def test_lenient_refs_are_canonicalised(hub: HubServer) -> None:
    assert _resolve(hub, " Acme/SD ").digest == _resolve(hub, "acme/sd:latest").digest


def test_a_hub_that_does_not_answer_is_unavailable() -> None:
    async def go() -> None:
        client = HubClient("http://127.0.0.1:9", max_attempts=2, backoff_s=0.01)
        try:
            await client.resolve("acme/sd")
        finally:
            await client.aclose()

    with pytest.raises(HubUnavailableError, match="did not answer"):
        asyncio.run(go())
