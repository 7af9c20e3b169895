"""Build-time discovery: endpoint.toml, the user's functions, and the endpoint.lock manifest."""

from gen_worker.discovery.checks import CheckedFunction, check_endpoint
from gen_worker.discovery.endpoint_toml import (
    ENDPOINT_TOML,
    EndpointConfig,
    load_endpoint_toml,
    parse_endpoint_toml,
)
from gen_worker.discovery.lock import EndpointLock, LockFunction, decode_lock, encode_lock
from gen_worker.discovery.project import Discovery, discover

__all__ = [
    "ENDPOINT_TOML",
    "CheckedFunction",
    "Discovery",
    "EndpointConfig",
    "EndpointLock",
    "LockFunction",
    "check_endpoint",
    "decode_lock",
    "discover",
    "encode_lock",
    "load_endpoint_toml",
    "parse_endpoint_toml",
]
