"""The auth service's HTTP routes, for tools that speak only HTTP.

- ``GET /.well-known/jwks.json``: the JWK Set (RFC 7517);
- ``GET /.well-known/oauth-authorization-server``: RFC 8414 metadata naming exactly the endpoints below;
- ``POST /oauth2/token``: RFC 6749 token endpoint, grants ``password`` (§4.3) and ``refresh_token`` (§6);
- ``POST /oauth2/introspect``: RFC 7662 introspection;
- ``POST /oauth2/revoke``: RFC 7009 revocation.

Each calls the same :class:`~authmesh._auth_service.core.AuthCore` method as its gRPC RPC, with the
caller's ``Authorization: Bearer`` token where the RPC takes one, so the authorization rules are the
RPCs' own. Refusals of the caller's token follow RFC 6750 (:mod:`authmesh._shared.http_errors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from authmesh._auth_service.core import AuthCore, IssuedTokens
from authmesh._shared.auth_metadata import METADATA_PATH, server_metadata_extensions
from authmesh._shared.errors import (
    AuthError,
    InvalidCredentials,
    InvalidRefreshToken,
    InvalidRequest,
    PermissionDenied,
    RefreshTokenReused,
    TokenRejected,
)
from authmesh._shared.grpc_errors import bearer_token
from authmesh._shared.http_errors import http_refusal
from authmesh._shared.settings import AuthSettings

JWKS_PATH = "/.well-known/jwks.json"
TOKEN_PATH = "/oauth2/token"
INTROSPECTION_PATH = "/oauth2/introspect"
REVOCATION_PATH = "/oauth2/revoke"
GRANT_TYPES = ("password", "refresh_token")
# RFC 6749 §5.1: token responses must not be cached.
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

Form = MultiDictProxy[str | bytes | bytearray | web.FileField]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_routes(core: AuthCore, settings: AuthSettings, public_base: Callable[[], str]) -> list[web.RouteDef]:
    """Routes for ``HttpServer``.

    Args:
        core: The service's behaviour (the same calls the gRPC servicer makes).
        settings: Issuer.
        public_base: The HTTP side's base URL as clients see it (known only once bound).
    """

    def url(path: str) -> str:
        return public_base().rstrip("/") + path

    async def jwks(_: web.Request) -> web.Response:
        return web.Response(
            text=await core.jwks(),
            content_type="application/jwk-set+json",
            headers={"Cache-Control": "public, max-age=60"},
        )

    async def metadata(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": settings.issuer,
                "jwks_uri": url(JWKS_PATH),
                "token_endpoint": url(TOKEN_PATH),
                "introspection_endpoint": url(INTROSPECTION_PATH),
                "revocation_endpoint": url(REVOCATION_PATH),
                "grant_types_supported": list(GRANT_TYPES),
                # RFC 8414 requires the field even of a server without an authorization endpoint.
                "response_types_supported": ["token"],
                "token_endpoint_auth_methods_supported": ["none"],
                "revocation_endpoint_auth_methods_supported": ["none"],
                "introspection_endpoint_auth_methods_supported": ["none"],
                # What a resource service must enforce, so it is read from here instead of copied.
                **server_metadata_extensions(settings),
            }
        )

    async def token(request: web.Request) -> web.Response:
        try:
            form = await _form(request)
            grant_type = _single(form, "grant_type")
            if grant_type == "password":
                scopes = _single(form, "scope", required=False).split()
                issued = await core.login(_single(form, "username"), _single(form, "password"), scopes)
            elif grant_type == "refresh_token":
                issued = await core.refresh(_single(form, "refresh_token"))
            else:
                return _oauth_error(400, "unsupported_grant_type", f"grant_type must be one of {GRANT_TYPES}")
        except AuthError as error:
            return _token_error(error)
        return web.json_response(_token_response(issued), headers=_NO_STORE)

    async def introspect(request: web.Request) -> web.Response:
        try:
            caller = await core.authenticate(bearer_token(_authorization(request)))
            answer = await core.introspect(caller, _single(await _form(request), "token"))
        except AuthError as error:
            return _refusal(error)
        claims = answer.claims
        if not answer.active or claims is None:
            # RFC 7662 §2.2: nothing more is said about a token that is not active.
            return web.json_response({"active": False}, headers=_NO_STORE)
        return web.json_response(
            {
                "active": True,
                "scope": claims.scope,
                "client_id": claims.client_id,
                "token_type": "Bearer",
                "exp": claims.exp,
                "iat": claims.iat,
                "nbf": claims.nbf,
                "sub": claims.sub,
                "aud": list(claims.aud),
                "iss": claims.iss,
                "jti": claims.jti,
                "sid": claims.sid,
            },
            headers=_NO_STORE,
        )

    async def revoke(request: web.Request) -> web.Response:
        try:
            caller = await core.authenticate(bearer_token(_authorization(request)))
            target = _single(await _form(request), "token")
            # RFC 7009 §2.2: a token that is invalid (not ours, unknown, expired) is not an error.
            with contextlib.suppress(TokenRejected):
                await core.revoke_token(caller, target, "")
        except AuthError as error:
            return _refusal(error)
        return web.Response(status=200)

    return [
        web.get(JWKS_PATH, jwks),
        web.get(METADATA_PATH, metadata),
        web.post(TOKEN_PATH, token),
        web.post(INTROSPECTION_PATH, introspect),
        web.post(REVOCATION_PATH, revoke),
    ]


def _authorization(request: web.Request) -> list[tuple[str, str]]:
    return [("authorization", value) for value in request.headers.getall("Authorization", [])]


async def _form(request: web.Request) -> Form:
    if request.content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("the body must be application/x-www-form-urlencoded", code="FIELD_INVALID")
    return await request.post()


def _single(form: Form, name: str, *, required: bool = True) -> str:
    """A parameter that appears at most once (RFC 6749 §3.2) as text."""
    values = form.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"{name} appears more than once", code="FIELD_INVALID")
    if not values:
        if required:
            raise InvalidRequest(f"{name} is required", code="FIELD_REQUIRED")
        return ""
    value = values[0]
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be text", code="FIELD_INVALID")
    return value


def _token_response(issued: IssuedTokens) -> dict[str, Any]:
    return {
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "refresh_token": issued.refresh_token,
        "refresh_token_expires_in": issued.refresh_expires_in,
        "scope": " ".join(issued.scopes),
        "session_id": issued.session_id,
    }


def _oauth_error(status: int, error: str, description: str, reason: str = "") -> web.Response:
    body = {"error": error, "error_description": description}
    if reason:
        body["reason"] = reason
    return web.json_response(body, status=status, headers=_NO_STORE)


def _token_error(error: AuthError) -> web.Response:
    """RFC 6749 §5.2: a bad credential or refresh token is ``invalid_grant``, a bad scope ``invalid_scope``.

    Other errors are answered as any refusal is.
    """
    if isinstance(error, InvalidCredentials | InvalidRefreshToken | RefreshTokenReused):
        return _oauth_error(400, "invalid_grant", error.message, error.code)
    if error.code == "INVALID_SCOPE" or isinstance(error, PermissionDenied):
        return _oauth_error(400, "invalid_scope", error.message, error.code)
    return _refusal(error)


def _refusal(error: AuthError) -> web.Response:
    refusal = http_refusal(error)
    headers = dict(refusal.headers)
    headers.update(_NO_STORE)
    return web.json_response(refusal.body(), status=refusal.status, headers=headers)
