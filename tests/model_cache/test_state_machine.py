"""``ModelCache`` under random sequences of loads, uses, unloads and disk marks, checked step by
step against a plain model of the rules: an LRU list, sizes in bytes, use counts and disk marks.

Invariants: VRAM used is exactly the sum of the hot sizes; the budget holds unless only in-use
models (and the one just loaded) are hot, and then ``over_budget`` says so; a model in use is
never evicted; disk knowledge survives VRAM eviction; the LRU order is the model's.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gen_worker.errors import ModelInUseError
from gen_worker.model_cache import BYTES_PER_GB, ModelCache

GB = BYTES_PER_GB
IDS = st.sampled_from([f"model-{c}" for c in "abcdef"])
SIZES = st.floats(min_value=0.0, max_value=6.0, allow_nan=False) | st.sampled_from([0.5, 2.0, 4.0])


def to_bytes(size_gb: float) -> int:
    return round(size_gb * GB)


class Payload:
    """A stand-in for a pipeline: a distinct object per load, named for failure messages."""

    def __init__(self, model_id: str, n: int) -> None:
        self.name = f"{model_id}#{n}"

    def __repr__(self) -> str:
        return self.name


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="model-cache-sm-"))
        self.loads = 0
        self.evicted: list[tuple[str, Any]] = []  # what on_evict received, in order
        # The model of the rules.
        self.lru: list[str] = []  # least recently used first
        self.objs: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}
        self.uses: dict[str, int] = {}
        self.disk: dict[str, Path] = {}
        self.exempt: str | None = None  # the model just loaded: its own load never evicts it
        self.evictions = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(
        mode=st.sampled_from(["explicit", "probe", "cpu"]),
        max_gb=st.sampled_from([3.0, 6.0, 10.5]),
        total_gb=st.sampled_from([2, 8, 12, 24]),
        margin_gb=st.sampled_from([0.0, 1.5, 3.5]),
    )
    def make(self, mode: str, max_gb: float, total_gb: int, margin_gb: float) -> None:
        probe_total = 0 if mode == "cpu" else total_gb * GB
        self.budget: int | None
        if mode == "explicit":
            self.budget = to_bytes(max_gb)
        elif mode == "probe":
            self.budget = max(probe_total - to_bytes(margin_gb), 0)
        else:
            self.budget = None
        self.cache = ModelCache(
            max_vram_gb=max_gb if mode == "explicit" else None,
            vram_safety_margin_gb=margin_gb,
            model_cache_dir=self.dir / "cache",  # never created: no store, only marks
            vram_probe=lambda: probe_total,
            on_evict=lambda model_id, obj: self.evicted.append((model_id, obj)),
        )

    # -- the model's eviction rule -------------------------------------------------------------

    def used(self) -> int:
        return sum(self.sizes[m] for m in self.lru)

    def evict(self, needed: int, keep: str | None) -> list[tuple[str, Any]]:
        if self.budget is None:
            return []
        gone = []
        for model_id in list(self.lru):
            if self.used() + needed <= self.budget:
                break
            if self.uses[model_id] or model_id == keep:
                continue
            gone.append((model_id, self.objs[model_id]))
            self.forget_hot(model_id)
        self.evictions += len(gone)
        return gone

    def forget_hot(self, model_id: str) -> None:
        self.lru.remove(model_id)
        del self.objs[model_id], self.sizes[model_id], self.uses[model_id]
        if self.exempt == model_id:
            self.exempt = None

    def touch(self, model_id: str) -> None:
        self.lru.remove(model_id)
        self.lru.append(model_id)

    def expect_callbacks(self, expected: list[tuple[str, Any]]) -> None:
        assert [(m, o) for m, o in self.evicted] == expected
        for (_, got), (_, want) in zip(self.evicted, expected, strict=True):
            assert got is want
        self.evicted.clear()

    # -- rules ---------------------------------------------------------------------------------

    @rule(model_id=IDS, size_gb=SIZES, acquire=st.booleans())
    def load(self, model_id: str, size_gb: float, acquire: bool) -> None:
        self.loads += 1
        obj = Payload(model_id, self.loads)
        dropped = []
        uses = 0
        if model_id in self.objs:
            uses = self.uses[model_id]
            if uses == 0:
                dropped.append((model_id, self.objs[model_id]))
            self.forget_hot(model_id)
        self.lru.append(model_id)
        self.objs[model_id], self.sizes[model_id] = obj, to_bytes(size_gb)
        self.uses[model_id] = uses + int(acquire)
        self.exempt = model_id
        victims = self.evict(0, keep=model_id)

        evicted = self.cache.mark_loaded_to_vram(model_id, obj, size_gb, acquire=acquire)
        assert evicted == [m for m, _ in victims]
        self.expect_callbacks(dropped + victims)
        assert self.cache.get_pipeline(model_id) is obj  # a touch of the newest: no change

    @rule(model_id=IDS)
    def acquire(self, model_id: str) -> None:
        if model_id not in self.objs:
            with pytest.raises(KeyError, match="is not loaded in VRAM"):
                self.cache.acquire(model_id)
            return
        assert self.cache.acquire(model_id) is self.objs[model_id]
        self.uses[model_id] += 1
        self.touch(model_id)

    @rule(model_id=IDS)
    def release(self, model_id: str) -> None:
        if not self.uses.get(model_id):
            with pytest.raises(ValueError, match="is not in use"):
                self.cache.release(model_id)
            return
        self.uses[model_id] -= 1
        victims = [] if self.uses[model_id] else self.evict(0, keep=None)
        self.cache.release(model_id)
        self.expect_callbacks(victims)

    @rule(model_id=IDS)
    def touch_pipeline(self, model_id: str) -> None:
        got = self.cache.get_pipeline(model_id)
        if model_id in self.objs:
            assert got is self.objs[model_id]
            self.touch(model_id)
        else:
            assert got is None

    @rule(model_id=IDS, keep_on_disk=st.booleans())
    def unload_from_vram(self, model_id: str, keep_on_disk: bool) -> None:
        if self.uses.get(model_id):
            with pytest.raises(ModelInUseError) as caught:
                self.cache.unload_from_vram(model_id, keep_on_disk=keep_on_disk)
            assert caught.value.uses == self.uses[model_id]
            return
        hot = model_id in self.objs
        gone = [(model_id, self.objs[model_id])] if hot else []
        if hot:
            self.forget_hot(model_id)
        if not keep_on_disk:
            self.disk.pop(model_id, None)
        assert self.cache.unload_from_vram(model_id, keep_on_disk=keep_on_disk) is hot
        self.expect_callbacks(gone)

    @rule(model_id=IDS)
    def unload_model(self, model_id: str) -> None:
        if self.uses.get(model_id):
            with pytest.raises(ModelInUseError, match=f"^model {model_id} is in use by"):
                self.cache.unload_model(model_id)
            return
        known = model_id in self.objs or model_id in self.disk
        gone = [(model_id, self.objs[model_id])] if model_id in self.objs else []
        if model_id in self.objs:
            self.forget_hot(model_id)
        self.disk.pop(model_id, None)
        assert self.cache.unload_model(model_id) is known
        self.expect_callbacks(gone)

    @rule(model_id=IDS, size_gb=SIZES)
    def cache_to_disk(self, model_id: str, size_gb: float) -> None:
        path = self.dir / "snapshots" / model_id
        path.mkdir(parents=True, exist_ok=True)
        self.cache.mark_cached_to_disk(model_id, path, size_gb)
        self.disk[model_id] = path

    @rule(size_gb=SIZES)
    def make_room(self, size_gb: float) -> None:
        victims = self.evict(to_bytes(size_gb), keep=None)
        assert self.cache.make_room(size_gb) == [m for m, _ in victims]
        self.expect_callbacks(victims)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def accounting_is_exact(self) -> None:
        stats = self.cache.get_stats()
        assert stats["used_vram_gb"] * GB == self.used()
        assert stats["vram_models"] == self.lru
        assert stats["in_use"] == {m: n for m, n in self.uses.items() if n}
        assert stats["evictions"] == self.evictions
        if self.budget is None:
            assert stats["budget_gb"] is None and stats["free_vram_gb"] is None
        else:
            assert stats["budget_gb"] * GB == self.budget
            assert stats["free_vram_gb"] * GB == max(self.budget - self.used(), 0)

    @invariant()
    def budget_holds_unless_everything_else_is_in_use(self) -> None:
        over = self.budget is not None and self.used() > self.budget
        assert self.cache.get_stats()["over_budget"] is over
        if over:
            idle = {m for m in self.lru if not self.uses[m]}
            assert idle <= {self.exempt}

    @invariant()
    def in_use_models_stay_hot(self) -> None:
        for model_id, n in self.uses.items():
            assert self.cache.is_in_vram(model_id)
            assert self.cache.is_in_use(model_id) is (n > 0)

    @invariant()
    def lru_order_and_disk_knowledge(self) -> None:
        assert self.cache.get_vram_models() == self.lru
        assert self.cache.get_disk_models() == sorted(self.disk)
        for model_id in IDS_LIST:
            assert self.cache.is_on_disk(model_id) is (model_id in self.disk)
            hot, warm = model_id in self.objs, model_id in self.disk
            state = "hot_vram" if hot else "warm_disk" if warm else "cold_remote"
            assert self.cache.cache_state(model_id) == state
        assert self.cache.inventory()["warm"] == sorted(set(self.disk) - set(self.lru))

    @invariant()
    def can_fit_matches_the_rule(self) -> None:
        for size_gb in (0.5, 4.0, 11.0):
            pinned = sum(self.sizes[m] for m in self.lru if self.uses[m])
            fits = self.budget is None or to_bytes(size_gb) <= self.budget - pinned
            assert self.cache.can_fit_in_vram(size_gb) is fits


IDS_LIST = [f"model-{c}" for c in "abcdef"]

CacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestModelCacheMachine = CacheMachine.TestCase
