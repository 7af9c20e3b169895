"""The authoring API endpoint authors import: the decorator, its spec, the context and types.

Import-light by design: nothing here imports grpc, torch or a runtime module, so discovery at
image build time is fast and safe.
"""

from gen_worker.authoring.context import ContextHooks, OutputSink, OutputStream, RequestContext
from gen_worker.authoring.decorator import find_function_spec, get_function_spec, worker_function
from gen_worker.authoring.keyspace import selected_key
from gen_worker.authoring.slug import slugify
from gen_worker.authoring.spec import (
    FunctionSpec,
    InjectionSpec,
    ModelRef,
    ModelRefSource,
    ResourceRequirements,
)
from gen_worker.authoring.types import Asset, DestinationRepo, OutputSpec, SourceRepo, Tensors

__all__ = [
    "Asset",
    "ContextHooks",
    "DestinationRepo",
    "FunctionSpec",
    "InjectionSpec",
    "ModelRef",
    "ModelRefSource",
    "OutputSink",
    "OutputSpec",
    "OutputStream",
    "RequestContext",
    "ResourceRequirements",
    "SourceRepo",
    "Tensors",
    "find_function_spec",
    "get_function_spec",
    "selected_key",
    "slugify",
    "worker_function",
]
