"""The in-process cache of live models: which are hot in VRAM, on disk, downloading, loading.

VRAM is an LRU under a budget (see :mod:`gen_worker.model_cache.budget`). A model in use by a
running request (between :meth:`ModelCache.acquire` and :meth:`ModelCache.release`) is never
evicted; evicting a model from VRAM keeps what is known about it on disk. Used VRAM is always
the sum of the sizes of the hot entries, in whole bytes, computed from the entries themselves.

One lock guards the state; the ``on_evict`` callback and the disk (the store) are reached
outside it, so a slow callback or a slow disk never stalls another thread's cache hit.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gen_worker.errors import ModelInUseError
from gen_worker.logs import log
from gen_worker.model_cache.budget import BYTES_PER_GB, VramBudget, gb_to_bytes
from gen_worker.model_cache.disk import StoreView
from gen_worker.models.store import Store

__all__ = ["CacheState", "ModelCache"]

CacheState = Literal["hot_vram", "warm_disk", "cold_remote"]
EvictCallback = Callable[[str, Any], None]


@dataclass(slots=True)
class _Hot:
    obj: Any
    size_bytes: int
    uses: int = 0


@dataclass(frozen=True, slots=True)
class _OnDisk:
    path: Path
    size_bytes: int


def _gb(size_bytes: int) -> float:
    return size_bytes / BYTES_PER_GB


def _check_id(model_id: str) -> None:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model id is {model_id!r}; expected a non-empty string")


class ModelCache:
    """Where each model of this worker is: hot in VRAM, warm on disk, downloading, loading.

    ``max_vram_gb`` (else ``WORKER_MAX_VRAM_GB``) caps the VRAM that cached models may fill;
    without it the budget is the device's total VRAM less ``vram_safety_margin_gb`` (else
    ``WORKER_VRAM_SAFETY_MARGIN_GB``, else 3.5). ``vram_probe`` returns the total in bytes
    (default: CUDA device 0 through torch, 0 without torch or CUDA). On a CPU-only host with no
    explicit budget the budget is unlimited (``None``): models then live in RAM and nothing is
    evicted for space.

    The disk side is ``store`` or the store under ``model_cache_dir`` (else
    ``TENSORHUB_CACHE_DIR``, else ``~/.cache/tensorhub``), opened on first need: constructing
    a cache never touches the disk. ``on_evict(model_id, obj)`` is called, outside the cache's
    lock, for every object that leaves VRAM (eviction or unload), so its owner can free it.
    """

    def __init__(
        self,
        max_vram_gb: float | None = None,
        vram_safety_margin_gb: float | None = None,
        model_cache_dir: str | os.PathLike[str] | None = None,
        *,
        vram_probe: Callable[[], int] | None = None,
        store: Store | None = None,
        on_evict: EvictCallback | None = None,
    ) -> None:
        self._budget = VramBudget(max_vram_gb, vram_safety_margin_gb, vram_probe, os.environ)
        self._disk_view = StoreView(store, model_cache_dir)
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._hot: OrderedDict[str, _Hot] = OrderedDict()  # least recently used first
        self._disk: dict[str, _OnDisk] = {}
        self._downloading: dict[str, float] = {}
        self._loading: set[str] = set()
        self._evictions = 0

    # -- VRAM --------------------------------------------------------------------------------

    def mark_loaded_to_vram(
        self, model_id: str, pipeline: Any, size_gb: float, *, acquire: bool = False
    ) -> list[str]:
        """Record ``pipeline`` as hot (most recently used), then evict least-recently-used
        models not in use until the budget holds; returns the evicted ids.

        Never refuses: the object is already loaded. If it still does not fit (everything else
        is in use), ``get_stats()["over_budget"]`` says so until room is made. Marking an id
        again replaces its object and size. ``acquire=True`` also takes one use, atomically,
        so no other thread's eviction can come between the load and its first use.
        """
        _check_id(model_id)
        size = gb_to_bytes(size_gb, f"size of model {model_id!r}")
        budget = self._budget.budget_bytes()
        dropped: list[tuple[str, Any]] = []
        with self._lock:
            old = self._hot.pop(model_id, None)
            uses = 0 if old is None else old.uses
            # A replaced object still used by a running request is left to it, not freed.
            if old is not None and old.obj is not pipeline and old.uses == 0:
                dropped.append((model_id, old.obj))
            self._hot[model_id] = _Hot(pipeline, size, uses + (1 if acquire else 0))
            self._loading.discard(model_id)
            victims = self._evict_locked(0, budget, keep=model_id)
        self._notify(dropped + victims)
        return [victim for victim, _ in victims]

    def is_in_vram(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._hot

    def get_pipeline(self, model_id: str) -> Any | None:
        """The live object of a hot model (marking it most recently used), else ``None``."""
        with self._lock:
            entry = self._hot.get(model_id)
            if entry is None:
                return None
            self._hot.move_to_end(model_id)
            return entry.obj

    def get_vram_models(self) -> list[str]:
        """Hot model ids, least recently used first."""
        with self._lock:
            return list(self._hot)

    def unload_from_vram(self, model_id: str, keep_on_disk: bool = True) -> bool:
        """Drop a hot model (``on_evict`` is called); ``False`` if it was not hot.

        ``ModelInUseError`` while a request uses it. ``keep_on_disk=False`` also forgets what
        was marked about it on disk (files are never deleted; the store still knows them).
        """
        with self._lock:
            entry = self._hot.get(model_id)
            if entry is not None and entry.uses:
                raise ModelInUseError(model_id, entry.uses)
            if not keep_on_disk:
                self._disk.pop(model_id, None)
            if entry is None:
                return False
            del self._hot[model_id]
        self._notify([(model_id, entry.obj)])
        return True

    def unload_model(self, model_id: str) -> bool:
        """Forget everything this process knows about a model (VRAM, disk marks, downloading,
        loading); ``False`` if it knew nothing. ``ModelInUseError`` while a request uses it."""
        with self._lock:
            entry = self._hot.get(model_id)
            if entry is not None and entry.uses:
                raise ModelInUseError(model_id, entry.uses)
            known = (
                self._hot.pop(model_id, None) is not None,
                self._disk.pop(model_id, None) is not None,
                self._downloading.pop(model_id, None) is not None,
                model_id in self._loading,
            )
            self._loading.discard(model_id)
        if entry is not None:
            self._notify([(model_id, entry.obj)])
        return any(known)

    def can_fit_in_vram(self, size_gb: float) -> bool:
        """Whether ``size_gb`` fits in the budget once every model not in use is evicted."""
        size = gb_to_bytes(size_gb, "size_gb")
        budget = self._budget.budget_bytes()
        if budget is None:
            return True
        with self._lock:
            pinned = sum(e.size_bytes for e in self._hot.values() if e.uses)
        return size <= budget - pinned

    def free_vram_gb(self) -> float | None:
        """What the budget leaves free now; ``None`` when unlimited."""
        budget = self._budget.budget_bytes()
        if budget is None:
            return None
        with self._lock:
            used = self._used_locked()
        return _gb(max(budget - used, 0))

    def make_room(self, size_gb: float) -> list[str]:
        """Evict least-recently-used models not in use until ``size_gb`` fits in the free
        budget, or nothing evictable is left; returns the evicted ids (``on_evict`` called)."""
        size = gb_to_bytes(size_gb, "size_gb")
        budget = self._budget.budget_bytes()
        with self._lock:
            victims = self._evict_locked(size, budget, keep=None)
        self._notify(victims)
        return [victim for victim, _ in victims]

    # -- in use ------------------------------------------------------------------------------

    def acquire(self, model_id: str) -> Any:
        """Take one use of a hot model and return its live object; it is not evicted until
        every use is released. ``KeyError`` when it is not hot."""
        with self._lock:
            entry = self._hot.get(model_id)
            if entry is None:
                raise KeyError(
                    f"model {model_id!r} is not loaded in VRAM; load it (mark_loaded_to_vram) "
                    f"before using it; hot models: {sorted(self._hot)}"
                )
            entry.uses += 1
            self._hot.move_to_end(model_id)
            return entry.obj

    def release(self, model_id: str) -> None:
        """Give back one use taken by :meth:`acquire`. When the last use of an over-budget
        cache is released, least-recently-used models not in use are evicted until it fits."""
        budget = self._budget.budget_bytes()
        with self._lock:
            entry = self._hot.get(model_id)
            if entry is None or entry.uses == 0:
                raise ValueError(
                    f"model {model_id!r} is not in use; release only what acquire() returned, "
                    "once per acquire"
                )
            entry.uses -= 1
            victims = [] if entry.uses else self._evict_locked(0, budget, keep=None)
        self._notify(victims)

    @contextmanager
    def using(self, model_id: str) -> Iterator[Any]:
        """``acquire`` for the duration of a ``with`` block; yields the live object."""
        obj = self.acquire(model_id)
        try:
            yield obj
        finally:
            self.release(model_id)

    def is_in_use(self, model_id: str) -> bool:
        with self._lock:
            entry = self._hot.get(model_id)
            return entry is not None and entry.uses > 0

    # -- disk, downloads, loads --------------------------------------------------------------

    def mark_cached_to_disk(
        self, model_id: str, disk_path: str | os.PathLike[str], size_gb: float
    ) -> None:
        """Record that the model's files are at ``disk_path``; ends its downloading state."""
        _check_id(model_id)
        size = gb_to_bytes(size_gb, f"size of model {model_id!r}")
        with self._lock:
            self._disk[model_id] = _OnDisk(Path(disk_path), size)
            self._downloading.pop(model_id, None)

    def mark_downloading(self, model_id: str, progress: float) -> None:
        """Record a download in progress; ``progress`` is clamped to [0, 1]."""
        _check_id(model_id)
        if isinstance(progress, bool) or not isinstance(progress, int | float):
            raise ValueError(f"download progress of {model_id!r} is {progress!r}; expected 0..1")
        if math.isnan(progress):
            raise ValueError(f"download progress of {model_id!r} is NaN; expected 0..1")
        with self._lock:
            self._downloading[model_id] = min(max(float(progress), 0.0), 1.0)

    def clear_downloading(self, model_id: str) -> None:
        with self._lock:
            self._downloading.pop(model_id, None)

    def mark_loading(self, model_id: str) -> None:
        _check_id(model_id)
        with self._lock:
            self._loading.add(model_id)

    def clear_loading(self, model_id: str) -> None:
        with self._lock:
            self._loading.discard(model_id)

    def get_downloading_models(self) -> dict[str, float]:
        with self._lock:
            return dict(sorted(self._downloading.items()))

    def get_loading_models(self) -> list[str]:
        with self._lock:
            return sorted(self._loading)

    def is_on_disk(self, model_id: str) -> bool:
        """Whether the model's files are on disk: where they were marked to be (if they still
        are), or a complete snapshot in the store (by ref, or by digest)."""
        with self._lock:
            mark = self._disk.get(model_id)
        if mark is not None and mark.path.exists():
            return True
        if self._disk_view.has(model_id):
            return True
        if mark is not None:
            self._forget_stale(model_id, mark)
        return False

    def has_model(self, model_id: str) -> bool:
        """Hot in VRAM or on disk."""
        return self.is_in_vram(model_id) or self.is_on_disk(model_id)

    def get_disk_models(self) -> list[str]:
        """Model ids on disk, sorted: those marked (whose files are still there) and the refs
        of the store's complete snapshots."""
        with self._lock:
            marks = dict(self._disk)
        present = set(self._disk_view.complete_refs())
        for model_id, mark in marks.items():
            if model_id in present or mark.path.exists() or self._disk_view.has(model_id):
                present.add(model_id)
            else:
                self._forget_stale(model_id, mark)
        return sorted(present)

    def ensure_disk_space(self, needed_bytes: int) -> None:
        """Make ``needed_bytes`` fit on disk: the store evicts least-recently-used snapshots
        not in use, or raises ``InsufficientDiskError`` having evicted nothing."""
        self._disk_view.ensure_space(needed_bytes)
        self.get_disk_models()  # forgets the marks of snapshots just evicted

    def _forget_stale(self, model_id: str, mark: _OnDisk) -> None:
        # Only the mark that was checked: a newer one (a fresh download) stays.
        with self._lock:
            if self._disk.get(model_id) is mark:
                del self._disk[model_id]

    # -- reporting ---------------------------------------------------------------------------

    def cache_state(self, model_id: str) -> CacheState:
        """``hot_vram``, ``warm_disk`` or ``cold_remote`` (what ``metrics.job`` reports)."""
        if self.is_in_vram(model_id):
            return "hot_vram"
        if self.is_on_disk(model_id):
            return "warm_disk"
        return "cold_remote"

    def inventory(self) -> dict[str, list[str]]:
        """What registration and heartbeats report: hot, warm (on disk, not hot),
        downloading and loading model ids, each sorted."""
        disk = self.get_disk_models()
        with self._lock:
            hot = sorted(self._hot)
            downloading = sorted(self._downloading)
            loading = sorted(self._loading)
        warm = [model_id for model_id in disk if model_id not in hot]
        return {"hot": hot, "warm": warm, "downloading": downloading, "loading": loading}

    def get_stats(self) -> dict[str, Any]:
        """Budget, usage and states, JSON-encodable. ``budget_gb`` and ``free_vram_gb`` are
        ``None`` when unlimited; ``evictions`` counts models evicted to make room."""
        total = self._budget.total_bytes()
        budget = self._budget.budget_bytes()
        disk = self.get_disk_models()
        with self._lock:
            used = self._used_locked()
            stats: dict[str, Any] = {
                "total_vram_gb": _gb(total),
                "budget_gb": None if budget is None else _gb(budget),
                "used_vram_gb": _gb(used),
                "free_vram_gb": None if budget is None else _gb(max(budget - used, 0)),
                "vram_models": list(self._hot),
                "disk_models": disk,
                "downloading": dict(sorted(self._downloading.items())),
                "loading": sorted(self._loading),
                "in_use": {mid: e.uses for mid, e in self._hot.items() if e.uses},
                "over_budget": budget is not None and used > budget,
                "evictions": self._evictions,
            }
        return stats

    # -- internals ---------------------------------------------------------------------------

    def _used_locked(self) -> int:
        return sum(entry.size_bytes for entry in self._hot.values())

    def _evict_locked(
        self, needed_bytes: int, budget: int | None, keep: str | None
    ) -> list[tuple[str, Any]]:
        """Remove LRU entries not in use (never ``keep``) until ``needed_bytes`` more fit."""
        if budget is None:
            return []
        used = self._used_locked()
        victims: list[tuple[str, Any]] = []
        for model_id, entry in list(self._hot.items()):
            if used + needed_bytes <= budget:
                break
            if entry.uses or model_id == keep:
                continue
            del self._hot[model_id]
            used -= entry.size_bytes
            victims.append((model_id, entry.obj))
        self._evictions += len(victims)
        return victims

    def _notify(self, gone: list[tuple[str, Any]]) -> None:
        if self._on_evict is None:
            return
        for model_id, obj in gone:
            try:
                self._on_evict(model_id, obj)
            except Exception as exc:  # the model has left the cache anyway; free the rest too
                log(
                    "warning",
                    "the on_evict callback failed",
                    model_id=model_id,
                    error=f"{type(exc).__name__}: {exc}",
                )
