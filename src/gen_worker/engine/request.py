"""What the engine needs to know about one request besides its payload."""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = ["Codec", "RequestMeta"]


class Codec(enum.Enum):
    """How payloads, deltas and outputs are encoded: msgpack on the wire, JSON over HTTP."""

    JSON = "json"
    MSGPACK = "msgpack"


class RequestMeta(msgspec.Struct, kw_only=True, frozen=True):
    request_id: str
    job_id: str | None = None
    owner: str | None = None
    invoker_id: str | None = None
    release_id: str | None = None
    parent_request_id: str | None = None
    child_request_id: str | None = None
    item_id: str | None = None
    item_index: int | None = None
    #: The caller's deadline; None falls back to the function's ``timeout_s``.
    timeout_ms: int | None = None
    required_models: tuple[str, ...] = ()
    resolved_models: dict[str, Any] = {}
    codec: Codec = Codec.JSON
    device: str = "cpu"
    #: The job's file API (outputs are uploaded there) and its bearer token; None: local.
    file_base_url: str | None = None
    file_token: str | None = None
