"""Access-token claims: presence and type of each of the ten, UUIDv7 ids, and issue instants."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authmesh._shared.claims import (
    MAX_AUDIENCES,
    MAX_NUMERIC_DATE,
    MAX_SCOPES,
    MAX_STRING_CLAIM,
    REQUIRED_CLAIMS,
    AccessClaims,
    new_uuid7,
    uuid7_ms,
)
from authmesh._shared.errors import InvalidClaim
from tests.helpers_tokens import NOW, OMIT, claims_payload

STRING_CLAIMS = ("iss", "sub", "jti", "sid", "client_id")
DATE_CLAIMS = ("exp", "iat", "nbf")


def claims(**overrides: Any) -> AccessClaims:
    """Claims from a valid payload with ``overrides``."""
    return AccessClaims.from_payload(claims_payload(**overrides), "kid-1")


def test_a_valid_payload_becomes_claims_and_back() -> None:
    payload = claims_payload()
    parsed = AccessClaims.from_payload(payload, "kid-1")
    assert parsed.iss == "authmesh"
    assert parsed.aud == ("authmesh-resources",)
    assert parsed.scopes == ("docs:read", "openid")
    assert parsed.scope == "docs:read openid"
    assert parsed.kid == "kid-1"
    assert parsed.to_payload() == payload


def test_parsed_claims_equal_claims_built_field_by_field() -> None:
    payload = claims_payload(aud=["a", "b"])
    expected = AccessClaims(
        iss=payload["iss"],
        sub=payload["sub"],
        aud=("a", "b"),
        exp=payload["exp"],
        iat=payload["iat"],
        nbf=payload["nbf"],
        jti=payload["jti"],
        sid=payload["sid"],
        scopes=("docs:read", "openid"),
        client_id=payload["client_id"],
        kid="kid-1",
    )
    parsed = AccessClaims.from_payload(payload, "kid-1")
    assert parsed == expected
    assert hash(parsed) == hash(expected)
    assert repr(parsed) == repr(expected)


def test_a_subclass_parses_to_an_instance_of_itself() -> None:
    class Tagged(AccessClaims):
        """A subclass a caller might define."""

        __slots__ = ()

    parsed = Tagged.from_payload(claims_payload(), "kid-1")
    assert type(parsed) is Tagged
    assert parsed.sub == "user-1"


def test_claims_are_frozen() -> None:
    parsed = claims()
    with pytest.raises(AttributeError):
        parsed.sub = "admin"  # type: ignore[misc]  # proving it cannot be done


def test_the_required_claims_are_the_ten_of_rfc_9068_we_issue() -> None:
    assert set(REQUIRED_CLAIMS) == {
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "nbf",
        "jti",
        "sid",
        "scope",
        "client_id",
    }


@pytest.mark.parametrize("name", REQUIRED_CLAIMS)
def test_each_missing_claim_is_named_in_the_error(name: str) -> None:
    with pytest.raises(InvalidClaim) as caught:
        claims(**{name: OMIT})
    assert caught.value.claim == name
    assert caught.value.code == "INVALID_CLAIM"


@pytest.mark.parametrize("name", REQUIRED_CLAIMS)
@pytest.mark.parametrize(
    "value",
    [None, True, False, 1.5, [], {}, ["x", 1]],
    ids=["null", "true", "false", "float", "empty-list", "object", "mixed-list"],
)
def test_each_claim_of_the_wrong_json_type_is_invalid(name: str, value: Any) -> None:
    with pytest.raises(InvalidClaim) as caught:
        claims(**{name: value})
    assert caught.value.claim == name


@pytest.mark.parametrize("name", DATE_CLAIMS)
@pytest.mark.parametrize(
    "value",
    [float(NOW), f"{NOW}", str(NOW + 300), True, -1, MAX_NUMERIC_DATE, 10**30],
    ids=["float", "string", "numeric-string", "bool", "negative", "too-large", "huge"],
)
def test_dates_must_be_plain_integers_in_range(name: str, value: Any) -> None:
    with pytest.raises(InvalidClaim) as caught:
        claims(**{name: value})
    assert caught.value.claim == name


@pytest.mark.parametrize("name", STRING_CLAIMS)
@pytest.mark.parametrize("value", ["", "x" * (MAX_STRING_CLAIM + 1), 7], ids=["empty", "too-long", "number"])
def test_strings_must_be_non_empty_and_bounded(name: str, value: Any) -> None:
    with pytest.raises(InvalidClaim) as caught:
        claims(**{name: value})
    assert caught.value.claim == name


@pytest.mark.parametrize("name", STRING_CLAIMS)
def test_strings_of_the_longest_allowed_length_are_accepted(name: str) -> None:
    assert getattr(claims(**{name: "x" * MAX_STRING_CLAIM}), name) == "x" * MAX_STRING_CLAIM


def test_a_list_of_audiences_is_accepted() -> None:
    assert claims(aud=["a", "authmesh-resources"]).aud == ("a", "authmesh-resources")


@pytest.mark.parametrize(
    "aud",
    [
        pytest.param("", id="empty-string"),
        pytest.param([], id="empty-list"),
        pytest.param(["a", ""], id="empty-member"),
        pytest.param(["a", 1], id="number-member"),
        pytest.param([["a"]], id="nested"),
        pytest.param(["a"] * (MAX_AUDIENCES + 1), id="too-many"),
        pytest.param("a" * (MAX_STRING_CLAIM + 1), id="too-long"),
    ],
)
def test_malformed_audiences_are_invalid(aud: Any) -> None:
    with pytest.raises(InvalidClaim) as caught:
        claims(aud=aud)
    assert caught.value.claim == "aud"


def test_an_empty_scope_means_no_scopes() -> None:
    assert claims(scope="").scopes == ()


@pytest.mark.parametrize(
    "scope",
    [
        pytest.param("a  b", id="double-space"),
        pytest.param(" a", id="leading-space"),
        pytest.param("a ", id="trailing-space"),
        pytest.param("a\tb", id="tab"),
        pytest.param("a\nb", id="newline"),
        pytest.param(" ".join(f"s{i}" for i in range(MAX_SCOPES + 1)), id="too-many"),
        pytest.param("s" * 5000, id="too-long"),
    ],
)
def test_a_scope_must_be_single_space_separated_and_bounded(scope: str) -> None:
    with pytest.raises(InvalidClaim) as caught:
        claims(scope=scope)
    assert caught.value.claim == "scope"


def test_has_scope_matches_whole_scopes_only() -> None:
    parsed = claims(scope="docs:read admin")
    assert parsed.has_scope("admin")
    assert not parsed.has_scope("docs")
    assert not parsed.has_scope("docs:read admin")


def test_extra_claims_are_ignored() -> None:
    assert claims(extra="x", cnf={"jkt": "y"}).sub == "user-1"


# --- UUIDv7 and the issue instant ----------------------------------------------------------------


@given(st.integers(min_value=0, max_value=2**48 - 1))
@settings(max_examples=300, deadline=None)
def test_a_uuid7_carries_its_millisecond_timestamp(ms: int) -> None:
    value = new_uuid7(ms)
    parsed = uuid.UUID(value)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert uuid7_ms(value) == ms
    assert str(parsed) == value  # canonical: lower case, hyphens where uuid puts them


def test_uuid7s_use_every_variant_digit_and_random_bits_everywhere_but_version_and_variant() -> None:
    values = [new_uuid7(NOW * 1000) for _ in range(400)]
    assert {value[19] for value in values} == set("89ab")
    # Each random hex digit position takes many values; the fixed ones (timestamp, 7) take one.
    for position in (15, 16, 17, 20, 21, 22, *range(24, 36)):
        assert len({value[position] for value in values}) > 8


def test_uuid7s_are_distinct_and_ordered_by_time() -> None:
    values = [new_uuid7(NOW * 1000 + i) for i in range(200)]
    assert len(set(values)) == 200
    assert values == sorted(values)
    assert len({new_uuid7(NOW * 1000) for _ in range(200)}) == 200


@pytest.mark.parametrize(
    "value",
    [
        "not-a-uuid",
        str(uuid.uuid4()),
        new_uuid7(1).upper(),
        "{" + new_uuid7(1) + "}",
        new_uuid7(1).replace("-", ""),
        new_uuid7(1) + "\n",
    ],
)
def test_anything_but_a_canonical_uuid7_has_no_timestamp(value: str) -> None:
    assert uuid7_ms(value) is None


def test_the_issue_instant_comes_from_the_jti_when_it_lies_inside_iat() -> None:
    assert claims(iat=NOW, jti=new_uuid7(NOW * 1000 + 737)).issued_at_ms == NOW * 1000 + 737


@pytest.mark.parametrize(
    "jti",
    [new_uuid7((NOW - 1) * 1000 + 999), new_uuid7((NOW + 1) * 1000), "opaque-id"],
    ids=["before-iat", "after-iat", "not-a-uuid7"],
)
def test_the_issue_instant_falls_back_to_the_start_of_iat(jti: str) -> None:
    # Failing closed: a user revocation in this second covers the token.
    assert claims(iat=NOW, jti=jti).issued_at_ms == NOW * 1000
