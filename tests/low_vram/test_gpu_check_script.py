"""scripts/gpu_check.py on a host without CUDA: it says so and exits 0 (3 when CUDA is required)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=90,
    )


def test_without_cuda_there_is_nothing_to_check() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: run scripts/gpu_check.py itself")
    done = _run()
    assert (done.returncode, done.stdout) == (0, "no CUDA device: nothing to check\n"), done.stderr
    required = _run("--require-cuda")
    assert (required.returncode, required.stdout) == (3, "no CUDA device: nothing to check\n")
