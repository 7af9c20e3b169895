"""Find the :class:`Asset` objects inside a payload or an output.

The engine uses this twice per request: on the decoded payload, to fetch the input files
before the call, and on the returned value, to upload or copy the outputs it names.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from gen_worker.authoring import Asset

__all__ = ["find_assets"]


def _children(value: object) -> Iterable[object]:
    """The values directly inside ``value``, in field or item order."""
    if isinstance(value, msgspec.Struct):
        return [getattr(value, name) for name in value.__struct_fields__]
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    return ()


def find_assets(value: object) -> list[Asset]:
    """Every Asset inside ``value``: the value itself, ``msgspec.Struct`` fields (recursively),
    list/tuple/set items and dict values.

    Order is depth-first in field order; each Asset object appears once (by identity). An
    explicit stack instead of recursion, and a visited set over containers, so a deeply
    nested or self-referencing value cannot raise RecursionError or loop forever.
    """
    found: list[Asset] = []
    seen: set[int] = set()
    # ``keep`` holds every visited object so that no id() in ``seen`` is reused meanwhile.
    keep: list[object] = []
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        keep.append(item)
        if isinstance(item, Asset):
            found.append(item)
        else:
            stack.extend(reversed(list(_children(item))))
    return found
