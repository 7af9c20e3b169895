"""Discover an endpoint project: endpoint.toml + its ``main`` module -> checked functions + lock."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from gen_worker.discovery.checks import CheckedFunction, check_endpoint
from gen_worker.discovery.endpoint_toml import ENDPOINT_TOML, EndpointConfig, load_endpoint_toml
from gen_worker.discovery.loader import collect_functions, import_main, isolated_imports
from gen_worker.discovery.lock import EndpointLock, build_lock

__all__ = ["Discovery", "discover"]


@dataclass(frozen=True, slots=True)
class Discovery:
    """The result of discovering one project."""

    project_dir: Path
    config: EndpointConfig
    functions: list[CheckedFunction]
    lock: EndpointLock


def discover(project_dir: str | Path = ".", *, isolated: bool = False) -> Discovery:
    """Read ``project_dir``/endpoint.toml, import its ``main`` and check every function.

    With ``isolated=True`` the imports are undone afterwards (tools and tests that discover
    several projects in one process); otherwise the endpoint stays imported, ready to run.
    Raises :class:`~gen_worker.errors.DefinitionError` (or its ``EndpointConfigError``
    subclass) for anything wrong.
    """
    root = Path(project_dir).resolve()
    config = load_endpoint_toml(root / ENDPOINT_TOML)
    with isolated_imports() if isolated else contextlib.nullcontext():
        module = import_main(config.main, root)
        functions = check_endpoint(config, collect_functions(module))
        lock = build_lock(config, functions)
    return Discovery(project_dir=root, config=config, functions=functions, lock=lock)
