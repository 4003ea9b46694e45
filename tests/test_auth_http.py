"""The auth service's standard HTTP endpoints: RFC 6749 token, RFC 7662 introspection, RFC 7009
revocation and RFC 8414 metadata, on a real auth service (Redis, NATS) called over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata

from authmesh._auth_service.app import AuthApp
from tests.auth_support import ADMIN, SERVICE, AuthClient, auth_settings, running_auth

ISSUER = "https://auth.example.test"
FORM = "application/x-www-form-urlencoded"


class Http:
    """Form posts and GETs against the auth service's HTTP side."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def post(
        self, path: str, form: dict[str, str], bearer: str | None = None
    ) -> tuple[int, dict[str, str], Any]:
        headers = {"authorization": f"Bearer {bearer}"} if bearer is not None else {}
        async with self.session.post(self.base + path, data=form, headers=headers) as reply:
            text = await reply.text()
            body = await reply.json(content_type=None) if text else None
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, body

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path) as reply:
            assert reply.status == 200
            return await reply.json(content_type=None)

    async def token(self, username: str, password: str, scope: str = "") -> dict[str, Any]:
        form = {"grant_type": "password", "username": username, "password": password}
        if scope:
            form["scope"] = scope
        status, _, body = await self.post("/oauth2/token", form)
        assert status == 200, body
        assert isinstance(body, dict)
        return body


@pytest_asyncio.fixture(loop_scope="session")
async def service(redis_url: str, nats_url: str) -> AsyncIterator[tuple[AuthApp, AuthClient, Http]]:
    settings = auth_settings(redis_url, [nats_url], issuer=ISSUER)
    async with running_auth(settings) as (app, client), aiohttp.ClientSession() as session:
        await client.create_user("pat", "pat-password-1")
        await client.create_user("sam", "sam-password-1")
        yield app, client, Http(session, f"http://{app.http_address}")


async def test_metadata_lists_exactly_the_endpoints_that_answer_and_passes_authlib(
    service: tuple[AuthApp, AuthClient, Http],
) -> None:
    _, _, http = service
    document = await http.get("/.well-known/oauth-authorization-server")
    AuthorizationServerMetadata(document).validate()
    assert document["issuer"] == ISSUER
    endpoints = {key: value for key, value in document.items() if key.endswith(("_endpoint", "_uri"))}
    assert set(endpoints) == {"jwks_uri", "token_endpoint", "introspection_endpoint", "revocation_endpoint"}
    for url in endpoints.values():
        assert url.startswith(http.base)
    await http.get(endpoints["jwks_uri"].removeprefix(http.base))
    for key in ("token_endpoint", "introspection_endpoint", "revocation_endpoint"):
        status, _, _ = await http.post(endpoints[key].removeprefix(http.base), {})
        assert status in (400, 401), key  # it exists, and refuses an empty request


async def test_the_token_endpoint_issues_and_rotates_tokens(
    service: tuple[AuthApp, AuthClient, Http],
) -> None:
    _, _, http = service
    issued = await http.token("pat", "pat-password-1")
    assert issued["token_type"] == "Bearer"
    assert issued["scope"] == "docs:read"
    status, headers, rotated = await http.post(
        "/oauth2/token", {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]}
    )
    assert status == 200
    assert headers["cache-control"] == "no-store"
    assert rotated["refresh_token"] != issued["refresh_token"]
    status, _, reused = await http.post(
        "/oauth2/token", {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]}
    )
    assert (status, reused["error"], reused["reason"]) == (400, "invalid_grant", "REFRESH_TOKEN_REUSED")


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": "password", "username": "pat", "password": "wrong-password"}, "invalid_grant"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({"grant_type": "password", "username": "pat"}, "invalid_request"),
    ],
)
async def test_the_token_endpoint_refuses_bad_grants_with_rfc6749_errors(
    service: tuple[AuthApp, AuthClient, Http], form: dict[str, str], error: str
) -> None:
    _, _, http = service
    status, _, body = await http.post("/oauth2/token", form)
    assert (status, body["error"]) == (400, error)
    assert "wrong-password" not in str(body)


async def test_introspection_answers_a_service_and_refuses_a_user(
    service: tuple[AuthApp, AuthClient, Http],
) -> None:
    _, _, http = service
    pat = await http.token("pat", "pat-password-1")
    service_token = (await http.token(*SERVICE, scope="service"))["access_token"]
    status, _, answer = await http.post("/oauth2/introspect", {"token": pat["access_token"]}, service_token)
    assert status == 200
    assert answer["active"] is True
    assert answer["scope"] == "docs:read"
    assert answer["sid"] == pat["session_id"]
    status, _, answer = await http.post("/oauth2/introspect", {"token": "not-a-token"}, service_token)
    assert (status, answer) == (200, {"active": False})
    # The same rule as the Introspect RPC: a user's resource token is not for the auth service.
    status, headers, answer = await http.post(
        "/oauth2/introspect", {"token": pat["access_token"]}, pat["access_token"]
    )
    assert (status, answer["reason"]) == (401, "WRONG_AUDIENCE")
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    # An admin token may introspect too.
    admin = (await http.token(*ADMIN, scope="admin"))["access_token"]
    status, _, answer = await http.post("/oauth2/introspect", {"token": pat["access_token"]}, admin)
    assert (status, answer["active"]) == (200, True)
    status, headers, _ = await http.post("/oauth2/introspect", {"token": pat["access_token"]})
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')


async def test_revocation_follows_the_rpc_rules_and_shows_in_introspection(
    service: tuple[AuthApp, AuthClient, Http],
) -> None:
    _, _, http = service
    pat = await http.token("pat", "pat-password-1")
    sam = await http.token("sam", "sam-password-1")
    service_token = (await http.token(*SERVICE, scope="service"))["access_token"]
    # Someone else's token: refused, as RevokeToken refuses it.
    status, _, body = await http.post("/oauth2/revoke", {"token": pat["access_token"]}, sam["access_token"])
    assert (status, body["reason"]) == (403, "NOT_OWNER")
    # One's own token: revoked; an invalid token is no error (RFC 7009 §2.2).
    status, _, _ = await http.post("/oauth2/revoke", {"token": pat["access_token"]}, pat["access_token"])
    assert status == 200
    status, _, _ = await http.post("/oauth2/revoke", {"token": "x.y.z"}, sam["access_token"])
    assert status == 200
    status, _, answer = await http.post("/oauth2/introspect", {"token": pat["access_token"]}, service_token)
    assert (status, answer) == (200, {"active": False})
    # An admin revokes anyone's refresh token (and with it the session).
    admin = (await http.token(*ADMIN, scope="admin"))["access_token"]
    status, _, _ = await http.post("/oauth2/revoke", {"token": sam["refresh_token"]}, admin)
    assert status == 200
    status, _, answer = await http.post("/oauth2/introspect", {"token": sam["access_token"]}, service_token)
    assert answer == {"active": False}


async def test_a_form_with_a_repeated_parameter_is_an_invalid_request(
    service: tuple[AuthApp, AuthClient, Http],
) -> None:
    _, _, http = service
    async with http.session.post(
        http.base + "/oauth2/token",
        data="grant_type=password&username=pat&username=sam&password=x",
        headers={"content-type": FORM},
    ) as reply:
        assert reply.status == 400
        assert (await reply.json())["error"] == "invalid_request"
