"""How the engine obtains model parameters: a narrow interface the model subsystem implements.

The engine asks two questions per model parameter, so it can time and report them apart:
*which* model (``resolve``: the FIXED key or the PAYLOAD selection to a model id) and *give me
it loaded* (``load``). A provider may also keep what a request uses from being evicted or used
by another request at the same time: ``lock`` (after every load of a request) and ``release``
(once the request's function has really stopped), keyed by the request's run object.

:class:`InProcessModels` serves objects registered in-process (tests, notebooks); the model
cache over the store and the loaders (:mod:`gen_worker.injection`) is the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from gen_worker.authoring import FunctionSpec, InjectionSpec, ModelRefSource, selected_key
from gen_worker.errors import FatalError

__all__ = ["InProcessModels", "LoadRequest", "ModelProvider", "selected_key"]


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One model parameter of one request, as a provider's ``load`` receives it."""

    model_id: str
    injection: InjectionSpec
    device: str
    function_name: str
    #: The request's run: what ``lock``/``release`` key their bookkeeping by.
    holder: object
    #: What the scheduler resolved for this request (ref -> snapshot digest and files).
    resolved: Mapping[str, Any] = field(default_factory=dict)
    #: The request's event sink (download and ladder events belong to the request).
    emit: Callable[[str, dict[str, Any]], None] = lambda _type, _payload: None


class ModelProvider(Protocol):
    async def resolve(
        self, spec: FunctionSpec, injection: InjectionSpec, payload: msgspec.Struct
    ) -> str:
        """The model id (canonical ref) for this parameter; ValidationError for a bad choice."""
        ...

    async def load(self, request: LoadRequest) -> Any:
        """The loaded model object, of the parameter's annotated type."""
        ...


# Optional on a provider:
# * ``cache_state(model_id) -> "hot_vram" | "warm_disk" | "cold_remote"``, asked before
#   loading; it becomes ``metrics.job``'s ``cache_state``;
# * ``async lock(holder, model_ids)`` and ``release(holder)``: see the module docstring;
# * ``escalate(obj, emit) -> bool``: one low-VRAM step for an injected object after an OOM.


class InProcessModels:
    """Models registered as live objects: ``fixed`` by [models] key, ``selectable`` per function."""

    def __init__(
        self,
        fixed: Mapping[str, Any] | None = None,
        selectable: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._fixed = dict(fixed or {})
        self._selectable = {fn: dict(keys) for fn, keys in (selectable or {}).items()}
        self._objects: dict[str, Any] = {f"fixed:{k}": v for k, v in self._fixed.items()}
        for fn, keys in self._selectable.items():
            self._objects.update({f"{fn}:{k}": v for k, v in keys.items()})

    async def resolve(
        self, spec: FunctionSpec, injection: InjectionSpec, payload: msgspec.Struct
    ) -> str:
        if injection.source is ModelRefSource.FIXED:
            if injection.key not in self._fixed:
                raise FatalError(f"no model is registered for [models] key '{injection.key}'")
            return f"fixed:{injection.key}"
        allowed = self._selectable.get(spec.name, {})
        return f"{spec.name}:{selected_key(spec, injection, payload, allowed)}"

    async def load(self, request: LoadRequest) -> Any:
        return self._objects[request.model_id]

    def cache_state(self, model_id: str) -> str:
        return "hot_vram"  # live objects in this process: nothing to fetch or load
