"""Tests for the model-ref grammar in gen_worker.refs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gen_worker.errors import InvalidModelRefError
from gen_worker.refs import (
    HF_PREFIX,
    CozyRef,
    HfRef,
    ParsedRef,
    canonicalize,
    normalize_ref,
    parse_cozy_ref,
    parse_hf_ref,
    parse_ref,
)

HEX = "0123456789abcdef" * 4
COZY_FORM = "owner/repo[:tag][#flavor] or owner/repo@blake3:<64 lower-hex>[#flavor]"
HF_FORM = "hf:owner/repo[@revision]"


def _rejected(text: object, **kwargs: bool) -> InvalidModelRefError:
    with pytest.raises(InvalidModelRefError) as info:
        parse_ref(text, **kwargs)
    return info.value


# --- valid refs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "fields"),
    [
        ("o/r", "o/r:latest", ("o", "r", "latest", None, None)),
        ("o/r:latest", "o/r:latest", ("o", "r", "latest", None, None)),
        ("cozy/sdxl:v1.0", "cozy/sdxl:v1.0", ("cozy", "sdxl", "v1.0", None, None)),
        ("o/r#fp8", "o/r:latest#fp8", ("o", "r", "latest", None, "fp8")),
        ("o/r:v2#q4_k-m", "o/r:v2#q4_k-m", ("o", "r", "v2", None, "q4_k-m")),
        (f"o/r@blake3:{HEX}", f"o/r@blake3:{HEX}", ("o", "r", None, HEX, None)),
        (f"o/r@blake3:{HEX}#fp16", f"o/r@blake3:{HEX}#fp16", ("o", "r", None, HEX, "fp16")),
        (
            "0-a.b_c/9.x-y_z:1_2.3-4",
            "0-a.b_c/9.x-y_z:1_2.3-4",
            ("0-a.b_c", "9.x-y_z", "1_2.3-4", None, None),
        ),
    ],
)
def test_valid_cozy_refs_and_their_canonical_form(
    text: str, canonical: str, fields: tuple[str, str, str | None, str | None, str | None]
) -> None:
    ref = parse_cozy_ref(text)
    assert ref == CozyRef(*fields)
    assert ref.canonical == canonical
    assert str(ref) == canonical
    assert canonicalize(text) == canonical
    assert parse_ref(text) == ref
    assert ref.repo_id == f"{fields[0]}/{fields[1]}"


def test_cozy_ref_is_frozen() -> None:
    ref = parse_cozy_ref("o/r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "other"  # type: ignore[misc]


def test_with_flavor_sets_replaces_and_drops_the_flavor() -> None:
    ref = parse_cozy_ref("o/r:v1")
    assert ref.with_flavor("fp8").canonical == "o/r:v1#fp8"
    assert ref.with_flavor("fp8").with_flavor("q4").canonical == "o/r:v1#q4"
    assert parse_cozy_ref("o/r#fp8").with_flavor(None).canonical == "o/r:latest"
    pinned = parse_cozy_ref(f"o/r@blake3:{HEX}")
    assert pinned.with_flavor("fp8").canonical == f"o/r@blake3:{HEX}#fp8"


@pytest.mark.parametrize(
    ("flavor", "problem"),
    [("", "the flavor is empty"), ("FP8", "the flavor 'FP8'"), ("a#b", "the flavor 'a#b'")],
)
def test_with_flavor_validates(flavor: str, problem: str) -> None:
    with pytest.raises(InvalidModelRefError) as info:
        parse_cozy_ref("o/r").with_flavor(flavor)
    assert problem in info.value.rule
    assert COZY_FORM in info.value.rule


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (("o", "r", "v1", HEX, None), "exactly one of tag and digest"),
        (("o", "r", None, None, None), "exactly one of tag and digest"),
        (("O", "r", "v1", None, None), "the owner 'O' does not match"),
        (("o", "r", None, "blake3:" + HEX, None), "exactly 64 lower-hex chars, got 71"),
        (("o", "r", None, HEX.upper(), None), "is not lower-hex"),
    ],
)
def test_constructing_an_invalid_cozy_ref_is_rejected(
    fields: tuple[str, str, str | None, str | None, str | None], problem: str
) -> None:
    with pytest.raises(InvalidModelRefError) as info:
        CozyRef(*fields)
    assert problem in info.value.rule


# --- rejections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a/b/c", "'a/b/c' has more than one '/'"),
        ("o/r:t:u", "'o/r:t:u' has more than one ':'"),
        ("o/r#a#b", "'o/r#a#b' has more than one '#'"),
        ("o/r@@x", "has more than one '@'"),
        ("or", "'or' has no '/' between owner and repo"),
        ("/r", "the owner is empty"),
        ("o/", "the repo is empty"),
        ("o/r:", "the tag is empty"),
        ("o/r#", "the flavor is empty"),
        (":t/x", "does not start with owner/repo"),
        ("-o/r", "the owner '-o' does not match [a-z0-9][a-z0-9._-]*"),
        ("o/.r", "the repo '.r' does not match"),
        ("o/r:_t", "the tag '_t' does not match"),
        ("o/r#f!", "the flavor 'f!' does not match"),
        ("o r/x", "the owner 'o r' does not match"),
        ("o/r\u00e9", "the repo 'r\u00e9' does not match"),
        ("o/r@" + HEX, "'@' must be followed by 'blake3:<64 lower-hex>'"),
        ("o/r@sha256:" + HEX, "'@' must be followed by 'blake3:<64 lower-hex>', got 'sha256:"),
        ("o/r@blake3:" + HEX[:-1], "exactly 64 lower-hex chars, got 63"),
        ("o/r@blake3:" + HEX + "0", "exactly 64 lower-hex chars, got 65"),
        ("o/r@blake3:", "exactly 64 lower-hex chars, got 0"),
        ("o/r@blake3:" + "g" * 64, "is not lower-hex"),
        ("o/r:v1@blake3:" + HEX, "a ref takes a ':tag' or an '@digest', not both"),
        ("s3:x/y", "unknown provider prefix 's3:'; the only one is 'hf:'"),
        ("gs:bucket/key", "unknown provider prefix 'gs:'"),
    ],
)
def test_cozy_ref_outside_the_grammar_is_rejected(text: str, problem: str) -> None:
    for lenient in (False, True):
        err = _rejected(text, lenient=lenient)
        assert problem in err.rule
        assert COZY_FORM in err.rule
        assert str(err) == f"invalid model ref {text!r}: {err.rule}"
        assert err.ref == text


@pytest.mark.parametrize("text", [5, None, b"o/r", ["o/r"], 1.5])
def test_non_str_input_is_rejected(text: object) -> None:
    for parse in (parse_ref, parse_cozy_ref, parse_hf_ref, canonicalize, normalize_ref):
        with pytest.raises(InvalidModelRefError) as info:
            parse(text)
        assert f"a model ref must be a str, not {type(text).__name__}" in info.value.rule
        assert "owner/repo" in info.value.rule


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_ref_is_rejected(text: str) -> None:
    for lenient in (False, True):
        err = _rejected(text, lenient=lenient)
        assert "the ref is empty" in err.rule
        assert COZY_FORM in err.rule
        assert HF_FORM in err.rule


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"^invalid model ref 'a/b/c': expected owner/repo"):
        parse_ref("a/b/c")


def test_cozy_length_cap() -> None:
    tag = "t" * (512 - len("o/r:"))
    assert parse_ref(f"o/r:{tag}").canonical == f"o/r:{tag}"
    err = _rejected(f"o/r:{tag}x")
    assert "the ref is 513 chars; at most 512" in err.rule
    # Without a tag the canonical form gains ':latest', so it is the canonical form that counts.
    repo = "r" * (512 - len("o/"))
    err = _rejected(f"o/{repo}")
    assert f"the canonical ref is {512 + len(':latest')} chars; at most 512" in err.rule


def test_error_message_truncates_huge_refs() -> None:
    err = _rejected("x" * 100_000)
    assert len(str(err)) < 600
    assert err.ref.endswith("...")


# --- strict vs lenient ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem", "suggestion", "canonical"),
    [
        ("Cozy/SDXL:V1", "refs must be lower-case", "cozy/sdxl:v1", "cozy/sdxl:v1"),
        (f"o/r@blake3:{HEX.upper()}", "lower-case", f"o/r@blake3:{HEX}", f"o/r@blake3:{HEX}"),
        (" o/r", "surrounding whitespace is not allowed", "o/r", "o/r:latest"),
        ("o/r:v1\n", "surrounding whitespace is not allowed", "o/r:v1", "o/r:v1"),
        (" O/R ", "surrounding whitespace is not allowed", "o/r", "o/r:latest"),
        ("HF:Org/Model", "the provider prefix must be lower-case 'hf:'", "hf:Org/Model", None),
    ],
)
def test_strict_mode_rejects_what_lenient_mode_fixes(
    text: str, problem: str, suggestion: str, canonical: str | None
) -> None:
    err = _rejected(text)
    assert problem in err.rule
    assert f"did you mean {suggestion!r}?" in err.rule
    ref, changed = normalize_ref(text)
    assert changed is True
    assert ref.canonical == (suggestion if canonical is None else canonical)
    assert parse_ref(text, lenient=True) == ref


@pytest.mark.parametrize(
    ("text", "canonical", "changed"),
    [
        ("o/r", "o/r:latest", False),
        ("o/r:v1#fp8", "o/r:v1#fp8", False),
        (" O/R:V1#FP8\t", "o/r:v1#fp8", True),
        ("Cozy/Model", "cozy/model:latest", True),
        ("  hf:Org/Model@Main  ", "hf:Org/Model@Main", True),
        ("hf:Org/Model", "hf:Org/Model", False),
        ("Hf:Org/Model", "hf:Org/Model", True),
    ],
)
def test_normalize_ref_reports_whether_it_changed_the_input(
    text: str, canonical: str, changed: bool
) -> None:
    ref, did_change = normalize_ref(text)
    assert ref.canonical == canonical
    assert did_change is changed
    assert canonicalize(text, lenient=True) == canonical


def test_lenient_lower_casing_is_ascii_only() -> None:
    # The Kelvin sign lower-cases to 'k' with str.lower(); it must not sneak in as a valid ref.
    err = _rejected("o/\u212a", lenient=True)
    assert "the repo" in err.rule


def test_parse_cozy_ref_honours_lenient() -> None:
    assert parse_cozy_ref(" O/R ", lenient=True).canonical == "o/r:latest"
    with pytest.raises(InvalidModelRefError, match="lower-case"):
        parse_cozy_ref("O/R")


# --- Hugging Face refs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "owner", "repo", "revision"),
    [
        ("hf:Org/Model", "Org", "Model", None),
        ("hf:stabilityai/SDXL-1.0_base", "stabilityai", "SDXL-1.0_base", None),
        ("hf:Org/Model@main", "Org", "Model", "main"),
        ("hf:Org/Model@refs/pr/12", "Org", "Model", "refs/pr/12"),
        ("hf:o/r@" + "A1b2" * 10, "o", "r", "A1b2" * 10),
        ("hf:" + "O" * 96 + "/" + "R" * 96 + "@" + "v" * 255, "O" * 96, "R" * 96, "v" * 255),
    ],
)
def test_valid_hf_refs_keep_their_case(
    text: str, owner: str, repo: str, revision: str | None
) -> None:
    for ref in (parse_hf_ref(text), parse_ref(text), parse_ref(text, lenient=True)):
        assert ref == HfRef(owner, repo, revision)
        assert ref.canonical == text
        assert str(ref) == text
        assert ref.repo_id == f"{owner}/{repo}"
    assert normalize_ref(text) == (HfRef(owner, repo, revision), False)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("hf:", "'hf:' does not start with owner/repo"),
        ("hf:org", "'hf:org' has no '/' between owner and repo"),
        ("hf:a/b/c", "'hf:a/b/c' has more than one '/'"),
        ("hf:/r", "the owner is empty"),
        ("hf:o/", "the repo is empty"),
        ("hf:o/r@", "the revision is empty"),
        ("hf:o/r@a@b", "has more than one '@'"),
        ("hf:-o/r", "the owner '-o' does not match [A-Za-z0-9][A-Za-z0-9._-]*"),
        ("hf:o/r:x", "the repo 'r:x' does not match"),
        ("hf:o/r@/main", "the revision '/main' does not match [A-Za-z0-9][A-Za-z0-9._/-]*"),
        ("hf:o/r#fp8", "the repo 'r#fp8' does not match"),
        ("hf:" + "o" * 97 + "/r", "the owner is 97 chars; at most 96"),
        ("hf:o/" + "r" * 97, "the repo is 97 chars; at most 96"),
        ("hf:o/r@" + "v" * 256, "the revision is 256 chars; at most 255"),
    ],
)
def test_hf_ref_outside_the_grammar_is_rejected(text: str, problem: str) -> None:
    for parse in (parse_hf_ref, parse_ref):
        with pytest.raises(InvalidModelRefError) as info:
            parse(text)
        assert problem in info.value.rule
        assert f"expected {HF_FORM}" in info.value.rule


def test_parse_hf_ref_requires_the_prefix_and_no_whitespace() -> None:
    with pytest.raises(InvalidModelRefError) as info:
        parse_hf_ref("Org/Model")
    assert "a Hugging Face ref must start with 'hf:'" in info.value.rule
    with pytest.raises(InvalidModelRefError) as info:
        parse_hf_ref(" hf:Org/Model")
    assert "surrounding whitespace is not allowed; did you mean 'hf:Org/Model'?" in info.value.rule


def test_direct_hf_construction_is_validated() -> None:
    with pytest.raises(InvalidModelRefError, match="the revision is empty"):
        HfRef("o", "r", "")


@pytest.mark.parametrize("text", ["hf:Org/Model", "hf:o/r@main"])
def test_allow_hf_false_rejects_provider_prefixes(text: str) -> None:
    for parse_kwargs in ({"allow_hf": False}, {"allow_hf": False, "lenient": True}):
        err = _rejected(text, **parse_kwargs)
        assert "provider prefixes are not allowed here" in err.rule
        assert COZY_FORM in err.rule
    with pytest.raises(InvalidModelRefError, match="provider prefixes are not allowed here"):
        parse_cozy_ref(text)
    assert isinstance(parse_ref(text, allow_hf=True), HfRef)


# --- properties -------------------------------------------------------------------------------

cozy_part = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,15}", fullmatch=True)
hf_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True)
hf_revision = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,30}", fullmatch=True)
digest = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@st.composite
def cozy_refs(draw: st.DrawFn) -> tuple[str, str]:
    """A valid Cozy ref as written, and its expected canonical form."""
    name = f"{draw(cozy_part)}/{draw(cozy_part)}"
    flavor = draw(st.none() | cozy_part)
    suffix = "" if flavor is None else f"#{flavor}"
    version = draw(st.one_of(st.none(), cozy_part, digest.map(lambda d: "@blake3:" + d)))
    if version is None:
        return name + suffix, f"{name}:latest{suffix}"
    version = version if version.startswith("@") else f":{version}"
    return name + version + suffix, name + version + suffix


@st.composite
def hf_refs(draw: st.DrawFn) -> str:
    revision = draw(st.none() | hf_revision)
    tail = "" if revision is None else f"@{revision}"
    return f"{HF_PREFIX}{draw(hf_name)}/{draw(hf_name)}{tail}"


@given(cozy_refs())
def test_property_cozy_canonical_round_trips(written_and_canonical: tuple[str, str]) -> None:
    written, canonical = written_and_canonical
    ref = parse_cozy_ref(written)
    assert ref.canonical == canonical
    assert parse_cozy_ref(canonical) == ref
    assert parse_ref(canonical).canonical == canonical
    assert normalize_ref(canonical) == (ref, False)


@given(hf_refs())
def test_property_hf_canonical_round_trips(written: str) -> None:
    ref = parse_hf_ref(written)
    assert ref.canonical == written
    assert parse_ref(ref.canonical) == ref


@given(cozy_refs(), st.sampled_from([" ", "\t", "\n", ""]), st.booleans())
def test_property_lenient_accepts_trimmed_upper_case(
    written_and_canonical: tuple[str, str], pad: str, upper: bool
) -> None:
    written, canonical = written_and_canonical
    messy = pad + (written.upper() if upper else written) + pad
    assume(messy != written)
    ref, changed = normalize_ref(messy)
    assert changed is True
    assert ref.canonical == canonical
    with pytest.raises(InvalidModelRefError):
        parse_ref(messy)


ref_alphabet = "abcXYZ019._-/:@#hf3 \t\u212a\u00e9"
arbitrary = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=ref_alphabet, max_size=40),
    st.builds(
        lambda a, b: a + b, cozy_refs().map(lambda p: p[0]), st.text(ref_alphabet, max_size=4)
    ),
    st.builds(lambda a, b: a + b, hf_refs(), st.text(ref_alphabet, max_size=4)),
    st.builds(lambda a, b: a + b, st.text(ref_alphabet, max_size=4), hf_refs()),
)


def _check_total(parse: Callable[[object], ParsedRef], text: object) -> None:
    try:
        ref = parse(text)
    except InvalidModelRefError as err:
        assert err.rule.startswith("expected ")
        return
    assert isinstance(ref, CozyRef | HfRef)
    assert parse_ref(ref.canonical) == ref
    assert parse_ref(ref.canonical).canonical == ref.canonical


@given(arbitrary, st.booleans(), st.booleans())
def test_property_any_text_parses_to_a_stable_ref_or_a_ref_error(
    text: str, lenient: bool, allow_hf: bool
) -> None:
    _check_total(lambda t: parse_ref(t, lenient=lenient, allow_hf=allow_hf), text)
    _check_total(lambda t: parse_cozy_ref(t, lenient=lenient), text)
    _check_total(parse_hf_ref, text)
    _check_total(lambda t: normalize_ref(t)[0], text)


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text(), max_size=2)))
def test_property_non_str_is_always_a_ref_error(value: object) -> None:
    with pytest.raises(InvalidModelRefError):
        parse_ref(value, lenient=True)
