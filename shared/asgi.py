"""FastAPI and Starlette: a :class:`ResourceGuard` as a request dependency (the ``authmesh[asgi]`` extra).

::

    bearer = BearerAuth(guard)

    @app.get("/documents/{id}")
    async def document(id: str, claims: AccessClaims = Depends(bearer.require(all_of={"docs:read"}))):
        ...

Refusals follow RFC 6750: ``401`` with ``WWW-Authenticate: Bearer error="invalid_token"`` (and an
``error_description``) for a token that is not acceptable, a bare ``Bearer`` challenge when there was
none; ``403`` with ``error="insufficient_scope"`` for a valid token without the scope; ``503`` (with
``Retry-After``) when the guard cannot decide: not ready yet, or the revocation state stale and the
``Introspect`` fallback failed too. Each is a Starlette ``HTTPException``, which FastAPI and Starlette
both turn into the response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from authmesh._shared.claims import AccessClaims
from authmesh._shared.errors import AuthError, InsufficientScope, PermissionDenied, TokenMissing, Unavailable
from authmesh._shared.grpc_errors import bearer_token
from authmesh._shared.guard import ResourceGuard
from authmesh._shared.interceptor import bind_claims
from authmesh._shared.scopes import AUTHENTICATED, ScopeRequirement

RETRY_AFTER_SECONDS = "1"

__all__ = ["BearerAuth", "http_error"]


class BearerAuth:
    """Checks the ``Authorization: Bearer`` header of HTTP requests with a guard.

    Args:
        guard: The guard, entered in the app's lifespan (``async with guard:``).
        realm: The ``realm`` of the challenge, if any.
    """

    def __init__(self, guard: ResourceGuard, *, realm: str | None = None) -> None:
        self._guard = guard
        self._realm = realm

    def require(
        self, *, all_of: Iterable[str] = (), any_of: Iterable[str] = ()
    ) -> Callable[[HTTPConnection], Awaitable[AccessClaims]]:
        """A dependency that returns the caller's verified claims, or refuses the request.

        Args:
            all_of: Scopes the token must all hold.
            any_of: Scopes of which it must hold one (when given).
        """
        requirement = ScopeRequirement(all_of=all_of, any_of=any_of)

        async def verified_claims(request: HTTPConnection) -> AccessClaims:
            return await self.claims(request, requirement)

        return verified_claims

    async def claims(
        self, request: HTTPConnection, requirement: ScopeRequirement = AUTHENTICATED
    ) -> AccessClaims:
        """The verified claims of ``request`` (also for :func:`current_claims` in the same task).

        Raises:
            HTTPException: 401, 403 or 503, as the module says.
        """
        header = request.headers.get("authorization")
        token = bearer_token((("authorization", header),)) if header is not None else None
        try:
            claims = await self._guard.authenticate(token)
            requirement.check(claims)
        except AuthError as error:
            raise http_error(error, realm=self._realm) from None
        bind_claims(claims)
        return claims


def http_error(error: AuthError, *, realm: str | None = None) -> HTTPException:
    """The RFC 6750 response for a refusal."""
    detail = f"{error.message} ({error.code})"
    params = [f'realm="{_quoted(realm)}"'] if realm is not None else []
    if isinstance(error, Unavailable):
        return HTTPException(503, detail, headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(error, PermissionDenied):
        params += ['error="insufficient_scope"', f'error_description="{_quoted(error.message)}"']
        if isinstance(error, InsufficientScope):
            params.append(f'scope="{_quoted(error.required)}"')
        return HTTPException(403, detail, headers={"WWW-Authenticate": _challenge(params)})
    if not isinstance(error, TokenMissing):  # RFC 6750 §3.1: no error code when no token was sent
        params += ['error="invalid_token"', f'error_description="{_quoted(error.message)}"']
    return HTTPException(401, detail, headers={"WWW-Authenticate": _challenge(params)})


def _challenge(params: list[str]) -> str:
    return "Bearer " + ", ".join(params) if params else "Bearer"


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
