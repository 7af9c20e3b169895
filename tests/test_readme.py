"""The README's Quick start and examples run as written."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import types
from pathlib import Path

import httpx
import pytest

from gen_worker.discovery import decode_lock

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
GOLDEN = Path(__file__).parent / "golden" / "hello-world.endpoint.lock"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]


def test_quick_start_has_exactly_the_two_commands() -> None:
    assert quick_start_commands() == [
        "uv run gen-worker serve --project examples/hello-world --listen 127.0.0.1:8081 "
        "--outputs ./out",
        "uv run pytest",
    ]


def venv_script(command: str) -> list[str]:
    """`uv run X ...` runs X from the project's environment: the one running these tests."""
    argv = shlex.split(command)
    assert argv[:2] == ["uv", "run"]
    return [str(Path(sys.executable).parent / argv[2]), *argv[3:]]


def curl_to_request(line: str, base_url: str) -> tuple[str, str, dict[str, str], bytes]:
    argv = shlex.split(line)
    assert argv[0] == "curl"
    method, headers, data, url = "GET", {}, b"", ""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-X":
            method, i = argv[i + 1], i + 2
        elif arg == "-H":
            name, _, value = argv[i + 1].partition(":")
            headers[name.strip()] = value.strip()
            i += 2
        elif arg == "-d":
            data, i = argv[i + 1].encode(), i + 2
        elif arg.startswith("-"):
            i += 1  # -sS, -N: output options only
        else:
            url, i = arg, i + 1
    return method, url.replace("http://localhost:8081", base_url), headers, data


def test_quick_start_serves_the_example_and_the_curl_lines_work(tmp_path: Path) -> None:
    command = quick_start_commands()[0].replace("127.0.0.1:8081", "127.0.0.1:0")
    argv = [a if a != "./out" else str(tmp_path / "out") for a in venv_script(command)]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        base = line.split()[-1]
        section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
        curls = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)[0].strip().splitlines()
        answers = []
        for curl in curls:
            method, url, headers, data = curl_to_request(curl, base)
            answers.append(httpx.request(method, url, headers=headers, content=data, timeout=30))
        hello, generate, stream = answers
        assert hello.status_code == 200 and hello.json()["output"] == {"message": "Hello, world!"}
        assert generate.status_code == 200, generate.text
        image = generate.json()["output"]["image"]
        rid = generate.json()["request_id"]
        assert image["ref"] == f"jobs/{rid}/outputs/image.ppm"
        assert (tmp_path / "out" / image["ref"]).read_bytes().startswith(b"P6 8 8 255")
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.text.count("event: delta") == 4 and "event: result" in stream.text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_example_lock_matches_the_golden_file() -> None:
    argv = venv_script("uv run gen-worker discover --project examples/hello-world")
    result = subprocess.run(argv, cwd=REPO, capture_output=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == GOLDEN.read_bytes(), (
        "the example's endpoint.lock changed; if intended, run `make golden`"
    )
    assert [f.name for f in decode_lock(result.stdout).functions] == [
        "describe-models",
        "generate",
        "hello",
        "stream-words",
        "word-lengths",
    ]


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_examples_run(index: int) -> None:
    source = blocks("python")[index]
    module = types.ModuleType(f"readme_example_{index}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, f"README.md python block {index}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    specs = [
        v.__gen_worker_spec__ for v in vars(module).values() if hasattr(v, "__gen_worker_spec__")
    ]
    assert specs, "every README example declares at least one worker function"


def test_python_examples_were_found() -> None:
    assert len(blocks("python")) >= 4


SEED_INVOKE = (
    "curl -sS -X POST 'http://localhost:8081/v1/request/generate' "
    "-H 'content-type: application/json' "
    """-d '{"payload": {"prompt": "a tiny robot watering a bonsai, macro photo"}}'"""
)


def test_the_seed_invoke_example_is_in_the_quick_start_verbatim() -> None:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert SEED_INVOKE in section.splitlines()
