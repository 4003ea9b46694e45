"""Project Wycheproof vectors against the strict ES256 codec and the JWK parser.

The vectors are vendored in ``tests/data/wycheproof`` (its README names the upstream commit and
licence). They are required: if they are missing, collection fails with an error instead of skipping.

How each file is run:

* ``ecdsa_secp256r1_sha256_p1363_test.json``: raw ``r‖s`` signatures (the JWS encoding) through
  :func:`authmesh._shared.jose.verify_signature`; valid ones verify, invalid ones raise ``BadSignature``.
* ``ecdsa_secp256r1_sha256_test.json``: the same in DER, which is never a JWS signature: every one,
  valid as DER or not, raises ``BadSignature``.
* ``json_web_signature_test.json``, the groups that concern an ES256-only verifier (``es256``,
  ``SpecialCaseEs256``, ``hs256``, ``base64``): each JWS goes through the strict decoder's JWS layer,
  :func:`authmesh._shared.jose.decode_compact_raw` (every header and signature rule of ``decode_compact``; the
  vectors' payloads are the bytes ``foo``, not JSON objects), then ``verify_signature`` with the group's
  public key whatever the ``kid`` says (every vector here has a ``kid``; answering every ``kid`` with
  the key makes a tampered ``kid`` fail on the signature rather than on the lookup, the stricter test).
  Only ES256 vectors labelled valid may pass: the valid HS256 ones are refused as
  ``UnsupportedAlgorithm``, and the five mislabelled tcIds of the README are expected to be refused.
* ``json_web_key_test.json``: each key set through :func:`authmesh._shared.keys.parse_jwks`, then its JWS as
  above with the parsed keys by ``kid``. Every vector that applies to P-256 (an ES256 JWS) is labelled
  invalid, and its signature is in fact good for the point: the rejection must come from the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from joserfc.jwk import ECKey
from joserfc.jws import JWSRegistry

from authmesh._shared.errors import (
    BadSignature,
    MalformedToken,
    TokenRejected,
    UnknownKey,
    UnsupportedAlgorithm,
)
from authmesh._shared.jose import ALGORITHM, b64url_decode, decode_compact_raw, verify_signature
from authmesh._shared.keys import InvalidJwk, parse_jwk, parse_jwks
from authmesh._shared.verifier import NoRevocations, TokenVerifier, VerifierPolicy
from tests.helpers_tokens import AnyKidKeys
from tests.joserfc_reference import reference_jws

VECTORS = Path(__file__).resolve().parent / "data" / "wycheproof"
P1363_FILE = "ecdsa_secp256r1_sha256_p1363_test.json"
DER_FILE = "ecdsa_secp256r1_sha256_test.json"
JWS_FILE = "json_web_signature_test.json"
JWK_FILE = "json_web_key_test.json"
JWS_GROUPS = frozenset({"es256", "SpecialCaseEs256", "hs256", "base64"})
ES256_GROUPS = frozenset({"es256", "SpecialCaseEs256"})
# Upstream label defects (vectors README): 367 and 370 are byte-identical to 357 but labelled
# invalid; 372 and 373 contain "?" yet are labelled valid. A strict verifier refuses all five.
MISLABELLED = frozenset({357, 367, 370, 372, 373})
DUPLICATES_OF_357 = (367, 370)


@cache
def load(name: str) -> dict[str, Any]:
    """One vector file, parsed; a missing file is an error, never a skip."""
    path = VECTORS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Wycheproof vectors missing: {path} (vendored in tests/data/wycheproof; see its README)"
        )
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


@cache
def der_key(der_hex: str) -> ec.EllipticCurvePublicKey:
    """A public key from the vectors' hex SubjectPublicKeyInfo."""
    key = load_der_public_key(bytes.fromhex(der_hex))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def jwk_key(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    """A public key from a vector's JWK, parsed the way the project parses JWKs."""
    return parse_jwk({name: value for name, value in jwk.items() if name != "d"})[1]


@dataclass(frozen=True, slots=True)
class EcdsaCase:
    """One ECDSA vector."""

    tc_id: int
    public_key_der: str
    message: bytes
    signature: bytes
    valid: bool


def ecdsa_cases(name: str) -> list[Any]:
    """The ECDSA vectors of one file, one pytest param per tcId."""
    return list(_ecdsa_cases(name))


def _ecdsa_cases(name: str) -> Iterator[Any]:
    for group in load(name)["testGroups"]:
        for test in group["tests"]:
            assert test["result"] in {"valid", "invalid"}, f"tcId {test['tcId']}: unexpected label"
            case = EcdsaCase(
                tc_id=test["tcId"],
                public_key_der=group["publicKeyDer"],
                message=bytes.fromhex(test["msg"]),
                signature=bytes.fromhex(test["sig"]),
                valid=test["result"] == "valid",
            )
            yield pytest.param(case, id=f"tc{case.tc_id}-{test['result']}")


@dataclass(frozen=True, slots=True)
class JwsCase:
    """One JSON Web Signature vector."""

    tc_id: int
    group: str
    jws: str
    label: str
    comment: str

    @property
    def accepted_by_es256_verifier(self) -> bool:
        """Whether a strict ES256-only verifier must accept it."""
        return self.label == "valid" and self.group in ES256_GROUPS and self.tc_id not in MISLABELLED


@cache
def jws_cases() -> list[Any]:
    """The JWS vectors of the groups that concern an ES256-only verifier."""
    return list(_jws_cases())


def _jws_cases() -> Iterator[Any]:
    for group in load(JWS_FILE)["testGroups"]:
        if group["comment"] not in JWS_GROUPS:
            continue
        for test in group["tests"]:
            case = JwsCase(test["tcId"], group["comment"], test["jws"], test["result"], test["comment"])
            yield pytest.param(case, id=f"tc{case.tc_id}-{case.group}-{test['comment']}")


@cache
def jws_group_key() -> ec.EllipticCurvePublicKey:
    """The public key of the es256 groups (the only EC key the JWS file's applicable groups use)."""
    keys = {
        json.dumps(group["public"], sort_keys=True)
        for group in load(JWS_FILE)["testGroups"]
        if group["comment"] in ES256_GROUPS
    }
    assert len(keys) == 1
    return jwk_key(json.loads(keys.pop()))


def verify_jws(jws: str, public_key: ec.EllipticCurvePublicKey) -> None:
    """Decode strictly and check the signature with ``public_key``, whatever the kid says."""
    decoded = decode_compact_raw(jws)
    verify_signature(AnyKidKeys(public_key).public_key(decoded.kid), decoded.signing_input, decoded.signature)


# --- the files themselves ------------------------------------------------------------------------


def test_the_vector_files_are_the_ones_recorded_in_source_txt() -> None:
    recorded = {}
    for line in (VECTORS / "SOURCE.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            recorded[parts[1]] = parts[0]
    for name in (P1363_FILE, DER_FILE, JWS_FILE, JWK_FILE):
        assert hashlib.sha256((VECTORS / name).read_bytes()).hexdigest() == recorded[name], name


@pytest.mark.parametrize(
    ("name", "groups", "valid", "invalid"),
    [
        (P1363_FILE, None, 173, 89),
        (DER_FILE, None, 174, 310),
        (JWS_FILE, None, 46, 355),
        (JWS_FILE, JWS_GROUPS, 10, 67),
        (JWK_FILE, None, 5, 21),
    ],
)
def test_every_vector_is_run(name: str, groups: frozenset[str] | None, valid: int, invalid: int) -> None:
    labels = [
        test["result"]
        for group in load(name)["testGroups"]
        if groups is None or group["comment"] in groups
        for test in group["tests"]
    ]
    assert (labels.count("valid"), labels.count("invalid")) == (valid, invalid)


# --- ECDSA P-256 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ecdsa_cases(P1363_FILE))
def test_p1363_vectors_verify_exactly_when_valid(case: EcdsaCase) -> None:
    key = der_key(case.public_key_der)
    if case.valid:
        verify_signature(key, case.message, case.signature)
    else:
        with pytest.raises(BadSignature) as caught:
            verify_signature(key, case.message, case.signature)
        assert caught.value.code == "BAD_SIGNATURE"


@pytest.mark.parametrize("case", ecdsa_cases(DER_FILE))
def test_der_signatures_are_never_jws_signatures(case: EcdsaCase) -> None:
    with pytest.raises(BadSignature):
        verify_signature(der_key(case.public_key_der), case.message, case.signature)


# --- JSON Web Signature --------------------------------------------------------------------------


@pytest.mark.parametrize("case", jws_cases())
def test_jws_vectors_are_accepted_only_when_valid_es256(case: JwsCase) -> None:
    key = jws_group_key()
    if case.accepted_by_es256_verifier:
        verify_jws(case.jws, key)
        return
    with pytest.raises(TokenRejected) as caught:
        verify_jws(case.jws, key)
    assert isinstance(caught.value, MalformedToken | BadSignature), repr(caught.value)
    if case.group in {"hs256", "base64"} and case.label == "valid":
        # A good HS256 token is exactly what an ES256 verifier must refuse by algorithm.
        assert isinstance(caught.value, UnsupportedAlgorithm | MalformedToken)


@pytest.mark.parametrize("case", jws_cases())
def test_jws_vectors_never_pass_as_access_tokens(case: JwsCase) -> None:
    # None of them is an access token (no typ, and payloads that are not JSON objects); whatever the
    # reason, the verifier answers with a TokenRejected and nothing else.
    verifier = TokenVerifier(AnyKidKeys(jws_group_key()), NoRevocations(), VerifierPolicy("iss", "aud"))
    with pytest.raises(TokenRejected):
        verifier.verify(case.jws)


@pytest.mark.parametrize(
    ("tc_id", "error"),
    [
        (19, BadSignature),  # modified signature
        (22, BadSignature),  # modified payload
        (25, BadSignature),  # modified kid: refused by the signature, not the lookup
        (31, UnsupportedAlgorithm),  # HS256 keyed with the EC public key
        (32, UnsupportedAlgorithm),  # attacker's key embedded as a jwk header
        (16, UnsupportedAlgorithm),  # alg none
        (379, BadSignature),  # signature too long
        (386, BadSignature),  # r = s = 0
        (401, BadSignature),  # r = s = n
        (17, MalformedToken),  # JSON serialisation
    ],
)
def test_notable_jws_vectors_fail_for_the_right_reason(tc_id: int, error: type[TokenRejected]) -> None:
    (case,) = [param.values[0] for param in jws_cases() if param.values[0].tc_id == tc_id]
    with pytest.raises(error):
        verify_jws(case.jws, jws_group_key())


def test_the_es256_valid_vectors_include_a_malleated_signature_pair() -> None:
    # tcId 18 and 378 sign the same bytes with (r, s) and (r, n - s): both are valid ECDSA.
    cases = {param.values[0].tc_id: param.values[0] for param in jws_cases()}
    assert cases[18].jws.rsplit(".", 1)[0] == cases[378].jws.rsplit(".", 1)[0]
    assert cases[18].jws != cases[378].jws
    for tc_id in (18, 378):
        verify_jws(cases[tc_id].jws, jws_group_key())


@pytest.mark.parametrize("case", [param for param in jws_cases() if param.values[0].group == "base64"])
def test_base64_group_encodings_are_judged_by_our_decoder_as_labelled(case: JwsCase) -> None:
    # Independently of the algorithm: every segment of a well-encoded vector decodes, and every
    # vector labelled invalid for its encoding has a segment our decoder refuses. 367 and 370 are
    # byte-identical to the valid 357 (a label defect), so their encoding cannot be what is wrong.
    segments = case.jws.split(".")
    if case.tc_id in DUPLICATES_OF_357:
        (original,) = [p.values[0] for p in jws_cases() if p.values[0].tc_id == 357]
        assert case.jws == original.jws
        return
    well_encoded = case.label == "valid" and case.tc_id not in MISLABELLED
    if well_encoded or case.tc_id == 357:
        assert len(segments) == 3
        for segment in segments:
            b64url_decode(segment.encode("ascii"))
        return
    refused = 0
    for segment in segments:
        try:
            b64url_decode(segment.encode("ascii"))
        except MalformedToken:
            refused += 1
    assert refused > 0 or len(segments) != 3


# --- JSON Web Key --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JwkCase:
    """One JSON Web Key vector: a key set and a JWS to check with it."""

    tc_id: int
    comment: str
    keyset: dict[str, Any]
    private_keyset: dict[str, Any]
    jws: str
    label: str

    @property
    def applies_to_p256(self) -> bool:
        """Whether the JWS is an ES256 one (the only kind this project verifies)."""
        header = json.loads(b64url_decode(self.jws.split(".")[0].encode("ascii")))
        return bool(header.get("alg") == "ES256")


@cache
def jwk_cases() -> list[Any]:
    """The JWK vectors, one pytest param per tcId."""
    return list(_jwk_cases())


def _jwk_cases() -> Iterator[Any]:
    for group in load(JWK_FILE)["testGroups"]:
        for test in group["tests"]:
            case = JwkCase(
                tc_id=test["tcId"],
                comment=group["comment"],
                keyset=group.get("public", group["private"]),
                private_keyset=group["private"],
                jws=test["jws"],
                label=test["result"],
            )
            yield pytest.param(case, id=f"tc{case.tc_id}-{case.comment}-{test['result']}")


def verify_with_keyset(case: JwkCase) -> None:
    """Parse the key set and check the JWS with the key its kid names."""
    keys = parse_jwks(json.dumps(case.keyset))
    decoded = decode_compact_raw(case.jws)
    try:
        key = keys[decoded.kid]
    except KeyError:
        raise UnknownKey(decoded.kid) from None
    verify_signature(key, decoded.signing_input, decoded.signature)


@pytest.mark.parametrize("case", jwk_cases())
def test_jwk_vectors_verify_only_with_a_valid_p256_key(case: JwkCase) -> None:
    # The vectors labelled valid are HS256/RS256 (not P-256): an ES256 verifier refuses those too.
    with pytest.raises(TokenRejected) as caught:
        verify_with_keyset(case)
    if case.applies_to_p256:
        assert case.label == "invalid"
        # The signature itself is good for the point: only refusing the key can reject it.
        assert isinstance(caught.value, InvalidJwk | UnknownKey), repr(caught.value)
    else:
        assert isinstance(caught.value, UnsupportedAlgorithm | MalformedToken), repr(caught.value)


@pytest.mark.parametrize("case", [p for p in jwk_cases() if p.values[0].applies_to_p256])
def test_every_ec_key_of_the_p256_jwk_vectors_is_refused_on_its_own(case: JwkCase) -> None:
    for entry in case.keyset["keys"]:
        with pytest.raises(InvalidJwk):
            parse_jwk(entry)


def test_the_ec_key_of_the_mixed_key_set_is_valid_but_the_private_set_is_not() -> None:
    (case,) = [p.values[0] for p in jwk_cases() if p.values[0].comment == "jws_mixedSymmetryKeyset"]
    (ec_entry,) = [entry for entry in case.keyset["keys"] if entry["kty"] == "EC"]
    assert parse_jwk(ec_entry)[0] == "kid-ec-sign"
    assert list(parse_jwks(json.dumps(case.keyset))) == ["kid-ec-sign"]
    # The same key again, now carrying its private part: a key set a verifier must never accept.
    ec_private = next(p.values[0] for p in jwk_cases() if p.values[0].comment == "invalid_point")
    with pytest.raises(InvalidJwk, match="private"):
        parse_jwks(json.dumps(ec_private.private_keyset))


# --- differential: what we accept, joserfc accepts ------------------------------------------------


def accepted_by_us(verify: Callable[[], None]) -> bool:
    """Whether the strict codec accepts (refusals are the other tests' business)."""
    try:
        verify()
    except TokenRejected:
        return False
    return True


@pytest.mark.parametrize("case", ecdsa_cases(P1363_FILE))
def test_every_p1363_signature_we_accept_joserfcs_es256_accepts(case: EcdsaCase) -> None:
    key = der_key(case.public_key_der)
    if not accepted_by_us(lambda: verify_signature(key, case.message, case.signature)):
        return
    assert JWSRegistry.algorithms[ALGORITHM].verify(case.message, case.signature, ECKey.import_key(key))


@pytest.mark.parametrize("case", jws_cases())
def test_every_jws_vector_we_accept_joserfc_accepts_with_the_same_header_and_payload(case: JwsCase) -> None:
    key = jws_group_key()
    if not accepted_by_us(lambda: verify_jws(case.jws, key)):
        return
    decoded = decode_compact_raw(case.jws)
    assert reference_jws(case.jws, key) == (decoded.unverified_header, decoded.unverified_payload)
