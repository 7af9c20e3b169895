"""The shared manifest rules: safe relative paths, the snapshot digest, digest strings."""

from __future__ import annotations

import random
from pathlib import PurePosixPath

import blake3
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gen_worker.errors import UnsafePathError
from gen_worker.models.manifest import (
    ManifestEntry,
    PartEntry,
    PartsFile,
    check_blake3_hex,
    check_relative_path,
    part_name,
    snapshot_digest,
    split_digest,
)

HEX_A = "a" * 64
HEX_B = "0123456789abcdef" * 4

GOOD_PATHS = [
    "a",
    "model_index.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "a/b/c/d",
    ".hidden",
    "a/.b",
    "a..b",
    "...",
    "with space/x y",
    "ünïcode/名前.bin",
    "C",
    "1:x",  # a colon is only a drive when a single letter precedes it
]

BAD_PATHS = [
    ("", "empty path"),
    ("../x", "segment '..' is not allowed"),
    ("a/../b", "segment '..' is not allowed"),
    ("..", "segment '..' is not allowed"),
    ("a/..", "segment '..' is not allowed"),
    ("/etc/passwd", "absolute path"),
    ("/", "absolute path"),
    ("a\\b", "backslash in path"),
    ("..\\x", "backslash in path"),
    ("a//b", "segment '' is not allowed"),
    ("a/", "segment '' is not allowed"),
    ("./a", "segment '.' is not allowed"),
    ("a/./b", "segment '.' is not allowed"),
    ("C:x", "absolute path"),
    ("c:/windows", "absolute path"),
    ("a\x00b", "control character in path"),
    ("a\nb", "control character in path"),
    ("a\x7f", "control character in path"),
]


@pytest.mark.parametrize("path", GOOD_PATHS)
def test_safe_paths_are_returned_unchanged(path: str) -> None:
    assert check_relative_path(path) == path


@pytest.mark.parametrize(("path", "problem"), BAD_PATHS)
def test_unsafe_paths_are_refused_naming_the_rule(path: str, problem: str) -> None:
    with pytest.raises(UnsafePathError) as caught:
        check_relative_path(path)
    assert str(caught.value) == (
        f"unsafe path {path!r}: {problem}; paths must be relative, use '/' and never '..'"
    )
    assert caught.value.path == path
    assert isinstance(caught.value, ValueError)
    assert caught.value.error_type == "validation"


def test_snapshot_digest_is_blake3_of_the_sorted_canonical_listing() -> None:
    entries = [ManifestEntry("b", 2, HEX_B, url="https://x/b?sig=1"), ManifestEntry("a", 1, HEX_A)]
    canonical = f"a\x001\x00{HEX_A}\nb\x002\x00{HEX_B}\n".encode()
    assert snapshot_digest(entries) == "blake3:" + blake3.blake3(canonical).hexdigest()
    assert snapshot_digest([]) == "blake3:" + blake3.blake3(b"").hexdigest()


def test_snapshot_digest_covers_path_size_and_blake3_but_not_url_or_sha256() -> None:
    base = ManifestEntry("a", 1, HEX_A)
    digest = snapshot_digest([base])
    assert snapshot_digest([ManifestEntry("a", 1, HEX_A, url="u", sha256="s")]) == digest
    assert snapshot_digest([ManifestEntry("b", 1, HEX_A)]) != digest
    assert snapshot_digest([ManifestEntry("a", 2, HEX_A)]) != digest
    assert snapshot_digest([ManifestEntry("a", 1, HEX_B)]) != digest


@given(
    st.lists(
        st.tuples(
            st.text(alphabet="abc/._", min_size=1, max_size=8),
            st.integers(min_value=0, max_value=10**12),
            st.sampled_from([HEX_A, HEX_B, ""]),
        ),
        max_size=8,
        unique_by=lambda t: t[0],
    ),
    st.randoms(use_true_random=False),
)
def test_snapshot_digest_does_not_depend_on_entry_order(
    rows: list[tuple[str, int, str]], rng: random.Random
) -> None:
    entries = [ManifestEntry(p, s, h) for p, s, h in rows]
    shuffled = list(entries)
    rng.shuffle(shuffled)
    assert snapshot_digest(shuffled) == snapshot_digest(entries)
    assert snapshot_digest(tuple(shuffled)) == snapshot_digest(entries)


def test_split_digest_returns_the_hex() -> None:
    assert split_digest("blake3:" + HEX_B) == HEX_B


@pytest.mark.parametrize(
    ("digest", "message"),
    [
        ("sha256:" + HEX_A, f"snapshot digest 'sha256:{HEX_A}' must look like blake3:<64 hex>"),
        (HEX_A, f"snapshot digest '{HEX_A}' must look like blake3:<64 hex>"),
        ("blake3:" + "A" * 64, f"snapshot digest '{'A' * 64}' is not 64 lower-case hex characters"),
        ("blake3:" + "a" * 63, f"snapshot digest '{'a' * 63}' is not 64 lower-case hex characters"),
        ("blake3:" + "g" * 64, f"snapshot digest '{'g' * 64}' is not 64 lower-case hex characters"),
        ("blake3:", "snapshot digest '' is not 64 lower-case hex characters"),
    ],
)
def test_split_digest_refuses_other_forms(digest: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        split_digest(digest)
    assert str(caught.value) == message


def test_check_blake3_hex_names_what_was_checked() -> None:
    assert check_blake3_hex(HEX_A) == HEX_A
    with pytest.raises(ValueError, match=r"^blob digest 'xyz' is not 64 lower-case hex"):
        check_blake3_hex("xyz", what="blob digest")


def test_part_names_are_zero_padded_to_four_digits() -> None:
    assert part_name("w.bin", 0) == "w.bin.part0000"
    assert part_name("dir/w.bin", 42) == "dir/w.bin.part0042"
    assert part_name("w.bin", 12345) == "w.bin.part12345"


def test_parts_file_json_round_trips() -> None:
    parts_file = PartsFile("w.bin", 3, HEX_A, (PartEntry("w.bin.part0000", 3, HEX_B),))
    data = msgspec.json.encode(parts_file)
    assert msgspec.json.decode(data, type=PartsFile) == parts_file
    assert msgspec.json.decode(data) == {
        "path": "w.bin",
        "size_bytes": 3,
        "blake3": HEX_A,
        "parts": [{"path": "w.bin.part0000", "size_bytes": 3, "blake3": HEX_B}],
    }


# Segments that are safe whatever they hold: no '/', '\\', control characters, and never
# exactly '.' or '..'.
SAFE_SEGMENT = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs"), blacklist_characters="/\\", max_codepoint=0x2FFF
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..") and not (len(s) >= 2 and s[0].isalpha() and s[1] == ":"))
SAFE_SEGMENTS = st.lists(SAFE_SEGMENT, min_size=1, max_size=6)


@given(SAFE_SEGMENTS)
def test_any_path_of_safe_segments_is_accepted_and_round_trips(segments: list[str]) -> None:
    path = "/".join(segments)
    assert check_relative_path(path) == path
    assert path.split("/") == segments
    assert list(PurePosixPath(path).parts) == segments


@given(SAFE_SEGMENTS, st.integers(min_value=0, max_value=6))
def test_any_path_with_a_dotdot_segment_is_refused(segments: list[str], at: int) -> None:
    segments.insert(min(at, len(segments)), "..")
    with pytest.raises(UnsafePathError):
        check_relative_path("/".join(segments))


@given(SAFE_SEGMENTS)
def test_any_path_with_a_leading_slash_is_refused(segments: list[str]) -> None:
    with pytest.raises(UnsafePathError, match="absolute path"):
        check_relative_path("/" + "/".join(segments))


@given(SAFE_SEGMENTS, st.integers(min_value=0, max_value=80))
def test_any_path_with_a_backslash_is_refused(segments: list[str], at: int) -> None:
    path = "/".join(segments)
    at = min(at, len(path))
    with pytest.raises(UnsafePathError, match="backslash in path"):
        check_relative_path(path[:at] + "\\" + path[at:])
