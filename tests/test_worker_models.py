"""The worker's endpoint-config prefetch against a real local hub (no scheduler needed here)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gen_worker.config import ModelSettings
from gen_worker.hub import HubServer, publish
from gen_worker.models.hub_client import HubClient
from gen_worker.models.source import build_model_source
from gen_worker.protocol import messages as m
from gen_worker.runtime.models import WorkerModels


def _publish(tmp_path: Path, ref: str, body: bytes) -> None:
    src = tmp_path / f"src-{ref.replace('/', '_').replace(':', '_')}"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "weights.safetensors").write_bytes(body)
    publish(tmp_path / "hub", ref, src)


def _resolution(hub: HubServer, ref: str) -> m.ResolvedModel:
    async def go() -> m.ResolvedModel:
        client = HubClient(hub.url)
        try:
            manifest = await client.resolve(ref)
        finally:
            await client.aclose()
        return m.ResolvedModel(
            ref=ref,
            snapshot_digest=manifest.digest,
            files=[m.ResolvedFile(e.path, e.size_bytes, e.blake3, e.url) for e in manifest.entries],
        )

    return asyncio.run(go())


def _prefetch(
    settings: ModelSettings, config: m.EndpointConfig
) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []

    async def go() -> None:
        models = WorkerModels(settings)
        try:
            await models.prefetch(config, lambda kind, payload: events.append((kind, payload)))
            assert models.downloading == set()
        finally:
            await models.aclose()

    asyncio.run(go())
    return events


def test_resolved_models_are_fetched_and_reported(tmp_path: Path) -> None:
    _publish(tmp_path, "acme/a:latest", b"a" * 5000)
    _publish(tmp_path, "acme/b:latest", b"b" * 7000)
    with HubServer(tmp_path / "hub") as hub:
        config = m.EndpointConfig(
            resolved_models=[_resolution(hub, "acme/a:latest")],
            required_models=["acme/a:latest", "acme/b:latest"],
        )
        settings = ModelSettings(cache_dir=str(tmp_path / "cache"))
        events = _prefetch(settings, config)
        kinds = [kind for kind, _ in events]
        # acme/a from the scheduler's resolution; acme/b was not resolved and hub resolve is off.
        assert kinds.count("model.download.started") == 1
        ready = [p for k, p in events if k == "model.ready"]
        assert [p["model_id"] for p in ready] == ["acme/a:latest"]
        assert Path(ready[0]["path"], "weights.safetensors").read_bytes() == b"a" * 5000
        failed = [p for k, p in events if k == "model.download.failed"]
        assert [p["model_id"] for p in failed] == ["acme/b:latest"]
        assert "WORKER_ALLOW_TENSORHUB_API_RESOLVE" in failed[0]["error_message"]
        assert kinds[-1] == "models.disk_inventory"

        # With hub resolution allowed, the unresolved one is resolved and fetched too.
        allowed = ModelSettings(
            cache_dir=str(tmp_path / "cache"), tensorhub_url=hub.url, allow_hub_resolve=True
        )
        events = _prefetch(allowed, config)
        ready_ids = sorted(p["model_id"] for k, p in events if k == "model.ready")
        assert ready_ids == ["acme/a:latest", "acme/b:latest"]
        assert not [p for k, p in events if k == "model.download.failed"]
        models = WorkerModels(allowed, build_model_source(allowed))
        assert models.warm() == ["acme/a:latest", "acme/b:latest"]


def test_a_real_worker_prefetches_what_the_endpoint_config_lists(tmp_path: Path) -> None:
    import msgspec
    from test_worker_integration import PROJECT, Harness, run, until

    from gen_worker.discovery import discover, encode_lock

    _publish(tmp_path, "acme/a:latest", b"a" * 3000)
    with HubServer(tmp_path / "hub") as hub:
        resolution = _resolution(hub, "acme/a:latest")
        lock = tmp_path / "endpoint.lock"
        lock.write_bytes(encode_lock(discover(PROJECT, isolated=True).lock))
        harness = Harness(tmp_path, lock)

        async def scenario() -> None:
            async with harness.serving() as s:
                config = m.EndpointConfig(resolved_models=[resolution])
                assert await s.sched.send(config, s.conn.worker_id)

                def kinds() -> list[str]:
                    return [e.event_type for e in s.conn.worker_events]

                await until(lambda: "models.disk_inventory" in kinds(), 10, "prefetch")
                ready = [
                    msgspec.json.decode(e.payload_json)
                    for e in s.conn.worker_events
                    if e.event_type == "model.ready"
                ]
                assert [r["model_id"] for r in ready] == ["acme/a:latest"]
                assert Path(ready[0]["path"], "weights.safetensors").read_bytes() == b"a" * 3000
                assert Path(ready[0]["path"]).is_relative_to(tmp_path / "hub-cache" / "cas")
                assert kinds().index("model.download.started") < kinds().index("model.ready")

        run(scenario())


def _expired(resolution: m.ResolvedModel) -> m.ResolvedModel:
    """The same resolution with every URL's signature spoiled: the hub answers 403."""
    files = [
        m.ResolvedFile(f.path, f.size_bytes, f.blake3, f.url.replace("sig=", "sig=0"))
        for f in resolution.files
    ]
    return m.ResolvedModel(resolution.ref, resolution.snapshot_digest, files)


def test_expired_urls_are_refreshed_by_asking_the_scheduler(tmp_path: Path) -> None:
    import msgspec
    from test_worker_integration import PROJECT, Harness, run, until

    from gen_worker.discovery import discover, encode_lock

    _publish(tmp_path, "acme/a:latest", b"a" * 3000)
    _publish(tmp_path, "acme/b:latest", b"b" * 2000)
    with HubServer(tmp_path / "hub") as hub:
        good = _resolution(hub, "acme/a:latest")
        refused = _resolution(hub, "acme/b:latest")
        assert "sig=" in good.files[0].url
        lock = tmp_path / "endpoint.lock"
        lock.write_bytes(encode_lock(discover(PROJECT, isolated=True).lock))
        harness = Harness(tmp_path, lock)

        async def scenario() -> None:
            async with harness.serving() as s:

                def asked() -> list[m.ModelUrlRefreshRequest]:
                    return [x for x in s.conn.messages if isinstance(x, m.ModelUrlRefreshRequest)]

                def events(kind: str) -> list[dict[str, object]]:
                    return [
                        msgspec.json.decode(e.payload_json)
                        for e in s.conn.worker_events
                        if e.event_type == kind
                    ]

                config = m.EndpointConfig(resolved_models=[_expired(good)])
                assert await s.sched.send(config, s.conn.worker_id)
                await until(lambda: len(asked()) == 1, 10, "a refresh request")
                assert asked()[0].model_ref == "acme/a:latest"
                assert await s.sched.send(m.ModelUrlRefreshResponse(model=good))
                await until(lambda: bool(events("model.ready")), 10, "model.ready")
                assert [r["model_id"] for r in events("model.ready")] == ["acme/a:latest"]
                ready = events("model.ready")[0]
                assert Path(str(ready["path"]), "weights.safetensors").read_bytes() == b"a" * 3000

                # The scheduler may refuse: the download fails, saying why.
                config = m.EndpointConfig(resolved_models=[_expired(refused)])
                assert await s.sched.send(config, s.conn.worker_id)
                await until(lambda: len(asked()) == 2, 10, "a second refresh request")
                answer = m.ModelUrlRefreshResponse(error_message="release withdrawn")
                assert await s.sched.send(answer)
                await until(lambda: bool(events("model.download.failed")), 10, "the failure")
                (failed,) = events("model.download.failed")
                assert failed["model_id"] == "acme/b:latest"
                assert "release withdrawn" in str(failed["error_message"])

        run(scenario())
