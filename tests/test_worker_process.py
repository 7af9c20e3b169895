"""``python -m gen_worker.entrypoint`` as a process, configured by environment variables only.

The scheduler is the real MockScheduler in the test process, on loopback; the worker is a
subprocess exactly as the image's ENTRYPOINT runs it (SPEC section 10).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from gen_worker.discovery import discover, encode_lock
from gen_worker.protocol import messages as m
from gen_worker.testing.scheduler import MockScheduler, RequestRecord, WorkerConnection

TESTS = Path(__file__).parent
PROJECT = TESTS / "fixtures" / "projects" / "worker_scenarios"
HELLO = TESTS.parent / "examples" / "hello-world"
HELLO_LOCK = TESTS / "golden" / "hello-world.endpoint.lock"

# Every variable the worker reads, so the developer's own environment cannot leak in.
_WORKER_PREFIXES = ("WORKER_", "GEN_WORKER_", "SCHEDULER_", "RECONNECT_", "TENSORHUB_")
_WORKER_NAMES = {"PUBLIC_ORCHESTRATOR_GRPC_ADDR", "MAX_RECONNECT_ATTEMPTS", "LB_ONLY_RETRIES",
                 "USE_TLS"}  # fmt: skip

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def pack(**fields: Any) -> bytes:
    return msgspec.msgpack.encode(fields)


def clean_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_WORKER_PREFIXES) and k not in _WORKER_NAMES
    }
    env["PYTHONPATH"] = str(TESTS)  # the scenario project imports tests/fixtures
    env["TENSORHUB_CACHE_DIR"] = str(tmp_path / "hub-cache")
    env["WORKER_LOCAL_MODEL_CACHE_DIR"] = str(tmp_path / "local-cache")
    env.update(variables)
    return env


async def until(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


async def started(record: RequestRecord) -> None:
    await until(
        lambda: any(e.event_type == "request.inference.started" for e in record.events),
        what="the function to start",
    )


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    stdout: asyncio.Task[bytes]
    stderr: asyncio.Task[bytes]

    async def finish(self, timeout_s: float = 15.0) -> tuple[int, str]:
        """The exit code and everything the process wrote (stdout + stderr)."""
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        out, err = await self.stdout, await self.stderr
        return code, out.decode() + err.decode()


async def spawn(env: dict[str, str]) -> Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gen_worker.entrypoint", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    # Read both pipes all along so a chatty worker can never block on a full pipe.
    return Process(proc, asyncio.create_task(proc.stdout.read()),
                   asyncio.create_task(proc.stderr.read()))  # fmt: skip


@contextlib.asynccontextmanager
async def worker_process(
    sched: MockScheduler, env: dict[str, str]
) -> AsyncIterator[tuple[Process, WorkerConnection]]:
    """The scheduler listening, the worker process registered with it; both ended afterwards."""
    address = await sched.start()
    process = await spawn({**env, "PUBLIC_ORCHESTRATOR_GRPC_ADDR": address})
    try:
        exited = asyncio.ensure_future(process.proc.wait())
        joined = asyncio.ensure_future(sched.wait_for_worker(20))
        await asyncio.wait([exited, joined], return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if not joined.done():
            joined.cancel()
            raise AssertionError(f"the worker exited before registering:\n{await process.finish()}")
        yield process, joined.result()
    finally:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()
        for task in (process.stdout, process.stderr):
            with contextlib.suppress(Exception):
                await task
        await sched.close()


@pytest.fixture(scope="module")
def scenario_lock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lock") / "endpoint.lock"
    path.write_bytes(encode_lock(discover(PROJECT).lock))
    return path


def scenario_env(tmp_path: Path, lock: Path, **variables: str) -> dict[str, str]:
    defaults = {
        "WORKER_JWT": "test-worker-token",
        "WORKER_ID": "worker-proc",
        "GEN_WORKER_MANIFEST_PATH": str(lock),
        "GEN_WORKER_ENDPOINT_ROOT": str(PROJECT),
        "RECONNECT_DELAY": "0.05",
        "RECONNECT_JITTER_SECONDS": "0.05",
    }
    return clean_env(tmp_path, **{**defaults, **variables})


# -- the seed README's local loop ---------------------------------------------------------------


def test_the_readme_mock_orchestrator_example_says_hello(tmp_path: Path) -> None:
    lock = tmp_path / "endpoint.lock"
    lock.write_bytes(HELLO_LOCK.read_bytes())
    # As the README's `docker run`: the scheduler address and the dev token, nothing else
    # but where this checkout keeps what the image would have baked in.
    env = clean_env(
        tmp_path,
        WORKER_JWT="dev-worker-jwt",
        GEN_WORKER_MANIFEST_PATH=str(lock),
        GEN_WORKER_ENDPOINT_ROOT=str(HELLO),
    )

    async def scenario() -> None:
        sched = MockScheduler()
        async with worker_process(sched, env) as (process, conn):
            assert conn.registration.endpoint_name == "hello-world"
            assert "hello" in [f.name for f in conn.registration.functions]
            assert conn.worker_id.startswith("worker-")  # no WORKER_ID, and no JWT sub
            record = await sched.submit("hello", msgspec.msgpack.encode({"name": "world"}))
            result = await record.wait(10)
            assert isinstance(result, m.JobResult)
            assert result.success, result
            assert msgspec.msgpack.decode(result.output) == {"message": "Hello, world!"}
            process.proc.send_signal(signal.SIGTERM)
            code, output = await process.finish()
            assert code == 0, output
            assert "dev-worker-jwt" not in output

    run(scenario())


# -- signals -------------------------------------------------------------------------------------


def test_sigterm_finishes_the_request_in_flight_then_exits_zero(
    tmp_path: Path, scenario_lock: Path
) -> None:
    env = scenario_env(tmp_path, scenario_lock)

    async def scenario() -> None:
        sched = MockScheduler(heartbeat_interval_s=0.1)
        async with worker_process(sched, env) as (process, conn):
            record = await sched.submit("anap", pack(delay_ms=500))
            await started(record)
            process.proc.send_signal(signal.SIGTERM)
            code, output = await process.finish()
            assert code == 0, output
            result = record.terminal
            assert isinstance(result, m.JobResult), output
            assert result.success is True
            assert msgspec.msgpack.decode(result.output) == {"n": 0, "delay_ms": 500}
            assert record.extra_terminals == 0
            assert conn.drain_result is not None
            assert (conn.drain_result.canceled, conn.drain_result.undelivered) == (0, 0)
            assert any(h.draining and h.running == 1 for h in conn.heartbeats)
            assert "Traceback" not in output

    run(scenario())


def test_a_second_sigterm_during_a_long_drain_exits_at_once(
    tmp_path: Path, scenario_lock: Path
) -> None:
    env = scenario_env(tmp_path, scenario_lock, WORKER_DRAIN_TIMEOUT_SECONDS="60")

    async def scenario() -> None:
        sched = MockScheduler(heartbeat_interval_s=0.1)
        async with worker_process(sched, env) as (process, conn):
            record = await sched.submit("wait-forever", pack())
            await started(record)
            process.proc.send_signal(signal.SIGTERM)
            await until(lambda: any(h.draining for h in conn.heartbeats), what="the drain")
            begin = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            code, output = await process.finish(timeout_s=10)
            assert code == 1, output
            assert time.monotonic() - begin < 3
            assert "second signal" in output
            assert "Traceback" not in output

    run(scenario())


# -- secrets -------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fake_jwt(sub: str) -> tuple[str, str]:
    """A JWT-shaped token (not verifiable: no JWKS here) and its signature part."""
    header = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
    claims = {"sub": sub, "release_id": "rel-leak", "exp": int(time.time()) + 3600}
    signature = b64url(secrets.token_bytes(64))
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}", signature


def test_no_token_reaches_any_log_line(tmp_path: Path, scenario_lock: Path) -> None:
    token, signature = fake_jwt("leak-check-worker")
    rotated, rotated_signature = fake_jwt("leak-check-worker")
    env = scenario_env(tmp_path, scenario_lock, WORKER_JWT=token, GEN_WORKER_LOG_LEVEL="debug")
    del env["WORKER_ID"]  # the worker id comes from the token's sub

    async def scenario() -> str:
        # The scheduler admits only this exact bearer token: it travels intact, just not to logs.
        sched = MockScheduler(heartbeat_interval_s=0.1, expected_token=token)
        async with worker_process(sched, env) as (process, conn):
            assert conn.worker_id == "leak-check-worker"
            assert conn.registration.release_id == "rel-leak"
            assert "authorization" not in conn.metadata
            ok = await (await sched.submit("chatty", pack(text="a"))).wait(10)
            assert isinstance(ok, m.JobResult) and ok.success
            failed = await (await sched.submit("fail", pack(text="value_error"))).wait(10)
            assert isinstance(failed, m.JobResult) and failed.error_type == "internal"
            # A rotated token is used for the next connection, and is not logged either.
            assert await sched.send(m.SchedulerEvent(event_type="jwt.rotated", jwt=rotated))
            await asyncio.sleep(0.2)
            sched.expected_token = rotated
            await sched.restart()
            await until(lambda: conn.registrations == 2, what="the reconnect with the new token")
            assert sched.rejected_sessions == 0
            process.proc.send_signal(signal.SIGTERM)
            code, output = await process.finish()
            assert code == 0, output
            return output

    output = run(scenario())
    assert '"phase":"registered"' in output and '"reason":"drained"' in output
    for secret in (token, signature, rotated, rotated_signature):
        assert secret not in output


# -- configuration errors -----------------------------------------------------------------------


def test_malformed_settings_exit_1_naming_the_variable(tmp_path: Path) -> None:
    base = {"PUBLIC_ORCHESTRATOR_GRPC_ADDR": "127.0.0.1:9", "WORKER_JWT": "tok"}
    cases = {
        "WORKER_MAX_CONCURRENCY": clean_env(tmp_path, **base, WORKER_MAX_CONCURRENCY="abc"),
        "WORKER_JWT": clean_env(tmp_path, PUBLIC_ORCHESTRATOR_GRPC_ADDR="127.0.0.1:9"),
        "WORKER_MODE": clean_env(tmp_path, **base, WORKER_MODE="bogus"),
    }
    argv = [sys.executable, "-m", "gen_worker.entrypoint"]
    procs = {
        name: subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        for name, env in cases.items()
    }  # fmt: skip
    messages = {}
    for variable, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, (variable, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err  # one line, no traceback
        line = json.loads(lines[0])
        assert (line["level"], line["msg"], line["phase"]) == ("error", "worker.fatal", "settings")
        assert line["exit_code"] == 1
        messages[variable] = line["exception_message"]
        assert messages[variable].startswith(f"{variable}: "), messages[variable]
    assert "'abc' is not an integer" in messages["WORKER_MAX_CONCURRENCY"]
    assert "is required" in messages["WORKER_JWT"]
    assert "'bogus' is not a worker mode" in messages["WORKER_MODE"]
