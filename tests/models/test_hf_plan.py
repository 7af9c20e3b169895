"""plan_hf_snapshot against a fake Hugging Face Hub on loopback (tests/servers/fake_hf.py)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import huggingface_hub.constants
import pytest
from servers.fake_hf import INVALID_CREDENTIALS, FakeHfHub

from gen_worker.errors import (
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubUnavailableError,
    InvalidModelRefError,
    UnsafePathError,
    ValidationError,
)
from gen_worker.models.hf import (
    DEFAULT_HF_ENDPOINT,
    hf_auth_headers,
    hf_endpoint,
    plan_hf_snapshot,
)
from gen_worker.refs import HfRef

TOKEN = "hf_SECRETtokenVALUE123"
UNET = b"\x01" * 3000
UNET_FP16 = b"\x02" * 1500
VAE_FP16 = b"\x03" * 700

SD_FILES = {
    ".gitattributes": b"*.safetensors filter=lfs\n",
    "README.md": b"# tiny sd\n",
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
    "v1-5-pruned.ckpt": b"pickle" * 10,
    "scheduler/scheduler_config.json": b'{"_class_name": "PNDMScheduler"}',
    "tokenizer/vocab.json": b'{"a": 0}',
    "tokenizer/tokenizer_config.json": b'{"model_max_length": 77}',
    "tokenizer/merges.txt": b"#version: 0.2\n",
    "unet/config.json": b'{"_class_name": "UNet2DConditionModel"}',
    "unet/diffusion_pytorch_model.safetensors": UNET,
    "unet/diffusion_pytorch_model.fp16.safetensors": UNET_FP16,
    "unet/diffusion_pytorch_model.bin": b"pickle" * 20,
    "vae/config.json": b'{"_class_name": "AutoencoderKL"}',
    "vae/diffusion_pytorch_model.fp16.safetensors": VAE_FP16,
    "onnx/unet/model.onnx": b"onnx" * 5,
}
SD_SELECTED = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[FakeHfHub]:
    hub = FakeHfHub()
    with hub.serve():
        yield hub


@pytest.fixture
def hub(served: FakeHfHub) -> Iterator[FakeHfHub]:
    served.api_status = None
    served.api_body = None
    with served._lock:
        served.requests.clear()
    yield served


def _is_loopback(host: object) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse (and record) any lookup or connection that would leave loopback."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub read the variable at import, possibly before gen_worker set its default
    # (another test module may have imported it first); test_telemetry_is_off_by_default
    # checks gen_worker's own default in a fresh interpreter.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    violations: list[str] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            violations.append(f"connect {address!r}")
            raise OSError(f"test refused a connection to {address!r}")
        real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            violations.append(f"lookup {host!r}")
            raise OSError(f"test refused a lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield violations
    assert violations == []


# -- resolution and selection ---------------------------------------------------------------


def test_main_resolves_to_the_commit_and_entries_point_at_it(hub: FakeHfHub) -> None:
    commit = hub.push("acme/tiny-sd", SD_FILES)

    plan = plan_hf_snapshot("hf:acme/tiny-sd@main", endpoint=hub.url)

    assert plan.ref == f"hf:acme/tiny-sd@{commit}"
    assert plan.repo_id == "acme/tiny-sd"
    assert plan.revision == commit
    assert [e.path for e in plan.entries] == SD_SELECTED
    for entry in plan.entries:
        body = SD_FILES[entry.path]
        assert entry.size_bytes == len(body)
        assert entry.url == f"{hub.url}/acme/tiny-sd/resolve/{commit}/{entry.path}"
        assert entry.blake3 == ""
        lfs = entry.path.endswith(".safetensors")
        assert entry.sha256 == (hashlib.sha256(body).hexdigest() if lfs else "")
    skipped = dict(plan.skipped)
    assert set(skipped) == set(SD_FILES) - set(SD_SELECTED)
    assert skipped["unet/diffusion_pytorch_model.bin"] == "pickle format (.bin) is never downloaded"
    assert plan.variants == (("unet", "fp16"), ("vae", "fp16"))
    assert plan.size_bytes == sum(len(SD_FILES[p]) for p in SD_SELECTED)
    # One listing request, with file metadata; nothing downloaded.
    assert hub.requests == [("GET", "/api/models/acme/tiny-sd/revision/main", None)]


def test_no_revision_asks_for_the_default_branch(hub: FakeHfHub) -> None:
    commit = hub.push("acme/default", {"config.json": b"{}", "model.safetensors": b"w" * 10})

    plan = plan_hf_snapshot(HfRef("acme", "default", None), endpoint=hub.url)

    assert plan.ref == f"hf:acme/default@{commit}"
    assert [e.path for e in plan.entries] == ["config.json", "model.safetensors"]
    assert hub.requested_paths() == ["/api/models/acme/default"]


def test_a_moved_branch_gives_the_new_commit_and_a_pinned_one_the_old(hub: FakeHfHub) -> None:
    old = hub.push(
        "acme/moving", {"config.json": b"{}", "model.safetensors": b"a" * 8}, tags=["v1"]
    )
    new = hub.push("acme/moving", {"config.json": b"{}", "model.fp16.safetensors": b"b" * 4})
    assert old != new

    at_main = plan_hf_snapshot("hf:acme/moving", endpoint=hub.url)
    at_old = plan_hf_snapshot(f"hf:acme/moving@{old}", endpoint=hub.url)
    at_tag = plan_hf_snapshot("hf:acme/moving@v1", endpoint=hub.url)

    assert (at_main.revision, [e.path for e in at_main.entries]) == (
        new,
        ["config.json", "model.fp16.safetensors"],
    )
    assert at_old.ref == at_tag.ref == f"hf:acme/moving@{old}"
    assert [e.path for e in at_old.entries] == ["config.json", "model.safetensors"]
    assert all(f"/resolve/{old}/" in e.url for e in at_tag.entries)


def test_entries_download_with_httpx_including_ranges(hub: FakeHfHub) -> None:
    commit = hub.push("acme/fetchable", SD_FILES)
    plan = plan_hf_snapshot("hf:acme/fetchable", endpoint=hub.url)

    with httpx.Client(follow_redirects=True) as client:
        for entry in plan.entries:
            response = client.get(entry.url)
            assert response.status_code == 200
            assert response.content == SD_FILES[entry.path]
            assert response.headers["accept-ranges"] == "bytes"
            if entry.sha256:
                assert hashlib.sha256(response.content).hexdigest() == entry.sha256
                # LFS files go through the Hub's redirect to a signed CDN URL.
                assert str(response.url).startswith(f"{hub.url}/cdn/{entry.sha256}?signature=")
                assert response.history[0].headers["x-repo-commit"] == commit
        unet = next(e for e in plan.entries if e.path.startswith("unet/diffusion"))
        ranged = client.get(unet.url, headers={"Range": "bytes=100-199"})
        tail = client.get(unet.url, headers={"Range": "bytes=1400-"})
        outside = client.get(unet.url, headers={"Range": f"bytes={len(UNET_FP16)}-"})
    assert (ranged.status_code, ranged.content) == (206, UNET_FP16[100:200])
    assert ranged.headers["content-range"] == f"bytes 100-199/{len(UNET_FP16)}"
    assert (tail.status_code, tail.content) == (206, UNET_FP16[1400:])
    assert outside.status_code == 416


def test_hf_endpoint_is_read_at_call_time(hub: FakeHfHub, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = hub.push("acme/by-env", {"config.json": b"{}", "model.safetensors": b"x" * 5})
    # huggingface_hub read HF_ENDPOINT when it was imported; setting it now changes nothing
    # there, which is why the plan reads it itself.
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    assert huggingface_hub.constants.ENDPOINT != hub.url

    plan = plan_hf_snapshot("hf:acme/by-env")

    assert plan.revision == commit
    assert all(e.url.startswith(f"{hub.url}/acme/by-env/resolve/{commit}/") for e in plan.entries)
    assert hub.requested_paths() == ["/api/models/acme/by-env"]


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hf_endpoint() == DEFAULT_HF_ENDPOINT
    monkeypatch.setenv("HF_ENDPOINT", " http://127.0.0.1:9/mirror/ ")
    assert hf_endpoint() == "http://127.0.0.1:9/mirror"
    assert hf_endpoint("http://127.0.0.1:8/") == "http://127.0.0.1:8"


def test_auth_headers() -> None:
    assert hf_auth_headers(TOKEN) == {"Authorization": f"Bearer {TOKEN}"}
    assert hf_auth_headers(None) == {}
    assert hf_auth_headers("") == {}


# -- private repos and tokens ---------------------------------------------------------------


def test_private_repo_needs_its_token(hub: FakeHfHub) -> None:
    files = {"config.json": b'{"private": true}', "model.safetensors": b"p" * 9}
    commit = hub.push("acme/private", files, readers=[TOKEN])
    hub.push("other/repo", {"config.json": b"{}"}, readers=["hf_otherAccountToken"])

    with pytest.raises(HubAuthError) as anonymous:
        plan_hf_snapshot("hf:acme/private", endpoint=hub.url)
    with pytest.raises(HubAuthError) as wrong:
        plan_hf_snapshot("hf:acme/private", endpoint=hub.url, token="hf_wrongSECRET")
    with pytest.raises(HubNotFoundError) as no_access:
        plan_hf_snapshot("hf:acme/private", endpoint=hub.url, token="hf_otherAccountToken")
    plan = plan_hf_snapshot("hf:acme/private", endpoint=hub.url, token=TOKEN)

    assert anonymous.value.status == 401
    assert str(anonymous.value) == (
        f"{hub.url} refused to list hf:acme/private (HTTP 401): the repo does not exist, or it "
        "is private or gated and no token was sent; pass a Hugging Face token with read access "
        "to it: Repository not found"
    )
    assert wrong.value.status == 401
    assert "the token sent was rejected or cannot read it" in str(wrong.value)
    assert wrong.value.detail == INVALID_CREDENTIALS
    assert "hf_wrongSECRET" not in str(wrong.value)
    assert no_access.value.status == 404
    assert "hf_otherAccountToken" not in str(no_access.value)
    assert plan.ref == f"hf:acme/private@{commit}"
    assert hub.requests[-1][2] == f"Bearer {TOKEN}"

    # The fetcher sends hf_auth_headers(token) to the entries' URLs.
    config = next(e for e in plan.entries if e.path == "config.json")
    assert httpx.get(config.url).status_code == 401
    authorized = httpx.get(config.url, headers=hf_auth_headers(TOKEN))
    assert (authorized.status_code, authorized.content) == (200, files["config.json"])


# -- errors ---------------------------------------------------------------------------------


def test_unknown_repo_without_a_token_may_be_private(hub: FakeHfHub) -> None:
    # Like the real Hub, an anonymous request cannot tell a missing repo from a private one.
    with pytest.raises(HubAuthError) as info:
        plan_hf_snapshot("hf:acme/missing", endpoint=hub.url, token=None)
    assert info.value.status == 401
    assert "the repo does not exist, or it is private or gated" in str(info.value)


def test_unknown_repo_with_a_token_is_not_found(hub: FakeHfHub) -> None:
    hub.push("acme/exists", {"config.json": b"{}"}, readers=[TOKEN])
    with pytest.raises(HubNotFoundError) as info:
        plan_hf_snapshot("hf:acme/missing@main", endpoint=hub.url, token=TOKEN)
    assert info.value.status == 404
    assert str(info.value) == (
        f"Hugging Face repo acme/missing not found at {hub.url} (ref hf:acme/missing@main); "
        "check the owner/repo spelling: Repository not found"
    )
    assert not info.value.retryable
    assert TOKEN not in str(info.value)


def test_unknown_revision_is_not_found(hub: FakeHfHub) -> None:
    hub.push("acme/revs", {"config.json": b"{}"})
    with pytest.raises(HubNotFoundError) as info:
        plan_hf_snapshot("hf:acme/revs@nope", endpoint=hub.url)
    assert info.value.status == 404
    assert str(info.value).startswith(
        f"revision 'nope' of acme/revs not found at {hub.url} (ref hf:acme/revs@nope); "
        "use an existing branch, tag or commit sha"
    )


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (500, HubUnavailableError, True),
        (502, HubUnavailableError, True),
        (503, HubUnavailableError, True),
        (429, HubUnavailableError, True),
        (403, HubAuthError, False),
        (401, HubAuthError, False),
        (400, HubError, False),
    ],
)
def test_hub_statuses_map_to_our_errors(
    hub: FakeHfHub, status: int, error: type[HubError], retryable: bool
) -> None:
    hub.push("acme/flaky", {"config.json": b"{}"})
    hub.api_status = status
    with pytest.raises(HubError) as info:
        plan_hf_snapshot("hf:acme/flaky@main", endpoint=hub.url, token=TOKEN)
    assert type(info.value) is error
    assert info.value.status == status
    assert info.value.retryable is retryable
    assert "hf:acme/flaky@main" in str(info.value)
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value.args)


def test_unreachable_endpoint_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HubUnavailableError) as info:
        plan_hf_snapshot("hf:acme/x", endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    assert str(info.value) == (
        f"cannot reach http://127.0.0.1:{port} to list hf:acme/x (ConnectError); "
        "check the endpoint (HF_ENDPOINT) and the network"
    )
    assert info.value.status is None
    assert TOKEN not in str(info.value)


def test_unreadable_answer_is_unavailable(hub: FakeHfHub) -> None:
    hub.api_body = b"<html>not json</html>"
    with pytest.raises(HubUnavailableError, match="answered the listing of hf:acme/x with"):
        plan_hf_snapshot("hf:acme/x", endpoint=hub.url)


def test_offline_mode_is_reported(hub: FakeHfHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE is set"):
        plan_hf_snapshot("hf:acme/x", endpoint=hub.url)
    assert hub.requests == []


def test_pickle_only_repo_fails_before_any_download(hub: FakeHfHub) -> None:
    commit = hub.push("acme/pickled", {"config.json": b"{}", "pytorch_model.bin": b"p" * 50})
    with pytest.raises(ValidationError) as info:
        plan_hf_snapshot("hf:acme/pickled", endpoint=hub.url)
    assert str(info.value).startswith(
        f"hf:acme/pickled@{commit} cannot be loaded: the repo root has no loadable weights "
        "(found pytorch_model.bin): pickle files (.bin) are never downloaded"
    )
    assert hub.requested_paths() == ["/api/models/acme/pickled"]


def test_unsafe_listed_path_is_refused(hub: FakeHfHub) -> None:
    hub.push("acme/evil", {"config.json": b"{}", "..\\evil.json": b"{}"})
    with pytest.raises(UnsafePathError, match="backslash"):
        plan_hf_snapshot("hf:acme/evil", endpoint=hub.url)


def test_a_bad_ref_is_refused_without_a_request(hub: FakeHfHub) -> None:
    with pytest.raises(InvalidModelRefError):
        plan_hf_snapshot("acme/no-prefix", endpoint=hub.url)
    with pytest.raises(InvalidModelRefError):
        plan_hf_snapshot("hf:acme/a/b", endpoint=hub.url)
    assert hub.requests == []


# -- huggingface_hub talks to nothing but the endpoint ---------------------------------------

CHILD = """
import socket, sys
real = socket.getaddrinfo
def only_loopback(host, *args, **kwargs):
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"lookup of {host!r} refused")
    return real(host, *args, **kwargs)
socket.getaddrinfo = only_loopback
from gen_worker.models.hf import plan_hf_snapshot
import huggingface_hub.constants
print(huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY)
if sys.argv[1]:
    print(plan_hf_snapshot("hf:acme/child", endpoint=sys.argv[1]).revision)
"""


@pytest.mark.parametrize(("chosen", "disabled"), [(None, "True"), ("0", "False")])
def test_telemetry_is_off_by_default(hub: FakeHfHub, chosen: str | None, disabled: str) -> None:
    commit = hub.push("acme/child", {"config.json": b"{}", "model.safetensors": b"c" * 3})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    if chosen is not None:
        env["HF_HUB_DISABLE_TELEMETRY"] = chosen
    # Only the default run plans: with telemetry on, huggingface_hub would look huggingface.co up.
    endpoint = hub.url if chosen is None else ""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, endpoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = [disabled, commit] if endpoint else [disabled]
    assert done.stdout.split() == expected
