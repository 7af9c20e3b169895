"""Parsing the /v1/models/prefetch body (the route itself is tested with the dev runner)."""

from __future__ import annotations

import pytest

from gen_worker.errors import ValidationError
from gen_worker.models.source import PrefetchItem, parse_prefetch_body


def test_the_seed_example_and_plain_strings() -> None:
    body = b'{"models":[{"ref":"runwayml/stable-diffusion-v1-5","dtypes":["bf16","fp16"]}, "a/b"]}'
    items = parse_prefetch_body(body)
    assert items == [
        PrefetchItem("runwayml/stable-diffusion-v1-5", dtypes=["bf16", "fp16"]),
        PrefetchItem("a/b"),
    ]
    assert items[0].wanted() == {"dtype": ["bf16", "fp16"]}
    explicit = PrefetchItem("a/b", dtypes=["fp16"], attributes={"dtype": "fp8", "arch": "x"})
    assert explicit.wanted() == {"dtype": "fp8", "arch": "x"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "'models' is missing"),
        (b"{}", "'models' is missing"),
        (b"[]", "'models' is missing"),
        (b"{not json", "the body is not JSON"),
        (b'{"models": "a/b"}', "'models' must be a list, got str"),
        (
            b'{"models": [{"ref": "a/b", "dtypes": "bf16"}]}',
            "models[0]: Expected `array | null`, got `str` - at `models[0].dtypes`",
        ),
        (b'{"models": [{"ref": "a/b", "extra": 1}]}', "models[0]: Object contains unknown field"),
        (b'{"models": [{"dtypes": []}]}', "models[0]: Object missing required field `ref`"),
        (b'{"models": [3]}', "models[0]: Expected `object`, got `int`"),
    ],
)
def test_bad_bodies_say_what_is_valid(body: bytes, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_prefetch_body(body)
    assert message in str(caught.value)
    assert 'expected {"models": [' in str(caught.value)
