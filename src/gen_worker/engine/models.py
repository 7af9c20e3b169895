"""How the engine obtains model parameters: a narrow interface the model subsystem implements.

The engine asks two questions per model parameter, so it can time and report them apart:
*which* model (``resolve``: the FIXED key or the PAYLOAD selection to a model id) and *give me
it loaded* (``load``). :class:`InProcessModels` serves objects registered in-process (tests,
notebooks); :class:`LocalModels` resolves against the endpoint's declared models and loads
snapshot directories from local folders (the dev runner's ``--model REF=DIR``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec

from gen_worker.authoring import FunctionSpec, InjectionSpec, ModelRefSource
from gen_worker.errors import FatalError, ValidationError

__all__ = ["InProcessModels", "LocalModels", "ModelProvider", "selected_key"]


class ModelProvider(Protocol):
    async def resolve(
        self, spec: FunctionSpec, injection: InjectionSpec, payload: msgspec.Struct
    ) -> str:
        """The model id (canonical ref) for this parameter; ValidationError for a bad choice."""
        ...

    async def load(self, model_id: str, injection: InjectionSpec, device: str) -> Any:
        """The loaded model object, of the parameter's annotated type."""
        ...


# Optional on a provider: ``cache_state(model_id) -> "hot_vram" | "warm_disk" | "cold_remote"``,
# asked before loading; it becomes ``metrics.job``'s ``cache_state``.


def selected_key(
    spec: FunctionSpec,
    injection: InjectionSpec,
    payload: msgspec.Struct,
    allowed: Mapping[str, Any],
) -> str:
    """The key a PAYLOAD parameter selects; a value outside ``allowed`` is the caller's error."""
    value = getattr(payload, injection.key)
    if value not in allowed:
        raise ValidationError(
            f"{injection.key}={value!r} is not a model of function '{spec.name}'; "
            f"choose one of {sorted(allowed)}"
        )
    return str(value)


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

    async def load(self, model_id: str, injection: InjectionSpec, device: str) -> Any:
        return self._objects[model_id]

    def cache_state(self, model_id: str) -> str:
        return "hot_vram"  # live objects in this process: nothing to fetch or load


class LocalModels:
    """Models declared in endpoint.lock, loaded from local snapshot folders.

    ``declared`` maps [models] keys to refs and ``keyspaces`` maps function slugs to their
    keys and refs; ``folders`` maps a ref (or a [models] key) to a directory on this machine.
    """

    def __init__(
        self,
        declared: Mapping[str, str],
        keyspaces: Mapping[str, Mapping[str, str]],
        folders: Mapping[str, Path],
    ) -> None:
        self._declared = dict(declared)
        self._keyspaces = {fn: dict(keys) for fn, keys in keyspaces.items()}
        self._folders = dict(folders)

    async def resolve(
        self, spec: FunctionSpec, injection: InjectionSpec, payload: msgspec.Struct
    ) -> str:
        if injection.source is ModelRefSource.FIXED:
            ref = self._declared.get(injection.key)
            if ref is None:
                raise FatalError(f"endpoint.lock declares no [models] key '{injection.key}'")
            return ref
        keyspace = self._keyspaces.get(spec.name, {})
        return keyspace[selected_key(spec, injection, payload, keyspace)]

    async def load(self, model_id: str, injection: InjectionSpec, device: str) -> Any:
        folder = self._folders.get(model_id)
        if folder is None:
            raise FatalError(
                f"model {model_id} is not available on this machine; pass "
                f"--model {model_id}=DIR with its snapshot folder"
            )
        return load_from_folder(folder, injection.type)

    def cache_state(self, model_id: str) -> str:
        return "warm_disk" if model_id in self._folders else "cold_remote"


def load_from_folder(folder: Path, target: Any) -> Any:
    """A snapshot folder as the annotated type: the path itself, or ``T.from_pretrained``."""
    if target in (Path, str, object, Any):
        return folder if target is not str else str(folder)
    loader = getattr(target, "from_pretrained", None)
    if inspect.isclass(target) and callable(loader):
        return loader(str(folder))
    raise FatalError(
        f"cannot load a model as {getattr(target, '__qualname__', target)!r}: annotate the "
        "parameter as Path, str, or a class with a from_pretrained(path) classmethod"
    )
