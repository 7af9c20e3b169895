"""No body a caller sends makes the dev runner answer 500: only 200 or a 4xx with a message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from devserver_support import serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
# Bodies shaped like payloads and envelopes, so the interesting paths are reached often.
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"text": json_values}),
    st.fixed_dictionaries({"prompt": json_values, "steps": json_values}),
    st.fixed_dictionaries({"payload": json_values}),
    st.fixed_dictionaries(
        {"payload": st.dictionaries(st.sampled_from(["text", "prompt", "x"]), json_values)},
        optional={"request_id": json_values, "timeout_ms": json_values, "owner": json_values},
    ),
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        serve(tmp_path_factory.mktemp("fuzz")) as served,
        httpx.Client(base_url=served.base_url, timeout=30) as c,
    ):
        yield c


def check(response: httpx.Response) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    if response.status_code != 200:
        body = response.json()
        assert body["success"] is False and body["safe_message"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, function=st.sampled_from(["chatty", "strict", "loose", "acount"]))
def test_arbitrary_json_bodies(client: httpx.Client, body: Any, function: str) -> None:
    if function == "acount" and isinstance(body, dict):
        body = {**body, "n": 2} if "payload" not in body else body
    check(client.post(f"/v1/request/{function}", content=msgspec.json.encode(body)))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=64))
def test_arbitrary_bytes(client: httpx.Client, raw: bytes) -> None:
    check(client.post("/v1/request/loose", content=raw))
