"""The README's "Models locally" commands run as written (in a scratch folder, on loopback)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _commands() -> list[str]:
    section = README.split("## Models locally: the hub and the store", 1)[1].split("\n## ", 1)[0]
    block: str = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)[0]
    return block.strip().splitlines()


def _argv(words: list[str]) -> list[str]:
    assert words[:2] == ["uv", "run"], words
    return [str(Path(sys.executable).parent / words[2]), *words[3:]]


def _split(line: str) -> tuple[dict[str, str], list[str], bool]:
    """(environment assignments, argv, runs in the background)."""
    words = shlex.split(line)
    background = words[-1] == "&"
    words = words[:-1] if background else words
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, _argv(words), background


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_the_models_section_runs_as_written(tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 4}')
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORHUB_", "HF_"))}
    base_env["TENSORHUB_CACHE_DIR"] = str(tmp_path / "cache")
    background: list[subprocess.Popen[str]] = []
    outputs: list[str] = []
    try:
        for line in _commands():
            env, argv, in_background = _split(line.replace("7777", str(port)))
            if in_background:
                background.append(
                    subprocess.Popen(argv, cwd=tmp_path, env={**base_env, **env}, text=True)
                )
                _wait_for_port(port)
                continue
            done = subprocess.run(
                argv,
                cwd=tmp_path,
                env={**base_env, **env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, (line, done.stderr)
            outputs.append(done.stdout)
    finally:
        for proc in background:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
    snapshot = Path(outputs[1].strip())
    assert (snapshot / "model.safetensors").read_bytes() == (
        model / "model.safetensors"
    ).read_bytes()
    assert "acme/tiny-model:latest" in outputs[2]
