"""Model settings: defaults from the seed README, malformed values named, tokens never shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gen_worker.config import ModelSettings, load_model_settings
from gen_worker.errors import ConfigError


def test_defaults() -> None:
    settings = load_model_settings({})
    assert settings.tensorhub_url is None
    assert settings.max_concurrent_downloads == 2
    assert settings.allow_hub_resolve is False
    assert settings.store_root == Path("~/.cache/tensorhub/cas").expanduser()


def test_values_are_read() -> None:
    settings = load_model_settings(
        {
            "TENSORHUB_URL": "http://127.0.0.1:7777/",
            "TENSORHUB_TOKEN": "s3cret-hub\n",
            "TENSORHUB_CACHE_DIR": "/data/th",
            "WORKER_MAX_CONCURRENT_DOWNLOADS": "4",
            "WORKER_ALLOW_TENSORHUB_API_RESOLVE": "true",
            "HF_TOKEN": "hf_s3cret",
        }
    )
    assert settings.tensorhub_url == "http://127.0.0.1:7777"
    assert settings.tensorhub_token == "s3cret-hub"
    assert settings.store_root == Path("/data/th/cas")
    assert settings.max_concurrent_downloads == 4
    assert settings.allow_hub_resolve is True
    shown = repr(settings)
    assert "s3cret" not in shown and "[REDACTED]" in shown


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TENSORHUB_URL", "hub:7777", "TENSORHUB_URL: is not an http(s) URL"),
        ("WORKER_MAX_CONCURRENT_DOWNLOADS", "0", "WORKER_MAX_CONCURRENT_DOWNLOADS"),
        ("WORKER_MAX_CONCURRENT_DOWNLOADS", "two", "WORKER_MAX_CONCURRENT_DOWNLOADS"),
        ("WORKER_ALLOW_TENSORHUB_API_RESOLVE", "maybe", "WORKER_ALLOW_TENSORHUB_API_RESOLVE"),
    ],
)
def test_malformed_values_name_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_model_settings({variable: value})


def test_repr_without_tokens_shows_none() -> None:
    assert "tensorhub_token=None" in repr(ModelSettings())
