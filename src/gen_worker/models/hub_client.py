"""Client of the hub's resolve API: a Cozy ref (plus attributes) -> a snapshot manifest.

``POST {TENSORHUB_URL}/api/v1/inference/repos/{owner}/{repo}/resolve`` with one of
``{digest}``, ``{tag, attributes}`` or ``{tag}``, chosen with the precedence digest >
attributes > tag. A ref's ``#flavor`` selects a concrete artifact of a checkpoint and travels
as the attribute ``flavor`` (an explicit ``flavor`` attribute wins). The bearer token is the
call's capability token when it has one, else ``TENSORHUB_TOKEN``.

Errors follow :func:`gen_worker.errors.hub_error`: 401/403 :class:`HubAuthError`, 404
:class:`HubNotFoundError`, 409 :class:`HubConflictError` (the server's body says what exists),
5xx and connection failures :class:`HubUnavailableError` after a few retries. Messages name
the ref and carry the server's explanation, never a token.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

import msgspec

from gen_worker.errors import HubConflictError, HubError, ValidationError, hub_error
from gen_worker.http_client import LazyHttpClient, retry_delay_s
from gen_worker.models.manifest import (
    DIGEST_PREFIX,
    ManifestEntry,
    SnapshotManifest,
    check_blake3_hex,
    check_relative_path,
    split_digest,
)
from gen_worker.refs import CozyRef, parse_cozy_ref

if TYPE_CHECKING:
    import httpx

__all__ = ["AttributeValues", "HubClient", "attribute_choices", "resolve_body"]

#: An attribute asked for: one value, or acceptable values in order of preference.
AttributeValues = str | Sequence[str]
# A resolve with several multi-valued attributes tries their combinations; bounded so a
# careless request cannot turn into hundreds of calls.
_MAX_CHOICES = 16


class _WireEntry(msgspec.Struct):
    path: str
    size_bytes: int
    blake3: str
    url: str = ""


class _WireManifest(msgspec.Struct):
    entries: list[_WireEntry]


class _Resolved(msgspec.Struct):
    checkpoint_id: str
    snapshot_manifest: _WireManifest


def resolve_body(ref: CozyRef, attributes: Mapping[str, str] | None = None) -> dict[str, object]:
    """The resolve request for ``ref``: digest > attributes > tag (SPEC 13.1)."""
    if ref.digest is not None:
        return {"digest": DIGEST_PREFIX + ref.digest}
    wanted = {"flavor": ref.flavor} if ref.flavor is not None else {}
    wanted.update(attributes or {})
    if wanted:
        return {"tag": ref.tag, "attributes": dict(sorted(wanted.items()))}
    return {"tag": ref.tag}


def attribute_choices(attributes: Mapping[str, AttributeValues] | None) -> list[dict[str, str]]:
    """Each single-valued combination of ``attributes``, most preferred first.

    ``{"dtype": ["bf16", "fp16"]}`` -> ``[{"dtype": "bf16"}, {"dtype": "fp16"}]``. No attributes
    -> one empty combination.
    """
    keys = sorted(attributes or {})
    options: list[list[str]] = []
    for key in keys:
        value = (attributes or {})[key]
        if isinstance(value, str):
            values = [value]
        elif isinstance(value, Sequence):
            values = list(value)
        else:
            values = []
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ValidationError(
                f"attribute {key!r} must be a non-empty string or a list of them, got {value!r}"
            )
        options.append(values)
    combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*options)]
    if len(combos) > _MAX_CHOICES:
        raise ValidationError(
            f"attributes {dict(attributes or {})} allow {len(combos)} combinations; "
            f"at most {_MAX_CHOICES}"
        )
    return combos


def _detail(response: httpx.Response) -> str:
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return response.text[:300].strip()
    if not isinstance(body, dict):
        return ""
    detail = str(body.get("error", ""))
    available = body.get("available")
    if isinstance(available, list) and available:
        shown = "; ".join(
            f"{item.get('checkpoint_id', '?')} {item.get('attributes', {})}"
            for item in available[:5]
            if isinstance(item, dict)
        )
        detail = f"{detail} (available: {shown})" if detail else f"available: {shown}"
    return detail


class HubClient:
    """Resolves Cozy refs against one hub."""

    def __init__(
        self,
        base_url: str,
        token: str = "",
        *,
        client: httpx.AsyncClient | None = None,
        max_attempts: int = 3,
        backoff_s: float = 0.2,
        timeout_s: float = 30.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValidationError(
                f"hub URL {base_url[:80]!r} must start with http:// or https:// (TENSORHUB_URL)"
            )
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._max_attempts = max(1, max_attempts)
        self._backoff_s = backoff_s
        self._http = LazyHttpClient(client, timeout_s=timeout_s)

    @property
    def files_url(self) -> str:
        """The base URL of this hub's file API."""
        return f"{self.base_url}/api/v1/files"

    @property
    def _client(self) -> httpx.AsyncClient:
        return self._http.client

    async def aclose(self) -> None:
        await self._http.aclose()

    async def resolve(
        self,
        ref: CozyRef | str,
        *,
        attributes: Mapping[str, AttributeValues] | None = None,
        token: str | None = None,
    ) -> SnapshotManifest:
        """The snapshot ``ref`` names now, with a download URL per file.

        With list-valued attributes each combination is tried in order of preference and the
        first the hub can serve wins; when none can, the last 409 is raised.
        """
        parsed = ref if isinstance(ref, CozyRef) else parse_cozy_ref(ref, lenient=True)
        choices = [{}] if parsed.digest is not None else attribute_choices(attributes)
        for index, choice in enumerate(choices):
            try:
                return await self._resolve_once(parsed, choice, token)
            except HubConflictError:
                if index + 1 == len(choices):
                    raise
        raise AssertionError("unreachable: there is at least one choice")

    async def _resolve_once(
        self, parsed: CozyRef, attributes: Mapping[str, str], token: str | None
    ) -> SnapshotManifest:
        import httpx  # noqa: PLC0415  # deferred: see _client

        url = (
            f"{self.base_url}/api/v1/inference/repos/"
            f"{quote(parsed.owner, safe='')}/{quote(parsed.repo, safe='')}/resolve"
        )
        body = resolve_body(parsed, attributes)
        bearer = token or self._token
        headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
        what = f"resolve {parsed.canonical}"
        if "attributes" in body:
            what += f" with attributes {body['attributes']}"
        for attempt in range(self._max_attempts):
            try:
                response = await self._client.post(url, json=body, headers=headers)
            except httpx.RequestError as exc:
                if attempt + 1 == self._max_attempts:
                    raise hub_error(
                        None,
                        f"{what}: the hub at {self.base_url} did not answer ({type(exc).__name__})",
                    ) from exc
            else:
                if response.status_code == 200:
                    return _manifest(response.content, what)
                error = hub_error(response.status_code, what, _detail(response))
                if not error.retryable or attempt + 1 == self._max_attempts:
                    raise error
            await asyncio.sleep(retry_delay_s(self._backoff_s, attempt))
        raise AssertionError("unreachable: the loop returns or raises")


def _manifest(content: bytes, what: str) -> SnapshotManifest:
    """Decode and check a resolve answer: digest form, safe paths, digests, sizes."""
    try:
        resolved = msgspec.json.decode(content, type=_Resolved)
        split_digest(resolved.checkpoint_id)
        entries = []
        for wire in resolved.snapshot_manifest.entries:
            check_relative_path(wire.path)
            check_blake3_hex(wire.blake3, what=f"blake3 of {wire.path}")
            if wire.size_bytes < 0:
                raise ValueError(f"negative size for {wire.path}")
            entries.append(ManifestEntry(wire.path, wire.size_bytes, wire.blake3, wire.url))
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise HubError(
            f"{what}: the hub's answer is not a valid snapshot manifest ({exc})"
        ) from exc
    return SnapshotManifest(resolved.checkpoint_id, tuple(entries))
