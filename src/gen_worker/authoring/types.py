"""Payload and output types with a meaning the runtime understands.

* :class:`Asset` is a file: in a payload it is an input the worker fetches before the call
  (``asset.local_path`` is then set); returned by ``ctx.save_*`` it is a persisted output.
* :class:`Tensors` is a weight artifact written by a conversion or training function.
* :class:`SourceRepo`, :class:`DestinationRepo` and :class:`OutputSpec` are the reserved
  payload fields of conversion endpoints (``source``, ``destination``, ``outputs``).
"""

from __future__ import annotations

import msgspec

__all__ = ["Asset", "DestinationRepo", "OutputSpec", "SourceRepo", "Tensors"]


class Asset(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A file, given by hub ``ref`` or ``url`` in a payload, or described after it was saved."""

    #: Hub file ref, e.g. ``jobs/<request_id>/outputs/image.png``.
    ref: str | None = None
    #: ``http(s)`` URL of an input file.
    url: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    blake3: str | None = None
    mime_type: str | None = None
    #: Where the file is on this machine. Set by the worker; a caller-supplied value is
    #: never trusted as a path to read.
    local_path: str | None = None


class Tensors(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A saved weight artifact (for example one safetensors file of a converted checkpoint)."""

    ref: str
    format: str = "safetensors"
    size_bytes: int | None = None
    sha256: str | None = None
    blake3: str | None = None
    #: The flavor this artifact is published as (``bf16``, ``fp8`` ...), when it has one.
    flavor: str | None = None


class SourceRepo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The model a conversion reads; the worker materialises it before the call."""

    #: A model ref: ``owner/repo[:tag][#flavor]``, ``owner/repo@blake3:<hex>``, ``hf:owner/repo``.
    ref: str
    #: The snapshot directory on this machine, set by the worker.
    local_path: str | None = None


class DestinationRepo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where a conversion publishes its checkpoint, and which tags then point at it."""

    #: ``owner/repo``.
    repo: str
    tags: list[str] = msgspec.field(default_factory=lambda: ["latest"])


class OutputSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One artifact a conversion is asked to produce."""

    flavor: str
    format: str = "safetensors"
    dtype: str | None = None
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
