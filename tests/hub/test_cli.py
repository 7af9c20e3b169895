"""``gen-worker hub`` as a user runs it: serve as a process with signals, and publish."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import httpx
import pytest

from gen_worker.hub import HubStorage
from gen_worker.hub.cli import main

http = httpx.Client(timeout=30)
TOKEN = "cli-token-" + "x" * 16


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


def serve(root: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    argv = [
        sys.executable,
        "-m",
        "gen_worker.hub.cli",
        "serve",
        "--root",
        str(root),
        "--listen",
        "127.0.0.1:0",
        *extra,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on http://127.0.0.1:"), (line, proc.stderr)
    return proc, line.split()[-1]


def stop(proc: subprocess.Popen[str], sig: int) -> tuple[str, str]:
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=20)
    return stdout, stderr


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_resolves_what_publish_adds_and_stops_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sig: int
) -> None:
    root = tmp_path / "hub"
    proc, base = serve(root, "--token", TOKEN, "--url-ttl", "30")
    try:
        src = tree(tmp_path / "src", {"w.bin": b"weights", "big.bin": os.urandom(300)})
        code = main(
            [
                "publish",
                "me/model:v1",
                str(src),
                "--root",
                str(root),
                "--attr",
                "dtype=bf16",
                "--part-size",
                "100",
            ]
        )
        assert code == 0
        out = capsys.readouterr().out.strip()
        index = HubStorage(root).repo("me/model")
        assert index is not None
        digest = index.tags["v1"][-1].digest
        assert out == f"published me/model:v1 {digest} (2 files, 307 bytes, 1 split into parts)"

        url = f"{base}/api/v1/inference/repos/me/model/resolve"
        body = {"tag": "v1", "attributes": {"dtype": "bf16"}}
        assert http.post(url, json=body).status_code == 401
        response = http.post(url, json=body, headers={"authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        assert response.json()["checkpoint_id"] == digest
        entries = response.json()["snapshot_manifest"]["entries"]
        assert len(entries) == 1 + 3 + 1  # w.bin, three parts and the parts file
        for entry in entries:
            blob = http.get(entry["url"], headers={"range": "bytes=0-"})
            assert blake3.blake3(blob.content).hexdigest() == entry["blake3"]
        bad = http.get(entries[0]["url"].replace("sig=", "sig=f"))
        assert bad.status_code == 403
    finally:
        stdout, stderr = stop(proc, sig)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert TOKEN not in stderr + stdout and "sig=" not in stderr + stdout


def test_signal_during_a_stalled_download_still_exits_zero(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    src = tree(tmp_path / "src", {"w.bin": os.urandom(24 << 20)})
    assert main(["publish", "me/big", str(src), "--root", str(root)]) == 0
    proc, base = serve(root)
    try:
        answer = http.post(f"{base}/api/v1/inference/repos/me/big/resolve", json={}).json()
        url = answer["snapshot_manifest"]["entries"][0]["url"]
        with http.stream("GET", url) as response:
            assert response.status_code == 200
            chunks = response.iter_raw(65536)
            next(chunks)  # then stop reading (but stay connected): the server's sends stall
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=20)
            took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert 2 <= took < 5  # the grace period (2 s), then the transfer is cut
    assert "Traceback" not in stderr and "ASGI callable" not in stderr, stderr


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "gen_worker.hub.cli",
                "serve",
                "--root",
                str(tmp_path),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in result.stderr


def test_serve_reports_a_root_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a directory")
    assert main(["serve", "--root", str(tmp_path / "file"), "--listen", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot use --root {tmp_path / 'file'}: ")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--root", "r", "--listen", "nope"], "'nope' is not HOST:PORT"),
        (["serve", "--root", "r", "--url-ttl", "0"], "'0' must be more than 0"),
        (["serve", "--root", "r", "--public-url", "ftp://x"], "must start with http://"),
        (["serve", "--root", "r", "--token", "a b"], "no whitespace"),
        (["serve", "--root", "r", "--signing-key-file", "/nonexistent/k"], "cannot read it"),
        (["serve"], "the following arguments are required: --root"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_serve_usage_errors_are_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize(
    ("ref", "extra", "message"),
    [
        ("me/m/x", [], "invalid model ref"),
        ("me/m@blake3:" + "a" * 64, [], "a digest names an existing snapshot"),
        ("me/m", ["--attr", "novalue"], "'novalue' is not KEY=VALUE"),
        ("me/m", ["--part-size", "-5"], "'-5' must be more than 0"),
        ("me/m", ["--part-size", "lots"], "'lots' is not a number"),
    ],
)
def test_publish_errors_are_one_line_exit_1_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ref: str,
    extra: list[str],
    message: str,
) -> None:
    src = tree(tmp_path / "src", {"f": b"1"})
    root = tmp_path / "hub"
    assert main(["publish", ref, str(src), "--root", str(root), *extra]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert captured.out == ""
    assert not root.exists()


def test_publish_refuses_an_escaping_symlink_and_a_missing_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "secret").write_text("x")
    src = tree(tmp_path / "src", {"f": b"1"})
    (src / "link").symlink_to(tmp_path / "secret")
    root = tmp_path / "hub"
    assert main(["publish", "me/m", str(src), "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unsafe path 'link': it is a symlink to ") and "outside" in err
    assert main(["publish", "me/m", str(tmp_path / "nothing"), "--root", str(root)]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    assert not root.exists()


def test_publish_canonicalises_a_mixed_case_ref_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tree(tmp_path / "src", {"f": b"1"})
    assert main(["publish", "Me/Model", str(src), "--root", str(tmp_path / "hub")]) == 0
    captured = capsys.readouterr()
    assert "note: using the canonical ref 'me/model:latest' for 'Me/Model'" in captured.err
    assert captured.out.startswith("published me/model:latest blake3:")
    assert captured.out.rstrip().endswith("(1 files, 1 bytes)")


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert main(["publish", "--help"]) == 0
    assert "--part-size" in capsys.readouterr().out
