"""The in-process cache of live models (SPEC 13.4): ``from gen_worker.model_cache import
ModelCache``.

* :mod:`~gen_worker.model_cache.cache`: :class:`ModelCache`, the VRAM LRU with models in use
  pinned, and the hot/warm/cold, downloading and loading states the worker reports;
* :mod:`~gen_worker.model_cache.budget`: the VRAM budget rules and the device probe;
* :mod:`~gen_worker.model_cache.disk`: the cache's view of the content-addressed store.
"""

from __future__ import annotations

from gen_worker.model_cache.budget import BYTES_PER_GB, cuda_total_vram_bytes
from gen_worker.model_cache.cache import CacheState, ModelCache

__all__ = ["BYTES_PER_GB", "CacheState", "ModelCache", "cuda_total_vram_bytes"]
