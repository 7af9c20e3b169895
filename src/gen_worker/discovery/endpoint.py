"""Loading an endpoint to run it: a baked endpoint.lock plus the code it was built from.

The worker and the dev runner start from the lock baked into the image
(``/app/.tensorhub/endpoint.lock``) and the code under the endpoint root (``/app``): the lock
says what the platform was promised, the code must still provide exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gen_worker.authoring import FunctionSpec
from gen_worker.discovery.loader import collect_functions, import_main
from gen_worker.discovery.lock import EndpointLock, decode_lock
from gen_worker.discovery.project import discover
from gen_worker.errors import DefinitionError

__all__ = ["LoadedEndpoint", "load_from_lock", "load_from_project"]


@dataclass(frozen=True, slots=True)
class LoadedEndpoint:
    lock: EndpointLock
    functions: list[FunctionSpec]
    #: Where the code was imported from.
    root: Path


def load_from_project(project_dir: str | Path) -> LoadedEndpoint:
    """Discover a project now (development): endpoint.toml + code."""
    found = discover(project_dir)
    return LoadedEndpoint(found.lock, [f.spec for f in found.functions], found.project_dir)


def load_from_lock(manifest_path: str | Path, endpoint_root: str | Path) -> LoadedEndpoint:
    """Read the baked lock, import its ``main`` from ``endpoint_root``, match the functions."""
    path = Path(manifest_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DefinitionError(
            f"cannot read the endpoint lock {path} ({exc.strerror}); bake it at build time with "
            "`python -m gen_worker.discover > endpoint.lock`, or point GEN_WORKER_MANIFEST_PATH "
            "at it"
        ) from None
    lock = decode_lock(data, source=str(path))
    root = Path(endpoint_root).resolve()
    specs = {s.name: s for s in collect_functions(import_main(lock.main, root))}
    missing = sorted({f.name for f in lock.functions} - set(specs))
    if missing:
        raise DefinitionError(
            f"{path} lists functions {missing} that module '{lock.main}' under {root} does not "
            f"define (it defines {sorted(specs)}); rebuild the lock from this code"
        )
    return LoadedEndpoint(lock, [specs[f.name] for f in lock.functions], root)
