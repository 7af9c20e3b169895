"""Importing an endpoint's ``main`` module and collecting its worker functions.

A module that fails to import is an error naming the module and the exception (never a warning
and a half-empty endpoint).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from gen_worker.authoring import FunctionSpec, find_function_spec
from gen_worker.errors import DefinitionError

__all__ = ["collect_functions", "endpoint_import_paths", "import_main", "isolated_imports"]


def endpoint_import_paths(project_dir: Path) -> list[Path]:
    """Where an endpoint's code lives: its ``src/`` (the documented layout) and its root."""
    return [project_dir / "src", project_dir]


@contextlib.contextmanager
def isolated_imports() -> Iterator[None]:
    """Undo the ``sys.path`` and ``sys.modules`` changes made inside the block.

    Lets tests and tools discover several projects in one process even when they reuse
    module names.
    """
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            del sys.modules[name]


def import_main(main: str, project_dir: Path) -> ModuleType:
    """Import ``main`` with the project's code first on ``sys.path``."""
    for path in reversed(endpoint_import_paths(project_dir)):
        sys.path.insert(0, str(path))
    importlib.invalidate_caches()
    try:
        return importlib.import_module(main)
    except DefinitionError as exc:
        raise DefinitionError(f"importing '{main}' failed: {exc}") from exc
    except ModuleNotFoundError as exc:
        if exc.name is not None and (main == exc.name or main.startswith(exc.name + ".")):
            raise DefinitionError(
                f"module '{main}' (endpoint.toml `main`) was not found in {project_dir}/src or "
                f"{project_dir}; check `main`, or that the package directory exists there"
            ) from exc
        raise _import_failure(main, exc) from exc
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _import_failure(main, exc) from exc


def _import_failure(main: str, exc: BaseException) -> DefinitionError:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    hint = " (is a dependency missing?)" if isinstance(exc, ImportError) else ""
    return DefinitionError(f"importing '{main}' failed{where}: {type(exc).__name__}: {exc}{hint}")


def collect_functions(module: ModuleType) -> list[FunctionSpec]:
    """Every ``@worker_function`` reachable as an attribute of ``module``, sorted by slug.

    Functions defined in other modules count once imported into ``main``, which is how a
    larger endpoint splits its code.
    """
    found: dict[int, FunctionSpec] = {}
    for value in vars(module).values():
        spec = find_function_spec(value)
        if spec is not None:
            found[id(spec)] = spec
    if not found:
        raise DefinitionError(
            f"module '{module.__name__}' defines no @worker_function; decorate at least one "
            "function, or import it into this module"
        )
    return sorted(found.values(), key=lambda s: (s.name, s.python_name))
