"""Building the model provider an endpoint needs, for the worker and the dev runner alike."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gen_worker.authoring import FunctionSpec
from gen_worker.config import ModelSettings
from gen_worker.discovery import EndpointLock
from gen_worker.injection.provider import CachedModels
from gen_worker.injection.snapshots import SnapshotFinder
from gen_worker.model_cache import ModelCache
from gen_worker.models.source import ModelSource

__all__ = ["build_cached_models", "detect_device"]

Emit = Callable[[str, dict[str, Any]], None]


def detect_device() -> str:
    """``cuda:0`` when torch is installed and sees a GPU, else ``cpu``.

    Asked only by endpoints that inject models: importing torch costs seconds.
    """
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch  # noqa: PLC0415

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def build_cached_models(
    lock: EndpointLock,
    functions: Sequence[FunctionSpec],
    *,
    settings: ModelSettings,
    source: Callable[[], ModelSource] | None,
    allow_hub: bool,
    device: str,
    folders: Mapping[str, Path] | None = None,
    on_event: Emit | None = None,
    cache: ModelCache | None = None,
) -> CachedModels:
    """The provider for ``lock``'s models: keyspaces and attributes from the lock."""
    declared = {key: model.ref for key, model in lock.models.items()}
    keyspaces = {
        fn: {key: model.ref for key, model in keys.items()}
        for fn, keys in lock.models_by_function.items()
    }
    attributes: dict[str, dict[str, list[str]]] = {}
    every = [*lock.models.values()]
    every += [m for keys in lock.models_by_function.values() for m in keys.values()]
    for model in every:
        if model.attributes:
            attributes.setdefault(model.ref, dict(model.attributes))
    finder = SnapshotFinder(source, folders=folders, allow_hub=allow_hub, attributes=attributes)
    provider: CachedModels | None = None

    def forget(key: str, obj: Any) -> None:
        if provider is not None:
            provider.forget(key, obj)

    if cache is None:
        cache = ModelCache(model_cache_dir=settings.cache_dir, on_evict=forget)
    provider = CachedModels(
        cache,
        finder,
        declared=declared,
        keyspaces=keyspaces,
        functions=functions,
        on_event=on_event,
        device=device,
    )
    return provider
