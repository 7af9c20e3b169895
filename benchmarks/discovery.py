"""How long build-time discovery of the example endpoint takes, against the floor.

The floor is a bare interpreter that imports msgspec (what any discovery must pay); the
ratio says what gen-worker adds on top. Run: `uv run python benchmarks/discovery.py`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hello-world"


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    floor_cmd = [sys.executable, "-c", "import msgspec"]
    discover_cmd = [sys.executable, "-m", "gen_worker.discover", "--project", str(EXAMPLE)]
    timed(discover_cmd)  # warm the file cache and bytecode
    floor, discover = [], []
    for _ in range(runs):  # interleaved so machine noise hits both alike
        floor.append(timed(floor_cmd))
        discover.append(timed(discover_cmd))
    f, d = statistics.median(floor), statistics.median(discover)
    print(f"python -c 'import msgspec' (floor): median {f * 1000:7.1f} ms over {runs} runs")
    print(f"gen_worker.discover hello-world     : median {d * 1000:7.1f} ms over {runs} runs")
    print(f"ratio discover/floor: {d / f:.2f}x; discovery's own cost: {(d - f) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
