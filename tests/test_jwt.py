"""Worker JWT verification against a real JWKS served over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gen_worker.errors import AuthError
from gen_worker.transport.jwt import JwtClaims, unverified_claims, verify_worker_jwt

NOT_A_JWT = "WORKER_JWT is not a JWT (expected three base64url parts: header.payload.signature)"
ALLOWED = "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA"


class Keys:
    """Signing keys made at test time; ``other_rsa`` forges tokens under the real kid."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": "rsa-1"},
                {**ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": "ec-1"},
                {**OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True), "kid": "ed-1"},
            ]
        }


class JwksServer(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, tuple[int, bytes]]


class JwksHandler(BaseHTTPRequestHandler):
    server: JwksServer

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/slow.json":
            time.sleep(0.3)
            path = "/jwks.json"
        status, body = self.server.routes.get(path, (404, b"not found"))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture
def base_url(keys: Keys) -> Iterator[str]:
    server = JwksServer(("127.0.0.1", 0), JwksHandler)
    full = keys.jwks()
    oct_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "oct-1"}
    pinned = {**full["keys"][0], "kid": "pinned", "alg": "RS512"}
    server.routes = {
        "/jwks.json": (200, json.dumps(full).encode()),
        "/single.json": (200, json.dumps({"keys": [full["keys"][0]]}).encode()),
        "/oct.json": (200, json.dumps({"keys": [oct_key]}).encode()),
        "/pinned.json": (200, json.dumps({"keys": [pinned]}).encode()),
        "/500.json": (500, b'{"error": "boom"}'),
        "/html.json": (200, b"<html>oops</html>"),
        "/nokeys.json": (200, b'{"jwks": []}'),
    }
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "worker-1", "release_id": "rel-9", "iss": "cozy", "aud": "workers"}
    return {**base, "exp": now + 600, "iat": now, **changes}


def sign(key: Any, payload: dict[str, Any], alg: str = "RS256", kid: str | None = "rsa-1") -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def verify(token: str, url: str, **kwargs: Any) -> JwtClaims:
    options: dict[str, Any] = {"issuer": "cozy", "audience": "workers", **kwargs}
    return asyncio.run(verify_worker_jwt(token, jwks_url=url, **options))


def assert_no_leak(exc: BaseException, token: str) -> None:
    texts = [str(exc), repr(exc), repr(exc.args)]
    parts = [part for part in token.split(".") if len(part) > 10]
    parts += [token] if token else []  # "" is in every string
    for text in texts:
        for part in parts:
            assert part not in text
    assert exc.__cause__ is None
    assert exc.__suppress_context__ or exc.__context__ is None


def refused(token: str, url: str, **kwargs: Any) -> str:
    with pytest.raises(AuthError) as info:
        verify(token, url, **kwargs)
    assert_no_leak(info.value, token)
    assert info.value.error_type == "auth"
    return str(info.value)


# -- accepted ----------------------------------------------------------------------------------


def test_valid_rsa_token_returns_its_claims(keys: Keys, base_url: str) -> None:
    payload = claims(extra={"tier": 2})
    result = verify(sign(keys.rsa, payload), f"{base_url}/jwks.json")
    assert result == JwtClaims(
        sub="worker-1",
        release_id="rel-9",
        iss="cozy",
        aud="workers",
        exp=payload["exp"],
        raw=payload,
    )


@pytest.mark.parametrize(
    ("which", "alg", "kid"),
    [
        ("rsa", "PS256", "rsa-1"),
        ("rsa", "RS512", "rsa-1"),
        ("ec", "ES256", "ec-1"),
        ("ed", "EdDSA", "ed-1"),
    ],
)
def test_every_key_type_verifies(keys: Keys, base_url: str, which: str, alg: str, kid: str) -> None:
    token = sign(getattr(keys, which), claims(sub=f"w-{alg}"), alg=alg, kid=kid)
    assert verify(token, f"{base_url}/jwks.json").sub == f"w-{alg}"


def test_issuer_and_audience_are_checked_only_when_given(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(iss="elsewhere", aud=["a", "b"]))
    result = verify(token, f"{base_url}/jwks.json", issuer=None, audience=None)
    assert result.aud == ["a", "b"]
    assert result.iss == "elsewhere"


def test_audience_list_containing_the_expected_one(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(aud=["other", "workers"]))
    assert verify(token, f"{base_url}/jwks.json").aud == ["other", "workers"]


def test_no_kid_uses_the_only_key(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(), kid=None)
    assert verify(token, f"{base_url}/single.json").sub == "worker-1"


def test_a_given_client_is_used_and_left_open(keys: Keys, base_url: str) -> None:
    seen: list[str] = []

    async def hook(request: httpx.Request) -> None:
        seen.append(str(request.url))

    async def main() -> bool:
        async with httpx.AsyncClient(event_hooks={"request": [hook]}) as client:
            token = sign(keys.rsa, claims())
            url = f"{base_url}/jwks.json"
            await verify_worker_jwt(token, jwks_url=url, issuer=None, audience=None, client=client)
            return client.is_closed

    assert asyncio.run(main()) is False
    assert seen == [f"{base_url}/jwks.json"]


def test_fetching_the_jwks_does_not_block_the_event_loop(keys: Keys, base_url: str) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> JwtClaims:
        task = asyncio.create_task(ticker())
        try:
            token = sign(keys.rsa, claims())
            url = f"{base_url}/slow.json"
            return await verify_worker_jwt(token, jwks_url=url, issuer=None, audience=None)
        finally:
            task.cancel()

    assert asyncio.run(main()).sub == "worker-1"
    assert ticks >= 10  # the server held the answer 0.3 s; the loop kept running meanwhile


# -- refused -----------------------------------------------------------------------------------


def test_expired(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(exp=int(time.time()) - 60))
    assert refused(token, f"{base_url}/jwks.json") == "WORKER_JWT has expired"


def test_exp_is_required(keys: Keys, base_url: str) -> None:
    payload = {k: v for k, v in claims().items() if k != "exp"}
    message = refused(sign(keys.rsa, payload), f"{base_url}/jwks.json")
    assert message == "WORKER_JWT lacks the required 'exp' claim"


def test_wrong_audience(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(aud="someone-else"))
    message = refused(token, f"{base_url}/jwks.json")
    assert message == "WORKER_JWT has the wrong audience (expected 'workers')"


def test_wrong_issuer(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(iss="mallory"))
    message = refused(token, f"{base_url}/jwks.json")
    assert message == "WORKER_JWT has the wrong issuer (expected 'cozy')"


def test_not_valid_yet(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(nbf=int(time.time()) + 600))
    message = refused(token, f"{base_url}/jwks.json")
    assert message == "WORKER_JWT is not valid yet (nbf or iat in the future)"


def test_bad_signature_from_another_key_under_the_same_kid(keys: Keys, base_url: str) -> None:
    token = sign(keys.other_rsa, claims(), kid="rsa-1")
    message = refused(token, f"{base_url}/jwks.json")
    assert message == "WORKER_JWT has a bad signature (not signed by the JWKS key)"


def test_tampered_payload_is_a_bad_signature(keys: Keys, base_url: str) -> None:
    header, _, signature = sign(keys.rsa, claims()).split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    message = refused(f"{header}.{forged}.{signature}", f"{base_url}/jwks.json")
    assert message == "WORKER_JWT has a bad signature (not signed by the JWKS key)"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(base_url: str, alg: str) -> None:
    header = b64(json.dumps({"alg": alg, "kid": "rsa-1", "typ": "JWT"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    message = refused(token, f"{base_url}/jwks.json")
    assert message == f"WORKER_JWT is unsigned (alg none); allowed algorithms: {ALLOWED}"


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_signed_with_the_public_key_is_refused(keys: Keys, base_url: str, alg: str) -> None:
    # The classic confusion: the public key (which anyone can fetch) used as an HMAC secret.
    pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = ".".join(
        b64(json.dumps(part).encode()) for part in ({"alg": alg, "kid": "rsa-1"}, claims())
    )
    digest = getattr(hashlib, f"sha{alg[2:]}")
    signature = hmac.new(pem, signing_input.encode(), digest).digest()
    token = f"{signing_input}.{b64(signature)}"
    message = refused(token, f"{base_url}/jwks.json")
    expected = f"WORKER_JWT uses the symmetric algorithm '{alg}', which is not allowed"
    assert message == f"{expected}; allowed algorithms: {ALLOWED}"


def test_other_algorithms_are_refused(keys: Keys, base_url: str) -> None:
    header = b64(json.dumps({"alg": "ES256K", "kid": "ec-1"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}.{b64(b'x' * 64)}"
    message = refused(token, f"{base_url}/jwks.json")
    expected = "WORKER_JWT uses the algorithm 'ES256K', which is not allowed"
    assert message == f"{expected}; allowed algorithms: {ALLOWED}"


def test_unknown_kid_names_it_and_the_kids_offered(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(), kid="rotated-away")
    message = refused(token, f"{base_url}/jwks.json")
    assert message == (
        f"WORKER_JWT kid 'rotated-away' is not in the JWKS at {base_url}/jwks.json; "
        "it offers 'rsa-1', 'ec-1', 'ed-1'"
    )


def test_no_kid_with_several_keys(keys: Keys, base_url: str) -> None:
    message = refused(sign(keys.rsa, claims(), kid=None), f"{base_url}/jwks.json")
    assert message == (
        f"WORKER_JWT has no kid and the JWKS at {base_url}/jwks.json offers 3 keys; "
        "cannot tell which one signed it"
    )


def test_key_of_the_wrong_type_for_the_algorithm(keys: Keys, base_url: str) -> None:
    token = sign(keys.ec, claims(), alg="ES256", kid="rsa-1")
    message = refused(token, f"{base_url}/jwks.json")
    assert message == "JWKS key 'rsa-1' cannot verify ES256 (wrong key type or curve)"


def test_key_pinned_to_another_algorithm(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(), alg="RS256", kid="pinned")
    message = refused(token, f"{base_url}/pinned.json")
    assert message == "WORKER_JWT is signed with RS256 but JWKS key 'pinned' is for 'RS512'"


def test_symmetric_key_in_the_jwks_is_refused(keys: Keys, base_url: str) -> None:
    token = sign(keys.rsa, claims(), kid="oct-1")
    message = refused(token, f"{base_url}/oct.json")
    assert message == "JWKS key 'oct-1' is a symmetric (oct) key; only public keys are allowed"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/500.json", "answered HTTP 500, expected 200"),
        ("/missing.json", "answered HTTP 404, expected 200"),
        ("/html.json", "is not JSON"),
        ("/nokeys.json", "has no 'keys' list"),
    ],
)
def test_jwks_answers_that_are_not_a_jwks(
    keys: Keys, base_url: str, path: str, problem: str
) -> None:
    message = refused(sign(keys.rsa, claims()), f"{base_url}{path}?api_key=s3cr3t#frag")
    assert message == f"JWKS at {base_url}{path} {problem}"


def test_jwks_unreachable(keys: Keys) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://user:pw@127.0.0.1:{port}/jwks.json?token=s3cr3t"
    message = refused(sign(keys.rsa, claims()), url)
    assert message == f"JWKS unreachable at http://127.0.0.1:{port}/jwks.json (ConnectError)"


def test_jwks_url_with_an_unsupported_scheme(keys: Keys) -> None:
    message = refused(sign(keys.rsa, claims()), "ftp://127.0.0.1/jwks.json")
    assert message == "JWKS unreachable at ftp://127.0.0.1/jwks.json (UnsupportedProtocol)"


GARBAGE = [
    "",
    "not-a-jwt",
    "a.b.c",
    "eyJhbGciOiJSUzI1NiJ9",
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3In0",
    "!!!!.@@@@.####",
    b64(b"[1, 2]") + "." + b64(b"{}") + ".sig",
    b64(b'{"alg": "RS256"}') + "." + b64(b"not json at all") + ".c2lnbmF0dXJl",
]


@pytest.mark.parametrize("token", GARBAGE)
def test_garbage_token_is_refused_before_any_fetch(token: str) -> None:
    # The URL points nowhere: a fetch would fail with "JWKS unreachable" instead.
    message = refused(token, "http://127.0.0.1:1/jwks.json")
    assert message == NOT_A_JWT


# -- unverified claims -------------------------------------------------------------------------


def test_unverified_claims_skip_signature_and_expiry(keys: Keys) -> None:
    payload = claims(exp=int(time.time()) - 3600, sub=7, aud=["a", 3])
    result = unverified_claims(sign(keys.other_rsa, payload))
    assert result.release_id == "rel-9"
    assert result.sub is None  # not a string: not trusted as a worker id
    assert result.aud is None
    assert result.exp == payload["exp"]
    assert result.raw == payload


@pytest.mark.parametrize("token", GARBAGE)
def test_unverified_claims_of_garbage(token: str) -> None:
    with pytest.raises(AuthError) as info:
        unverified_claims(token)
    assert str(info.value) == NOT_A_JWT
    assert_no_leak(info.value, token)


@given(st.text(max_size=200))
def test_unverified_claims_never_raise_anything_else(text: str) -> None:
    try:
        result = unverified_claims(text)
    except AuthError as exc:
        assert str(exc) == NOT_A_JWT
        assert exc.__cause__ is None
    else:
        assert isinstance(result.raw, dict)
