"""Slug normalization (SPEC section 4)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gen_worker.authoring import slugify


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("medasr_transcribe", "medasr-transcribe"),
        ("Generate", "generate"),
        ("make__image", "make-image"),
        ("_private_", "private"),
        ("v1.5_model", "v1.5-model"),
        ("..dots..", "dots"),
        ("a  b\tc", "a-b-c"),
        ("café_crème", "caf-cr-me"),
        ("-.-x-.-", "x"),
        ("___", ""),
        ("a" * 200, "a" * 128),
        ("a" * 127 + "_b", "a" * 127),
    ],
)
def test_slug_table(text: str, slug: str) -> None:
    assert slugify(text) == slug


@given(st.text())
def test_slug_properties(text: str) -> None:
    slug = slugify(text)
    assert len(slug) <= 128
    assert slug == "" or re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", slug)
    assert "--" not in slug
    assert slugify(slug) == slug
