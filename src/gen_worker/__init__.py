"""gen-worker: write typed Python functions, run them as serverless AI inference endpoints.

The names here are the authoring API; everything an endpoint module needs imports from this
package root (errors from :mod:`gen_worker.errors`).
"""

from gen_worker._version import __version__
from gen_worker.authoring import (
    Asset,
    DestinationRepo,
    ModelRef,
    ModelRefSource,
    OutputSpec,
    RequestContext,
    ResourceRequirements,
    SourceRepo,
    Tensors,
    worker_function,
)

__all__ = [
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
    "worker_function",
]
