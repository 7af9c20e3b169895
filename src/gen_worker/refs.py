"""The one model-ref grammar of gen-worker: parse, validate and canonicalize model refs::

    ref      = owner "/" repo [ ":" tag ] [ "#" flavor ]
             | owner "/" repo "@" digest [ "#" flavor ]
    digest   = "blake3:" 64 lower-hex
    owner, repo, tag, flavor = [a-z0-9][a-z0-9._-]*          (whole ref at most 512 chars)
    hf_ref   = "hf:" hf_owner "/" hf_repo [ "@" revision ]    (case preserved)
    hf_owner, hf_repo = [A-Za-z0-9][A-Za-z0-9._-]*            (at most 96 chars each)
    revision = [A-Za-z0-9][A-Za-z0-9._/-]*                    (at most 255 chars)

A missing tag means ``latest``; the canonical string (``owner/repo:tag[#flavor]``,
``owner/repo@blake3:<hex>[#flavor]``, ``hf:owner/repo[@revision]``) is the identity key
everywhere. Strict parsing (endpoint.toml) rejects upper-case and surrounding whitespace;
lenient parsing (dev runner, hub client) trims and lower-cases Cozy refs, and
:func:`normalize_ref` tells the caller it did, so the rewrite can be logged.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, replace
from typing import TypeAlias

from gen_worker.errors import InvalidModelRefError

__all__ = [
    "DEFAULT_TAG",
    "HF_PREFIX",
    "MAX_COZY_REF_LEN",
    "CozyRef",
    "HfRef",
    "ParsedRef",
    "canonicalize",
    "normalize_ref",
    "parse_cozy_ref",
    "parse_hf_ref",
    "parse_ref",
]

HF_PREFIX = "hf:"
DEFAULT_TAG = "latest"
DIGEST_PREFIX = "blake3:"
MAX_COZY_REF_LEN = 512
MAX_HF_NAME_LEN = 96
MAX_HF_REVISION_LEN = 255

COZY_FORM = "expected owner/repo[:tag][#flavor] or owner/repo@blake3:<64 lower-hex>[#flavor]"
HF_FORM = "expected hf:owner/repo[@revision]"
ANY_FORM = f"{COZY_FORM}, or hf:owner/repo[@revision]"

_COZY_PART = re.compile(r"[a-z0-9][a-z0-9._-]*")
_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HF_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_PROVIDER = re.compile(r"[a-z][a-z0-9+.-]*")
# ASCII only: str.lower() would fold look-alikes such as the Kelvin sign into valid refs.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# Error messages echo the ref; a hostile multi-megabyte ref must not become a log line.
_SHOWN_MAX = 200


@dataclass(frozen=True, slots=True)
class CozyRef:
    """A Cozy hub ref; exactly one of ``tag`` and ``digest`` (64 lower-hex, no prefix) is set."""

    owner: str
    repo: str
    tag: str | None
    digest: str | None
    flavor: str | None

    def __post_init__(self) -> None:
        # Validated on construction, so no CozyRef, parsed or built by hand, holds a bad key.
        problem = self._problem()
        if problem is not None:
            raise _fail(self.canonical, COZY_FORM, problem)

    def _problem(self) -> str | None:
        tag, digest = self.tag, self.digest
        if (tag is None) == (digest is None):
            return "exactly one of tag and digest must be set"
        parts = {"owner": self.owner, "repo": self.repo, "tag": tag, "flavor": self.flavor}
        for what, value in parts.items():
            problem = None if value is None else _part_problem(what, value, _COZY_PART)
            if problem is not None:
                return problem
        if digest is not None and _DIGEST.fullmatch(digest) is None:
            if len(digest) != 64:
                return f"the digest must be exactly 64 lower-hex chars, got {len(digest)}"
            return f"the digest {digest!r} is not lower-hex"
        # The canonical form may be longer than the input (':latest') and must itself re-parse.
        if len(self.canonical) > MAX_COZY_REF_LEN:
            return f"the canonical ref is {len(self.canonical)} chars; at most {MAX_COZY_REF_LEN}"
        return None

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    @property
    def canonical(self) -> str:
        version = f":{self.tag}" if self.digest is None else f"@{DIGEST_PREFIX}{self.digest}"
        return f"{self.repo_id}{version}" + ("" if self.flavor is None else f"#{self.flavor}")

    def __str__(self) -> str:
        return self.canonical

    def with_flavor(self, flavor: str | None) -> CozyRef:
        """The same ref with ``flavor`` set (``None`` drops it); the flavor is validated."""
        return replace(self, flavor=flavor)


@dataclass(frozen=True, slots=True)
class HfRef:
    """A Hugging Face ref; owner, repo and revision keep their case."""

    owner: str
    repo: str
    revision: str | None

    def __post_init__(self) -> None:
        problem = _part_problem("owner", self.owner, _HF_NAME, MAX_HF_NAME_LEN)
        problem = problem or _part_problem("repo", self.repo, _HF_NAME, MAX_HF_NAME_LEN)
        if problem is None and self.revision is not None:
            problem = _part_problem("revision", self.revision, _HF_REVISION, MAX_HF_REVISION_LEN)
        if problem is not None:
            raise _fail(self.canonical, HF_FORM, problem)

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    @property
    def canonical(self) -> str:
        revision = "" if self.revision is None else f"@{self.revision}"
        return f"{HF_PREFIX}{self.repo_id}{revision}"

    def __str__(self) -> str:
        return self.canonical


ParsedRef: TypeAlias = CozyRef | HfRef


def parse_cozy_ref(text: object, *, lenient: bool = False) -> CozyRef:
    """Parse a Cozy hub ref; provider-prefixed refs such as ``hf:`` are rejected."""
    normalized = _normalize(text, lenient=lenient)
    if _is_hf(normalized):
        raise _fail(normalized, COZY_FORM, "provider prefixes are not allowed here")
    return _parse_cozy(normalized)


def parse_hf_ref(text: object) -> HfRef:
    """Parse ``hf:owner/repo[@revision]`` strictly (the ``hf:`` prefix is part of ``text``)."""
    ref = _require_str(text, HF_FORM)
    if ref != ref.strip():
        problem = f"surrounding whitespace is not allowed; did you mean {ref.strip()!r}?"
        raise _fail(ref, HF_FORM, problem)
    if not ref.startswith(HF_PREFIX):
        raise _fail(ref, HF_FORM, f"a Hugging Face ref must start with {HF_PREFIX!r}")
    return _parse_hf(ref)


def parse_ref(text: object, *, lenient: bool = False, allow_hf: bool = True) -> ParsedRef:
    """Parse any model ref, dispatching on the ``hf:`` prefix."""
    normalized = _normalize(text, lenient=lenient)
    if not _is_hf(normalized):
        return _parse_cozy(normalized)
    if not allow_hf:
        raise _fail(normalized, COZY_FORM, "provider prefixes are not allowed here")
    return _parse_hf(normalized)


def canonicalize(text: object, *, lenient: bool = False) -> str:
    """The canonical string (identity key) of a model ref."""
    return parse_ref(text, lenient=lenient).canonical


def normalize_ref(text: object) -> tuple[ParsedRef, bool]:
    """Parse leniently; the flag is True when trimming or lower-casing changed ``text``."""
    normalized = _normalize(text, lenient=True)
    return parse_ref(normalized), normalized != text


def _normalize(text: object, *, lenient: bool) -> str:
    """Trim and lower-case (Cozy refs only); in strict mode any such change is an error."""
    raw = _require_str(text, ANY_FORM)
    stripped = raw.strip()
    if not stripped:
        raise _fail(raw, ANY_FORM, "the ref is empty")
    if _is_hf(stripped):
        fixed = HF_PREFIX + stripped[len(HF_PREFIX) :]
    else:
        fixed = stripped.translate(_ASCII_LOWER)
    if fixed == raw or lenient:
        return fixed
    if stripped != raw:
        problem = "surrounding whitespace is not allowed"
    elif _is_hf(stripped):
        problem = f"the provider prefix must be lower-case {HF_PREFIX!r}"
    else:
        problem = "refs must be lower-case"
    raise _fail(raw, ANY_FORM, f"{problem}; did you mean {fixed!r}?")


def _parse_cozy(ref: str) -> CozyRef:
    if len(ref) > MAX_COZY_REF_LEN:
        raise _fail(ref, COZY_FORM, f"the ref is {len(ref)} chars; at most {MAX_COZY_REF_LEN}")
    colon, slash = ref.find(":"), ref.find("/")
    if 0 < colon < slash and _PROVIDER.fullmatch(ref[:colon]):
        problem = f"unknown provider prefix {ref[: colon + 1]!r}; the only one is {HF_PREFIX!r}"
        raise _fail(ref, COZY_FORM, problem)
    main, flavor = _split_once(ref, "#", ref, COZY_FORM)
    name, tag, digest = _split_version(main, ref)
    owner, repo = _split_name(name, ref, COZY_FORM)
    try:
        return CozyRef(owner=owner, repo=repo, tag=tag, digest=digest, flavor=flavor)
    except InvalidModelRefError as exc:
        # Name the ref the caller wrote, not the canonical form the constructor saw.
        raise InvalidModelRefError(_shown(ref), exc.rule) from None


def _split_version(main: str, ref: str) -> tuple[str, str | None, str | None]:
    """Split ``owner/repo[:tag]`` or ``owner/repo@blake3:<hex>`` into name, tag, bare digest."""
    if "@" not in main:
        name, tag = _split_once(main, ":", ref, COZY_FORM)
        return name, DEFAULT_TAG if tag is None else tag, None
    name, pinned = _split_once(main, "@", ref, COZY_FORM)
    if ":" in name:
        raise _fail(ref, COZY_FORM, "a ref takes a ':tag' or an '@digest', not both")
    if pinned is None or not pinned.startswith(DIGEST_PREFIX):
        problem = f"'@' must be followed by 'blake3:<64 lower-hex>', got {_shown(pinned or '')!r}"
        raise _fail(ref, COZY_FORM, problem)
    return name, None, pinned[len(DIGEST_PREFIX) :]


def _parse_hf(ref: str) -> HfRef:
    name, revision = _split_once(ref[len(HF_PREFIX) :], "@", ref, HF_FORM)
    owner, repo = _split_name(name, ref, HF_FORM)
    try:
        return HfRef(owner=owner, repo=repo, revision=revision)
    except InvalidModelRefError as exc:
        raise InvalidModelRefError(_shown(ref), exc.rule) from None


def _split_once(text: str, sep: str, ref: str, form: str) -> tuple[str, str | None]:
    """Split at ``sep`` if present; more than one ``sep`` is outside the grammar."""
    if text.count(sep) > 1:
        raise _fail(ref, form, f"{_shown(ref)!r} has more than one {sep!r}")
    head, found, tail = text.partition(sep)
    return head, tail if found else None


def _split_name(name: str, ref: str, form: str) -> tuple[str, str]:
    owner, repo = _split_once(name, "/", ref, form)
    if not name:
        raise _fail(ref, form, f"{_shown(ref)!r} does not start with owner/repo")
    if repo is None:
        raise _fail(ref, form, f"{_shown(ref)!r} has no '/' between owner and repo")
    return owner, repo


def _part_problem(
    what: str, value: str, pattern: re.Pattern[str], max_len: int = MAX_COZY_REF_LEN
) -> str | None:
    if not value:
        return f"the {what} is empty"
    if len(value) > max_len:
        return f"the {what} is {len(value)} chars; at most {max_len}"
    if pattern.fullmatch(value) is None:
        return f"the {what} {_shown(value)!r} does not match {pattern.pattern}"
    return None


def _is_hf(ref: str) -> bool:
    # Case-insensitive so 'HF:' reaches the HF grammar and its case error, not Cozy's.
    return ref[: len(HF_PREFIX)].lower() == HF_PREFIX


def _require_str(text: object, form: str) -> str:
    if isinstance(text, str):
        return text
    raise _fail(repr(text), form, f"a model ref must be a str, not {type(text).__name__}")


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX] + "..."


def _fail(ref: str, form: str, problem: str) -> InvalidModelRefError:
    return InvalidModelRefError(_shown(ref), f"{form}; {problem}")
