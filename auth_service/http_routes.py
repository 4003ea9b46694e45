"""The auth service's HTTP routes: the JWK Set and RFC 8414 metadata for HTTP-only verifiers."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from authmesh._auth_service.core import AuthCore
from authmesh._shared.settings import AuthSettings

JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"


def http_routes(core: AuthCore, settings: AuthSettings, public_base: Callable[[], str]) -> list[web.RouteDef]:
    """Routes for ``HttpServer``.

    Args:
        core: Gives the JWK Set.
        settings: Issuer.
        public_base: The HTTP side's base URL as clients see it (known only once bound).
    """

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
                "jwks_uri": public_base().rstrip("/") + JWKS_PATH,
                "grant_types_supported": ["password", "refresh_token"],
                "response_types_supported": ["token"],
                "token_endpoint_auth_methods_supported": ["none"],
                "revocation_endpoint_auth_methods_supported": ["none"],
                "introspection_endpoint_auth_methods_supported": ["none"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    return [web.get(JWKS_PATH, jwks), web.get(METADATA_PATH, metadata)]
