"""Settings of the model subsystem: where the hub is, how to authenticate, where the store is.

Read by the worker, the dev runner and ``gen-worker models``, so all three find the same hub
and the same store from the same variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from gen_worker.config.parse import boolean, directory, positive_int, read, string
from gen_worker.errors import ConfigError

__all__ = ["ModelSettings", "load_model_settings"]


def _default_cache_dir() -> str:
    return str(Path("~/.cache/tensorhub").expanduser())


class ModelSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where models come from and where they are kept. ``repr`` never shows the tokens."""

    #: TENSORHUB_URL: the hub's base URL; None means no hub (only what the store has).
    tensorhub_url: str | None = None
    #: TENSORHUB_TOKEN: bearer token for the hub (a request's capability token wins).
    tensorhub_token: str | None = None
    #: TENSORHUB_CACHE_DIR: the store lives in ``<dir>/cas``.
    cache_dir: str = msgspec.field(default_factory=_default_cache_dir)
    #: WORKER_MAX_CONCURRENT_DOWNLOADS: models downloaded at once.
    max_concurrent_downloads: int = 2
    #: WORKER_ALLOW_TENSORHUB_API_RESOLVE: let the worker ask the hub to resolve refs the
    #: scheduler did not resolve (local development).
    allow_hub_resolve: bool = False
    #: HF_TOKEN: token for Hugging Face refs.
    hf_token: str | None = None
    #: HF_ENDPOINT: the Hugging Face endpoint (huggingface_hub's own variable).
    hf_endpoint: str | None = None

    @property
    def store_root(self) -> Path:
        return Path(self.cache_dir) / "cas"

    def __repr__(self) -> str:
        shown = {
            name: ("[REDACTED]" if name.endswith("token") and value else value)
            for name in self.__struct_fields__
            for value in [getattr(self, name)]
        }
        fields = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"ModelSettings({fields})"


def _http_url(variable: str, text: str) -> str:
    url = text.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(
            variable, "is not an http(s) URL with a host; use e.g. http://127.0.0.1:7777"
        )
    return url


def load_model_settings(environ: Mapping[str, str] | None = None) -> ModelSettings:
    """Read the model variables; a malformed one is a ConfigError naming it."""
    env = os.environ if environ is None else environ
    values = {
        "tensorhub_url": read(env, "TENSORHUB_URL", _http_url),
        "tensorhub_token": read(env, "TENSORHUB_TOKEN", string),
        "cache_dir": read(env, "TENSORHUB_CACHE_DIR", directory),
        "max_concurrent_downloads": read(env, "WORKER_MAX_CONCURRENT_DOWNLOADS", positive_int),
        "allow_hub_resolve": read(env, "WORKER_ALLOW_TENSORHUB_API_RESOLVE", boolean),
        "hf_token": read(env, "HF_TOKEN", string),
        "hf_endpoint": read(env, "HF_ENDPOINT", _http_url),
    }
    given = {k: v for k, v in values.items() if v is not None}
    return msgspec.structs.replace(ModelSettings(), **given)
