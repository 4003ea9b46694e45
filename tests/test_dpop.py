"""DPoP proof verification (RFC 9449 §4.3): every negative case, replay, nonces, a third-party proof."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey

from authmesh._shared.dpop import (
    NonceSource,
    ProofPolicy,
    ProofSigner,
    ProofVerifier,
    ReplayCache,
    access_token_hash,
    jwk_thumbprint,
    require_binding,
)
from authmesh._shared.errors import (
    ConfigurationError,
    DpopKeyMismatch,
    DpopNonceRequired,
    DpopProofMissing,
    DpopProofReplayed,
    DpopRejected,
    Unavailable,
)
from authmesh._shared.jose import b64url_encode, sign_compact
from authmesh._shared.keys import ec_public_jwk as public_jwk
from tests.helpers_tokens import FrozenClock

ORIGIN = "https://api.example:443"
METHOD = "/authmesh.resource.v1.ResourceService/WhoAmI"
TOKEN = "header.payload.signature"
NOW = 1_800_000_000.0


def verifier(clock: FrozenClock | None = None, **policy: Any) -> ProofVerifier:
    return ProofVerifier(ProofPolicy(origins=(ORIGIN,), **policy), clock=clock or FrozenClock(NOW))


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "jti": "a-unique-proof-id-0001",
        "htm": "POST",
        "htu": ORIGIN + METHOD,
        "iat": int(NOW),
        "ath": access_token_hash(TOKEN),
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def proof(key: ec.EllipticCurvePrivateKey, payload: dict[str, Any], **header: Any) -> str:
    return sign_compact({"typ": "dpop+jwt", "jwk": public_jwk(key.public_key()), **header}, payload, key)


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_a_valid_proof_gives_the_keys_thumbprint(key: ec.EllipticCurvePrivateKey) -> None:
    result = verifier().verify(proof(key, claims()), METHOD, access_token=TOKEN)
    assert result.jkt == jwk_thumbprint(public_jwk(key.public_key()))
    assert result.jti == "a-unique-proof-id-0001"


def test_the_thumbprint_is_rfc_7638s_example() -> None:
    # RFC 7638 §3.1 gives an RSA example; this EC key's thumbprint was computed by joserfc.
    key = ECKey.generate_key("P-256")
    jwk = {name: str(value) for name, value in key.as_dict(private=False).items()}
    assert jwk_thumbprint(jwk) == key.thumbprint()


def test_a_proof_made_by_joserfc_is_accepted() -> None:
    key = ECKey.generate_key("P-256")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    token = jws.serialize_compact(header, json.dumps(claims()).encode(), key)
    result = verifier().verify(token, METHOD, access_token=TOKEN)
    assert result.jkt == key.thumbprint()


def test_the_signer_makes_proofs_the_verifier_accepts() -> None:
    clock = FrozenClock(NOW)
    signer = ProofSigner(clock=clock)
    made = signer.proof(ORIGIN, METHOD, access_token=TOKEN)
    assert verifier(clock).verify(made, METHOD, access_token=TOKEN).jkt == signer.jkt


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (claims(htm="GET"), "htm"),
        (claims(htm=None), "htm missing"),
        (claims(htu=ORIGIN + "/authmesh.resource.v1.ResourceService/ListDocuments"), "another method"),
        (claims(htu="https://evil.example:443" + METHOD), "another authority"),
        (claims(htu="http://api.example:443" + METHOD), "another scheme"),
        (claims(htu=ORIGIN + METHOD + "?x=1"), "a query"),
        (claims(htu=ORIGIN + METHOD.lower()), "path case"),
        (claims(htu=None), "htu missing"),
        (claims(iat=int(NOW) - 66), "old iat"),
        (claims(iat=int(NOW) + 6), "future iat"),
        (claims(iat=float(NOW)), "iat a float"),
        (claims(iat=None), "iat missing"),
        (claims(ath=None), "ath missing"),
        (claims(ath=access_token_hash("another.access.token")), "ath wrong"),
        (claims(jti=None), "jti missing"),
        (claims(jti="short"), "jti too short"),
    ],
)
def test_a_claim_that_is_wrong_is_refused(
    key: ec.EllipticCurvePrivateKey, payload: dict[str, Any], why: str
) -> None:
    with pytest.raises(DpopRejected) as raised:
        verifier().verify(proof(key, payload), METHOD, access_token=TOKEN)
    assert raised.value.code == "DPOP_PROOF_INVALID", why


def test_the_window_edges_are_accepted(key: ec.EllipticCurvePrivateKey) -> None:
    check = verifier()
    check.verify(
        proof(key, claims(iat=int(NOW) - 65, jti="old-edge-proof-00001")), METHOD, access_token=TOKEN
    )
    check.verify(proof(key, claims(iat=int(NOW) + 5, jti="new-edge-proof-00001")), METHOD, access_token=TOKEN)


def test_the_default_port_may_be_left_out(key: ec.EllipticCurvePrivateKey) -> None:
    verifier().verify(proof(key, claims(htu="HTTPS://API.example" + METHOD)), METHOD, access_token=TOKEN)


def _forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = bytes(64)) -> str:
    def segment(value: dict[str, Any]) -> str:
        return b64url_encode(json.dumps(value).encode())

    return f"{segment(header)}.{segment(payload)}.{b64url_encode(signature)}"


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256", "ES384", "EdDSA"])
def test_an_algorithm_other_than_es256_is_refused(key: ec.EllipticCurvePrivateKey, alg: str) -> None:
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(key.public_key())}
    for signature in (b"", bytes(64), b"\x01" * 32):
        with pytest.raises(DpopRejected):
            verifier().verify(_forge(header, claims(), signature), METHOD, access_token=TOKEN)


def test_a_private_key_in_the_jwk_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    jwk = public_jwk(key.public_key()) | {
        "d": b64url_encode(key.private_numbers().private_value.to_bytes(32, "big"))
    }
    signed = sign_compact({"typ": "dpop+jwt", "jwk": jwk}, claims(), key)
    with pytest.raises(DpopRejected, match="public EC key"):
        verifier().verify(signed, METHOD, access_token=TOKEN)


@pytest.mark.parametrize(
    "header",
    [
        {"typ": "jwt"},
        {"typ": "at+jwt"},
        {"typ": None},
        {"kid": "k1"},
        {"x5c": ["MIIB"]},
        {"jku": "https://evil.example/jwks"},
        {"crit": ["exp"]},
    ],
)
def test_a_header_other_than_typ_alg_jwk_is_refused(
    key: ec.EllipticCurvePrivateKey, header: dict[str, Any]
) -> None:
    payload = claims()
    full = {"typ": "dpop+jwt", "jwk": public_jwk(key.public_key()), **header}
    signed = sign_compact({name: value for name, value in full.items() if value is not None}, payload, key)
    with pytest.raises(DpopRejected):
        verifier().verify(signed, METHOD, access_token=TOKEN)


def test_a_missing_jwk_or_one_of_another_curve_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(DpopRejected):
        verifier().verify(sign_compact({"typ": "dpop+jwt"}, claims(), key), METHOD, access_token=TOKEN)
    other = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-384",
        "x": b64url_encode(other.x.to_bytes(48, "big")),
        "y": b64url_encode(other.y.to_bytes(48, "big")),
    }
    with pytest.raises(DpopRejected):
        verifier().verify(
            sign_compact({"typ": "dpop+jwt", "jwk": jwk}, claims(), key), METHOD, access_token=TOKEN
        )


def test_a_point_off_the_curve_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    jwk = public_jwk(key.public_key())
    jwk["y"] = b64url_encode(bytes(31) + b"\x05")
    with pytest.raises(DpopRejected, match="not a P-256 public key"):
        verifier().verify(
            sign_compact({"typ": "dpop+jwt", "jwk": jwk}, claims(), key), METHOD, access_token=TOKEN
        )


def test_a_signature_by_another_key_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    signed = sign_compact({"typ": "dpop+jwt", "jwk": public_jwk(key.public_key())}, claims(), other)
    with pytest.raises(DpopRejected, match="signature"):
        verifier().verify(signed, METHOD, access_token=TOKEN)


def test_duplicate_claims_are_refused(key: ec.EllipticCurvePrivateKey) -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(key.public_key())}
    body = json.dumps(claims())[:-1] + ', "htu": "https://evil.example:443/x"}'
    signing_input = b64url_encode(json.dumps(header).encode()) + "." + b64url_encode(body.encode())
    # Signed with the real key, so only the duplicate is wrong.
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    duplicated = signing_input + "." + b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    with pytest.raises(DpopRejected, match="duplicate"):
        verifier().verify(duplicated, METHOD, access_token=TOKEN)


def test_an_oversize_proof_is_refused_before_decoding(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(DpopRejected, match="too large"):
        verifier().verify(proof(key, claims(pad="x" * 2048)), METHOD, access_token=TOKEN)


def test_no_proof_is_missing() -> None:
    with pytest.raises(DpopProofMissing):
        verifier().verify(None, METHOD, access_token=TOKEN)


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=300) | st.binary(max_size=300).map(lambda raw: base64.urlsafe_b64encode(raw).decode())
)
def test_any_string_is_refused_with_a_dpop_reason(garbage: str) -> None:
    with pytest.raises(DpopRejected):
        verifier().verify(garbage, METHOD, access_token=TOKEN)


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce"]),
        st.none() | st.integers() | st.text(max_size=40),
    )
)
def test_any_claim_set_but_the_right_one_is_refused(payload: dict[str, Any]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(DpopRejected):
        verifier().verify(proof(key, payload), METHOD, access_token=TOKEN)


def test_a_proof_is_accepted_once_per_replica_within_the_window(key: ec.EllipticCurvePrivateKey) -> None:
    clock = FrozenClock(NOW)
    replica_a, replica_b = verifier(clock), verifier(clock)
    made = proof(key, claims())
    replica_a.verify(made, METHOD, access_token=TOKEN)
    with pytest.raises(DpopProofReplayed):
        replica_a.verify(made, METHOD, access_token=TOKEN)
    # Another replica has its own cache: the documented bound is one use per replica.
    replica_b.verify(made, METHOD, access_token=TOKEN)
    with pytest.raises(DpopProofReplayed):
        replica_b.verify(made, METHOD, access_token=TOKEN)
    # After the window the proof is too old everywhere, cache or not.
    clock.now += 66
    for replica in (replica_a, replica_b, verifier(clock)):
        with pytest.raises(DpopRejected, match="iat"):
            replica.verify(made, METHOD, access_token=TOKEN)


def test_a_full_replay_cache_refuses_rather_than_forgets() -> None:
    cache = ReplayCache(capacity=2)
    cache.claim("a", 100.0, 0.0)
    cache.claim("b", 100.0, 0.0)
    with pytest.raises(Unavailable) as raised:
        cache.claim("c", 100.0, 0.0)
    assert raised.value.code == "DPOP_REPLAY_CACHE_FULL"
    with pytest.raises(DpopProofReplayed):
        cache.claim("a", 100.0, 1.0)
    cache.claim("c", 200.0, 100.0)  # a and b expired: room again
    assert len(cache) == 1


def test_a_full_verifier_fails_closed(key: ec.EllipticCurvePrivateKey) -> None:
    check = verifier(replay_capacity=1)
    check.verify(proof(key, claims(jti="first-proof-id-00001")), METHOD, access_token=TOKEN)
    with pytest.raises(Unavailable):
        check.verify(proof(key, claims(jti="second-proof-id-0001")), METHOD, access_token=TOKEN)


def test_a_nonce_from_one_replica_is_accepted_by_another(key: ec.EllipticCurvePrivateKey) -> None:
    clock = FrozenClock(NOW)
    secret = b"s" * 32
    replica_a = ProofVerifier(
        ProofPolicy(origins=(ORIGIN,)), nonces=NonceSource(secret, "api", clock=clock), clock=clock
    )
    replica_b = ProofVerifier(
        ProofPolicy(origins=(ORIGIN,)), nonces=NonceSource(secret, "api", clock=clock), clock=clock
    )
    with pytest.raises(DpopNonceRequired) as raised:
        replica_a.verify(proof(key, claims()), METHOD, access_token=TOKEN)
    nonce = raised.value.nonce
    replica_b.verify(proof(key, claims(nonce=nonce)), METHOD, access_token=TOKEN)
    clock.now += 60  # the previous bucket still counts
    replica_a.verify(
        proof(key, claims(nonce=nonce, iat=int(clock.now), jti="later-proof-id-00001")),
        METHOD,
        access_token=TOKEN,
    )
    clock.now += 60
    with pytest.raises(DpopNonceRequired):
        replica_a.verify(
            proof(key, claims(nonce=nonce, iat=int(clock.now), jti="stale-nonce-proof-01")),
            METHOD,
            access_token=TOKEN,
        )


def test_nonces_are_bound_to_the_secret_and_the_audience() -> None:
    clock = FrozenClock(NOW)
    nonce = NonceSource(b"s" * 32, "api", clock=clock).current()
    for other in (NonceSource(b"t" * 32, "api", clock=clock), NonceSource(b"s" * 32, "other", clock=clock)):
        with pytest.raises(DpopNonceRequired):
            other.check(nonce)
    with pytest.raises(ConfigurationError):
        NonceSource(b"short", "api")


def test_the_binding_must_be_the_proofs_key(key: ec.EllipticCurvePrivateKey) -> None:
    result = verifier().verify(proof(key, claims()), METHOD, access_token=TOKEN)
    require_binding(result, result.jkt)
    for bound in (None, jwk_thumbprint(public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))):
        with pytest.raises(DpopKeyMismatch):
            require_binding(result, bound)


def test_an_origin_that_is_not_scheme_host_port_is_a_configuration_error() -> None:
    for origin in ("api.example:443", "ftp://api.example", "https://api.example/path"):
        with pytest.raises(ConfigurationError):
            ProofVerifier(ProofPolicy(origins=(origin,)))
