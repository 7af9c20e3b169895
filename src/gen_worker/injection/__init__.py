"""Model injection: the engine's model provider over the model cache, the store and loaders."""

from gen_worker.injection.build import build_cached_models, detect_device
from gen_worker.injection.loaders import Loaded, load_snapshot, loader_kind
from gen_worker.injection.provider import CachedModels, cache_key, ref_of_key
from gen_worker.injection.snapshots import SnapshotFinder, manifest_from_resolution

__all__ = [
    "CachedModels",
    "Loaded",
    "SnapshotFinder",
    "build_cached_models",
    "cache_key",
    "detect_device",
    "load_snapshot",
    "loader_kind",
    "manifest_from_resolution",
    "ref_of_key",
]
