"""Hugging Face snapshots: resolve ``hf:owner/repo[@revision]`` to a commit and plan its files.

:func:`plan_hf_snapshot` asks the Hub (through ``huggingface_hub``) for the repo at the
revision, pins the commit sha it resolves to, and keeps exactly the files a diffusers or
transformers load needs (the rules of :mod:`gen_worker.models.hf_select`). It downloads
nothing: each entry carries the file's ``/resolve/<sha>/`` URL for our downloader, with the
size and, for LFS files, the sha256 the Hub published. :func:`hf_auth_headers` is what the
downloader sends with those URLs.

The endpoint is, in order: the ``endpoint`` argument, ``HF_ENDPOINT`` read at call time,
``https://huggingface.co``. ``huggingface_hub`` reads ``HF_ENDPOINT`` once, when it is first
imported, so a later change of the variable would otherwise be ignored. A missing token means
an anonymous request: the token saved by ``hf auth login`` on this machine is never used
implicitly, so the listing and the downloads authenticate the same way.

Telemetry: unless the operator chose otherwise, ``HF_HUB_DISABLE_TELEMETRY=1`` is set before
``huggingface_hub`` is first imported (it reads the variable at import). With telemetry on,
its first request also fetches an agent registry from the endpoint it saw at import
(huggingface.co by default), whatever endpoint the request itself goes to: a worker pointed at
a mirror must not talk to anything else. If ``huggingface_hub`` was imported earlier, its
setting stands.

Errors from the Hub become our tree, naming the ref and never the token: no such repo or
revision -> :class:`HubNotFoundError`; 401/403 -> :class:`HubAuthError`; 5xx, 429, a refused
or broken connection, an unreadable answer -> :class:`HubUnavailableError`; a repo whose
load would need pickle weights -> :class:`ValidationError`.
"""

from __future__ import annotations

import os

# Before huggingface_hub is imported, which reads it once (see "Telemetry" above).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import ModelInfo

# The HTTP library huggingface_hub raises transport errors from (httpx2 today), under the alias
# it keeps for downstream libraries across its major versions; typed, but not re-exported.
from huggingface_hub.utils import httpx as hf_httpx  # type: ignore[attr-defined]

from gen_worker._version import __version__
from gen_worker.errors import (
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubUnavailableError,
    ValidationError,
)
from gen_worker.models.hf_select import RepoFile, select_files, weight_variants
from gen_worker.models.manifest import ManifestEntry, check_relative_path
from gen_worker.refs import HfRef, parse_hf_ref

__all__ = [
    "DEFAULT_HF_ENDPOINT",
    "HF_ENDPOINT_ENV",
    "HfSnapshotPlan",
    "hf_auth_headers",
    "hf_endpoint",
    "hf_file_url",
    "plan_hf_snapshot",
]

HF_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT_S = 30.0
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DETAIL_MAX = 300


@dataclass(frozen=True, slots=True)
class HfSnapshotPlan:
    """The files of one Hugging Face commit that a load needs, and why the others are not.

    ``variants`` maps a load folder (``""`` for the repo root, ``"unet"`` ...) to the
    reduced-precision variant whose weights were selected there; the loader passes it on as
    ``variant=``. Folders with default-precision weights are not listed.
    """

    ref: str
    repo_id: str
    revision: str
    entries: tuple[ManifestEntry, ...]
    skipped: tuple[tuple[str, str], ...]
    variants: tuple[tuple[str, str], ...] = ()

    @property
    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries)


def hf_endpoint(endpoint: str | None = None) -> str:
    """The Hub base URL: ``endpoint``, else ``HF_ENDPOINT`` now, else huggingface.co."""
    chosen = endpoint or os.environ.get(HF_ENDPOINT_ENV, "").strip() or DEFAULT_HF_ENDPOINT
    return chosen.rstrip("/")


def hf_auth_headers(token: str | None) -> dict[str, str]:
    """Headers for requests to the Hub's file URLs: the bearer token, or none when anonymous.

    The Hub answers large files with a redirect to a CDN whose URL is already signed; send
    these headers to the Hub's own host only, never across the redirect.
    """
    return {"Authorization": f"Bearer {token}"} if token else {}


def hf_file_url(endpoint: str, repo_id: str, commit: str, path: str) -> str:
    """The Hub's download URL of ``path`` at ``commit`` (``/{repo}/resolve/{commit}/{path}``)."""
    return f"{endpoint.rstrip('/')}/{repo_id}/resolve/{commit}/{quote(path)}"


def plan_hf_snapshot(
    ref: HfRef | str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> HfSnapshotPlan:
    """Resolve ``ref`` to a commit and select the files a load of it needs.

    One Hub request (the model info at the revision, with file sizes and LFS digests).
    Raises :class:`HubError` subclasses for Hub failures and :class:`ValidationError` when
    the repo cannot be loaded without pickle files (see the module docstring).
    """
    hf_ref = parse_hf_ref(ref) if isinstance(ref, str) else ref
    base = hf_endpoint(endpoint)
    info = _model_info(hf_ref, base, token or None, timeout_s)
    commit = info.sha or ""
    if _COMMIT.fullmatch(commit) is None:
        raise _malformed(hf_ref, base, f"the commit sha {commit[:80]!r} is not 40 lower-hex")
    files = _repo_files(info, hf_ref, base)
    pinned = f"hf:{hf_ref.repo_id}@{commit}"
    try:
        selected, skipped = select_files(files)
    except ValidationError as exc:
        raise ValidationError(f"{pinned} cannot be loaded: {exc}") from None
    entries = tuple(
        ManifestEntry(
            path=check_relative_path(f.path),
            size_bytes=f.size,
            url=hf_file_url(base, hf_ref.repo_id, commit, f.path),
            sha256=f.sha256 or "",
        )
        for f in selected
    )
    return HfSnapshotPlan(
        ref=pinned,
        repo_id=hf_ref.repo_id,
        revision=commit,
        entries=entries,
        skipped=tuple(skipped),
        variants=tuple(sorted(weight_variants(selected).items())),
    )


def _model_info(ref: HfRef, endpoint: str, token: str | None, timeout_s: float) -> ModelInfo:
    # token=False, not None: None would make huggingface_hub send a locally saved token.
    api = HfApi(
        endpoint=endpoint,
        token=token or False,
        library_name="gen-worker",
        library_version=__version__,
    )
    try:
        return api.model_info(
            ref.repo_id, revision=ref.revision, files_metadata=True, timeout=timeout_s
        )
    except OfflineModeIsEnabled:
        raise HubUnavailableError(
            f"cannot list {ref}: HF_HUB_OFFLINE is set, so huggingface_hub sends no request; "
            "unset it to pull Hugging Face models"
        ) from None
    except HfHubHTTPError as exc:
        raise _http_error(exc, ref, endpoint, token) from None
    except hf_httpx.RequestError as exc:
        raise HubUnavailableError(
            f"cannot reach {_shown(endpoint)} to list {ref} ({type(exc).__name__}); "
            f"check the endpoint ({HF_ENDPOINT_ENV}) and the network"
        ) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed(ref, endpoint, f"{type(exc).__name__}: {exc}") from None


def _repo_files(info: ModelInfo, ref: HfRef, endpoint: str) -> list[RepoFile]:
    if info.siblings is None:
        raise _malformed(ref, endpoint, "the answer has no file list")
    files: list[RepoFile] = []
    for sibling in info.siblings:
        if sibling.size is None or sibling.size < 0:
            raise _malformed(ref, endpoint, f"{sibling.rfilename[:200]!r} has no size")
        sha256 = sibling.lfs.sha256 if sibling.lfs is not None else None
        if sha256 is not None and _SHA256.fullmatch(sha256) is None:
            raise _malformed(ref, endpoint, f"{sibling.rfilename[:200]!r} has a bad LFS sha256")
        files.append(RepoFile(sibling.rfilename, sibling.size, sha256))
    return files


def _http_error(exc: HfHubHTTPError, ref: HfRef, endpoint: str, token: str | None) -> HubError:
    status = exc.response.status_code
    detail = _detail(exc, token)
    where = _shown(endpoint)
    if isinstance(exc, RevisionNotFoundError):
        return HubNotFoundError(
            f"revision {ref.revision!r} of {ref.repo_id} not found at {where} (ref {ref}); "
            "use an existing branch, tag or commit sha",
            status=status,
            detail=detail,
        )
    if status in (401, 403):
        return HubAuthError(_auth_message(exc, ref, where, token), status=status, detail=detail)
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return HubNotFoundError(
            f"Hugging Face repo {ref.repo_id} not found at {where} (ref {ref}); "
            "check the owner/repo spelling",
            status=status,
            detail=detail,
        )
    if status >= 500 or status == 429:
        return HubUnavailableError(
            f"{where} failed to list {ref} (HTTP {status}); try again later",
            status=status,
            detail=detail,
        )
    return HubError(f"{where} answered HTTP {status} to the listing of {ref}", status=status)


def _auth_message(exc: HfHubHTTPError, ref: HfRef, where: str, token: str | None) -> str:
    status = exc.response.status_code
    if isinstance(exc, GatedRepoError):
        return (
            f"{ref.repo_id} is gated at {where} (ref {ref}, HTTP {status}): accept its terms "
            "on the repo page and use a token of that account"
        )
    sent = "the token sent was rejected or cannot read it" if token else "no token was sent"
    return (
        f"{where} refused to list {ref} (HTTP {status}): the repo does not exist, or it is "
        f"private or gated and {sent}; pass a Hugging Face token with read access to it"
    )


def _detail(exc: HfHubHTTPError, token: str | None) -> str:
    """The Hub's own explanation, short, and without the token should it echo it."""
    detail = (exc.server_message or "").strip().replace("\n", " ")
    if token:
        detail = detail.replace(token, "***")
    return detail[:_DETAIL_MAX]


def _malformed(ref: HfRef, endpoint: str, problem: str) -> HubUnavailableError:
    return HubUnavailableError(
        f"{_shown(endpoint)} answered the listing of {ref} with something unreadable: {problem}"
    )


def _shown(endpoint: str) -> str:
    """The endpoint without user info or query, which may hold credentials."""
    parts = urlsplit(endpoint)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"[:200] if parts.scheme else "the endpoint"
