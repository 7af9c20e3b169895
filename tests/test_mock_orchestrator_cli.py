"""The one-shot mock orchestrator command, against a real worker process."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hello-world"
LOCK = REPO / "tests" / "golden" / "hello-world.endpoint.lock"
# The seed README's command, verbatim except that the port must be free on a test machine.
SEED_COMMAND = (
    "python -m gen_worker.testing.mock_orchestrator --listen 0.0.0.0:8080 --run hello "
    """--payload-json '{"name":"world"}'"""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Worker:
    def __init__(self, port: int, proc: subprocess.Popen[str]) -> None:
        self.port = port
        self.proc = proc
        #: What SIGTERM at teardown should end with: 0 (drained), or 5 when the scheduler
        #: left before a result could be delivered.
        self.expected_exit = 0


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    """A worker started as the README's docker line starts it (same variables, no docker)."""
    port = free_port()
    env = {
        **os.environ,
        "PUBLIC_ORCHESTRATOR_GRPC_ADDR": f"127.0.0.1:{port}",
        "WORKER_JWT": "dev-worker-jwt",
        "GEN_WORKER_MANIFEST_PATH": str(LOCK),
        "GEN_WORKER_ENDPOINT_ROOT": str(EXAMPLE),
        "TENSORHUB_CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_LOCAL_MODEL_CACHE_DIR": str(tmp_path / "local"),
        "RECONNECT_DELAY": "0.05",
        "RECONNECT_MAX_DELAY": "0.2",
        "WORKER_DRAIN_TIMEOUT_SECONDS": "2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gen_worker.entrypoint"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    handle = Worker(port, proc)
    yield handle
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == handle.expected_exit, stderr
    assert "dev-worker-jwt" not in stderr


def mock(*args: str, port: int, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(" ".join(args).replace("0.0.0.0:8080", f"127.0.0.1:{port}"))
    assert argv[:3] == ["python", "-m", "gen_worker.testing.mock_orchestrator"]
    return subprocess.run(
        [sys.executable, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_seed_example_verbatim(worker: Worker) -> None:
    port = worker.port
    result = mock(SEED_COMMAND, port=port)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("[connected] worker_id=worker-")
    assert (
        "functions=['describe-models', 'generate', 'hello', 'stream-words', 'word-lengths']"
        in lines[1]
    )
    assert lines[2].startswith("[sent] request_id=")
    assert lines[-1] == '[output] {"message": "Hello, world!"}'


def test_job_failure_exits_1(worker: Worker) -> None:
    port = worker.port
    result = mock(SEED_COMMAND.replace('"world"', '" "'), port=port)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "[error] type=validation safe=name must not be empty"


def test_json_lines_with_events_and_deltas(worker: Worker) -> None:
    port = worker.port
    result = mock(
        "python -m gen_worker.testing.mock_orchestrator --listen 0.0.0.0:8080 --run stream-words",
        """--payload-json '{"text": "a b"}' --json --print-events --print-registrations""",
        port=port,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    items = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [i["kind"] for i in items]
    assert kinds[0] == "listening" and "registration" in kinds and kinds[-1] == "output"
    assert [i["delta"] for i in items if i["kind"] == "delta"] == [
        {"index": 0, "word": "a"},
        {"index": 1, "word": "b"},
    ]
    assert any(i["kind"] == "event" and i["event_type"] == "request.progress" for i in items)
    assert "dev-worker-jwt" not in result.stdout


def test_no_result_in_time_exits_3(worker: Worker) -> None:
    port = worker.port
    result = mock(
        "python -m gen_worker.testing.mock_orchestrator --listen 0.0.0.0:8080 --run stream-words",
        """--payload-json '{"text": "a b c d", "delay_ms": 1000}' --result-wait-s 0.5""",
        port=port,
    )
    assert result.returncode == 3
    assert result.stdout.splitlines()[-1] == "[error] no result within 0.5 s"
    worker.expected_exit = 5  # its stream result could not be delivered before the drain ended


def test_no_worker_exits_2() -> None:
    result = mock(SEED_COMMAND, "--wait-s 0.3", port=free_port())
    assert result.returncode == 2
    assert result.stdout.splitlines()[-1] == "[error] no worker connected within 0.3 s"


def test_bad_arguments_exit_1() -> None:
    result = mock(
        "python -m gen_worker.testing.mock_orchestrator --listen 0.0.0.0:8080 --run hello",
        "--payload-json '{nope'",
        port=free_port(),
    )
    assert result.returncode == 1
    assert "--payload-json is not valid JSON" in result.stdout
