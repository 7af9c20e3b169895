"""House style: no library module over 600 lines (DESIGN.md section 3)."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gen_worker"
MAX_LINES = 600


def test_no_module_passes_600_lines() -> None:
    modules = [p for p in SRC.rglob("*.py") if "pb" not in p.relative_to(SRC).parts[:-1]]
    assert len(modules) > 10  # the scan found the package
    too_long = {
        str(p.relative_to(SRC)): n
        for p in modules
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert too_long == {}, f"split these modules by concept: {too_long}"
