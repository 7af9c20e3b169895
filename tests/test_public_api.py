"""The public surface is locked: changing it must be a deliberate edit of this file."""

from __future__ import annotations

import subprocess
import sys

import gen_worker
from gen_worker import errors

ROOT_API = [
    "Asset",
    "DestinationRepo",
    "ModelRef",
    "ModelRefSource",
    "OutputSpec",
    "RequestContext",
    "ResourceRequirements",
    "SourceRepo",
    "Tensors",
    "__version__",
    "apply_low_vram_config",
    "with_oom_retry",
    "worker_function",
]

ERRORS_API = [
    "AuthError",
    "BlobMissingError",
    "BusyError",
    "CanceledError",
    "ConfigError",
    "DefinitionError",
    "DigestMismatchError",
    "DownloadError",
    "EndpointConfigError",
    "FatalError",
    "GenWorkerError",
    "HubAuthError",
    "HubConflictError",
    "HubError",
    "HubNotFoundError",
    "HubUnavailableError",
    "InsufficientDiskError",
    "InvalidModelRefError",
    "ModelInUseError",
    "ModelLoadError",
    "OutputTooLargeError",
    "ResourceError",
    "RetryableError",
    "SnapshotInUseError",
    "UnsafePathError",
    "ValidationError",
]


def test_root_all_is_exactly_the_authoring_api() -> None:
    assert sorted(gen_worker.__all__) == ROOT_API
    for name in ROOT_API:
        assert hasattr(gen_worker, name), name


def test_errors_all() -> None:
    assert sorted(errors.__all__) == ERRORS_API


def test_seed_import_paths_work() -> None:
    from gen_worker import RequestContext, worker_function  # noqa: F401
    from gen_worker.errors import FatalError, RetryableError, ValidationError  # noqa: F401


def test_authoring_api_imports_no_runtime_dependency() -> None:
    code = (
        "import sys, gen_worker, gen_worker.discovery, gen_worker.discover;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'grpc', 'torch', 'google', 'diffusers', 'transformers', 'numpy'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
