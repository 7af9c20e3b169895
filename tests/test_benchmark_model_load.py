"""benchmarks/model_load.py runs end to end at tiny sizes: every section prints its table.

A smoke test of the benchmark's wiring (local hub, store, loaders, engine, dev runner), not
of its numbers: those are for a person to read. Most of its time is importing diffusers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "model_load.py"
TINY = ["--size-mb", "8", "--rounds", "1", "--hot-iterations", "200"]
TINY += ["--engine-requests", "50", "--e2e-rounds", "1"]


def test_the_model_load_benchmark_prints_its_three_sections() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), *TINY],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert out.startswith(f"command: {Path(sys.executable).name} {BENCHMARK}")
    assert re.search(r"^machine: \d+ cores", out, re.MULTILINE)
    # (a): the three sides, each with a ratio to the floor, and the verdict.
    assert "(a) warm load: BertModel, 8.0 MiB in model.safetensors (fp16" in out
    for side in ("floor: safe_open + get_tensor", "transformers from_pretrained", "ours:"):
        assert re.search(rf"^    {re.escape(side)}.*\d\.\d\dx.*\d\.\d\dx", out, re.MULTILINE), side
    assert re.search(r"target ours/floor <= 1\.2x: resident \d+\.\d\dx (met|MISSED)", out)
    # (b): the provider's 200 hits, and 50 engine requests of each function.
    assert re.search(r"^    provider\.load \+ release\s+200\s+\d", out, re.MULTILINE)
    assert re.search(r"^    engine: async no-op \+ 1 injected pipeline\s+50\s", out, re.MULTILINE)
    assert re.search(r"^    engine: async no-op, no model\s+50\s", out, re.MULTILINE)
    assert re.search(r"target < 100 us: (met|MISSED)", out)
    # (c): each state once, with the cache state each request's metrics.job reported.
    for state, reported in (("cold", "cold_remote"), ("warm", "warm_disk"), ("hot", "hot_vram")):
        assert re.search(rf"^    {state}\s+[\d.]+\s+[\d.]+\s+[\d.]+  {reported} ok$", out, re.M)
    assert re.search(r"^total: [\d.]+ s$", out, re.MULTILINE)
