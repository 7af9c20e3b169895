"""``redact``: credentials in log lines and error details become ``[REDACTED]``."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gen_worker.logs import REDACTED, redact


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims: dict[str, object] | None = None) -> str:
    header = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = claims or {"sub": "user-42", "iss": "https://hub.example", "exp": 1700000000}
    payload = b64url(json.dumps(body).encode())
    signature = b64url(bytes(range(256)))  # 342 url-safe characters, '-' and '_' included
    return f"{header}.{payload}.{signature}"


JWT = make_jwt()


def test_jwt_fixture_looks_real() -> None:
    header, payload, signature = JWT.split(".")
    assert header.startswith("eyJ")
    assert payload.startswith("eyJ")
    assert "-" in signature and "_" in signature


def test_redacted_marker() -> None:
    assert REDACTED == "[REDACTED]"


# -- JWTs ----------------------------------------------------------------------------------------


def test_bare_jwt_is_redacted() -> None:
    assert redact(JWT) == "[REDACTED]"


def test_jwt_inside_text_keeps_the_text() -> None:
    text = f"loading model with credential {JWT} failed: 403 Forbidden"
    assert redact(text) == "loading model with credential [REDACTED] failed: 403 Forbidden"


def test_two_jwts_are_both_redacted() -> None:
    other = make_jwt({"sub": "someone-else", "scope": "read write"})
    assert other != JWT
    assert redact(f"a={JWT}, b:{other}") == "a=[REDACTED], b:[REDACTED]"


def test_jwt_in_json_error_detail() -> None:
    text = json.dumps({"error": "expired", "id_token": JWT})
    assert redact(text) == '{"error": "expired", "id_token": "[REDACTED]"}'


# -- Bearer / Basic ------------------------------------------------------------------------------


def test_bearer_opaque_token() -> None:
    text = "request failed with header Bearer abcDEF123456_xyz~+/= and no retry"
    assert redact(text) == "request failed with header Bearer [REDACTED] and no retry"


def test_bearer_jwt_in_authorization_header() -> None:
    text = f"Authorization: Bearer {JWT}"
    assert redact(text) == "Authorization: Bearer [REDACTED]"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "Basic", "basic"])
def test_scheme_is_case_insensitive_and_kept(scheme: str) -> None:
    assert redact(f"{scheme} s3cr3t-t0ken-value") == f"{scheme} [REDACTED]"


def test_authorization_basic_header() -> None:
    credentials = base64.b64encode(b"alice:correct horse battery staple").decode()
    text = f"GET /v1/models HTTP/1.1\r\nAuthorization: Basic {credentials}\r\nHost: hub.example"
    assert redact(text) == (
        "GET /v1/models HTTP/1.1\r\nAuthorization: Basic [REDACTED]\r\nHost: hub.example"
    )
    assert credentials not in redact(text)


def test_the_word_bearer_in_prose_is_left_alone() -> None:
    text = "the bearer of this message is ok"
    assert redact(text) == text


# -- presigned URLs and key=value secrets ----------------------------------------------------------


def test_s3_presigned_url_keeps_host_path_and_other_params() -> None:
    url = (
        "https://bucket.s3.us-east-1.amazonaws.com/jobs/r1/outputs/image.png"
        "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
        "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr%2F%2F%2F"
        "&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
    )
    assert redact(f"upload to {url} failed") == (
        "upload to https://bucket.s3.us-east-1.amazonaws.com/jobs/r1/outputs/image.png"
        "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=[REDACTED]"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
        "&X-Amz-Security-Token=[REDACTED]"
        "&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=[REDACTED]"
        " failed"
    )


def test_azure_sas_signature() -> None:
    url = (
        "https://acct.blob.core.windows.net/c/in.png?sv=2022-11-02&se=2024-01-01T00%3A00Z"
        "&sr=b&sp=r&sig=AbC%2Bdef%3D"
    )
    assert redact(url) == (
        "https://acct.blob.core.windows.net/c/in.png?sv=2022-11-02&se=2024-01-01T00%3A00Z"
        "&sr=b&sp=r&sig=[REDACTED]"
    )


def test_token_query_param_in_the_middle() -> None:
    url = "https://cdn.example.com/a/b.safetensors?token=hf_abcdef123&download=true#frag"
    assert (
        redact(url) == "https://cdn.example.com/a/b.safetensors?token=[REDACTED]&download=true#frag"
    )


@pytest.mark.parametrize(
    "key",
    [
        "X-Amz-Signature",
        "x-amz-signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "Signature",
        "sig",
        "token",
        "TOKEN",
        "access_token",
        "api_key",
        "apikey",
        "password",
        "secret",
        "authorization",
    ],
)
def test_each_secret_key(key: str) -> None:
    text = f"GET https://h.example/p?a=1&{key}=VALUE123&b=2 returned 403"
    assert redact(text) == f"GET https://h.example/p?a=1&{key}=[REDACTED]&b=2 returned 403"


def test_value_stops_at_quotes_and_whitespace() -> None:
    assert redact("url='https://h/p?sig=abc' next") == "url='https://h/p?sig=[REDACTED]' next"
    assert redact('"password=hunter2" ok') == '"password=[REDACTED]" ok'
    assert redact("secret=abc def") == "secret=[REDACTED] def"


@pytest.mark.parametrize(
    "text",
    [
        "https://example.com/images/cat.png?width=512&height=256&format=webp",
        "prompt: a cat riding a bicycle, steps=30, guidance=7.5",
        "design=modern config=fast max_token=5 tokens=12 signed=yes",
        "model black-forest-labs/FLUX.1-dev loaded in 12.3 s on cuda:0",
        "a.b.c eyJ.x.y short.jwt.like",
        "",
        'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad',
    ],
)
def test_text_without_secrets_is_unchanged(text: str) -> None:
    assert redact(text) == text


# -- properties ------------------------------------------------------------------------------------

FRAGMENTS = st.sampled_from(
    [
        JWT,
        "eyJhbGciOiJub25lIn0",
        ".",
        "Bearer ",
        "basic ",
        "Authorization: ",
        "token=",
        "sig=",
        "X-Amz-Signature=",
        "password=",
        "&",
        "?",
        "=",
        " ",
        "\n",
        '"',
        "'",
        REDACTED,
        "[",
        "]",
        "abcdefgh",
        "A1b2C3d4_-",
        "https://h.example/p",
    ]
)
MIXED_TEXT = st.lists(st.one_of(FRAGMENTS, st.text(max_size=12)), max_size=20).map("".join)


@given(MIXED_TEXT)
def test_redact_is_idempotent(text: str) -> None:
    once = redact(text)
    assert isinstance(once, str)
    assert redact(once) == once


@given(st.text())
def test_redact_never_raises_on_any_text(text: str) -> None:
    result = redact(text)
    assert isinstance(result, str)
    assert redact(result) == result


@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.text(max_size=30),
)
def test_an_embedded_jwt_never_survives(before: str, after: str) -> None:
    text = f"{before} {JWT} {after}"
    assert JWT not in redact(text)
    assert JWT.split(".")[2] not in redact(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"access_token": "ya29.abc"}', '{"access_token": "[REDACTED]"}'),
        ("X-Amz-Signature: abcdef0123", "X-Amz-Signature: [REDACTED]"),
        ("password: hunter2", "password: [REDACTED]"),
        ("Authorization: Bearer abcdefghijk", "Authorization: Bearer [REDACTED]"),
        ("jwt eyJhbGciOiJub25lIn0.e30. end", "jwt [REDACTED] end"),
    ],
)
def test_other_secret_shapes(text: str, expected: str) -> None:
    assert redact(text) == expected
