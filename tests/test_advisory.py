"""One regression test per known class of JWT-library vulnerability, each named after its advisory.

A test proves the attack that broke another library (or would break a lenient verifier) is refused
by ``TokenVerifier`` (or the event codec), for the reason the advisory is about.
"""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from authmesh._shared.auth_metadata import TokenRules, server_metadata_extensions
from authmesh._shared.denylist import Denylist
from authmesh._shared.errors import (
    BadSignature,
    EventRejected,
    InvalidClaim,
    MalformedToken,
    TokenRevoked,
    TokenTooLarge,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongTokenType,
)
from authmesh._shared.events import EventType, SecurityEvent, TokenRevokedEvent, decode_event, encode_event
from authmesh._shared.jose import P256_ORDER, b64url_encode
from authmesh._shared.keys import public_jwk
from authmesh._shared.settings import AuthSettings
from authmesh._shared.verifier import TokenVerifier, VerifierPolicy
from authmesh.auth.v1 import auth_pb2
from tests.auth_support import SERVICE, auth_settings, bearer, expect_error, running_auth
from tests.helpers_tokens import (
    AUDIENCE,
    ISSUER,
    KID,
    NOW,
    FrozenClock,
    SetRevocations,
    SigningKey,
    StaticKeys,
    access_header,
    claims_payload,
    hs256_token,
    json_segment,
    make_verifier,
    malleated,
    mint_access_token,
    sign_bytes,
    sign_json,
    sign_segments,
    signature_of,
    unsigned_token,
    with_signature,
)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The issuer's key."""
    return SigningKey.generate(KID)


@pytest.fixture
def keys(key: SigningKey) -> StaticKeys:
    """The verifier's key source."""
    return StaticKeys(key)


@pytest.fixture
def verifier(keys: StaticKeys) -> TokenVerifier:
    """A verifier trusting only the issuer's key."""
    return make_verifier(keys)


def pem(key: SigningKey) -> bytes:
    """The issuer's public key as PEM, what many libraries load as "the key"."""
    return key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_cve_2022_29217_pyjwt_algorithm_confusion(verifier: TokenVerifier, key: SigningKey) -> None:
    # PyJWT with algorithms=jwt.algorithms.get_default_algorithms() verified an HS256 token whose HMAC
    # secret was the public key. Only ES256 is ever accepted here, whatever key material is around.
    token = hs256_token(access_header(KID, alg="HS256"), claims_payload(), pem(key))
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(token)


def test_cve_2017_11424_pyjwt_public_key_used_as_hmac_secret(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    # PyJWT < 1.5.1 only blocked PEM headers it knew; other public-key spellings went through as secrets.
    secrets = [
        key.public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        key.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        key.public_bytes_uncompressed(),
    ]
    for secret in secrets:
        with pytest.raises(UnsupportedAlgorithm):
            verifier.verify(hs256_token(access_header(KID, alg="HS256"), claims_payload(), secret))


def test_cve_2024_33663_python_jose_algorithm_confusion_with_ecdsa_keys(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    # python-jose accepted HMAC over OpenSSH-formatted ECDSA public keys.
    secret = key.public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for alg in ("HS256", "HS384", "HS512"):
        with pytest.raises(UnsupportedAlgorithm):
            verifier.verify(hs256_token(access_header(KID, alg=alg), claims_payload(), secret))


def test_cve_2024_37568_authlib_hmac_with_asymmetric_public_key(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    # Authlib verified HS256 against any asymmetric public key when the caller named no algorithm.
    secret = json.dumps(public_jwk(key.public_key, KID)).encode()
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(hs256_token(access_header(KID, alg="HS256"), claims_payload(), secret))


def test_cve_2015_9235_jsonwebtoken_symmetric_algorithm_with_asymmetric_key(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    # node-jsonwebtoken < 4.2.2 accepted an HS* token verified with the RS/ES public key as secret.
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(hs256_token(access_header(KID, alg="HS256"), claims_payload(), pem(key).strip()))


def test_cve_2023_48223_fast_jwt_confusion_with_unusual_pem_spellings(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    # fast-jwt's PEM matcher missed some public-key spellings (leading whitespace, other labels).
    for secret in (b"\n  " + pem(key), pem(key).replace(b"PUBLIC KEY", b"EC PUBLIC KEY")):
        with pytest.raises(UnsupportedAlgorithm):
            verifier.verify(hs256_token(access_header(KID, alg="HS256"), claims_payload(), secret))


def test_cve_2021_46743_php_jwt_kid_selects_a_key_of_another_type(
    verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    # firebase/php-jwt let the kid pick a key from a mixed key ring and the header pick the algorithm.
    # Our key source holds only P-256 keys, and the algorithm is fixed before any key is looked up.
    token = hs256_token(access_header(KID, alg="HS256"), claims_payload(), b"shared-secret-of-another-kid")
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(token)
    assert keys.lookups == []


def test_cve_2022_21449_psychic_signatures_r_and_s_zero(verifier: TokenVerifier, key: SigningKey) -> None:
    # Java 15-18 accepted (r, s) = (0, 0) for every message and key.
    token = mint_access_token(key)
    with pytest.raises(BadSignature):
        verifier.verify(with_signature(token, bytes(64)))
    # Its relatives: a scalar equal to the group order is zero modulo n.
    order = P256_ORDER.to_bytes(32, "big")
    for signature in (order + order, bytes(32) + order, order + bytes(31) + b"\x01"):
        with pytest.raises(BadSignature):
            verifier.verify(with_signature(token, signature))


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_cve_2018_1000531_alg_none_accepted(alg: str, verifier: TokenVerifier, key: SigningKey) -> None:
    # prime-jwt (and many others) accepted "alg": "none" with an empty signature.
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(unsigned_token(access_header(KID, alg=alg), claims_payload()))


def test_cve_2022_23540_jsonwebtoken_none_by_default_with_a_falsy_key(verifier: TokenVerifier) -> None:
    # jsonwebtoken < 9 fell back to "none" when verify() got no key; our verifier has no such fallback:
    # an unknown kid is refused, and a token without kid is malformed.
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(unsigned_token({"alg": "none"}, claims_payload()))
    with pytest.raises(UnknownKey):
        verifier.verify(mint_access_token(SigningKey.generate("nobody")))


def test_cve_2020_28042_servicestack_empty_signature(verifier: TokenVerifier, key: SigningKey) -> None:
    # ServiceStack accepted a token whose signature was empty or truncated.
    token = mint_access_token(key)
    head = token.rsplit(".", 1)[0]
    with pytest.raises(MalformedToken):
        verifier.verify(head + ".")
    with pytest.raises(MalformedToken):
        verifier.verify(head)
    with pytest.raises(BadSignature):
        verifier.verify(with_signature(token, signature_of(token)[:32]))


def test_cve_2018_0114_node_jose_embedded_jwk_trusted(verifier: TokenVerifier) -> None:
    # node-jose verified with the key the token itself carried in its "jwk" header.
    attacker = SigningKey.generate(KID)
    header = access_header(KID, jwk=public_jwk(attacker.public_key, KID))
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(sign_json(header, claims_payload(sub="admin", scope="admin"), attacker))


@pytest.mark.parametrize("parameter", ["jku", "x5u"])
def test_key_url_headers_fetch_attacker_keys(
    parameter: str, verifier: TokenVerifier, keys: StaticKeys
) -> None:
    # The jku/x5u class (server-side request forgery and attacker keys): never fetched, never followed.
    attacker = SigningKey.generate(KID)
    header = access_header(KID, **{parameter: "http://169.254.169.254/latest/meta-data/"})
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(sign_json(header, claims_payload(), attacker))
    assert keys.lookups == []


def test_x5c_certificate_chain_supplies_the_key(verifier: TokenVerifier) -> None:
    # The x5c class: a self-signed certificate in the header is not a trust anchor here.
    attacker = SigningKey.generate(KID)
    header = access_header(KID, x5c=["MIIBfake"], x5t="abc")
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(sign_json(header, claims_payload(), attacker))


def test_cve_2022_39227_python_jwt_mixed_json_and_compact_serialisation(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    # python-jwt parsed a JSON-serialised polyglot with forged claims as if its compact form had been
    # signed. Only the compact serialisation exists here; the polyglot is malformed.
    genuine = mint_access_token(key)
    header, payload, signature = genuine.split(".")
    forged = json_segment(claims_payload(sub="admin", scope="admin"))
    polyglot = json.dumps(
        {f" {header}.{forged}.": "", "protected": header, "payload": payload, "signature": signature}
    )
    with pytest.raises(MalformedToken):
        verifier.verify(polyglot)
    with pytest.raises(MalformedToken):
        verifier.verify(f"{header}.{forged}.{signature}.{payload}")


def test_cve_2024_33664_python_jose_jwt_bomb(verifier: TokenVerifier, key: SigningKey) -> None:
    # python-jose inflated a tiny compressed JWE into gigabytes. Nothing is ever decompressed here:
    # "zip" is refused, and the size cap applies before any decoding.
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(sign_json(access_header(KID, zip="DEF"), claims_payload(), key))
    with pytest.raises(TokenTooLarge):
        verifier.verify("A" * (16 * 1024 * 1024))


def test_cve_2022_25898_jsrsasign_non_base64url_characters(verifier: TokenVerifier, key: SigningKey) -> None:
    # jsrsasign accepted signatures carrying characters outside base64url (and escapes).
    token = mint_access_token(key)
    head, signature = token.rsplit(".", 1)
    for spoiled in (signature.replace("-", "+").replace("_", "/"), signature + "==", "%" + signature[1:]):
        if spoiled != signature:
            with pytest.raises(MalformedToken):
                verifier.verify(f"{head}.{spoiled}")


def test_duplicate_claims_parser_differential(verifier: TokenVerifier, key: SigningKey) -> None:
    # The duplicate-key class (parser differentials, as CVE-2017-12635 in CouchDB): two parsers that
    # keep different duplicates disagree about the claims. Duplicates are refused outright.
    payload = json.dumps(claims_payload(sub="user-1"))[:-1] + ',"sub":"admin"}'
    with pytest.raises(MalformedToken):
        verifier.verify(sign_bytes(json.dumps(access_header(KID)).encode(), payload.encode(), key))


def test_ecdsa_malleability_does_not_dodge_a_revocation(key: SigningKey) -> None:
    # (r, n - s) is a second valid signature. Anything keyed on signature bytes (a denylist, a
    # "seen" set) would miss the twin; revocation here is keyed on jti.
    revocations = SetRevocations()
    verifier = make_verifier(StaticKeys(key), revocations=revocations)
    token = mint_access_token(key)
    revocations.jtis.add(verifier.verify(token).jti)
    with pytest.raises(TokenRevoked):
        verifier.verify(malleated(token))


async def test_ecdsa_malleability_does_not_dodge_a_revocation_at_the_auth_service(
    redis_url: str, nats_url: str
) -> None:
    # Issue 10.12, on a real auth service: a malleated copy of a revoked token is inactive for
    # Introspect and refused as a caller's token, whether the service had verified (and cached) the
    # original or not, and whether the token, its session or its user was revoked. A copy of a token
    # nobody revoked is the same token: active, with the same claims.
    async with running_auth(auth_settings(redis_url, [nats_url])) as (_, client):
        await client.create_user("mallory", "mallory-password-1")
        pairs = [await client.login("mallory", "mallory-password-1") for _ in range(4)]
        by_token, by_session, untouched, by_user = (pair.access_token for pair in pairs)
        service = bearer((await client.login(*SERVICE, ("service",))).access_token)

        async def introspect(token: str) -> auth_pb2.IntrospectResponse:
            return await client.stub.Introspect(auth_pb2.IntrospectRequest(token=token), metadata=service)

        copy = await introspect(malleated(untouched))
        original = await introspect(untouched)
        assert copy.active
        assert copy == original
        # Only the original of this one is seen before the revocation (the RPC verifies it).
        await client.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=by_token), metadata=bearer(by_token))
        await client.stub.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=pairs[1].session_id), metadata=bearer(by_session)
        )
        for token, reason in [(by_token, "TOKEN_REVOKED"), (by_session, "SESSION_REVOKED")]:
            for presented in (malleated(token), token, malleated(token)):
                answer = await introspect(presented)
                assert (answer.active, answer.inactive_reason) == (False, reason)
                await expect_error(
                    client.stub.RevokeToken(
                        auth_pb2.RevokeTokenRequest(token=untouched), metadata=bearer(presented)
                    ),
                    grpc.StatusCode.UNAUTHENTICATED,
                    reason,
                )
        admin = bearer(await client.admin_token())
        subject = (await introspect(by_user)).subject
        await introspect(malleated(by_user))  # both copies verified before the revocation
        await client.stub.RevokeUser(auth_pb2.RevokeUserRequest(subject=subject), metadata=admin)
        for presented in (by_user, malleated(by_user)):
            answer = await introspect(presented)
            assert (answer.active, answer.inactive_reason) == (False, "USER_REVOKED")


def test_cross_jwt_confusion_an_event_replayed_as_an_access_token(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    # RFC 8725 §2.8: a JWT of one kind, signed by the same key, must not pass as another kind.
    event = SecurityEvent.new(TokenRevokedEvent(jti="j", exp=NOW), issuer=ISSUER, now_ms=NOW * 1000)
    with pytest.raises(WrongTokenType):
        verifier.verify(encode_event(event, key.private_key, KID).decode())


def test_cross_jwt_confusion_an_access_token_replayed_as_an_event(keys: StaticKeys, key: SigningKey) -> None:
    with pytest.raises(EventRejected):
        decode_event(mint_access_token(key).encode(), EventType.TOKEN_REVOKED.subject, keys, ISSUER)


def test_unsigned_event_injection(keys: StaticKeys) -> None:
    # An unsigned revocation or key event on the bus must never be applied.
    header = {"alg": "none", "typ": "secevent+jwt", "kid": KID}
    payload = {
        "iss": ISSUER,
        "iat": NOW,
        "jti": "e",
        "toe": NOW,
        "events": {EventType.KEY_REVOKED.uri: {"kid": KID}},
    }
    token = f"{json_segment(header)}.{json_segment(payload)}.{b64url_encode(bytes(64))}"
    with pytest.raises(EventRejected):
        decode_event(token.encode(), EventType.KEY_REVOKED.subject, keys, ISSUER)


def test_a_replica_with_a_shorter_lifetime_setting_forgot_a_session_revocation_at_t_plus_400_s(
    key: SigningKey,
) -> None:
    """authmesh's own: a replica whose lifetime setting (300 s) was below the auth service's (900 s)
    dropped a revoked session after 300 s, while the session's tokens lived on, and accepted one again
    at t+400 s. The lifetime now comes from the auth service's metadata; a token claiming to live longer
    than that is refused."""
    auth_side = AuthSettings(access_token_ttl=900, issuer=ISSUER, audience=AUDIENCE)
    published = {"issuer": ISSUER, **server_metadata_extensions(auth_side)}
    rules = TokenRules.from_metadata(json.loads(json.dumps(published)))
    clock = FrozenClock()
    denylist = Denylist(access_token_ttl=rules.access_token_ttl, leeway=rules.leeway, clock=clock)
    policy = VerifierPolicy(
        issuer=rules.issuer, audience=rules.audience, leeway=rules.leeway, max_lifetime=rules.access_token_ttl
    )
    verifier = TokenVerifier(StaticKeys(key), denylist, policy, clock=clock)
    token = mint_access_token(key, NOW, exp=NOW + 900, sid="session-stolen")
    denylist.revoke_session("session-stolen", revoked_at=NOW)
    clock.advance(400)
    with pytest.raises(TokenRevoked):
        verifier.verify(token)
    with pytest.raises(InvalidClaim):
        verifier.verify(mint_access_token(key, NOW, exp=NOW + 1800))


def test_a_nested_jwt_is_refused_as_an_access_token_and_as_an_event(
    verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    # RFC 7519 §5.2: "cty": "JWT" says the payload is itself a token. A consumer that unwraps it trusts
    # the inner token by the outer signature; authmesh never nests, so the header alone refuses it, even
    # when the key that signed is ours.
    with pytest.raises(UnsupportedAlgorithm):
        verifier.verify(sign_json(access_header(KID, cty="JWT"), claims_payload(), key))
    event = SecurityEvent.new(TokenRevokedEvent(jti="j", exp=NOW), issuer=ISSUER, now_ms=NOW * 1000)
    header, payload, _ = encode_event(event, key.private_key, KID).decode().split(".")
    nested_header = {**json.loads(base64.urlsafe_b64decode(header + "==")), "cty": "JWT"}
    nested = sign_segments(json_segment(nested_header), payload, key)
    with pytest.raises(EventRejected):
        decode_event(nested.encode(), EventType.TOKEN_REVOKED.subject, keys, ISSUER)
