"""``gen-worker models pull|ls|rm`` as a user runs them: real subprocesses, a real local hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gen_worker.hub import HubServer, publish

TOKEN = "cli-hub-token"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"hidden_size": 8}')
    (src / "model.safetensors").write_bytes(os.urandom(200_000))
    publish(tmp_path / "hub", "acme/tiny:v1", src, part_size_bytes=64_000)
    with HubServer(tmp_path / "hub", tokens=(TOKEN,)) as server:
        yield server


def _cli(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORHUB_", "HF_"))}
    environ.update({"TENSORHUB_CACHE_DIR": str(cache), **env})
    return subprocess.run(
        [sys.executable, "-m", "gen_worker.cli", "models", *args],
        env=environ,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pull_ls_rm(hub: HubServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pulled = _cli("pull", "acme/tiny:v1", cache=cache, TENSORHUB_URL=hub.url, TENSORHUB_TOKEN=TOKEN)
    assert pulled.returncode == 0, pulled.stderr
    path = Path(pulled.stdout.strip())
    assert path.parent == cache / "cas" / "snapshots"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert "downloaded" in pulled.stderr and "acme/tiny:v1: 100% of" in pulled.stderr
    assert TOKEN not in pulled.stderr + pulled.stdout

    again = _cli("pull", "acme/tiny:v1", cache=cache, TENSORHUB_URL=hub.url, TENSORHUB_TOKEN=TOKEN)
    assert again.returncode == 0 and Path(again.stdout.strip()) == path
    assert "already in the store" in again.stderr

    listed = _cli("ls", "--json", cache=cache)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["digest"], r["refs"], r["files"]) for r in rows] == [
        (f"blake3:{path.name}", ["acme/tiny:v1"], 2)
    ]
    assert "acme/tiny:v1" in _cli("ls", cache=cache).stdout

    removed = _cli("rm", "acme/tiny:v1", cache=cache)
    assert removed.returncode == 0, removed.stderr
    assert not path.exists()
    assert "no snapshots" in _cli("ls", cache=cache).stdout


def test_failures_are_one_line_and_exit_1(hub: HubServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cases = [
        (
            ("pull", "acme/none"),
            {"TENSORHUB_URL": hub.url, "TENSORHUB_TOKEN": TOKEN},
            "acme/none:latest",
        ),
        (
            ("pull", "acme/tiny:v1"),
            {"TENSORHUB_URL": hub.url, "TENSORHUB_TOKEN": "nope"},
            "HTTP 403",
        ),
        (("pull", "acme/tiny:v1"), {}, "no hub is configured; set TENSORHUB_URL"),
        (("pull", "a/b/c"), {}, "invalid model ref"),
        (("pull", "acme/tiny:v1", "--attr", "dtype"), {}, "expected key=value"),
        (("rm", "acme/tiny:v1"), {}, "neither a snapshot digest"),
        (("pull", "acme/tiny:v1"), {"TENSORHUB_URL": "hub:7777"}, "TENSORHUB_URL"),
    ]
    for args, env, message in cases:
        done = _cli(*args, cache=cache, **env)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], (args, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert "nope" not in done.stderr
