"""The resolve request body and attribute preferences (pure; HTTP is in test_hub_client)."""

from __future__ import annotations

import pytest

from gen_worker.errors import ValidationError
from gen_worker.models.hub_client import HubClient, attribute_choices, resolve_body
from gen_worker.refs import parse_cozy_ref

DIGEST = "ab" * 32


@pytest.mark.parametrize(
    ("ref", "attributes", "body"),
    [
        ("acme/sd", None, {"tag": "latest"}),
        ("acme/sd:v2", None, {"tag": "v2"}),
        ("acme/sd:v2", {"dtype": "fp16"}, {"tag": "v2", "attributes": {"dtype": "fp16"}}),
        ("acme/sd:v2#bf16", None, {"tag": "v2", "attributes": {"flavor": "bf16"}}),
        ("acme/sd#bf16", {"flavor": "fp8"}, {"tag": "latest", "attributes": {"flavor": "fp8"}}),
        # digest beats attributes and tag
        (f"acme/sd@blake3:{DIGEST}", {"dtype": "fp16"}, {"digest": f"blake3:{DIGEST}"}),
        (f"acme/sd@blake3:{DIGEST}#bf16", None, {"digest": f"blake3:{DIGEST}"}),
    ],
)
def test_resolve_body_precedence(
    ref: str, attributes: dict[str, str] | None, body: dict[str, object]
) -> None:
    assert resolve_body(parse_cozy_ref(ref), attributes) == body


def test_attribute_choices_in_preference_order() -> None:
    assert attribute_choices(None) == [{}]
    assert attribute_choices({"dtype": ["bf16", "fp16"]}) == [{"dtype": "bf16"}, {"dtype": "fp16"}]
    assert attribute_choices({"dtype": ["bf16", "fp16"], "arch": "sm90"}) == [
        {"arch": "sm90", "dtype": "bf16"},
        {"arch": "sm90", "dtype": "fp16"},
    ]


@pytest.mark.parametrize("bad", [{"dtype": []}, {"dtype": [""]}, {"dtype": [1]}, {"d": 3}])
def test_attribute_choices_refuse_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="must be a non-empty string or a list"):
        attribute_choices(bad)  # type: ignore[arg-type]


def test_attribute_choices_are_bounded() -> None:
    many = {f"k{i}": ["a", "b"] for i in range(5)}  # 32 combinations
    with pytest.raises(ValidationError, match="at most 16"):
        attribute_choices(many)


def test_hub_url_must_be_http() -> None:
    with pytest.raises(ValidationError, match="TENSORHUB_URL"):
        HubClient("ftp://hub")
