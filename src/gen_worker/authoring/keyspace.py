"""The model a PAYLOAD parameter selects: a key of the function's keyspace, never a ref.

Shared by every model provider (in-process objects, the model cache) so that the rule and its
message are one: a caller names one of the keys ``[models.<function>]`` declares, and a value
outside them is the caller's error listing what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from gen_worker.authoring.spec import FunctionSpec, InjectionSpec
from gen_worker.errors import ValidationError

__all__ = ["selected_key"]


def selected_key(
    spec: FunctionSpec,
    injection: InjectionSpec,
    payload: msgspec.Struct,
    allowed: Mapping[str, Any],
) -> str:
    """The key a PAYLOAD parameter selects; a value outside ``allowed`` is a ValidationError."""
    value = getattr(payload, injection.key)
    if not isinstance(value, str) or value not in allowed:
        raise ValidationError(
            f"{injection.key}={value!r} is not a model of function '{spec.name}'; "
            f"choose one of {sorted(allowed)}"
        )
    return value
