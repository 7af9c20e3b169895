"""URL rules for input downloads: allowed schemes, public hosts only, and safe display.

An input URL comes from the caller, so a download is a request the caller makes from inside
the worker's network. Only ``http(s)`` is allowed and, unless the dev runner allows local
hosts, every address the host resolves to must be public (no loopback, private, link-local
such as the cloud metadata service, reserved, multicast or unspecified address).

A URL's query string may be a presigned signature: messages show ``scheme://host/path`` only
(see :func:`display_url`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from gen_worker.errors import RetryableError, ValidationError

__all__ = ["check_public_host", "display_url", "is_public_address", "parse_input_url", "safe_name"]

_ALLOWED_SCHEMES = ("http", "https")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME_CHARS = 100
_MAX_SHOWN_PATH = 200
_NOT_PUBLIC_FLAGS = (
    "is_loopback",
    "is_private",
    "is_link_local",
    "is_reserved",
    "is_multicast",
    "is_unspecified",
)
# getaddrinfo errors that mean "this name does not exist", as opposed to a DNS outage.
_NO_SUCH_HOST = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


if TYPE_CHECKING:
    import httpx  # imported where used: it is slow to import (see files/assets.py)


def display_url(url: httpx.URL) -> str:
    """``scheme://host[:port]/path``: no credentials, no query string, no fragment."""
    port = f":{url.port}" if url.port is not None else ""
    path = url.path
    if len(path) > _MAX_SHOWN_PATH:
        path = path[:_MAX_SHOWN_PATH] + "..."
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}{path}"


def parse_input_url(text: str) -> httpx.URL:
    import httpx  # noqa: PLC0415  # deferred: slow to import

    """Parse an input URL with httpx's own parser (the one that will fetch it), http(s) only.

    Using the fetching client's parser means the host checked is the host contacted.
    """
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValidationError("input URL is not a valid URL; an http(s) URL is required") from exc
    if url.scheme not in _ALLOWED_SCHEMES:
        raise ValidationError(
            f"input URL scheme {url.scheme!r} is not supported; an http(s) URL is required"
        )
    if not url.host:
        raise ValidationError(f"input URL {display_url(url)} has no host")
    return url


def is_public_address(address: str) -> bool:
    """True when ``address`` (an IP literal, optionally with ``%scope``) is publicly routable."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    for candidate in (ip, mapped):
        if candidate is None:
            continue
        if any(getattr(candidate, flag) for flag in _NOT_PUBLIC_FLAGS):
            return False
        # is_global also rules out ranges such as carrier-grade NAT (100.64.0.0/10).
        if not candidate.is_global:
            return False
    return True


async def check_public_host(url: httpx.URL) -> None:
    """Refuse ``url`` unless every address its host resolves to is public.

    The client resolves the name again when it connects, so a hostile DNS server could
    still answer differently then; this check stops the common case (a URL naming an
    internal host or address), not DNS rebinding.
    """
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_HOST:
            raise ValidationError(f"input URL {display_url(url)}: host not found") from exc
        raise RetryableError(f"input URL {display_url(url)}: could not resolve the host") from exc
    addresses = {str(info[4][0]) for info in infos}
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise ValidationError(
            f"input URL {display_url(url)} resolves to a private address; "
            "only public hosts are allowed"
        )


def safe_name(url: httpx.URL, default: str = "input") -> str:
    """A file name from the last segment of the URL path, limited to ``[A-Za-z0-9._-]``."""
    name = _UNSAFE_NAME_CHARS.sub("_", PurePosixPath(url.path).name)
    # Leading dots would hide the file, and "." or ".." would name a directory.
    name = name[-_MAX_NAME_CHARS:].lstrip(".")
    return name or default
