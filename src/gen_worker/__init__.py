"""gen-worker: write typed Python functions, run them as serverless AI inference endpoints.

The names here are the authoring API; everything an endpoint module needs imports from this
package root (errors from :mod:`gen_worker.errors`), with the two low-VRAM helpers an
endpoint may call itself (:func:`apply_low_vram_config`, :func:`with_oom_retry`).
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
from gen_worker.low_vram import apply_low_vram_config, with_oom_retry

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
    "apply_low_vram_config",
    "with_oom_retry",
    "worker_function",
]
