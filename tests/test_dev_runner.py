"""The dev HTTP runner, over a real socket on 127.0.0.1:0, with the scenario functions."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from devserver_support import Served, serve
from fixtures.functions import blocks_forever, sleeps

from gen_worker.config import EngineSettings


def sse_items(text: str) -> list[tuple[str, Any]]:
    items = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        items.append((fields["event"], msgspec.json.decode(fields["data"])))
    return items


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("outputs")) as served:
        yield served


@pytest.fixture(scope="module")
def client(runner: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=runner.base_url, timeout=30) as c:
        yield c


def post(client: httpx.Client, function: str, body: Any, **kw: Any) -> httpx.Response:
    return client.post(f"/v1/request/{function}", content=msgspec.json.encode(body), **kw)


# -- success and the response shape --------------------------------------------------------


def test_success_body(client: httpx.Client) -> None:
    r = post(client, "chatty", {"text": "hi"})
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and body["output"] == {"text": "HI"}
    assert (body["error_type"], body["safe_message"], body["error_message"]) == (None, None, None)
    types = [e["type"] for e in body["events"]]
    assert types[0] == "request.received" and types[-1] == "request.completed"
    assert {"type": "custom.note", "payload": {"k": "v"}}.items() <= next(
        e for e in body["events"] if e["type"] == "custom.note"
    ).items()
    progress = [e["payload"] for e in body["events"] if e["type"] == "request.progress"]
    assert progress == [{"progress": 0.25, "stage": "load"}, {"progress": 1.0}]
    assert [e["seq"] for e in body["events"]] == sorted(e["seq"] for e in body["events"])
    assert body["timing_ms"]["total_ms"] > 0


def test_envelope_and_python_name(client: httpx.Client) -> None:
    r = post(client, "chatty", {"payload": {"text": "env"}, "request_id": "my-id-1", "owner": "me"})
    assert r.status_code == 200
    assert r.json()["request_id"] == "my-id-1" and r.json()["output"] == {"text": "ENV"}


# -- one test per status code -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "error_type"),
    [
        ("validation", 400, "validation"),
        ("auth", 403, "auth"),
        ("canceled", 409, "canceled"),
        ("output_too_large", 413, "output_too_large"),
        ("retryable", 503, "retryable"),
        ("resource", 503, "resource"),
        ("fatal", 500, "fatal"),
        ("value_error", 500, "internal"),
    ],
)
def test_error_status_codes(client: httpx.Client, kind: str, status: int, error_type: str) -> None:
    r = post(client, "fail", {"text": kind})
    assert r.status_code == status
    body = r.json()
    assert body["success"] is False and body["error_type"] == error_type and body["output"] is None
    assert body["safe_message"]
    if status == 500:
        assert body["error_message"] is None  # operators' detail never reaches the caller
    else:
        assert body["error_message"]


def test_unknown_function_is_404(client: httpx.Client) -> None:
    r = post(client, "no-such-function", {})
    assert r.status_code == 404
    assert r.json()["error_type"] == "not_found"
    assert "unknown function 'no-such-function'; available: [" in r.json()["safe_message"]


def test_paths_the_invoke_fast_path_does_not_serve_keep_their_answers(
    client: httpx.Client,
) -> None:
    # Not one function name, or not a POST: Starlette's router answers, as before the fast path.
    assert client.post("/v1/request/chatty/extra", content=b"{}").status_code == 404
    assert client.post("/v1/request/", content=b"{}").status_code == 404
    assert client.get("/v1/request/chatty").status_code == 405
    assert client.get("/healthz").json() == {"ok": True}


def test_a_body_sent_in_chunks_is_read_whole(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"payload": {"te'
        yield b'xt": "chunked"}, "request_id": "chunky"}'

    r = client.post("/v1/request/chatty", content=chunks())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert (r.json()["request_id"], r.json()["output"]) == ("chunky", {"text": "CHUNKED"})


def test_wrong_type_has_the_msgspec_path(client: httpx.Client) -> None:
    r = post(client, "chatty", {"text": 5})
    assert r.status_code == 400
    assert r.json()["safe_message"] == "invalid payload: Expected `str`, got `int` - at `$.text`"


def test_unknown_fields_on_a_struct_that_forbids_them(client: httpx.Client) -> None:
    assert post(client, "loose", {"prompt": "x", "other": 1}).status_code == 200
    r = post(client, "strict", {"prompt": "x", "other": 1})
    assert r.status_code == 400
    assert "unknown field `other`" in r.json()["safe_message"]


def test_bad_envelope_is_400(client: httpx.Client) -> None:
    r = post(client, "chatty", {"payload": {"text": "x"}, "timeout_ms": "soon"})
    assert r.status_code == 400
    assert (
        "invalid request envelope: Expected `int | null`, got `str` - at `$.timeout_ms`" in r.text
    )


def test_deadline_is_504(client: httpx.Client) -> None:
    start = time.monotonic()
    r = post(client, "wait_forever", {"payload": {}, "timeout_ms": 200})
    assert r.status_code == 504 and r.json()["error_type"] == "timeout"
    assert time.monotonic() - start < 5


def test_memory_model_routes_say_what_is_wrong(client: httpx.Client) -> None:
    for path in ("/v1/models/load", "/v1/models/unload"):
        r = client.post(path, json={})
        assert r.status_code == 400, path
        assert r.json()["error_message"] == (
            '\'model_id\' is missing; expected {"model_id": "owner/repo:tag"}'
        )
        r = client.post(path, json={"model_id": "a/b/c"})
        assert r.status_code == 400 and "a/b/c" in r.json()["error_message"], r.text
    # No hub and nothing in the store: the load says where the model could come from.
    r = client.post("/v1/models/load", json={"model_id": "Acme/Absent"})
    assert r.status_code == 500 and r.json()["error_type"] == "fatal"
    assert r.json()["error_message"] == (
        "model acme/absent:latest is not in the local store and no hub is configured; set "
        "TENSORHUB_URL to a hub that has it, or serve a folder with --model "
        "acme/absent:latest=DIR"
    )
    # Unloading what is not loaded is not an error: there is nothing to do.
    r = client.post("/v1/models/unload", json={"model_id": "acme/absent"})
    assert r.status_code == 200 and r.json() == {
        "ok": True,
        "model_id": "acme/absent:latest",
        "unloaded": False,
    }
    # A function without models warms up at once; an unknown one is a 404.
    r = client.post("/v1/warmup/chatty", json={})
    assert r.status_code == 200 and r.json()["ok"] is True
    assert r.json()["request_id"].startswith("warmup-")
    assert client.post("/v1/warmup/nope", json={}).status_code == 404


def test_prefetch_without_models_is_400_and_status_lists_the_store(
    client: httpx.Client, runner: Served
) -> None:
    r = client.post("/v1/models/prefetch", json={})
    assert r.status_code == 400
    assert "'models' is missing" in r.json()["safe_message"]
    r = client.post("/v1/models/prefetch", json={"models": "acme/sd"})
    assert r.status_code == 400 and "must be a list" in r.json()["safe_message"]
    status = client.get("/v1/models/status").json()
    assert status["warm"] == [] and status["downloading"] == [] and status["hub"] is None
    assert status["store"] == str(runner.outputs / ".cache" / "cas")


def test_input_and_busy_limits(tmp_path: Path) -> None:
    settings = EngineSettings(max_input_bytes=64, max_concurrency=1)
    with (
        serve(tmp_path, settings=settings, max_queue=0) as served,
        httpx.Client(base_url=served.base_url, timeout=30) as c,
    ):
        r = post(c, "loose", {"prompt": "x" * 100})
        assert r.status_code == 413 and r.json()["error_type"] == "validation"
        assert "WORKER_MAX_INPUT_BYTES" in r.json()["safe_message"]
        slow = threading.Thread(target=post, args=(c, "anap", {"delay_ms": 500}))
        slow.start()
        time.sleep(0.2)
        busy = post(c, "anap", {"delay_ms": 1})
        slow.join()
        assert busy.status_code == 429 and busy.json()["error_type"] == "busy"


# -- streaming --------------------------------------------------------------------------------


def test_sse_order_for_a_streaming_function(client: httpx.Client) -> None:
    r = post(client, "count", {"n": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    items = sse_items(r.text)
    kinds = [k for k, _ in items]
    assert kinds[-1] == "result" and kinds.count("result") + kinds.count("error") == 1
    assert [d["delta"]["n"] for k, d in items if k == "delta"] == [0, 1, 2]
    seqs = [d["seq"] for k, d in items if k != "result"]
    assert seqs == sorted(seqs)
    result = items[-1][1]
    assert result["success"] is True and result["status"] == 200 and result["output"] is None


def test_sse_on_request_for_a_single_output_function(client: httpx.Client) -> None:
    r = post(client, "chatty", {"text": "s"}, headers={"accept": "text/event-stream"})
    items = sse_items(r.text)
    kinds = [k for k, _ in items]
    assert "progress" in kinds and "event" in kinds
    assert kinds[-1] == "result" and items[-1][1]["output"] == {"text": "S"}
    assert kinds.index("progress") < len(kinds) - 1


def test_sse_failure_after_two_deltas(client: httpx.Client) -> None:
    items = sse_items(post(client, "two_then_fail", {}).text)
    deltas = [d["delta"] for k, d in items if k == "delta"]
    assert deltas == [{"text": "one"}, {"text": "two"}]
    assert items[-1][0] == "error"
    assert items[-1][1]["error_type"] == "internal" and items[-1][1]["status"] == 500
    assert [k for k, _ in items].count("error") == 1


def test_ten_thousand_deltas(client: httpx.Client) -> None:
    items = sse_items(post(client, "acount", {"n": 10000}).text)
    deltas = [d["delta"]["n"] for k, d in items if k == "delta"]
    assert deltas == list(range(10000))
    assert items[-1][0] == "result"


# -- cancellation and concurrency -------------------------------------------------------------


def test_cancel_a_sync_function_that_never_checks(tmp_path: Path) -> None:
    blocks_forever.STARTED.clear()
    blocks_forever.STOPPED.clear()
    settings = EngineSettings(max_concurrency=1)
    with (
        serve(tmp_path, settings=settings, cancel_grace_s=0.3) as served,
        httpx.Client(base_url=served.base_url, timeout=30) as c,
    ):
        results: dict[str, httpx.Response] = {}
        spin = threading.Thread(
            target=lambda: results.update(
                spin=post(c, "spin", {"payload": {}, "request_id": "spin-1"})
            )
        )
        spin.start()
        assert blocks_forever.STARTED.wait(5)
        second = threading.Thread(
            target=lambda: results.update(nap=post(c, "nap", {"delay_ms": 1}))
        )
        second.start()
        time.sleep(0.1)
        start = time.monotonic()
        cancel = c.delete("/v1/request/spin-1")
        assert cancel.json() == {"request_id": "spin-1", "canceled": True}
        spin.join(5)
        assert time.monotonic() - start < 1.0  # the outcome arrives promptly
        assert (
            results["spin"].status_code == 409
            and results["spin"].json()["error_type"] == "canceled"
        )
        assert "nap" not in results  # still waiting for the slot the spinning thread holds
        second.join(10)
        assert results["nap"].status_code == 200
        assert blocks_forever.STOPPED.is_set()
        assert c.delete("/v1/request/spin-1").json()["canceled"] is False


def test_cancel_an_async_function(client: httpx.Client) -> None:
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: result.update(
            r=post(client, "wait_forever", {"payload": {}, "request_id": "aw-1"})
        )
    )
    t.start()
    time.sleep(0.2)
    assert client.delete("/v1/request/aw-1").json()["canceled"] is True
    t.join(5)
    assert result["r"].status_code == 409


def test_queued_requests_complete_in_order(tmp_path: Path) -> None:
    sleeps.STARTED.clear()
    with (
        serve(tmp_path, settings=EngineSettings(max_concurrency=1)) as served,
        httpx.Client(base_url=served.base_url, timeout=30) as c,
    ):
        threads = []
        for i in range(4):
            body = {"payload": {"delay_ms": 80}, "request_id": f"order-{i}"}
            threads.append(threading.Thread(target=post, args=(c, "nap", body)))
            threads[-1].start()
            time.sleep(0.03)
        status = c.get("/v1/status").json()
        assert status["running"] == 1 and status["waiting"] >= 2
        for t in threads:
            t.join(10)
    assert [f"order-{i}" for i in range(4)] == sleeps.STARTED


# -- files ------------------------------------------------------------------------------------


class _FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"0123456789" * (1000 if self.path == "/big.bin" else 1)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def file_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_asset_input_and_outputs(client: httpx.Client, runner: Served, file_server: str) -> None:
    body = {"payload": {"image": {"url": f"{file_server}/small.bin"}}, "request_id": "assets-1"}
    r = post(client, "inspect_file", body)
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    assert out["size"] == 10
    saved = runner.outputs / "jobs/assets-1/outputs/reversed.bin"
    assert saved.read_bytes() == b"9876543210"
    assert out["saved"]["ref"] == "jobs/assets-1/outputs/reversed.bin"
    assert out["copy"]["ref"] == "jobs/assets-1/outputs/returned.txt"
    assert (runner.outputs / out["copy"]["ref"]).read_bytes() == b"returned as a local Asset"
    assert len(out["saved"]["sha256"]) == 64 and len(out["saved"]["blake3"]) == 64


def test_asset_over_the_size_limit(tmp_path: Path, file_server: str) -> None:
    with (
        serve(tmp_path, settings=EngineSettings(max_input_file_bytes=100)) as served,
        httpx.Client(base_url=served.base_url, timeout=30) as c,
    ):
        r = post(c, "inspect_file", {"image": {"url": f"{file_server}/big.bin"}})
        assert r.status_code == 400
        assert "larger than the limit of 100 bytes" in r.json()["safe_message"]


def test_output_refs_outside_the_request_are_refused(client: httpx.Client, runner: Served) -> None:
    ok = post(
        client, "save_to", {"payload": {"ref": "jobs/ref-1/outputs/x/y.txt"}, "request_id": "ref-1"}
    )
    assert ok.status_code == 200
    assert (runner.outputs / "jobs/ref-1/outputs/x/y.txt").read_bytes() == b"data"
    for ref in ["../escape.txt", "/etc/passwd", "jobs/other/outputs/a.txt"]:
        r = post(client, "save_to", {"ref": ref})
        assert r.status_code == 400, ref
        assert r.json()["error_type"] == "validation"
    assert not (runner.outputs.parent / "escape.txt").exists()


# -- documents --------------------------------------------------------------------------------


def test_openapi_functions_status_health(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    op = doc["paths"]["/v1/request/chatty"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Text"
    }
    assert "Text" in doc["components"]["schemas"]
    assert (
        "text/event-stream"
        in doc["paths"]["/v1/request/count"]["post"]["responses"]["200"]["content"]
    )
    functions = client.get("/v1/functions").json()["functions"]
    count = next(f for f in functions if f["name"] == "count")
    assert count["streaming"] is True and "delta_schema" in count
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/readyz").json() == {"ready": True}
    status = client.get("/v1/status").json()
    assert status["endpoint"] == "runner-scenarios" and status["concurrency"] == 2
    page = client.get("/docs")
    assert page.status_code == 200 and "<h2>chatty</h2>" in page.text


def test_models_from_local_folders(tmp_path: Path) -> None:
    tok, small = tmp_path / "tok", tmp_path / "small"
    for folder, name in ((tok, "vocab.json"), (small, "model.safetensors")):
        folder.mkdir()
        (folder / name).write_text("{}")
    example = Path(__file__).resolve().parents[1] / "examples" / "hello-world"
    dirs = {"tokenizer": tok, "gen-worker/tiny-lm:v1": small}
    with (
        serve(tmp_path / "out", project=example, model_dirs=dirs) as served,
        httpx.Client(base_url=served.base_url, timeout=30) as c,
    ):
        ok = post(c, "describe-models", {})
        assert ok.status_code == 200, ok.text
        assert ok.json()["output"] == {
            "tokenizer_files": ["vocab.json"],
            "model_files": ["model.safetensors"],
        }
        job = next(e for e in ok.json()["events"] if e["type"] == "metrics.job")
        assert job["payload"]["cache_state"] == "warm_disk"
        unknown = post(c, "describe-models", {"model": "someone/else"})
        assert unknown.status_code == 400
        assert "choose one of ['large', 'small']" in unknown.json()["safe_message"]
        absent = post(c, "describe-models", {"model": "large"})
        assert absent.status_code == 500
        assert absent.json()["safe_message"].startswith(
            "model gen-worker/tiny-lm:v2 is not in the local store and no hub is configured"
        )
