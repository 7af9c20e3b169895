"""The dev runner as a process: startup errors, and clean stops on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

TESTS = Path(__file__).parent
PROJECT = TESTS / "fixtures" / "projects" / "runner_scenarios"


def start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    argv = [sys.executable, "-m", "gen_worker.testing.http_runner", "--listen", "127.0.0.1:0",
            "--outputs", str(tmp_path / "out"), "--project", str(PROJECT), *extra]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), (line, proc.stderr.read() if proc.stderr else "")
    return proc, line.split()[-1]


def call(results: dict[str, Any], key: str, url: str, body: bytes) -> None:
    try:
        results[key] = httpx.post(url, content=body, timeout=30)
    except httpx.HTTPError as exc:
        results[key] = exc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_running_requests_finish_then_exits_zero(tmp_path: Path, sig: int) -> None:
    proc, base = start(tmp_path)
    results: dict[str, Any] = {}
    t = threading.Thread(
        target=call, args=(results, "nap", f"{base}/v1/request/anap", b'{"delay_ms": 800}')
    )
    t.start()
    time.sleep(0.3)
    proc.send_signal(sig)
    t.join(20)
    _, stderr = proc.communicate(timeout=20)
    assert isinstance(results["nap"], httpx.Response) and results["nap"].status_code == 200
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_requests_past_the_grace_period_are_canceled(tmp_path: Path) -> None:
    proc, base = start(tmp_path)
    results: dict[str, Any] = {}
    t = threading.Thread(
        target=call, args=(results, "forever", f"{base}/v1/request/wait_forever", b"{}")
    )
    t.start()
    time.sleep(0.3)
    start_stop = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    t.join(10)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert time.monotonic() - start_stop < 15
    assert (
        not isinstance(results["forever"], httpx.Response) or results["forever"].status_code != 200
    )


def test_second_signal_stops_at_once(tmp_path: Path) -> None:
    proc, base = start(tmp_path)
    results: dict[str, Any] = {}
    t = threading.Thread(
        target=call, args=(results, "forever", f"{base}/v1/request/wait_forever", b"{}")
    )
    t.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    begin = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    t.join(10)
    assert time.monotonic() - begin < 4
    assert proc.returncode == 1
    assert "second signal: stopping at once" in stderr
    assert "Traceback" not in stderr


def test_startup_errors_are_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "gen_worker.testing.http_runner", "--listen", "127.0.0.1:0",
            "--outputs", str(tmp_path), "--manifest", str(tmp_path / "missing.lock")]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot read the endpoint lock")
    assert len(result.stderr.strip().splitlines()) == 1
    bad = subprocess.run(
        [sys.executable, "-m", "gen_worker.testing.http_runner", "--listen", "nonsense"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "is not HOST:PORT" in bad.stderr


def test_serves_a_baked_lock(tmp_path: Path) -> None:
    example = TESTS.parent / "examples" / "hello-world"
    lock = tmp_path / "endpoint.lock"
    lock.write_bytes((TESTS / "golden" / "hello-world.endpoint.lock").read_bytes())
    argv = [sys.executable, "-m", "gen_worker.testing.http_runner", "--listen", "127.0.0.1:0",
            "--outputs", str(tmp_path / "out"), "--manifest", str(lock),
            "--endpoint-root", str(example)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().split()[-1]
        r = httpx.post(f"{base}/v1/request/hello", json={"name": "lock"}, timeout=30)
        assert r.json()["output"] == {"message": "Hello, lock!"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
