"""The cache's view of the content-addressed store: which models have a complete snapshot.

A model id is on disk in the store when it is a ref that the store's ref index maps to a
complete snapshot, or when it is itself the digest (``blake3:<hex>``) of one. The store is the
authority: a snapshot it evicted is simply no longer there.

Without a store given, the view opens ``<cache dir>/cas`` lazily. Queries never create it (a
cache dir nobody has downloaded into yet means nothing is on disk); only
:meth:`StoreView.ensure_space` (preparing a download) and :meth:`StoreView.opened` do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

from gen_worker.config.parse import read, string
from gen_worker.models.manifest import DIGEST_PREFIX
from gen_worker.models.store import Store

__all__ = ["CACHE_DIR_VARIABLE", "StoreView", "default_cache_dir"]

CACHE_DIR_VARIABLE = "TENSORHUB_CACHE_DIR"


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """``TENSORHUB_CACHE_DIR``, else ``~/.cache/tensorhub`` (nothing is created)."""
    configured = read(environ, CACHE_DIR_VARIABLE, string)
    return Path(configured or "~/.cache/tensorhub").expanduser()


class StoreView:
    """The store, given or opened on first need, and the questions the cache asks it."""

    def __init__(self, store: Store | None, cache_dir: str | os.PathLike[str] | None) -> None:
        self._store = store
        self._cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self._open_lock = threading.Lock()

    def root(self) -> Path:
        """Where the store is, or will be once something is downloaded."""
        if self._store is not None:
            return self._store.root
        return self._cache_root() / "cas"

    def _cache_root(self) -> Path:
        if self._cache_dir is None:
            self._cache_dir = default_cache_dir(os.environ)
        return self._cache_dir

    def opened(self) -> Store:
        """The store, opened (and its directories created) if it is not yet."""
        with self._open_lock:
            if self._store is None:
                self._store = Store(self.root())
            return self._store

    def existing(self) -> Store | None:
        """The store if it exists; ``None`` when nothing was ever stored under the cache dir."""
        if self._store is not None or self.root().is_dir():
            return self.opened()
        return None

    def has(self, model_id: str) -> bool:
        """Whether the store holds a complete snapshot of ``model_id`` (a ref or a digest)."""
        store = self.existing()
        if store is None:
            return False
        digest = model_id if model_id.startswith(DIGEST_PREFIX) else store.get_ref(model_id)
        return digest is not None and _complete(store, digest)

    def complete_refs(self) -> list[str]:
        """Every ref in the store's index whose snapshot is complete."""
        store = self.existing()
        if store is None:
            return []
        return [ref for ref, digest in store.refs().items() if _complete(store, digest)]

    def ensure_space(self, needed_bytes: int) -> None:
        """Make ``needed_bytes`` fit in the store (its LRU eviction of snapshots not in use);
        ``InsufficientDiskError`` when it cannot. Opens (creates) the store if need be."""
        self.opened().ensure_space(needed_bytes)


def _complete(store: Store, digest: str) -> bool:
    try:
        return store.has_snapshot(digest)
    except ValueError:  # "blake3:" and then no digest (a hand-edited index): not a snapshot
        return False
