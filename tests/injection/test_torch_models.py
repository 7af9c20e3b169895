"""Real diffusers pipelines end to end on CPU: published to a local hub, then served.

The tiny Stable Diffusion pipeline (random weights, tests/fixtures/tiny_models.py) goes through
the real worker with the mock scheduler and through the dev runner: the first request finds it
``cold_remote`` (downloaded, then loaded), the next ``hot_vram``; a PAYLOAD value outside the
function's keyspace is refused; unloading a model a request is using is refused.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from devserver_support import serve
from test_worker_integration import Harness, event_types, pack, run, unpack, until
from test_worker_models import _resolution

from gen_worker.config import ModelSettings
from gen_worker.discovery import discover, encode_lock
from gen_worker.hub import HubServer, publish
from gen_worker.protocol import messages as m
from gen_worker.testing.scheduler import RequestRecord, WorkerConnection

PROJECT = Path(__file__).resolve().parents[1] / "fixtures" / "projects" / "diffusion"
REF = "acme/tiny-sd:v1"


def wait_ready(client: httpx.Client, timeout_s: float = 60) -> None:
    """Until /readyz says the declared models are on disk (the runner fetches them at start)."""
    deadline = time.monotonic() + timeout_s
    while (answer := client.get("/readyz")).status_code != 200:
        assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
        time.sleep(0.05)
    assert answer.json() == {"ready": True}


def payloads(record: RequestRecord) -> list[tuple[str, dict[str, Any]]]:
    return [(e.event_type, msgspec.json.decode(e.payload_json)) for e in record.events]


def job_metrics(record: RequestRecord) -> dict[str, Any]:
    return next(p for t, p in payloads(record) if t == "metrics.job")


def worker_events(conn: WorkerConnection, kind: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(e.payload_json) for e in conn.worker_events if e.event_type == kind]


def test_a_real_worker_serves_a_payload_selected_pipeline_cold_then_hot(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    publish(tmp_path / "hub", REF, tiny_sd_dir)
    lock = tmp_path / "endpoint.lock"
    lock.write_bytes(encode_lock(discover(PROJECT, isolated=True).lock))
    release = tmp_path / "release-hold"
    with HubServer(tmp_path / "hub") as hub:
        resolved = [_resolution(hub, REF)]
        harness = Harness(tmp_path, lock)

        async def scenario() -> None:
            async with harness.serving(GEN_WORKER_ENDPOINT_ROOT=str(PROJECT)) as s:
                assert s.conn.registration.models.hot == []
                # Cold: downloaded (events to the request), loaded, then the call.
                first = await s.sched.submit(
                    "generate", pack(model="tiny"), resolved_models=resolved
                )
                done = await first.wait(90)
                assert isinstance(done, m.JobResult) and done.success, done
                image = unpack(done.output)
                assert image["shape"] == [32, 32, 3]
                assert image["pipeline"] == "StableDiffusionPipeline"
                kinds = event_types(first)
                order = [
                    "model.download.started",
                    "model.download.completed",
                    "request.model_load.completed",
                    "request.inference.started",
                ]
                assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order)
                assert job_metrics(first)["cache_state"] == "cold_remote"
                assert job_metrics(first)["models"] == {"pipe": REF}
                (cached,) = worker_events(s.conn, "model.cached")
                assert cached["model_id"] == REF and cached["size_bytes"] > 0
                assert cached["loader"] == ("diffusers:StableDiffusionPipeline.from_pretrained")
                # Hot: no download, no load; the heartbeats say so.
                second = await s.sched.submit(
                    "generate", pack(model="tiny"), resolved_models=resolved
                )
                again = await second.wait(60)
                assert isinstance(again, m.JobResult) and again.success
                # The same pipeline object (random latents: the pixels differ).
                assert unpack(again.output)["shape"] == image["shape"]
                assert job_metrics(second)["cache_state"] == "hot_vram"
                assert "model.download.started" not in event_types(second)
                await until(lambda: REF in s.conn.heartbeats[-1].models.hot, 5, "hot in heartbeat")

                # A caller may only name a key of the function's keyspace, never a ref.
                bad = await s.sched.submit("generate", pack(model=REF))
                refused = await bad.wait(10)
                assert isinstance(refused, m.JobResult) and not refused.success
                assert refused.error_type == "validation"
                assert refused.safe_message == (
                    f"model='{REF}' is not a model of function 'generate'; "
                    "choose one of ['other', 'tiny']"
                )

                # Unloading a model a request is using is refused, and says why.
                holding = await s.sched.submit(
                    "hold", pack(model="tiny", release_file=str(release)), resolved_models=resolved
                )
                await until(lambda: "request.inference.started" in event_types(holding), 30)
                assert await s.sched.send(m.UnloadModel(model_id=REF))
                await until(
                    lambda: any(isinstance(x, m.UnloadModelResult) for x in s.conn.messages)
                )
                answer = next(x for x in s.conn.messages if isinstance(x, m.UnloadModelResult))
                assert (answer.model_id, answer.ok, answer.reason) == (REF, False, "in_use")
                assert "in use by 1 running request" in answer.error_message
                (failed,) = worker_events(s.conn, "model.unload.failed")
                assert failed["reason"] == "in_use"
                release.touch()
                held = await holding.wait(30)
                assert isinstance(held, m.JobResult) and held.success

                # Once the request is done, the same unload succeeds; the model stays warm.
                s.conn.messages.clear()
                assert await s.sched.send(m.UnloadModel(model_id=REF))
                await until(
                    lambda: any(isinstance(x, m.UnloadModelResult) for x in s.conn.messages)
                )
                answer = next(x for x in s.conn.messages if isinstance(x, m.UnloadModelResult))
                assert answer.ok, answer
                await until(lambda: REF in s.conn.heartbeats[-1].models.warm, 5, "warm")
                assert REF not in s.conn.heartbeats[-1].models.hot
                # And the scheduler can load it back ahead of traffic.
                assert await s.sched.send(m.LoadModel(model_id=REF))
                await until(
                    lambda: any(isinstance(x, m.LoadModelResult) for x in s.conn.messages), 60
                )
                loaded = next(x for x in s.conn.messages if isinstance(x, m.LoadModelResult))
                assert loaded.ok, loaded
                await until(lambda: REF in s.conn.heartbeats[-1].models.hot, 5, "hot again")

        run(scenario(), timeout_s=110)


def test_the_dev_runner_loads_from_the_hub_once_and_warms_up(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    publish(tmp_path / "hub", REF, tiny_sd_dir)
    publish(tmp_path / "hub", "acme/tiny-sd:v2", tiny_sd_dir)
    with HubServer(tmp_path / "hub") as hub:
        settings = ModelSettings(tensorhub_url=hub.url, cache_dir=str(tmp_path / "cache"))
        with (
            serve(tmp_path / "out", project=PROJECT, model_settings=settings) as served,
            httpx.Client(base_url=served.base_url, timeout=90) as client,
        ):
            wait_ready(client)  # both declared models downloaded as the runner started
            warm = client.post("/v1/warmup/generate", json={"model": "other"})
            assert warm.status_code == 200 and warm.json()["ok"] is True, warm.text
            status = client.get("/v1/models/status").json()
            assert status["hot"] == ["acme/tiny-sd:v2"]
            first = client.post("/v1/request/generate", json={"model": "tiny"})
            assert first.status_code == 200, first.text
            assert first.json()["output"]["shape"] == [32, 32, 3]
            metrics = next(e for e in first.json()["events"] if e["type"] == "metrics.job")
            assert metrics["payload"]["cache_state"] == "warm_disk"
            second = client.post("/v1/request/generate", json={"model": "other"})
            metrics = next(e for e in second.json()["events"] if e["type"] == "metrics.job")
            assert metrics["payload"]["cache_state"] == "hot_vram"
            status = client.get("/v1/models/status").json()
            assert status["hot"] == ["acme/tiny-sd:v1", "acme/tiny-sd:v2"]
            assert status["cache"]["used_vram_gb"] >= 0
            unload = client.post("/v1/models/unload", json={"model_id": REF})
            assert unload.json() == {"ok": True, "model_id": REF, "unloaded": True}
            assert client.get("/v1/models/status").json()["hot"] == ["acme/tiny-sd:v2"]


def test_one_snapshot_loads_as_a_tokenizer_and_as_a_model(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer, BertModel

    from gen_worker.injection import CachedModels, SnapshotFinder
    from gen_worker.model_cache import ModelCache
    from gen_worker.models.source import build_model_source
    from injection.test_provider import Holder, Load, injection

    publish(tmp_path / "hub", "acme/tiny-bert:v1", tiny_bert_dir)

    async def scenario(hub: HubServer) -> None:
        settings = ModelSettings(tensorhub_url=hub.url, cache_dir=str(tmp_path / "cache"))
        source = build_model_source(settings)
        models = CachedModels(
            ModelCache(max_vram_gb=1.0, model_cache_dir=tmp_path / "cache"),
            SnapshotFinder(lambda: source),
            declared={"bert": "acme/tiny-bert:v1"},
            keyspaces={},
        )
        holder = Holder("r1")
        ref = "acme/tiny-bert:v1"
        tokenizer = await models.load(Load(ref, injection(AutoTokenizer), "cpu", holder))
        model = await models.load(Load(ref, injection(AutoModel), "cpu", holder))
        assert isinstance(model, BertModel) and not model.training  # eval mode for serving
        with torch.no_grad():
            out = model(**tokenizer(["hello world"], return_tensors="pt"))
        assert out.last_hidden_state.shape[-1] == 32
        # Two entries (one per type), one ref in every report.
        assert sorted(models.cache.get_vram_models()) == [
            "acme/tiny-bert:v1::AutoModel",
            "acme/tiny-bert:v1::AutoTokenizer",
        ]
        assert models.inventory()["hot"] == [ref]
        stats = models.cache.get_stats()
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        assert stats["used_vram_gb"] * 1024**3 >= size  # the model's bytes are accounted for
        # Both are pinned by the request; the tokenizer is locked to it (fast tokenizers are
        # not thread-safe), the model is shared.
        await models.lock(holder, [ref])
        other = Holder("r2")
        await models.load(Load(ref, injection(AutoModel), "cpu", other))
        await asyncio.wait_for(models.lock(other, [ref]), 1)  # not blocked: no tokenizer
        models.release(other)
        models.release(holder)
        assert models.cache.get_stats()["in_use"] == {}
        await models.aclose()

    with HubServer(tmp_path / "hub") as hub:
        asyncio.run(scenario(hub))


def test_dtype_from_attributes_variant_files_and_object_annotations(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    """The loader reads the precision from the model's attributes, finds variant-only weight
    files, and lets the files decide for an ``object`` parameter."""
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from gen_worker.injection import load_snapshot

    fp16 = load_snapshot(
        tiny_sd_dir,
        StableDiffusionPipeline,
        model_id="acme/tiny-sd:v1",
        device="cpu",
        attributes={"dtype": ["fp16", "bf16"]},
    )
    assert fp16.kind == "diffusers" and fp16.exclusive
    assert fp16.obj.unet.dtype == torch.float16
    assert fp16.placement is not None and fp16.placement["stage"] == "baseline"

    # A snapshot published with fp16 variant files only: diffusers must be told the variant.
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    variant_dir = tmp_path / "variant"
    pipe.save_pretrained(variant_dir, safe_serialization=True, variant="fp16")
    assert all(".fp16." in p.name for p in variant_dir.rglob("*.safetensors"))
    auto = load_snapshot(variant_dir, object, model_id="acme/v:1", device="cpu")
    assert isinstance(auto.obj, StableDiffusionPipeline) and auto.size_bytes > 0
    # The size counts every weight once (the pipeline's modules, not the files on disk).
    weights = sum(
        t.numel() * t.element_size()
        for c in auto.obj.components.values()
        if isinstance(c, torch.nn.Module)
        for t in [*c.parameters(), *c.buffers()]
    )
    assert auto.size_bytes == weights


def test_concurrent_requests_share_one_pipeline_safely(tmp_path: Path, tiny_sd_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    publish(tmp_path / "hub", REF, tiny_sd_dir)
    with HubServer(tmp_path / "hub") as hub:
        settings = ModelSettings(tensorhub_url=hub.url, cache_dir=str(tmp_path / "cache"))
        with (
            # No fetch at start: the four requests find the model cold and share one load.
            serve(
                tmp_path / "out", project=PROJECT, model_settings=settings, prefetch_models=False
            ) as served,
            httpx.Client(base_url=served.base_url, timeout=90) as client,
            ThreadPoolExecutor(4) as pool,
        ):
            answers = list(
                pool.map(
                    lambda i: client.post(
                        "/v1/request/generate", json={"model": "tiny", "prompt": f"p{i}"}
                    ),
                    range(4),
                )
            )
            assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
            loads = [
                e
                for a in answers
                for e in a.json()["events"]
                if e["type"] == "model.download.started"
            ]
            assert len(loads) == 1  # four requests, one download, one load
            status = client.get("/v1/models/status").json()
            assert status["hot"] == [REF] and status["cache"]["in_use"] == {}


def test_several_pipelines_share_a_vram_budget_least_recently_used_first(
    tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pipelines of ~6.7 MB under a 10 MB budget: loading one evicts the other (it stays
    warm on disk); the next request for the evicted one reloads it from disk."""
    monkeypatch.setenv("WORKER_MAX_VRAM_GB", str(10 / 1024))
    publish(tmp_path / "hub", REF, tiny_sd_dir)
    publish(tmp_path / "hub", "acme/tiny-sd:v2", tiny_sd_dir)
    logged: list[dict[str, Any]] = []
    with HubServer(tmp_path / "hub") as hub:
        settings = ModelSettings(tensorhub_url=hub.url, cache_dir=str(tmp_path / "cache"))
        with (
            serve(tmp_path / "out", project=PROJECT, model_settings=settings) as served,
            httpx.Client(base_url=served.base_url, timeout=90) as client,
        ):
            models = served.runner.models
            assert models is not None and models.provider is not None
            models.provider.on_event = lambda kind, payload: logged.append({kind: payload})

            def state(model: str) -> str:
                answer = client.post("/v1/request/generate", json={"model": model})
                assert answer.status_code == 200, answer.text
                job = next(e for e in answer.json()["events"] if e["type"] == "metrics.job")
                return str(job["payload"]["cache_state"])

            wait_ready(client)
            assert state("tiny") == "warm_disk"
            assert state("other") == "warm_disk"
            evicted = [p["evicted"] for e in logged for k, p in e.items() if k == "model.cached"]
            assert evicted == [[], [REF]]
            status = client.get("/v1/models/status").json()
            assert status["hot"] == ["acme/tiny-sd:v2"]
            assert status["cache"]["over_budget"] is False
            assert status["cache"]["used_vram_gb"] <= 10 / 1024
            # Evicted from memory, not from disk: the next load skips the download.
            assert state("tiny") == "warm_disk"
            assert client.get("/v1/models/status").json()["hot"] == [REF]


def test_a_load_command_uses_the_endpoint_configs_resolution(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    """The scheduler resolves the endpoint's models in its config, then asks for one by ref:
    the worker (no hub access of its own) loads it from that resolution."""
    publish(tmp_path / "hub", REF, tiny_sd_dir)
    lock = tmp_path / "endpoint.lock"
    lock.write_bytes(encode_lock(discover(PROJECT, isolated=True).lock))
    with HubServer(tmp_path / "hub") as hub:
        resolution = _resolution(hub, REF)
        harness = Harness(tmp_path, lock)

        async def scenario() -> None:
            async with harness.serving(GEN_WORKER_ENDPOINT_ROOT=str(PROJECT)) as s:
                config = m.EndpointConfig(resolved_models=[resolution])
                assert await s.sched.send(config, s.conn.worker_id)
                assert await s.sched.send(m.LoadModel(model_id=REF))

                def answers() -> list[m.LoadModelResult]:
                    return [x for x in s.conn.messages if isinstance(x, m.LoadModelResult)]

                await until(lambda: bool(answers()), 60, "the load result")
                (answer,) = answers()
                assert (answer.model_id, answer.ok) == (REF, True), answer
                assert [e["model_id"] for e in worker_events(s.conn, "model.cached")] == [REF]
                await until(lambda: REF in s.conn.heartbeats[-1].models.hot, 5, "hot")

        run(scenario(), timeout_s=90)
