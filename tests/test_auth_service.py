"""The auth service's RPCs against a real Redis and a real NATS: success and failure paths."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec

from authmesh._auth_service.app import AuthApp
from authmesh._shared.errors import UnknownKey
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.jose import decode_compact
from authmesh._shared.keys import parse_jwks
from authmesh._shared.verifier import NoRevocations, TokenVerifier, VerifierPolicy
from authmesh.auth.v1 import auth_pb2
from tests.auth_support import (
    SERVICE,
    AuthClient,
    auth_settings,
    bearer,
    expect_error,
    running_auth,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


class StaticKeys:
    """A key source over a parsed JWK Set."""

    def __init__(self, jwks_json: str) -> None:
        self.keys = parse_jwks(jwks_json)

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        if kid not in self.keys:
            raise UnknownKey(kid)
        return self.keys[kid]


@pytest_asyncio.fixture(loop_scope="session")
async def auth(redis_url: str, nats_url: str) -> AsyncIterator[tuple[AuthApp, AuthClient]]:
    """A fresh auth service on clean Redis and NATS."""
    async with running_auth(auth_settings(redis_url, [nats_url], login_max_failures=5)) as pair:
        yield pair


async def test_login_issues_an_es256_access_token_that_verifies_against_the_jwk_set(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    await client.create_user("alice", "alice-password", ("docs:read", "profile"))
    pair = await client.login("alice", "alice-password")
    assert pair.token_type == "Bearer"
    assert pair.expires_in == 300
    assert pair.scope == "docs:read profile"
    header = decode_compact(pair.access_token).unverified_header
    assert header["alg"] == "ES256"
    assert header["typ"] == "at+jwt"
    jwks = (await client.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json
    verifier = TokenVerifier(
        StaticKeys(jwks), NoRevocations(), VerifierPolicy(issuer="authmesh", audience="authmesh-resources")
    )
    claims = verifier.verify(pair.access_token)
    assert claims.sid == pair.session_id
    assert claims.scopes == ("docs:read", "profile")
    assert claims.client_id == "alice"
    assert claims.kid == header["kid"]
    assert claims.exp - claims.iat == 300


async def test_login_with_requested_scopes_narrows_the_token(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    await client.create_user("bob", "bob-password", ("docs:read", "profile"))
    assert (await client.login("bob", "bob-password", ("profile",))).scope == "profile"
    await expect_error(client.login("bob", "bob-password", ("admin",)), INVALID_ARGUMENT, "INVALID_SCOPE")


def audience_of(token: str) -> str:
    """The ``aud`` of a token we issued (one audience each)."""
    aud: str = decode_compact(token).unverified_payload["aud"]
    return aud


async def test_a_login_for_admin_gets_an_auth_audience_token_with_only_auth_scopes(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    await client.create_user("root2", "root2-password", ("admin", "docs:read"))
    admin = await client.login("root2", "root2-password", ("admin",))
    assert (admin.scope, audience_of(admin.access_token)) == ("admin", "authmesh-auth")
    # Its refresh keeps the audience and the scopes.
    again = await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=admin.refresh_token))
    assert (again.scope, audience_of(again.access_token)) == ("admin", "authmesh-auth")
    # Asking for both kinds at once is refused; asking for nothing gets the resource scopes only.
    await expect_error(
        client.login("root2", "root2-password", ("admin", "docs:read")), INVALID_ARGUMENT, "INVALID_SCOPE"
    )
    plain = await client.login("root2", "root2-password")
    assert (plain.scope, audience_of(plain.access_token)) == ("docs:read", "authmesh-resources")
    # The bootstrap admin holds only admin: a login without scopes gets a token that can do nothing.
    bare = await client.login("admin", "admin-password-1")
    assert (bare.scope, audience_of(bare.access_token)) == ("", "authmesh-resources")
    await expect_error(
        client.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=bearer(bare.access_token)),
        UNAUTHENTICATED,
        "WRONG_AUDIENCE",
    )


async def test_introspect_calls_an_auth_audience_token_inactive(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    service = await client.service_token()
    answer = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=await client.admin_token()), metadata=bearer(service)
    )
    assert (answer.active, answer.inactive_reason) == (False, "WRONG_AUDIENCE")


async def test_wrong_password_and_unknown_user_are_indistinguishable(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    await client.create_user("carol", "carol-password")
    wrong = await expect_error(client.login("carol", "nope-nope"), UNAUTHENTICATED, "INVALID_CREDENTIALS")
    unknown = await expect_error(client.login("nobody", "nope-nope"), UNAUTHENTICATED, "INVALID_CREDENTIALS")
    assert wrong.details() == unknown.details()
    assert "nope" not in (wrong.details() or "")


async def test_repeated_failed_logins_are_rate_limited_per_username(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    await client.create_user("dave", "dave-password")
    for _ in range(5):
        await expect_error(client.login("dave", "wrong-password"), UNAUTHENTICATED)
    await expect_error(
        client.login("dave", "dave-password"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
    )
    # Another username is unaffected.
    await client.create_user("erin", "erin-password")
    await client.login("erin", "erin-password")


@pytest.mark.parametrize(
    ("username", "password", "reason"),
    [
        ("", "x-password", "FIELD_REQUIRED"),
        ("alice", "", "FIELD_REQUIRED"),
        ("a" * 129, "x-password", "FIELD_TOO_LARGE"),
        ("alice", "p" * 1025, "FIELD_TOO_LARGE"),
        ("al ice", "x-password", "FIELD_INVALID"),
    ],
)
async def test_malformed_login_requests_are_invalid_arguments(
    auth: tuple[AuthApp, AuthClient], username: str, password: str, reason: str
) -> None:
    _, client = auth
    await expect_error(client.login(username, password), INVALID_ARGUMENT, reason)


async def test_an_absurdly_large_request_is_refused_unprocessed(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    call = client.login("alice", "p" * (1024 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, INVALID_ARGUMENT)


async def test_refresh_rotates_and_a_spent_token_revokes_the_session(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    await client.create_user("frank", "frank-password")
    first = await client.login("frank", "frank-password")
    second = await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token))
    assert second.session_id == first.session_id
    assert second.refresh_token != first.refresh_token
    await expect_error(
        client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token)),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_REUSED",
    )
    # The whole session died: the successor refresh token and the access tokens with it.
    await expect_error(
        client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=second.refresh_token)),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )
    service_token = await client.service_token()
    answer = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=second.access_token), metadata=bearer(service_token)
    )
    assert not answer.active
    assert answer.inactive_reason == "SESSION_REVOKED"


async def test_fifty_concurrent_refreshes_of_one_token_let_exactly_one_win(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    await client.create_user("grace", "grace-password")
    pair = await client.login("grace", "grace-password")
    request = auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)
    results = await asyncio.gather(
        *(client.stub.Refresh(request, timeout=10) for _ in range(50)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, auth_pb2.TokenPair)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 49
    assert {loser.code() for loser in losers} == {UNAUTHENTICATED}
    # The losers presented a spent token: reuse, so the winner's session is revoked too.
    await expect_error(
        client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=winners[0].refresh_token)),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )


async def test_unknown_refresh_token_is_unauthenticated(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    await expect_error(
        client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token="amr_unknown")),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )
    await expect_error(
        client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token="")), INVALID_ARGUMENT, "FIELD_REQUIRED"
    )


async def test_logout_revokes_the_session(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    await client.create_user("heidi", "heidi-password")
    pair = await client.login("heidi", "heidi-password")
    response = await client.stub.Logout(auth_pb2.LogoutRequest(refresh_token=pair.refresh_token))
    assert response.event_id
    assert response.revoked_at_unix_ms > 0
    await expect_error(
        client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )


async def test_revoke_token_by_its_owner_makes_it_inactive(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    await client.create_user("ivan", "ivan-password")
    pair = await client.login("ivan", "ivan-password")
    other = await client.login("ivan", "ivan-password")
    first = await client.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token=pair.access_token, reason="lost laptop"),
        metadata=bearer(other.access_token),
    )
    again = await client.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token=pair.access_token), metadata=bearer(other.access_token)
    )
    assert again.event_id == first.event_id  # idempotent: the same revocation, the same event
    await expect_error(
        client.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=other.access_token), metadata=bearer(pair.access_token)
        ),
        UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    service_token = await client.service_token()
    answer = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=pair.access_token), metadata=bearer(service_token)
    )
    assert (answer.active, answer.inactive_reason) == (False, "TOKEN_REVOKED")
    answer = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=other.access_token), metadata=bearer(service_token)
    )
    assert answer.active
    assert answer.session_id == other.session_id


async def test_revoking_someone_elses_token_is_permission_denied(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    await client.create_user("judy", "judy-password")
    await client.create_user("mallory", "mallory-password")
    judy = await client.login("judy", "judy-password")
    mallory = await client.login("mallory", "mallory-password")
    await expect_error(
        client.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=judy.access_token), metadata=bearer(mallory.access_token)
        ),
        PERMISSION_DENIED,
        "NOT_OWNER",
    )
    await expect_error(
        client.stub.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=judy.session_id), metadata=bearer(mallory.access_token)
        ),
        PERMISSION_DENIED,
        "NOT_OWNER",
    )
    await expect_error(
        client.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=judy.refresh_token), metadata=bearer(mallory.access_token)
        ),
        PERMISSION_DENIED,
        "NOT_OWNER",
    )
    # An admin may (with a token for the auth audience), and so may the owner with a resource token.
    admin = await client.admin_token()
    await client.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=judy.session_id), metadata=bearer(admin)
    )
    await client.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=mallory.session_id), metadata=bearer(mallory.access_token)
    )


async def test_calls_without_a_valid_bearer_token_are_unauthenticated(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    request = auth_pb2.RevokeSessionRequest(session_id="s1")
    await expect_error(client.stub.RevokeSession(request), UNAUTHENTICATED, "TOKEN_MISSING")
    await expect_error(
        client.stub.RevokeSession(request, metadata=bearer("garbage")), UNAUTHENTICATED, "MALFORMED_TOKEN"
    )
    await expect_error(
        client.stub.RevokeSession(request, metadata=(("authorization", "Basic abc"),)),
        UNAUTHENTICATED,
        "TOKEN_MISSING",
    )


async def test_revoke_session_of_an_unknown_session_is_not_found(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    admin = await client.admin_token()
    await expect_error(
        client.stub.RevokeSession(auth_pb2.RevokeSessionRequest(session_id="nope"), metadata=bearer(admin)),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


async def test_revoke_user_kills_earlier_tokens_yet_a_login_right_after_works(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    sub = await client.create_user("ken", "ken-password")
    before = await client.login("ken", "ken-password")
    admin = await client.admin_token()
    await client.stub.RevokeUser(
        auth_pb2.RevokeUserRequest(subject=sub, reason="offboarded"), metadata=bearer(admin)
    )
    after = await client.login("ken", "ken-password")
    service_token = await client.service_token()
    old = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=before.access_token), metadata=bearer(service_token)
    )
    new = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=after.access_token), metadata=bearer(service_token)
    )
    assert (old.active, old.inactive_reason) == (False, "USER_REVOKED")
    assert new.active
    await expect_error(
        client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=before.refresh_token)),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )
    await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=after.refresh_token))


async def test_admin_only_rpcs_refuse_resource_tokens_and_auth_tokens_without_the_scope(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    sub = await client.create_user("leo", "leo-password")
    resource_token = (await client.login("leo", "leo-password")).access_token
    service_token = await client.service_token()
    calls: dict[str, Callable[[str], Awaitable[object]]] = {
        "RevokeUser": lambda token: client.stub.RevokeUser(
            auth_pb2.RevokeUserRequest(subject=sub), metadata=bearer(token)
        ),
        "RotateSigningKey": lambda token: client.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(), metadata=bearer(token)
        ),
        "CreateUser": lambda token: client.stub.CreateUser(
            auth_pb2.CreateUserRequest(username="x1", password="x-password"), metadata=bearer(token)
        ),
    }
    for name, call in calls.items():
        refused = await expect_error(call(resource_token), UNAUTHENTICATED, "WRONG_AUDIENCE")
        assert refused.details(), name
        await expect_error(call(service_token), PERMISSION_DENIED, "INSUFFICIENT_SCOPE")
    await expect_error(
        client.stub.Introspect(
            auth_pb2.IntrospectRequest(token=resource_token), metadata=bearer(resource_token)
        ),
        UNAUTHENTICATED,
        "WRONG_AUDIENCE",
    )


async def test_create_user_refuses_a_taken_username(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    await client.create_user("mia", "mia-password")
    await expect_error(
        client.create_user("mia", "other-password"), grpc.StatusCode.ALREADY_EXISTS, "USER_EXISTS"
    )
    await expect_error(client.create_user("short", "pw"), INVALID_ARGUMENT, "FIELD_INVALID")


async def test_rotation_keeps_old_tokens_valid_and_retirement_kills_them(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    await client.create_user("nina", "nina-password")
    old = await client.login("nina", "nina-password")
    admin = await client.admin_token()
    service_token = await client.service_token()
    rotated = await client.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=bearer(admin))
    assert rotated.previous_kid == decode_compact(old.access_token).kid
    new = await client.login("nina", "nina-password")
    assert decode_compact(new.access_token).kid == rotated.kid
    jwks = json.loads((await client.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
    assert {key["kid"] for key in jwks["keys"]} == {rotated.kid, rotated.previous_kid}
    answer = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=old.access_token), metadata=bearer(service_token)
    )
    assert answer.active

    admin = await client.admin_token()
    retired = await client.stub.RotateSigningKey(
        auth_pb2.RotateSigningKeyRequest(retire_previous=True), metadata=bearer(admin)
    )
    assert retired.previous_kid == rotated.kid
    # The admin's own token was signed by the key just retired: it is dead too.
    await expect_error(
        client.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=bearer(admin)),
        UNAUTHENTICATED,
        "KEY_REVOKED",
    )
    service_token = await client.service_token()
    answer = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=new.access_token), metadata=bearer(service_token)
    )
    assert (answer.active, answer.inactive_reason) == (False, "KEY_REVOKED")
    jwks = json.loads((await client.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
    assert rotated.kid not in {key["kid"] for key in jwks["keys"]}
    # Tokens of the first key (superseded, not retired) are still fine; new logins work.
    answer = await client.stub.Introspect(
        auth_pb2.IntrospectRequest(token=old.access_token), metadata=bearer(service_token)
    )
    assert answer.active
    latest = await client.login("nina", "nina-password")
    assert decode_compact(latest.access_token).kid == retired.kid


async def test_snapshot_lists_every_revocation_in_force(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    sub = await client.create_user("olga", "olga-password")
    one = await client.login("olga", "olga-password")
    two = await client.login("olga", "olga-password")
    await client.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token=one.access_token), metadata=bearer(two.access_token)
    )
    await client.stub.Logout(auth_pb2.LogoutRequest(refresh_token=two.refresh_token))
    admin = await client.admin_token()
    await client.stub.RevokeUser(auth_pb2.RevokeUserRequest(subject=sub), metadata=bearer(admin))
    service_token = await client.service_token()
    chunks = [
        c
        async for c in client.stub.SnapshotRevocations(
            auth_pb2.SnapshotRevocationsRequest(), metadata=bearer(service_token)
        )
    ]
    assert chunks
    tokens = {t.jti for c in chunks for t in c.tokens}
    sessions = {(s.sid, s.sub) for c in chunks for s in c.sessions}
    users = {u.sub for c in chunks for u in c.users}
    assert decode_compact(one.access_token).unverified_payload["jti"] in tokens
    assert (two.session_id, sub) in sessions
    assert sub in users
    assert chunks[-1].stream_sequence >= 3


async def test_http_side_serves_jwks_that_pyjwt_accepts(auth: tuple[AuthApp, AuthClient]) -> None:
    app, client = auth
    await client.create_user("pat", "pat-password")
    pair = await client.login("pat", "pat-password")
    base = f"http://{app.http_address}"
    jwks_client = jwt.PyJWKClient(f"{base}/.well-known/jwks.json")
    signing_key = await asyncio.to_thread(jwks_client.get_signing_key_from_jwt, pair.access_token)
    claims = jwt.decode(
        pair.access_token,
        signing_key.key,
        algorithms=["ES256"],
        audience="authmesh-resources",
        issuer="authmesh",
        options={"require": ["exp", "iat", "nbf", "jti", "sub", "iss", "aud"]},
    )
    assert claims["sid"] == pair.session_id

    def fetch(path: str) -> dict[str, object]:
        with urllib.request.urlopen(f"{base}{path}", timeout=5) as response:  # noqa: S310  # loopback URL built here
            data: dict[str, object] = json.loads(response.read())
            return data

    metadata = await asyncio.to_thread(fetch, "/.well-known/oauth-authorization-server")
    assert metadata["issuer"] == "authmesh"
    assert metadata["jwks_uri"] == f"{base}/.well-known/jwks.json"
    forged = pair.access_token[:-4] + ("AAAA" if not pair.access_token.endswith("AAAA") else "BBBB")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, signing_key.key, algorithms=["ES256"], audience="authmesh-resources")


async def test_health_and_reflection_are_served(auth: tuple[AuthApp, AuthClient]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, client = auth
    health = health_pb2_grpc.HealthStub(client.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="authmesh.auth.v1.AuthService"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_metrics_count_rpcs_and_logins(auth: tuple[AuthApp, AuthClient]) -> None:
    app, client = auth
    await expect_error(client.login("nobody", "wrong-password"), UNAUTHENTICATED)
    await client.login(*SERVICE)

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{app.http_address}/metrics", timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    assert 'authmesh_logins_total{result="ok"}' in text
    assert 'authmesh_logins_total{result="invalid_credentials"}' in text
    assert "grpc_server_handled_total{" in text
    assert 'grpc_code="UNAUTHENTICATED"' in text


async def test_snapshot_is_for_services_and_admins_only(auth: tuple[AuthApp, AuthClient]) -> None:
    _, client = auth
    await client.create_user("quinn", "quinn-password")
    token = (await client.login("quinn", "quinn-password")).access_token
    stream = client.stub.SnapshotRevocations(auth_pb2.SnapshotRevocationsRequest(), metadata=bearer(token))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stream:
            pass
    assert info.value.code() == UNAUTHENTICATED
    assert error_reason(info.value) == "WRONG_AUDIENCE"
    service = client.stub.SnapshotRevocations(
        auth_pb2.SnapshotRevocationsRequest(), metadata=bearer(await client.service_token())
    )
    assert [chunk async for chunk in service]


async def test_a_rotation_repeated_with_the_same_request_id_rotates_once(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    admin = bearer(await client.admin_token())
    request = auth_pb2.RotateSigningKeyRequest(request_id="rotation-42")
    first = await client.stub.RotateSigningKey(request, metadata=admin)
    again = await client.stub.RotateSigningKey(request, metadata=admin)
    assert (again.kid, again.previous_kid) == (first.kid, first.previous_kid)
    other = await client.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=admin)
    assert other.kid != first.kid
