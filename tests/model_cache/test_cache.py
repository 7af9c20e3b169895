"""``ModelCache``: the README example, eviction and its callback, models in use, replacement,
refusals, states and stats, and exact accounting under threads."""

from __future__ import annotations

import contextlib
import json
import random
import re
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gen_worker.errors import ModelInUseError
from gen_worker.model_cache import BYTES_PER_GB, ModelCache

GB = BYTES_PER_GB

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
#: The README's ModelCache example (the seed's, verbatim), as the README has it.
(README_SNIPPET,) = [b for b in re.findall(r"```py\n(.*?)```", README, re.S) if "ModelCache(" in b]


def test_the_readme_example_runs_verbatim() -> None:
    namespace: dict[str, Any] = {"pipeline": object()}
    exec(README_SNIPPET, namespace)
    cache = namespace["cache"]
    assert cache.is_in_vram("model-a") is True
    assert cache.get_vram_models() == ["model-a"]
    assert cache.get_pipeline("model-a") is namespace["pipeline"]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __call__(self, model_id: str, obj: Any) -> None:
        self.calls.append((model_id, obj))


def cache_of(max_gb: float = 10.0, **kwargs: Any) -> tuple[ModelCache, Recorder]:
    recorder = Recorder()
    kwargs.setdefault("vram_probe", lambda: 0)  # the stats' total VRAM, without importing torch
    return ModelCache(max_vram_gb=max_gb, on_evict=recorder, **kwargs), recorder


# -- eviction ------------------------------------------------------------------------------------


def test_loading_evicts_the_least_recently_used_and_calls_on_evict() -> None:
    cache, evicted = cache_of(10.0)
    a, b, c, d = object(), object(), object(), object()
    assert cache.mark_loaded_to_vram("a", a, 4.0) == []
    assert cache.mark_loaded_to_vram("b", b, 4.0) == []
    assert cache.get_pipeline("a") is a  # a is now the most recent
    assert cache.mark_loaded_to_vram("c", c, 4.0) == ["b"]
    assert evicted.calls == [("b", b)]
    assert cache.get_vram_models() == ["a", "c"]
    assert cache.mark_loaded_to_vram("d", d, 9.0) == ["a", "c"]
    assert evicted.calls == [("b", b), ("a", a), ("c", c)]
    assert cache.get_stats()["evictions"] == 3
    assert cache.get_stats()["used_vram_gb"] == 9.0


def test_a_model_in_use_is_never_evicted_and_over_budget_is_reported() -> None:
    cache, evicted = cache_of(10.0)
    a, b = object(), object()
    cache.mark_loaded_to_vram("a", a, 6.0)
    with cache.using("a") as live:
        assert live is a
        assert cache.is_in_use("a")
        assert cache.mark_loaded_to_vram("b", b, 6.0) == []  # a is in use; b was just loaded
        stats = cache.get_stats()
        assert stats["over_budget"] is True
        assert stats["in_use"] == {"a": 1}
        assert stats["used_vram_gb"] == 12.0 and stats["free_vram_gb"] == 0.0
        assert cache.make_room(1.0) == ["b"]  # the only model not in use
        assert evicted.calls == [("b", b)]
    assert not cache.is_in_use("a")
    assert cache.get_stats()["over_budget"] is False


def test_releasing_the_last_use_of_an_over_budget_cache_evicts_down_to_the_budget() -> None:
    cache, evicted = cache_of(10.0)
    a, b = object(), object()
    cache.mark_loaded_to_vram("a", a, 6.0, acquire=True)
    cache.mark_loaded_to_vram("b", b, 6.0, acquire=True)  # over budget: both in use
    assert cache.get_stats()["over_budget"] is True
    cache.release("b")  # a is older but in use: b goes
    assert evicted.calls == [("b", b)]
    assert cache.get_vram_models() == ["a"]
    cache.release("a")  # within budget now: nothing more
    assert cache.get_vram_models() == ["a"]


def test_make_room_and_can_fit() -> None:
    cache, evicted = cache_of(10.0)
    cache.mark_loaded_to_vram("a", "A", 3.0)
    cache.mark_loaded_to_vram("b", "B", 3.0)
    cache.mark_loaded_to_vram("c", "C", 3.0)
    assert cache.free_vram_gb() == 1.0
    cache.acquire("a")
    assert cache.can_fit_in_vram(7.0) is True  # b and c can go
    assert cache.can_fit_in_vram(7.5) is False  # a (3 GB) stays
    assert cache.make_room(1.0) == []  # already fits
    assert cache.make_room(4.0) == ["b"]
    assert cache.free_vram_gb() == 4.0
    assert cache.make_room(9.0) == ["c"]  # all it can; a stays
    assert cache.get_vram_models() == ["a"]
    assert evicted.calls == [("b", "B"), ("c", "C")]
    cache.release("a")
    assert cache.can_fit_in_vram(10.0) and not cache.can_fit_in_vram(10.5)


def test_remarking_replaces_the_object_and_the_size_exactly() -> None:
    cache, evicted = cache_of(10.0)
    old, new = object(), object()
    cache.mark_loaded_to_vram("a", old, 6.0)
    cache.mark_loaded_to_vram("b", "B", 1.0)
    cache.mark_loaded_to_vram("a", new, 2.5)
    assert cache.get_stats()["used_vram_gb"] == 3.5
    assert cache.get_vram_models() == ["b", "a"]  # re-marked: most recent
    assert cache.get_pipeline("a") is new
    assert evicted.calls == [("a", old)]  # its owner may free the replaced object
    cache.mark_loaded_to_vram("a", new, 2.5)  # the same object again: nothing to free
    assert evicted.calls == [("a", old)]


def test_replacing_an_object_in_use_keeps_the_uses_and_leaves_the_old_one_alone() -> None:
    cache, evicted = cache_of(10.0)
    old, new = object(), object()
    cache.mark_loaded_to_vram("a", old, 2.0)
    assert cache.acquire("a") is old
    cache.mark_loaded_to_vram("a", new, 3.0)
    assert evicted.calls == []  # a request still runs on the old object
    assert cache.get_stats()["in_use"] == {"a": 1}
    cache.release("a")
    assert cache.get_pipeline("a") is new


def test_on_evict_failures_are_logged_and_do_not_stop_other_callbacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    freed: list[str] = []

    def on_evict(model_id: str, obj: Any) -> None:
        if model_id == "a":
            raise RuntimeError("cannot move to cpu")
        freed.append(model_id)

    cache = ModelCache(max_vram_gb=4.0, on_evict=on_evict, vram_probe=lambda: 0)
    cache.mark_loaded_to_vram("a", object(), 2.0)
    cache.mark_loaded_to_vram("b", object(), 2.0)
    assert cache.mark_loaded_to_vram("c", object(), 4.0) == ["a", "b"]
    assert freed == ["b"]
    assert cache.get_vram_models() == ["c"]
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["level"] == "warning"
    assert line["msg"] == "the on_evict callback failed"
    assert (line["model_id"], line["error"]) == ("a", "RuntimeError: cannot move to cpu")


# -- in use, unloads -----------------------------------------------------------------------------


def test_unloading_a_model_in_use_is_refused() -> None:
    cache, evicted = cache_of(10.0)
    cache.mark_loaded_to_vram("acme/sd:latest", "P", 2.0)
    cache.acquire("acme/sd:latest")
    cache.acquire("acme/sd:latest")
    for unload in (cache.unload_from_vram, cache.unload_model):
        with pytest.raises(ModelInUseError) as caught:
            unload("acme/sd:latest")
        assert str(caught.value) == (
            "model acme/sd:latest is in use by 2 running request(s); wait for them to finish "
            "(or cancel them) and unload it again"
        )
        assert (caught.value.model_id, caught.value.uses) == ("acme/sd:latest", 2)
        assert (caught.value.error_type, caught.value.retryable) == ("retryable", True)
    assert cache.is_in_vram("acme/sd:latest") and evicted.calls == []
    cache.release("acme/sd:latest")
    cache.release("acme/sd:latest")
    assert cache.unload_from_vram("acme/sd:latest") is True
    assert evicted.calls == [("acme/sd:latest", "P")]
    assert cache.unload_from_vram("acme/sd:latest") is False


def test_acquire_and_release_refusals() -> None:
    cache, _ = cache_of(10.0)
    with pytest.raises(KeyError) as missing:
        cache.acquire("ghost")
    assert missing.value.args[0] == (
        "model 'ghost' is not loaded in VRAM; load it (mark_loaded_to_vram) before using it; "
        "hot models: []"
    )
    cache.mark_loaded_to_vram("a", "A", 1.0)
    with pytest.raises(ValueError, match=r"^model 'a' is not in use; release only what acquire"):
        cache.release("a")
    with pytest.raises(ValueError, match=r"^model 'ghost' is not in use"):
        cache.release("ghost")
    with pytest.raises(RuntimeError, match="boom"), cache.using("a"):
        raise RuntimeError("boom")
    assert not cache.is_in_use("a")  # released on the way out


def test_unload_keeps_or_forgets_disk_knowledge(tmp_path: Path) -> None:
    cache, _ = cache_of(10.0, model_cache_dir=tmp_path / "cache")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for model_id in ("a", "b"):
        cache.mark_cached_to_disk(model_id, tmp_path / model_id, 1.0)
        cache.mark_loaded_to_vram(model_id, object(), 1.0)
    assert cache.unload_from_vram("a") is True
    assert cache.cache_state("a") == "warm_disk"
    assert cache.unload_from_vram("b", keep_on_disk=False) is True
    assert cache.cache_state("b") == "cold_remote"
    assert (tmp_path / "b").is_dir()  # forgotten, never deleted
    assert cache.unload_from_vram("a", keep_on_disk=False) is False  # not hot; mark dropped
    assert cache.get_disk_models() == []


def test_unload_model_forgets_everything() -> None:
    cache, evicted = cache_of(10.0)
    cache.mark_loaded_to_vram("a", "A", 1.0)
    cache.mark_downloading("a", 0.5)
    cache.mark_loading("a")
    assert cache.unload_model("a") is True
    assert evicted.calls == [("a", "A")]
    assert cache.inventory() == {"hot": [], "warm": [], "downloading": [], "loading": []}
    assert cache.unload_model("a") is False
    cache.mark_loading("b")
    assert cache.unload_model("b") is True
    assert cache.get_loading_models() == []


# -- sizes, ids, progress ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (-1.0, "size of model 'm' is -1.0; expected a finite number of GB >= 0, e.g. 8.0"),
        (float("nan"), "size of model 'm' is nan; expected a finite number of GB >= 0, e.g. 8.0"),
        (float("inf"), "size of model 'm' is inf; expected a finite number of GB >= 0, e.g. 8.0"),
        ("8", "size of model 'm' is '8'; expected a number of GB >= 0, e.g. 8.0"),
        (True, "size of model 'm' is True; expected a number of GB >= 0, e.g. 8.0"),
    ],
)
def test_bad_sizes_are_refused_naming_the_model(size: Any, message: str, tmp_path: Path) -> None:
    cache, _ = cache_of(10.0)
    for mark in (
        lambda: cache.mark_loaded_to_vram("m", object(), size),
        lambda: cache.mark_cached_to_disk("m", tmp_path, size),
    ):
        with pytest.raises(ValueError) as caught:
            mark()
        assert str(caught.value) == message
    assert cache.get_vram_models() == [] and cache.get_disk_models() == []
    with pytest.raises(ValueError, match=r"^size_gb is -1\.0"):
        cache.make_room(-1.0)


def test_ids_must_be_non_empty_strings() -> None:
    cache, _ = cache_of(10.0)
    with pytest.raises(ValueError, match=r"^model id is ''; expected a non-empty string$"):
        cache.mark_loaded_to_vram("", object(), 1.0)
    with pytest.raises(ValueError, match=r"^model id is None"):
        cache.mark_loading(None)  # type: ignore[arg-type]


def test_downloading_and_loading_states(tmp_path: Path) -> None:
    cache, _ = cache_of(10.0, model_cache_dir=tmp_path / "cache")
    cache.mark_downloading("b", 0.25)
    cache.mark_downloading("a", 1.7)
    cache.mark_downloading("c", -3)
    assert cache.get_downloading_models() == {"a": 1.0, "b": 0.25, "c": 0.0}
    with pytest.raises(ValueError, match=r"^download progress of 'a' is NaN; expected 0\.\.1$"):
        cache.mark_downloading("a", float("nan"))
    cache.clear_downloading("c")
    cache.mark_cached_to_disk("b", tmp_path, 2.0)  # done: no longer downloading
    assert cache.get_downloading_models() == {"a": 1.0}
    cache.mark_loading("b")
    cache.mark_loading("d")
    assert cache.get_loading_models() == ["b", "d"]
    assert cache.inventory() == {
        "hot": [],
        "warm": ["b"],
        "downloading": ["a"],
        "loading": ["b", "d"],
    }
    cache.mark_loaded_to_vram("b", object(), 2.0)  # loaded: no longer loading
    cache.clear_loading("d")
    assert cache.get_loading_models() == []
    assert cache.inventory() == {"hot": ["b"], "warm": [], "downloading": ["a"], "loading": []}
    assert [cache.cache_state(m) for m in ("b", "a")] == ["hot_vram", "cold_remote"]
    assert cache.has_model("b") and not cache.has_model("a")


def test_stats_are_exact_and_json_encodable(tmp_path: Path) -> None:
    cache = ModelCache(
        vram_safety_margin_gb=2.0, vram_probe=lambda: 24 * GB, model_cache_dir=tmp_path / "c"
    )
    cache.mark_loaded_to_vram("a", object(), 0.1)
    cache.mark_loaded_to_vram("b", object(), 0.2, acquire=True)
    cache.mark_cached_to_disk("a", tmp_path, 0.1)
    cache.mark_downloading("z", 0.5)
    stats = cache.get_stats()
    used = round(0.1 * GB) + round(0.2 * GB)
    assert stats == {
        "total_vram_gb": 24.0,
        "budget_gb": 22.0,
        "used_vram_gb": used / GB,
        "free_vram_gb": (22 * GB - used) / GB,
        "vram_models": ["a", "b"],
        "disk_models": ["a"],
        "downloading": {"z": 0.5},
        "loading": [],
        "in_use": {"b": 1},
        "over_budget": False,
        "evictions": 0,
    }
    assert json.loads(json.dumps(stats)) == stats
    cache.release("b")
    for model_id in ("a", "b"):
        cache.unload_from_vram(model_id)
    assert cache.get_stats()["used_vram_gb"] == 0.0  # no float residue


# -- threads -------------------------------------------------------------------------------------


class Hammer:
    """One of several threads doing random loads, uses, unloads and queries on one cache, and
    recording any object evicted while some thread was using it."""

    IDS: ClassVar[list[str]] = [f"m{i}" for i in range(8)]
    SIZE_GB: ClassVar[dict[str, float]] = {m: 0.5 + i * 0.75 for i, m in enumerate(IDS)}

    def __init__(self) -> None:
        self.cache = ModelCache(max_vram_gb=8.0, on_evict=self.on_evict, vram_probe=lambda: 0)
        self.lock = threading.Lock()
        self.using: set[int] = set()  # id() of the objects a thread is using right now
        self.freed: list[int] = []
        self.objects: list[object] = []  # kept alive, so that each id() stays unique
        self.errors: list[BaseException] = []

    def on_evict(self, model_id: str, obj: Any) -> None:
        with self.lock:
            if id(obj) in self.using:
                self.errors.append(AssertionError(f"{model_id} evicted while in use"))
            self.freed.append(id(obj))

    def use(self, model_id: str) -> None:
        try:
            with self.cache.using(model_id) as live:
                with self.lock:
                    self.using.add(id(live))
                assert self.cache.is_in_vram(model_id)
                with self.lock:
                    self.using.discard(id(live))
        except KeyError:
            pass  # not hot at this moment

    def step(self, rng: random.Random) -> None:
        model_id = rng.choice(self.IDS)
        op = rng.random()
        if op < 0.3:
            obj = object()
            with self.lock:
                self.objects.append(obj)
            self.cache.mark_loaded_to_vram(model_id, obj, self.SIZE_GB[model_id])
        elif op < 0.7:
            self.use(model_id)
        elif op < 0.8:
            self.cache.make_room(rng.choice([0.5, 2.0, 6.0]))
        elif op < 0.9:
            with contextlib.suppress(ModelInUseError):
                self.cache.unload_from_vram(model_id)
        else:
            self.cache.get_pipeline(model_id)
            self.cache.get_stats()

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(1500):
                self.step(rng)
        except BaseException as exc:
            self.errors.append(exc)


def test_threads_hammering_the_cache_keep_accounting_exact() -> None:
    hammer = Hammer()
    threads = [threading.Thread(target=hammer.run, args=(seed,)) for seed in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, inside the cache's methods too
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert hammer.errors == []
    assert not any(thread.is_alive() for thread in threads)

    cache = hammer.cache
    stats = cache.get_stats()
    assert stats["in_use"] == {}
    hot = cache.get_vram_models()
    assert stats["used_vram_gb"] * GB == sum(round(Hammer.SIZE_GB[m] * GB) for m in hot)
    assert len(hammer.freed) == len(set(hammer.freed))  # each object freed once
    cache.make_room(0.0)  # whatever a last load left over budget goes now
    assert cache.get_stats()["used_vram_gb"] <= 8.0
    assert cache.get_stats()["over_budget"] is False
