"""The README's Quick start and examples run as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

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
        "uv run gen-worker discover --project examples/hello-world",
        "uv run pytest",
    ]


def test_quick_start_main_command_prints_the_golden_lock() -> None:
    argv = shlex.split(quick_start_commands()[0])
    assert argv[:2] == ["uv", "run"]
    # `uv run X` runs X from the project's environment: the one running these tests.
    script = Path(sys.executable).parent / argv[2]
    result = subprocess.run(
        [str(script), *argv[3:]], cwd=REPO, capture_output=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == GOLDEN.read_bytes(), (
        "the example's endpoint.lock changed; if intended, run `make golden`"
    )
    assert [f.name for f in decode_lock(result.stdout).functions] == [
        "describe-models",
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
