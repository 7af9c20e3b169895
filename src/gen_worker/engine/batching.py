"""Running a batch of requests as one call, along the function's ``batch_dimension``.

Items are merged when every payload field except the batch dimension is equal (the items
differ only in their list of inputs); the output is split back per item along every list field
whose length is the merged input's length, other fields being copied to each item. A batch
that cannot be merged or split that way is reported as such, and the caller runs the items one
by one instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

__all__ = ["BatchShapeError", "merge_payloads", "split_output"]


class BatchShapeError(ValueError):
    """The items cannot be merged into one call, or the output cannot be split back."""


def merge_payloads(payloads: Sequence[msgspec.Struct], dimension: str) -> tuple[Any, list[int]]:
    """One payload holding every item's ``dimension`` list, and each item's list length."""
    if not payloads:
        raise BatchShapeError("a batch needs at least one item")
    first = payloads[0]
    rest = {k: v for k, v in msgspec.structs.asdict(first).items() if k != dimension}
    sizes: list[int] = []
    merged: list[Any] = []
    for payload in payloads:
        others = {k: v for k, v in msgspec.structs.asdict(payload).items() if k != dimension}
        if others != rest:
            raise BatchShapeError(f"items differ in fields other than {dimension!r}")
        values = getattr(payload, dimension)
        sizes.append(len(values))
        merged.extend(values)
    return msgspec.structs.replace(first, **{dimension: merged}), sizes


def split_output(output: msgspec.Struct, sizes: Sequence[int]) -> list[Any]:
    """Per-item outputs: list fields as long as the merged input are cut at the item sizes."""
    total = sum(sizes)
    values = msgspec.structs.asdict(output)
    split_fields = [k for k, v in values.items() if isinstance(v, list) and len(v) == total]
    if not split_fields:
        raise BatchShapeError(
            f"{type(output).__name__} has no list field with one entry per input ({total}); "
            "cannot split the batch's output per item"
        )
    parts = []
    start = 0
    for size in sizes:
        cut = {k: values[k][start : start + size] for k in split_fields}
        parts.append(msgspec.structs.replace(output, **cut))
        start += size
    return parts
