"""Model injection: a warm load against safetensors, the hot-hit overhead, and a request end to end.

(a) Warm load. A ``BertModel`` folder (config + one ``model.safetensors`` of random weights,
    ``--size-mb`` MiB) is published into a local hub and pulled once into a store. Each round
    then loads it three ways, in a rotated order: the floor (``safe_open`` + ``get_tensor`` of
    every key), transformers' own ``BertModel.from_pretrained`` on the snapshot (what our
    loader falls back to; for this plain checkpoint it takes its direct safetensors path,
    ``gen_worker.injection.direct_load``), and ours (``CachedModels.load`` from a fresh
    ``ModelCache``, with the scheduler's resolution: a warm-disk load, never a hot hit). The
    file is read once first, so every side reads from the page cache; then the rounds run again
    with the file's pages dropped before each side (``posix_fadvise(DONTNEED)``: a snapshot on
    disk but not in memory, as after a restart), where the disk read is part of every side.
    Both safetensors and our loader map the file and read nothing until a tensor is used
    (transformers copies each tensor out), so each side is timed twice: once its tensors exist
    (``loaded``), and once one byte of every page of them has been read, the same way for all
    three (``resident``: the whole file is then mapped into the process). CPU seconds (every
    thread of this process) are shown too: on a busy machine they are steadier.
    Target: ours within 1.2x of the floor.
(b) Hot hit. ``await provider.load(request)`` + ``provider.release(holder)`` for a pipeline
    already loaded, per call; then the engine: an async no-op function with one injected
    pipeline against the same no-op without one (blocks alternate). Target: under 100 us.
(c) End to end on CPU. The tiny Stable Diffusion pipeline (tests/fixtures/tiny_models.py)
    behind the fixture project tests/fixtures/projects/diffusion, served by the dev runner on
    loopback: cold (empty store: download, load, call), hot (the next request on that runner)
    and warm (a new runner, in this same process, on the same store: the dev runner still
    asks the local hub to resolve the ref, then finds the snapshot on disk); the
    ``cache_state`` each ``metrics.job`` reported.

Every section stops early (and says so) once it has run ``--section-limit-s``; all traffic is
to 127.0.0.1 (enforced: any other connection fails the run). The machine is small and shared:
medians and ratios are what to read.
Run: `uv run --no-sync python benchmarks/model_load.py [--size-mb 500] [--rounds 5]`.
"""

from __future__ import annotations

import os

# Set before gen_worker and transformers are imported (they read it then): quiet the
# per-request info log lines, and never ask the Hugging Face hub for anything.
os.environ.setdefault("GEN_WORKER_LOG_LEVEL", "warning")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import asyncio
import gc
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from _model_fixtures import (
    PIPE_KEY,
    build_sized_bert,
    tests_module,
    touch_pages,
    with_model,
    without_model,
)
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from transformers import BertModel
from transformers.utils import logging as transformers_logging

from gen_worker.authoring import FunctionSpec, InjectionSpec, ModelRefSource, get_function_spec
from gen_worker.config import ModelSettings
from gen_worker.engine import Engine, LoadRequest, RequestMeta, Result
from gen_worker.hub import HubServer, publish
from gen_worker.injection import CachedModels, SnapshotFinder
from gen_worker.model_cache import ModelCache
from gen_worker.models.manifest import SnapshotManifest
from gen_worker.models.source import ModelSource, build_model_source

BERT_REF = "bench/bert:v1"
SD_REF = "acme/tiny-sd:v1"  # what the fixture project's key "tiny" names
PROJECT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "projects" / "diffusion"
LOAD_TARGET = 1.2
HOT_TARGET_US = 100.0
ENGINE_BLOCK = 50


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


class Deadline:
    """A section's time limit; ``passed()`` once it has run ``limit_s``."""

    def __init__(self, limit_s: float) -> None:
        self.end = time.monotonic() + limit_s

    def passed(self) -> bool:
        return time.monotonic() > self.end


def _resolution(manifest: SnapshotManifest) -> dict[str, Any]:
    """The scheduler's resolution of a ref (snapshot digest and files), as a worker gets it."""
    files = [
        {"path": e.path, "size_bytes": e.size_bytes, "blake3": e.blake3, "url": e.url}
        for e in manifest.entries
    ]
    return {"snapshot_digest": manifest.digest, "files": files}


async def _pull(hub_url: str, cache: Path, ref: str) -> tuple[Path, dict[str, Any]]:
    """Pull ``ref`` from the hub into the store under ``cache``; (snapshot, its resolution)."""
    source = build_model_source(ModelSettings(tensorhub_url=hub_url, cache_dir=str(cache)))
    try:
        snapshot = await source.pull(ref)
        assert source.hub is not None
        manifest = await source.hub.resolve(ref)
    finally:
        await source.aclose()
    return snapshot, _resolution(manifest)


def _injection(target: Any, key: str) -> InjectionSpec:
    return InjectionSpec(param="model", type=target, source=ModelRefSource.FIXED, key=key)


# -- (a) warm load --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    loaded_s: float
    resident_s: float
    cpu_s: float  # this process's CPU seconds until resident (every thread: ours loads in one)


def _sample(started: float, loaded: float, cpu: float) -> Sample:
    now = time.perf_counter()
    return Sample(loaded - started, now - started, time.process_time() - cpu)


def _floor(weights: Path) -> Sample:
    cpu, started = time.process_time(), time.perf_counter()
    with safe_open(str(weights), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118  (not a dict)
    loaded = time.perf_counter()
    touch_pages(tensors.values())
    return _sample(started, loaded, cpu)


def _direct(snapshot: Path) -> Sample:
    """What our loader wraps, called directly: the library's own cost."""
    cpu, started = time.process_time(), time.perf_counter()
    model: Any = BertModel.from_pretrained(str(snapshot))
    model = model.to("cpu").eval()  # as our loader does
    loaded = time.perf_counter()
    touch_pages([*model.parameters(), *model.buffers()])
    return _sample(started, loaded, cpu)


async def _ours(source: ModelSource, cache: Path, resolution: dict[str, Any]) -> Sample:
    provider = CachedModels(
        ModelCache(model_cache_dir=cache),  # fresh: the model is on disk, not in memory
        SnapshotFinder(lambda: source, allow_hub=False),
        declared={"bert": BERT_REF},
        keyspaces={},
    )
    holder = object()
    request = LoadRequest(
        model_id=BERT_REF,
        injection=_injection(BertModel, "bert"),
        device="cpu",
        function_name="bench",
        holder=holder,
        resolved={BERT_REF: resolution},
    )
    state = provider.cache_state(BERT_REF)
    if state != "warm_disk":
        raise SystemExit(f"(a) expected the snapshot warm on disk before loading, found {state}")
    cpu, started = time.process_time(), time.perf_counter()
    model = await provider.load(request)
    loaded = time.perf_counter()
    touch_pages([*model.parameters(), *model.buffers()])
    sample = _sample(started, loaded, cpu)
    provider.release(holder)
    return sample


SIDES = (
    "floor: safe_open + get_tensor",
    "transformers from_pretrained",
    "ours: CachedModels.load",
)


async def warm_load(work: Path, hub_url: str, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    bert = build_sized_bert(work / "bert-src", args.size_mb << 20, args.dtype)
    built = time.perf_counter()
    publish(work / "hub", BERT_REF, bert.path)
    published = time.perf_counter()
    cache = work / "cache-a"
    snapshot, resolution = await _pull(hub_url, cache, BERT_REF)
    pulled = time.perf_counter()
    weights = snapshot / "model.safetensors"
    size = weights.stat().st_size
    print(
        f"(a) warm load: BertModel, {size / 2**20:.1f} MiB in model.safetensors ({args.dtype}, "
        f"{bert.tensors} tensors; hidden {bert.hidden}, {bert.layers} layers, vocab "
        f"{bert.vocab}); built {built - started:.1f} s, published {published - built:.1f} s, "
        f"pulled over loopback {pulled - published:.1f} s"
    )
    source = build_model_source(ModelSettings(cache_dir=str(cache)))  # no hub: warm only
    deadline = Deadline(args.section_limit_s)
    runs: dict[str, Callable[[], Awaitable[Sample]]] = {
        SIDES[0]: lambda: _as_async(_floor, weights),
        SIDES[1]: lambda: _as_async(_direct, snapshot),
        SIDES[2]: lambda: _ours(source, cache, resolution),
    }
    try:
        for side in SIDES:  # warm-up, not counted: first-call costs (lazy imports, caches)
            await runs[side]()
            gc.collect()
        for cold in (False, True):
            # Warm: the file is in the page cache and every side reads from memory (the
            # harshest ratio: only the library's own work differs). Cold: its pages are dropped
            # before each side (posix_fadvise DONTNEED), as after a restart with the snapshot
            # on disk; the disk read is then part of every side.
            if not cold:
                with weights.open("rb") as f:
                    while f.read(8 << 20):
                        pass
            samples = await _rounds(runs, args.rounds, deadline, weights if cold else None)
            _print_warm_load(
                samples, "page cache dropped before each side" if cold else "page cache warm"
            )
    finally:
        await source.aclose()


def _drop_pages(path: Path) -> None:
    """Evict ``path``'s pages from the page cache (no root needed). Only clean pages go: the
    snapshot was written moments ago, so it is written back first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def _rounds(
    runs: dict[str, Callable[[], Awaitable[Sample]]],
    rounds: int,
    deadline: Deadline,
    drop: Path | None,
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {side: [] for side in SIDES}
    for round_ in range(rounds):
        if deadline.passed():
            print(f"    stopped after {round_} rounds: the section's time limit passed")
            break
        order = SIDES[round_ % 3 :] + SIDES[: round_ % 3]
        for side in order:
            gc.collect()  # the previous side's model is freed outside the timing
            if drop is not None:
                _drop_pages(drop)
            samples[side].append(await runs[side]())
    gc.collect()
    return samples


async def _as_async(fn: Callable[[Path], Sample], path: Path) -> Sample:
    return fn(path)


def _print_warm_load(samples: dict[str, list[Sample]], how: str) -> None:
    rounds = len(samples[SIDES[0]])
    print(f"    median of {rounds} round(s), order rotated each round, {how}")
    print(
        f"    {'side':<32}{'loaded s':>10}{'vs floor':>10}{'resident s':>12}{'vs floor':>10}"
        f"{'CPU s':>8}{'vs floor':>10}"
    )
    loaded = {s: _median([x.loaded_s for x in v]) for s, v in samples.items()}
    resident = {s: _median([x.resident_s for x in v]) for s, v in samples.items()}
    cpu = {s: _median([x.cpu_s for x in v]) for s, v in samples.items()}
    floor_l, floor_r, floor_c = loaded[SIDES[0]], resident[SIDES[0]], cpu[SIDES[0]]
    for side in SIDES:
        print(
            f"    {side:<32}{loaded[side]:>10.3f}{loaded[side] / floor_l:>9.2f}x"
            f"{resident[side]:>12.3f}{resident[side] / floor_r:>9.2f}x"
            f"{cpu[side]:>8.3f}{cpu[side] / floor_c:>9.2f}x"
        )
    ours, lib = SIDES[2], SIDES[1]
    print(
        f"    ours / transformers direct (our own overhead): loaded "
        f"{loaded[ours] / loaded[lib]:.2f}x, resident {resident[ours] / resident[lib]:.2f}x"
    )
    ratio_r, ratio_l = resident[ours] / floor_r, loaded[ours] / floor_l
    print(
        f"    target ours/floor <= {LOAD_TARGET}x: resident {ratio_r:.2f}x "
        f"{_verdict(ratio_r <= LOAD_TARGET)}; loaded (nothing read yet) {ratio_l:.2f}x "
        f"{_verdict(ratio_l <= LOAD_TARGET)}\n"
    )


# -- (b) hot hit ----------------------------------------------------------------------------------


def _load_request(spec: FunctionSpec, holder: object) -> LoadRequest:
    return LoadRequest(
        model_id=SD_REF,
        injection=spec.injections[0],
        device="cpu",
        function_name=spec.name,
        holder=holder,
    )


async def _provider_hits(
    provider: CachedModels, spec: FunctionSpec, n: int, dl: Deadline
) -> list[float]:
    samples: list[float] = []
    clock = time.perf_counter_ns
    for i in range(n):
        if i % 1000 == 0 and dl.passed():
            break
        holder = object()  # one per request, as the engine's run object
        request = _load_request(spec, holder)
        started = clock()
        await provider.load(request)
        provider.release(holder)
        samples.append((clock() - started) / 1000)
    return samples


async def _engine_request(engine: Engine, spec: FunctionSpec, request_id: str) -> float:
    started = time.perf_counter_ns()
    last = None
    async for outcome in engine.run(spec, b'{"x": 1}', RequestMeta(request_id=request_id)):
        last = outcome
    elapsed = (time.perf_counter_ns() - started) / 1000
    if not isinstance(last, Result):
        raise SystemExit(f"(b) the engine's {spec.name} request failed: {last!r}")
    return elapsed


async def _engine_pairs(engine: Engine, n: int, dl: Deadline) -> dict[str, list[float]]:
    specs = {"with": get_function_spec(with_model), "without": get_function_spec(without_model)}
    times: dict[str, list[float]] = {"with": [], "without": []}
    for label, spec in specs.items():  # warm-up: first-call costs stay out of the numbers
        for i in range(100):
            await _engine_request(engine, spec, f"warm-{label}-{i}")
    count = 0
    while count < n and not dl.passed():
        for label, spec in specs.items():
            for i in range(ENGINE_BLOCK):
                times[label].append(await _engine_request(engine, spec, f"{label}-{count + i}"))
        count += ENGINE_BLOCK
    return times


async def hot_hit(work: Path, hub_url: str, args: argparse.Namespace) -> None:
    cache = work / "cache-b"
    _snapshot, resolution = await _pull(hub_url, cache, SD_REF)
    source = build_model_source(ModelSettings(cache_dir=str(cache)))
    with_spec, without_spec = get_function_spec(with_model), get_function_spec(without_model)
    provider = CachedModels(
        ModelCache(model_cache_dir=cache),
        SnapshotFinder(lambda: source, allow_hub=False),
        declared={PIPE_KEY: SD_REF},
        keyspaces={},
        functions=[with_spec, without_spec],
    )
    deadline = Deadline(args.section_limit_s)
    try:
        first = object()
        warm = LoadRequest(
            SD_REF, with_spec.injections[0], "cpu", "with_model", first, {SD_REF: resolution}
        )
        pipe = await provider.load(warm)
        provider.release(first)
        if (
            not isinstance(pipe, StableDiffusionPipeline)
            or provider.cache_state(SD_REF) != "hot_vram"
        ):
            raise SystemExit(f"(b) the pipeline did not load hot: {type(pipe).__name__}")
        await _provider_hits(provider, with_spec, min(1000, args.hot_iterations), deadline)
        hits = await _provider_hits(provider, with_spec, args.hot_iterations, deadline)
        engine = Engine([with_spec, without_spec], models=provider)
        try:
            times = await _engine_pairs(engine, args.engine_requests, deadline)
        finally:
            await engine.shutdown(grace_s=1)
        if provider.cache.get_stats()["in_use"]:
            raise SystemExit("(b) a pin was left behind: load/release are unbalanced")
    finally:
        await provider.aclose()
    _print_hot_hit(hits, times, args)


def _print_hot_hit(
    hits: list[float], times: dict[str, list[float]], args: argparse.Namespace
) -> None:
    stopped = " (stopped early: time limit)" if len(hits) < args.hot_iterations else ""
    print(f"(b) hot hit: the tiny SD pipeline already loaded (StableDiffusionPipeline){stopped}")
    print(f"    {'path':<46}{'n':>7}{'median us':>11}{'p99 us':>10}")
    rows = (
        ("provider.load + release", hits),
        ("engine: async no-op + 1 injected pipeline", times["with"]),
        ("engine: async no-op, no model", times["without"]),
    )
    for name, t in rows:
        print(f"    {name:<46}{len(t):>7}{_median(t):>11.1f}{_p99(t):>10.1f}")
    diff = _median(times["with"]) - _median(times["without"])
    worst = max(_median(hits), diff)
    print(
        f"    per request, an injected model costs: provider {_median(hits):.1f} us, through the "
        f"engine {diff:.1f} us (median with - median without)"
    )
    print(f"    target < {HOT_TARGET_US:.0f} us: {_verdict(worst < HOT_TARGET_US)}\n")


# -- (c) end to end -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    ms: float
    cache_state: str
    load_ms: float
    inference_ms: float


def _post(client: httpx.Client) -> Answer:
    started = time.perf_counter()
    response = client.post("/v1/request/generate", json={"model": "tiny", "steps": 2})
    elapsed = (time.perf_counter() - started) * 1000
    body = response.json()
    if response.status_code != 200 or body["output"]["shape"] != [32, 32, 3]:
        raise SystemExit(f"(c) the request failed: {response.status_code} {response.text}")
    events = {e["type"]: e.get("payload", {}) for e in body["events"]}
    return Answer(
        elapsed,
        str(events["metrics.job"].get("cache_state")),
        float(events["request.model_load.completed"]["ms"]),
        float(events["request.inference.completed"]["ms"]),
    )


def end_to_end(work: Path, hub_url: str, args: argparse.Namespace) -> None:
    serve = tests_module("devserver_support").serve
    answers: dict[str, list[Answer]] = {"cold": [], "warm": [], "hot": []}
    deadline = Deadline(args.section_limit_s)
    for round_ in range(args.e2e_rounds):
        if deadline.passed():
            print(f"    stopped after {round_} rounds: the section's time limit passed")
            break
        here = work / f"e2e-{round_}"
        settings = ModelSettings(tensorhub_url=hub_url, cache_dir=str(here / "cache"))
        for runner, states in (("first", ("cold", "hot")), ("second", ("warm",))):
            with (
                # No fetch at start: the first request itself finds the model cold (or warm).
                serve(
                    here / runner, project=PROJECT, model_settings=settings, prefetch_models=False
                ) as served,
                httpx.Client(base_url=served.base_url, timeout=120) as client,
            ):
                for state in states:
                    answers[state].append(_post(client))
    print(
        f"(c) end to end, CPU: tiny SD pipeline (2 steps, 32x32) via the dev runner on loopback, "
        f"{len(answers['cold'])} round(s); cold = empty store, warm = new runner on that store, "
        "hot = next request on the same runner"
    )
    print(
        f"    {'state':<6}{'request ms':>12}{'model_load ms':>15}{'inference ms':>14}"
        "  cache_state per round"
    )
    for state, expected in (("cold", "cold_remote"), ("warm", "warm_disk"), ("hot", "hot_vram")):
        got = answers[state]
        reported = [a.cache_state for a in got]
        right = bool(reported) and all(r == expected for r in reported)
        check = "ok" if right else f"WRONG (want {expected})"
        print(
            f"    {state:<6}{_median([a.ms for a in got]):>12.1f}"
            f"{_median([a.load_ms for a in got]):>15.1f}"
            f"{_median([a.inference_ms for a in got]):>14.1f}  {', '.join(reported)} {check}"
        )
    print()


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500, help="(a) weights file, MiB")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="(a) weights")
    parser.add_argument("--rounds", type=int, default=5, help="(a) rounds")
    parser.add_argument("--hot-iterations", type=int, default=20000, help="(b) provider hits")
    parser.add_argument(
        "--engine-requests", type=int, default=5000, help="(b) engine requests of each function"
    )
    parser.add_argument("--e2e-rounds", type=int, default=3, help="(c) rounds")
    parser.add_argument("--sections", default="abc", help="which sections to run, e.g. 'ac'")
    parser.add_argument(
        "--section-limit-s",
        type=float,
        default=240.0,
        help="stop a section's rounds once it has run this long",
    )
    args = parser.parse_args(argv)
    if args.size_mb < 1 or min(args.rounds, args.hot_iterations, args.engine_requests) < 1:
        parser.error("--size-mb, --rounds, --hot-iterations and --engine-requests must be >= 1")
    if args.e2e_rounds < 1 or not set(args.sections) <= set("abc") or not args.sections:
        parser.error("--e2e-rounds must be >= 1 and --sections a combination of a, b and c")
    return args


def print_intro() -> None:
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(
        f"machine: {os.cpu_count()} cores ({platform.machine()}, {platform.system()} "
        f"{platform.release()}), python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); shared and noisy: read medians and ratios\n",
        flush=True,
    )


async def _sections(work: Path, hub_url: str, args: argparse.Namespace) -> None:
    if "a" in args.sections:
        await warm_load(work, hub_url, args)
    if "b" in args.sections:
        await hot_hit(work, hub_url, args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print_intro()
    started = time.perf_counter()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    diffusers_logging.disable_progress_bar()
    tiny_models = tests_module("fixtures.tiny_models")
    with (
        tiny_models.loopback_only(),
        tempfile.TemporaryDirectory(prefix="gw-model-load-") as tmp,
    ):
        work = Path(tmp)
        if set(args.sections) & {"b", "c"}:
            tiny_models.build_tiny_sd(work / "tiny-sd")
            publish(work / "hub", SD_REF, work / "tiny-sd")
        (work / "hub").mkdir(exist_ok=True)
        with HubServer(work / "hub") as hub:
            asyncio.run(_sections(work, hub.url, args))
            if "c" in args.sections:
                end_to_end(work, hub.url, args)
    print(f"total: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
