"""Fetch the input files of a request before its function runs.

An input :class:`Asset` names a file by ``url`` (downloaded with httpx into
``<inputs_root>/<request_id>/<index>-<name>``) or by ``ref`` (a file of the local file store
given as ``local_refs_root``; the hub client handles refs in a worker). Either way
``asset.local_path``, ``size_bytes``, ``sha256`` and ``blake3`` are set afterwards. A missing,
refused or oversized input is the caller's error (:class:`ValidationError`); a failing server
or network is transient (:class:`RetryableError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gen_worker.authoring import Asset
from gen_worker.errors import GenWorkerError, HubNotFoundError, RetryableError, ValidationError
from gen_worker.files.hashing import Digest, HashingWriter, hash_file
from gen_worker.files.refs import check_relative_ref, check_request_id
from gen_worker.files.urls import check_public_host, display_url, parse_input_url, safe_name
from gen_worker.http_client import LazyHttpClient

if TYPE_CHECKING:
    # httpx is imported where it is used: importing it costs ~0.5 s at startup (it pulls in
    # its CLI's dependencies when they are installed), and most workers never fetch a URL.
    import httpx

__all__ = ["DEFAULT_MAX_INPUT_FILE_BYTES", "AssetFetcher"]

DEFAULT_MAX_INPUT_FILE_BYTES = 200 * 1024 * 1024
LOCAL_REF_FORM = "expected a relative path such as 'uploads/photo.png'"
_MAX_REDIRECTS = 5
# Inputs of one request downloaded at once: enough to overlap latency, few enough to be polite.
_CONCURRENCY = 4
# Client errors that say "not now" rather than "never".
_RETRYABLE_STATUS = frozenset({408, 425, 429})


def _status_error(status: int, shown: str) -> GenWorkerError | None:
    """The error an HTTP status means for an input download, or None when it is a success."""
    if status in (404, 410):
        return ValidationError(f"input file not found: {shown}")
    if status >= 500 or status in _RETRYABLE_STATUS:
        return RetryableError(f"input file {shown} could not be downloaded: HTTP {status}")
    if status >= 300:
        return ValidationError(f"input file {shown} could not be downloaded: HTTP {status}")
    return None


def _request_error(exc: httpx.RequestError, shown: str) -> GenWorkerError:
    import httpx  # noqa: PLC0415  # deferred: see the module's imports

    # Only the exception's type is shown: its text is the transport's, never the caller's.
    if isinstance(exc, httpx.TimeoutException):
        return RetryableError(f"input file {shown}: the download timed out")
    if isinstance(exc, httpx.DecodingError):
        return ValidationError(f"input file {shown}: the response body could not be decoded")
    return RetryableError(f"input file {shown} could not be downloaded ({type(exc).__name__})")


def _content_length(response: httpx.Response) -> int | None:
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _mime_type(content_type: str | None, path: Path) -> str | None:
    if content_type:
        return content_type.split(";", 1)[0].strip().lower() or None
    return mimetypes.guess_type(path.name, strict=False)[0]


def _fill(asset: Asset, path: Path, digest: Digest, content_type: str | None) -> None:
    asset.local_path = str(path)
    asset.size_bytes = digest.size_bytes
    asset.sha256 = digest.sha256
    asset.blake3 = digest.blake3
    if asset.mime_type is None:
        asset.mime_type = _mime_type(content_type, path)


class AssetFetcher:
    """Downloads or locates the input Assets of requests, with a per-file size limit."""

    def __init__(
        self,
        inputs_root: Path,
        *,
        max_bytes: int = DEFAULT_MAX_INPUT_FILE_BYTES,
        allow_private_hosts: bool = False,
        local_refs_root: Path | None = None,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 60.0,
        files_url: str | None = None,
        files_token: str = "",
    ) -> None:
        self._inputs_root = Path(inputs_root)
        self._max_bytes = max_bytes
        self._allow_private_hosts = allow_private_hosts
        self._local_root = Path(local_refs_root).resolve() if local_refs_root else None
        #: The file API that input refs are read from when a request names none (the hub's).
        self._files = (files_url, files_token) if files_url else None
        # Redirects are followed by hand (see _download) so each hop is checked.
        self._http = LazyHttpClient(client, timeout_s=timeout_s)

    @property
    def _client(self) -> httpx.AsyncClient:
        return self._http.client

    async def fetch(
        self,
        asset: Asset,
        request_id: str,
        index: int,
        files: tuple[str, str] | None = None,
    ) -> None:
        """Make ``asset`` available on this machine and fill in its local path and digests.

        ``files`` is the request's file API (base URL, token): refs are read from it, else
        from the fetcher's own file API, else from the local file store.
        """
        asset.local_path = None  # caller-supplied: never trusted as a path to read
        check_request_id(request_id)
        files = files or self._files
        if asset.url is not None:
            await self._fetch_url(asset, request_id, index)
        elif asset.ref is not None and files is not None:
            await self._fetch_ref(asset, request_id, index, files)
        elif asset.ref is not None:
            await self._use_local_ref(asset, asset.ref)
        else:
            raise ValidationError("an input Asset needs a url or a ref")

    async def fetch_all(
        self, assets: Sequence[Asset], request_id: str, files: tuple[str, str] | None = None
    ) -> None:
        """Fetch every asset (index = position), a few at a time; the first failure wins."""
        limit = asyncio.Semaphore(_CONCURRENCY)

        async def one(index: int, asset: Asset) -> None:
            async with limit:
                await self.fetch(asset, request_id, index, files)

        tasks = [asyncio.create_task(one(i, a)) for i, a in enumerate(assets)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # Stop the other downloads before reporting, so none writes after cleanup().
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def cleanup(self, request_id: str) -> None:
        """Remove the downloaded inputs of ``request_id`` (nothing to do if there are none)."""
        directory = self._inputs_root / check_request_id(request_id)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory)

    async def aclose(self) -> None:
        """Close the HTTP client if this fetcher created it."""
        await self._http.aclose()

    # -- downloads ----------------------------------------------------------------------

    async def _fetch_url(self, asset: Asset, request_id: str, index: int) -> None:
        url = parse_input_url(str(asset.url))
        final = self._inputs_root / request_id / f"{index}-{safe_name(url)}"
        digest, content_type = await self._download(url, final)
        _fill(asset, final.resolve(), digest, content_type)

    async def _download(self, url: httpx.URL, final: Path) -> tuple[Digest, str | None]:
        import httpx  # noqa: PLC0415  # deferred: see the module's imports

        for _ in range(_MAX_REDIRECTS + 1):
            if not self._allow_private_hosts:
                await check_public_host(url)
            try:
                async with self._client.stream("GET", url, follow_redirects=False) as response:
                    if not response.is_redirect:
                        return await self._receive(response, url, final)
                    # Checked like the first URL at the top of the loop (scheme here, host there).
                    url = parse_input_url(str(url.join(response.headers["location"])))
            except httpx.RequestError as exc:
                raise _request_error(exc, display_url(url)) from exc
        raise ValidationError(f"input URL {display_url(url)}: more than {_MAX_REDIRECTS} redirects")

    def _too_large(self, shown: str) -> Callable[[int], Exception]:
        message = (
            f"input file {shown} is larger than the limit of {self._max_bytes} bytes "
            "(WORKER_MAX_INPUT_FILE_BYTES)"
        )
        return lambda size: ValidationError(message)

    async def _receive(
        self, response: httpx.Response, url: httpx.URL, final: Path
    ) -> tuple[Digest, str | None]:
        shown = display_url(url)
        error = _status_error(response.status_code, shown)
        if error is not None:
            raise error
        too_large = self._too_large(shown)
        declared = _content_length(response)
        if declared is not None and declared > self._max_bytes:
            raise too_large(declared)
        final.parent.mkdir(parents=True, exist_ok=True)
        writer = HashingWriter(final, max_bytes=self._max_bytes, too_large=too_large)
        try:
            async for chunk in response.aiter_bytes():
                writer.write(chunk)  # raises as soon as the limit is passed
            return writer.commit(), response.headers.get("content-type")
        finally:
            writer.discard()  # a no-op after a commit; removes the .partial otherwise

    async def _fetch_ref(
        self, asset: Asset, request_id: str, index: int, files: tuple[str, str]
    ) -> None:
        from gen_worker.files.file_api import FileApi  # noqa: PLC0415  # see the imports

        ref = str(asset.ref)
        check_relative_ref(ref, "input ref", LOCAL_REF_FORM)
        final = self._inputs_root / request_id / f"{index}-{ref.rsplit('/', 1)[-1]}"
        api = FileApi(files[0], files[1], client=self._client)
        try:
            digest = await api.download(ref, final, max_bytes=self._max_bytes)
        except HubNotFoundError as exc:
            raise ValidationError(f"input file not found: {ref}") from exc
        _fill(asset, final.resolve(), digest, None)

    # -- local refs ---------------------------------------------------------------------

    async def _use_local_ref(self, asset: Asset, ref: str) -> None:
        check_relative_ref(ref, "input ref", LOCAL_REF_FORM)
        if self._local_root is None:
            raise ValidationError(
                f"input ref {ref!r} names a hub file, and no hub is configured; set "
                "TENSORHUB_URL, or give the input as an http(s) url"
            )
        path = self._local_root.joinpath(ref).resolve()
        if not path.is_relative_to(self._local_root):
            raise ValidationError(
                f"input ref {ref!r} resolves outside the local file store through a symlink"
            )
        if not path.is_file():
            raise ValidationError(f"input file not found: {ref}")
        if path.stat().st_size > self._max_bytes:
            raise self._too_large(ref)(path.stat().st_size)
        _fill(asset, path, await asyncio.to_thread(hash_file, path), None)
