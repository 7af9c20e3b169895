"""A real worker uploads a request's outputs through the job's file API (the local hub)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from test_worker_integration import run, stop

from gen_worker.config import load_worker_settings
from gen_worker.entrypoint import run_inference
from gen_worker.hub import HubServer
from gen_worker.protocol import messages as m
from gen_worker.testing.scheduler import MockScheduler

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "tests" / "golden" / "hello-world.endpoint.lock"
EXAMPLE = REPO / "examples" / "hello-world"
TOKEN = "files-token"


def _env(address: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PUBLIC_ORCHESTRATOR_GRPC_ADDR": address,
        "WORKER_JWT": "test-worker-token",
        "WORKER_ID": "worker-uploads",
        "GEN_WORKER_MANIFEST_PATH": str(LOCK),
        "GEN_WORKER_ENDPOINT_ROOT": str(EXAMPLE),
        "TENSORHUB_CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_LOCAL_MODEL_CACHE_DIR": str(tmp_path / "local-cache"),
        "WORKER_REGISTER_TIMEOUT_S": "10",
        **extra,
    }


def _generate(
    tmp_path: Path, file_base_url: str, file_token: str
) -> tuple[bool, dict[str, object], str]:
    async def scenario() -> tuple[bool, dict[str, object], str]:
        sched = MockScheduler(heartbeat_interval_s=0.5)
        address = await sched.start()
        task = asyncio.create_task(run_inference(load_worker_settings(_env(address, tmp_path))))
        try:
            await sched.wait_for_worker(10)
            record = await sched.submit(
                "generate",
                msgspec.msgpack.encode({"prompt": "a bonsai"}),
                file_base_url=file_base_url,
                file_token=file_token,
            )
            await asyncio.wait_for(record.done.wait(), 20)
            result = record.terminal
            assert isinstance(result, m.JobResult)
            output = msgspec.msgpack.decode(result.output) if result.success else {}
            return result.success, output, f"{result.error_type}: {result.safe_message}"
        finally:
            await stop(task)
            await sched.close()

    return run(scenario(), 40)


def test_outputs_land_in_the_file_api_before_the_result(tmp_path: Path) -> None:
    with HubServer(tmp_path / "hub", tokens=(TOKEN,)) as hub:
        ok, output, error = _generate(tmp_path, f"{hub.url}/api/v1/files", TOKEN)
    assert ok, error
    image = output["image"]
    assert isinstance(image, dict)
    ref = image["ref"]
    assert isinstance(ref, str) and ref.startswith("jobs/") and ref.endswith("/outputs/image.ppm")
    stored = tmp_path / "hub" / "files" / ref
    assert stored.read_bytes().startswith(b"P6 8 8 255\n")
    assert image["size_bytes"] == stored.stat().st_size


@pytest.mark.parametrize("token", ["wrong-token"])
def test_a_refused_upload_fails_the_request(tmp_path: Path, token: str) -> None:
    with HubServer(tmp_path / "hub", tokens=(TOKEN,)) as hub:
        ok, _, error = _generate(tmp_path, f"{hub.url}/api/v1/files", token)
    assert not ok
    assert error.startswith("auth: ") and "image.ppm" in error
    assert token not in error
