"""Local verification of WORKER_JWT at worker startup against a JWKS served on loopback.

``run_inference`` runs in-process with SCHEDULER_JWKS_URL / _ISSUER / _AUDIENCE set (SPEC
section 10): a valid token registers, every bad one ends the worker with exit code 1 before it
opens any connection to the scheduler, and no token reaches stderr.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gen_worker.config import load_worker_settings
from gen_worker.discovery import discover, encode_lock
from gen_worker.entrypoint import run_inference
from gen_worker.protocol import messages as m
from gen_worker.testing.scheduler import MockScheduler

TESTS = Path(__file__).parent
PROJECT = TESTS / "fixtures" / "projects" / "worker_scenarios"
ISSUER = "cozy-scheduler"
AUDIENCE = "gen-workers"

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


class Keys:
    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> bytes:
        key = {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": "rsa-1"}
        return json.dumps({"keys": [key]}).encode()


class JwksServer(ThreadingHTTPServer):
    daemon_threads = True
    body: bytes = b""
    hits: int = 0
    slow_window: tuple[float, float] | None = None


class JwksHandler(BaseHTTPRequestHandler):
    server: JwksServer

    def do_GET(self) -> None:
        self.server.hits += 1
        path = self.path.partition("?")[0]
        if path == "/slow/jwks.json":
            begin = time.monotonic()
            time.sleep(0.5)
            self.server.slow_window = (begin, time.monotonic())
            path = "/jwks.json"
        found = path == "/jwks.json"
        body = self.server.body if found else b"not found"
        self.send_response(200 if found else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture
def jwks(keys: Keys) -> Iterator[JwksServer]:
    server = JwksServer(("127.0.0.1", 0), JwksHandler)
    server.body = keys.jwks()
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def lock_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lock") / "endpoint.lock"
    path.write_bytes(encode_lock(discover(PROJECT).lock))
    return path


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "jwt-worker-7", "release_id": "rel-42", "iss": ISSUER, "aud": AUDIENCE}
    return {**base, "iat": now, "exp": now + 600, **changes}


def sign(key: Any, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "rsa-1"})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Startup:
    """Everything a worker start needs but the scheduler's address and the token."""

    def __init__(self, tmp_path: Path, lock: Path, jwks: JwksServer, keys: Keys) -> None:
        self.tmp_path = tmp_path
        self.lock = lock
        self.jwks = jwks
        self.keys = keys

    def env(self, address: str, token: str, path: str = "/jwks.json") -> dict[str, str]:
        return {
            "PUBLIC_ORCHESTRATOR_GRPC_ADDR": address,
            "WORKER_JWT": token,
            "SCHEDULER_JWKS_URL": f"http://127.0.0.1:{self.jwks.server_address[1]}{path}",
            "SCHEDULER_JWT_ISSUER": ISSUER,
            "SCHEDULER_JWT_AUDIENCE": AUDIENCE,
            "GEN_WORKER_MANIFEST_PATH": str(self.lock),
            "GEN_WORKER_ENDPOINT_ROOT": str(PROJECT),
            "TENSORHUB_CACHE_DIR": str(self.tmp_path / "hub-cache"),
            "WORKER_LOCAL_MODEL_CACHE_DIR": str(self.tmp_path / "local-cache"),
            "WORKER_REGISTER_TIMEOUT_S": "5",
            "RECONNECT_DELAY": "0.05",
        }


@pytest.fixture
def startup(tmp_path: Path, lock_path: Path, jwks: JwksServer, keys: Keys) -> Startup:
    return Startup(tmp_path, lock_path, jwks, keys)


def test_a_valid_token_registers_as_its_subject(
    startup: Startup, capfd: pytest.CaptureFixture[str]
) -> None:
    token = sign(startup.keys.rsa, claims())

    async def scenario() -> None:
        # The scheduler admits only this bearer token: it is sent as it was given.
        sched = MockScheduler(expected_token=token)
        address = await sched.start()
        settings = load_worker_settings(startup.env(address, token))
        assert settings.worker_id is None  # WORKER_ID unset: the token's sub names the worker
        task = asyncio.create_task(run_inference(settings))
        try:
            conn = await sched.wait_for_worker(10)
            assert conn.worker_id == "jwt-worker-7"
            assert conn.registration.worker_id == "jwt-worker-7"
            assert conn.registration.release_id == "rel-42"
            assert sched.rejected_sessions == 0
            assert startup.jwks.hits >= 1  # verified against the JWKS, not merely decoded
            record = await sched.submit("chatty", msgspec.msgpack.encode({"text": "ok"}))
            result = await record.wait(5)
            assert isinstance(result, m.JobResult) and result.success
            assert await sched.drain()
            assert await asyncio.wait_for(task, 5) == 0
        finally:
            if not task.done():
                task.cancel()
            await asyncio.wait([task], timeout=10)
            await sched.close()

    run(scenario())
    captured = capfd.readouterr()
    assert token not in captured.err + captured.out
    assert token.rsplit(".", 1)[1] not in captured.err + captured.out


def test_verification_does_not_block_the_event_loop(startup: Startup) -> None:
    token = sign(startup.keys.rsa, claims())
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        sched = MockScheduler()
        address = await sched.start()
        # The JWKS answers after 0.5 s; the loop must keep running meanwhile.
        settings = load_worker_settings(startup.env(address, token, "/slow/jwks.json"))
        beat = asyncio.create_task(ticker())
        task = asyncio.create_task(run_inference(settings))
        try:
            conn = await sched.wait_for_worker(10)
            assert conn.worker_id == "jwt-worker-7"
            window = startup.jwks.slow_window
            assert window is not None  # the worker did wait for the slow JWKS
            begin, end = window
            inside = [begin, *(t for t in ticks if begin < t < end), end]
            gaps = [b - a for a, b in itertools.pairwise(inside)]
            assert len(inside) >= 12 and max(gaps) < 0.25, (len(inside), max(gaps))
            assert await sched.drain()
            assert await asyncio.wait_for(task, 5) == 0
        finally:
            beat.cancel()
            if not task.done():
                task.cancel()
            await asyncio.wait([task, beat], timeout=10)
            await sched.close()

    run(scenario())


def alg_none_token() -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
    return f"{header}.{b64url(json.dumps(claims()).encode())}."


BAD_TOKENS: dict[str, tuple[Callable[[Keys], str], str]] = {
    "expired": (
        lambda k: sign(k.rsa, claims(exp=int(time.time()) - 120, iat=int(time.time()) - 720)),
        "has expired",
    ),
    "wrong audience": (lambda k: sign(k.rsa, claims(aud="someone-else")), "wrong audience"),
    "wrong issuer": (lambda k: sign(k.rsa, claims(iss="mallory")), "wrong issuer"),
    "bad signature": (lambda k: sign(k.other, claims()), "signature"),
    "alg none": (lambda k: alg_none_token(), "alg none"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_a_bad_token_ends_the_worker_before_it_connects(
    startup: Startup, capfd: pytest.CaptureFixture[str], case: str
) -> None:
    make, reason = BAD_TOKENS[case]
    token = make(startup.keys)
    # Where the scheduler would be: a bare listening socket, so even a TCP connect shows.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        settings = load_worker_settings(startup.env(address, token))
        begin = time.monotonic()
        code = run(run_inference(settings))
        assert code == 1
        assert time.monotonic() - begin < 5
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()
    captured = capfd.readouterr()
    output = captured.err + captured.out
    fatal = [json.loads(line) for line in captured.err.splitlines() if "worker.fatal" in line]
    assert len(fatal) == 1, captured.err
    assert fatal[0]["exception_class"] == "AuthError"
    assert fatal[0]["exit_code"] == 1
    assert reason in fatal[0]["exception_message"]
    assert "scheduler_connecting" not in output
    assert token not in output
    signature = token.rsplit(".", 1)[1]
    if signature:  # alg none has no signature part
        assert signature not in output
    assert token.split(".")[1] not in output  # nor the claims as they were sent
