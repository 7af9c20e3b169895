"""Local verification of the worker JWT against the scheduler's JWKS (SPEC section 10).

The scheduler's claims are authoritative either way; verifying locally only makes a wrong,
expired or forged token fail at startup with a clear reason instead of as a rejected stream.

Every failure is an :class:`~gen_worker.errors.AuthError` whose message says what was wrong
and never contains the token or any part of it. Each is raised ``from None`` so a traceback
does not chain a library exception that might quote it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import msgspec

from gen_worker.errors import AuthError

__all__ = ["ALLOWED_ALGORITHMS", "JwtClaims", "unverified_claims", "verify_worker_jwt"]

#: Asymmetric algorithms only: with a symmetric one the public key from the JWKS would double
#: as the signing secret (the classic RS256 -> HS256 confusion).
ALLOWED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
_ALLOWED_TEXT = ", ".join(ALLOWED_ALGORITHMS)
_NOT_A_JWT = "WORKER_JWT is not a JWT (expected three base64url parts: header.payload.signature)"
# Values copied from the token's header into a message are cut short: they are attacker-chosen.
_MAX_ECHO = 64


class JwtClaims(msgspec.Struct, frozen=True):
    """The claims of a worker JWT that the worker uses, plus all of them in ``raw``."""

    sub: str | None
    release_id: str | None
    iss: str | None
    aud: str | list[str] | None
    exp: int | None
    raw: dict[str, Any]


def _echo(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_ECHO else text[: _MAX_ECHO - 3] + "..."


def _text_claim(payload: dict[str, Any], name: str) -> str | None:
    value = payload.get(name)
    return value if isinstance(value, str) else None


def _audience_claim(payload: dict[str, Any]) -> str | list[str] | None:
    value = payload.get("aud")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    return None


def _expiry_claim(payload: dict[str, Any]) -> int | None:
    value = payload.get("exp")
    # bool is an int subclass; ``"exp": true`` is not a time.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    return None


def _claims(payload: dict[str, Any]) -> JwtClaims:
    return JwtClaims(
        sub=_text_claim(payload, "sub"),
        release_id=_text_claim(payload, "release_id"),
        iss=_text_claim(payload, "iss"),
        aud=_audience_claim(payload),
        exp=_expiry_claim(payload),
        raw=payload,
    )


def unverified_claims(token: str) -> JwtClaims:
    """The token's claims without checking its signature or expiry.

    Only for values the scheduler re-checks anyway (the WORKER_ID fallback ``sub``, the
    ``release_id``); never for a decision about trust.
    """
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        raise AuthError(_NOT_A_JWT) from None
    return _claims(payload)


def _header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise AuthError(_NOT_A_JWT) from None


def _check_algorithm(alg: object) -> str:
    if isinstance(alg, str) and alg in ALLOWED_ALGORITHMS:
        return alg
    if isinstance(alg, str) and alg.lower() == "none":
        problem = "is unsigned (alg none)"
    elif isinstance(alg, str) and alg.upper().startswith("HS"):
        problem = f"uses the symmetric algorithm {_echo(alg)}, which is not allowed"
    else:
        problem = f"uses the algorithm {_echo(alg)}, which is not allowed"
    raise AuthError(f"WORKER_JWT {problem}; allowed algorithms: {_ALLOWED_TEXT}")


def _safe_url(url: str) -> str:
    """``url`` without user info, query string or fragment, which may carry credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


async def _get(url: str, client: httpx.AsyncClient | None, timeout_s: float) -> httpx.Response:
    if client is not None:
        return await client.get(url, timeout=timeout_s)
    async with httpx.AsyncClient(timeout=timeout_s) as own:
        return await own.get(url)


async def _fetch_keys(
    url: str, client: httpx.AsyncClient | None, timeout_s: float
) -> list[dict[str, Any]]:
    where = _safe_url(url)
    try:
        response = await _get(url, client, timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        # Only the class name: httpx messages can quote the full URL, query string included.
        raise AuthError(f"JWKS unreachable at {where} ({type(exc).__name__})") from None
    if response.status_code != httpx.codes.OK:
        raise AuthError(f"JWKS at {where} answered HTTP {response.status_code}, expected 200")
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        raise AuthError(f"JWKS at {where} is not JSON") from None
    keys = body.get("keys") if isinstance(body, dict) else None
    if not isinstance(keys, list):
        raise AuthError(f"JWKS at {where} has no 'keys' list")
    return [key for key in keys if isinstance(key, dict)]


def _select_key(keys: list[dict[str, Any]], kid: object, where: str) -> dict[str, Any]:
    if kid is None:
        if len(keys) == 1:
            return keys[0]
        raise AuthError(
            f"WORKER_JWT has no kid and the JWKS at {where} offers {len(keys)} keys; "
            "cannot tell which one signed it"
        )
    for key in keys:
        if key.get("kid") == kid:
            return key
    offered = ", ".join(_echo(key.get("kid")) for key in keys) or "none"
    raise AuthError(
        f"WORKER_JWT kid {_echo(kid)} is not in the JWKS at {where}; it offers {offered}"
    )


def _public_key(jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
    name = _echo(jwk.get("kid"))
    if jwk.get("kty") == "oct":
        raise AuthError(f"JWKS key {name} is a symmetric (oct) key; only public keys are allowed")
    key_alg = jwk.get("alg")
    if key_alg is not None and key_alg != alg:
        raise AuthError(
            f"WORKER_JWT is signed with {alg} but JWKS key {name} is for {_echo(key_alg)}"
        )
    try:
        return jwt.PyJWK(jwk, algorithm=alg)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise AuthError(f"JWKS key {name} cannot verify {alg} (wrong key type or curve)") from None


def _refusal(exc: Exception, issuer: str | None, audience: str | None) -> str:
    """What was wrong, in words; never ``str(exc)``, which is PyJWT's and unchecked."""
    reasons: list[tuple[type[jwt.PyJWTError], str]] = [
        (jwt.ExpiredSignatureError, "has expired"),
        (jwt.InvalidAudienceError, f"has the wrong audience (expected {audience!r})"),
        (jwt.InvalidIssuerError, f"has the wrong issuer (expected {issuer!r})"),
        (jwt.InvalidSignatureError, "has a bad signature (not signed by the JWKS key)"),
        (jwt.ImmatureSignatureError, "is not valid yet (nbf or iat in the future)"),
        (jwt.InvalidAlgorithmError, "uses an algorithm the key does not allow"),
        (jwt.DecodeError, "is malformed (undecodable header, payload or signature)"),
    ]
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"lacks the required {exc.claim!r} claim"
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return reason
    return f"was refused ({type(exc).__name__})"


async def verify_worker_jwt(
    token: str,
    *,
    jwks_url: str,
    issuer: str | None,
    audience: str | None,
    client: httpx.AsyncClient | None = None,
    timeout_s: float = 10.0,
) -> JwtClaims:
    """Verify ``token`` against the JWKS at ``jwks_url`` and return its claims.

    Checks the signature with the key named by the header's ``kid`` (asymmetric algorithms
    only), requires ``exp``, and checks ``iss`` / ``aud`` only when ``issuer`` / ``audience``
    are given. The JWKS is fetched with ``client`` when given, else a short-lived one.
    """
    # The whole structure first, so a garbage token is refused without a network round trip.
    unverified_claims(token)
    header = _header(token)
    alg = _check_algorithm(header.get("alg"))
    keys = await _fetch_keys(jwks_url, client, timeout_s)
    jwk = _select_key(keys, header.get("kid"), _safe_url(jwks_url))
    key = _public_key(jwk, alg)
    try:
        payload = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            issuer=issuer,
            audience=audience,
            options={
                "require": ["exp"],
                # PyJWT refuses any token carrying an aud when no audience is given.
                "verify_aud": audience is not None,
                "verify_iss": issuer is not None,
            },
        )
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise AuthError(f"WORKER_JWT {_refusal(exc, issuer, audience)}") from None
    return _claims(payload)
