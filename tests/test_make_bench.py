"""`make bench` runs every benchmark script in benchmarks/ (the README says so)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_bench_runs_every_benchmark_script() -> None:
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert len(scripts) >= 5  # the scan found the benchmarks
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    target = re.search(r"^bench:\n((?:\t.*\n|.*\\\n)+)", makefile, re.MULTILINE)
    assert target is not None, "the Makefile has no bench target"
    run = set(re.findall(r"benchmarks/(\w+\.py)", target.group(1)))
    assert run == scripts, (
        f"make bench misses {sorted(scripts - run)}, runs unknown {sorted(run - scripts)}"
    )
