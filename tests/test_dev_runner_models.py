"""The dev runner's model routes against a real local hub: the seed's prefetch example verbatim."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from devserver_support import serve
from test_readme import curl_to_request

from gen_worker.config import ModelSettings
from gen_worker.hub import HubServer, publish

# From the seed README, byte for byte.
SEED_PREFETCH = (
    "curl -sS -X POST 'http://localhost:8081/v1/models/prefetch' "
    "-H 'content-type: application/json' "
    '-d \'{"models":[{"ref":"runwayml/stable-diffusion-v1-5","dtypes":["bf16","fp16"]}]}\''
)


def test_the_seed_prefetch_example_downloads_into_the_store(tmp_path: Path) -> None:
    model = tmp_path / "sd15"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    weights = os.urandom(150_000)
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(weights)
    publish(
        tmp_path / "hub",
        "runwayml/stable-diffusion-v1-5:latest",
        model,
        attributes={"dtype": "fp16"},
        part_size_bytes=64_000,
    )
    cache = tmp_path / "cache"
    with HubServer(tmp_path / "hub") as hub:
        settings = ModelSettings(tensorhub_url=hub.url, cache_dir=str(cache))
        with serve(tmp_path / "out", model_settings=settings) as served:
            method, url, headers, data = curl_to_request(SEED_PREFETCH, served.base_url)
            with httpx.Client(timeout=60) as client:
                answer = client.request(method, url, headers=headers, content=data)
                assert answer.status_code == 200, answer.text
                (result,) = answer.json()["results"]
                assert result["model_id"] == "runwayml/stable-diffusion-v1-5"
                assert result["ok"] is True, result
                snapshot = Path(result["path"])
                assert snapshot.parent == cache / "cas" / "snapshots"
                unet = snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors"
                assert unet.read_bytes() == weights

                status = client.get(served.base_url + "/v1/models/status").json()
                assert status["hub"] == hub.url and status["downloading"] == []
                (warm,) = status["warm"]
                assert warm["refs"] == ["runwayml/stable-diffusion-v1-5:latest"]
                assert warm["digest"] == f"blake3:{snapshot.name}"

                mixed = client.post(
                    served.base_url + "/v1/models/prefetch",
                    json={"models": ["runwayml/stable-diffusion-v1-5", "acme/absent"]},
                ).json()["results"]
                assert [r["ok"] for r in mixed] == [True, False]
                assert mixed[1]["error_type"] == "fatal"
                assert "acme/absent:latest" in mixed[1]["error_message"]


def test_readyz_waits_for_the_declared_models_and_names_the_missing_ones(tmp_path: Path) -> None:
    """Ready once every model endpoint.toml declares is on disk; otherwise 503 saying which."""
    import time

    example = Path(__file__).resolve().parents[1] / "examples" / "hello-world"
    folders = {}
    for name in ("tok", "v1", "v2"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
    given = {"tokenizer": folders["tok"], "gen-worker/tiny-lm:v1": folders["v1"]}

    def readiness(dirs: dict[str, Path]) -> httpx.Response:
        with (
            serve(tmp_path / "out", project=example, model_dirs=dirs) as served,
            httpx.Client(base_url=served.base_url, timeout=30) as client,
        ):
            deadline = time.monotonic() + 20
            while (answer := client.get("/readyz")).json().get("pending"):
                assert time.monotonic() < deadline, answer.text
                time.sleep(0.02)
            return answer

    missing = readiness(given)
    assert missing.status_code == 503
    body = missing.json()
    assert body["ready"] is False and body["reason"] == "declared models are not available"
    assert list(body["failed"]) == ["gen-worker/tiny-lm:v2"]
    assert "no hub is configured" in body["failed"]["gen-worker/tiny-lm:v2"]
    ready = readiness({**given, "gen-worker/tiny-lm:v2": folders["v2"]})
    assert ready.status_code == 200 and ready.json() == {"ready": True}
