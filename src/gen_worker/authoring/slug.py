"""URL-safe slugs for endpoint and function names.

``medasr_transcribe`` becomes ``medasr-transcribe``.
"""

from __future__ import annotations

import re

__all__ = ["MAX_SLUG_LENGTH", "slugify"]

MAX_SLUG_LENGTH = 128

_OUTSIDE_ALPHABET = re.compile(r"[^a-z0-9.]")
_DASH_RUNS = re.compile(r"-{2,}")


def slugify(text: str) -> str:
    """Return the slug of ``text``; empty when nothing slug-worthy is left.

    Lower-case; every character outside ``[a-z0-9.]`` (``_`` included) becomes ``-``; runs of
    ``-`` collapse; leading and trailing ``-`` and ``.`` are trimmed; at most 128 characters.
    """
    slug = _OUTSIDE_ALPHABET.sub("-", text.lower())
    slug = _DASH_RUNS.sub("-", slug).strip("-.")
    # Trim again after truncation so a cut never leaves a trailing separator.
    return slug[:MAX_SLUG_LENGTH].strip("-.")
