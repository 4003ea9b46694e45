"""FastAPI and Starlette: a :class:`ResourceGuard` as a request dependency or as middleware.

(The ``authmesh[asgi]`` extra.) As a dependency, per route::

    bearer = BearerAuth(guard)
    Reader = Annotated[AccessClaims, Depends(bearer.require(all_of={"docs:read"}))]

    @app.get("/documents/{id}")
    async def document(id: str, claims: Reader): ...

As middleware, for every request but the open paths (cheaper: no dependency to solve per request)::

    app.add_middleware(BearerAuthMiddleware, guard=guard, open_paths={"/healthz"})

Handlers then read :func:`~authmesh.current_claims` (or ``request.scope["authmesh_claims"]``), and a
route's ``bearer.require(...)`` dependency checks its scopes on the claims the middleware verified
instead of verifying the token again.

DPoP (RFC 9449) works as on gRPC, with the guard's DPoP settings: a request may carry
``Authorization: DPoP <token>`` and a ``DPoP`` proof header whose ``htm`` is the request's method and
whose ``htu`` is the request's URL without the query, as one of the service's configured origins
(``AUTHMESH_DPOP_ORIGINS``) followed by the path; a refused proof gets a ``DPoP`` challenge
(``error="invalid_dpop_proof"``, or ``error="use_dpop_nonce"`` with a ``DPoP-Nonce`` header).

Refusals follow RFC 6750: ``401`` with ``WWW-Authenticate: Bearer error="invalid_token"`` (and an
``error_description``) for a token that is not acceptable, a bare ``Bearer`` challenge when there was
none; ``403`` with ``error="insufficient_scope"`` for a valid token without the scope; ``503`` (with
``Retry-After``) when the guard cannot decide: not ready yet, or the revocation state stale and the
``Introspect`` fallback failed too. Each is a Starlette ``HTTPException``, which FastAPI and Starlette
both turn into the response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from authmesh._shared.claims import AccessClaims
from authmesh._shared.errors import (
    AuthError,
    DpopNonceRequired,
    DpopRejected,
    InsufficientScope,
    PermissionDenied,
    TokenMissing,
    Unavailable,
)
from authmesh._shared.guard import ResourceGuard
from authmesh._shared.interceptor import bind_claims, presented_credentials
from authmesh._shared.scopes import AUTHENTICATED, ScopeRequirement

RETRY_AFTER_SECONDS = "1"
# Where the middleware leaves the verified claims in the request's ASGI scope.
CLAIMS_SCOPE_KEY = "authmesh_claims"

__all__ = ["CLAIMS_SCOPE_KEY", "BearerAuth", "BearerAuthMiddleware", "http_error"]


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
        verified = request.scope.get(CLAIMS_SCOPE_KEY)
        try:
            if isinstance(verified, AccessClaims):
                claims = verified
            else:
                claims = await _authenticate(self._guard, request.scope)
            requirement.check(claims)
        except AuthError as error:
            raise http_error(error, realm=self._realm) from None
        bind_claims(claims)
        return claims


class BearerAuthMiddleware:
    """ASGI middleware: every HTTP request outside ``open_paths`` needs a valid token.

    The claims are put in the request's scope (``scope["authmesh_claims"]``) and bound for
    :func:`~authmesh.current_claims`; a refusal is answered here, as :func:`http_error` says.

    Args:
        app: The ASGI app it wraps.
        guard: The guard (entered in the app's lifespan).
        requirement: What every protected request needs (any valid token by default).
        open_paths: Exact paths that need no token (health checks, say).
        realm: The ``realm`` of the challenge, if any.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        guard: ResourceGuard,
        requirement: ScopeRequirement = AUTHENTICATED,
        open_paths: Collection[str] = (),
        realm: str | None = None,
    ) -> None:
        self._app = app
        self._guard = guard
        self._requirement = requirement
        self._open = frozenset(open_paths)
        self._realm = realm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self._app(scope, receive, send)
            return
        try:
            claims = await _authenticate(self._guard, scope)
            self._requirement.check(claims)
        except AuthError as error:
            refusal = http_error(error, realm=self._realm)
            response = PlainTextResponse(refusal.detail, refusal.status_code, headers=refusal.headers)
            await response(scope, receive, send)
            return
        scope[CLAIMS_SCOPE_KEY] = claims
        bind_claims(claims)
        await self._app(scope, receive, send)


async def _authenticate(guard: ResourceGuard, scope: Scope) -> AccessClaims:
    """The claims of an HTTP request's token, its DPoP proof checked against the request."""
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope["headers"]
        if name in (b"authorization", b"dpop")
    ]
    token, dpop_scheme, proof = presented_credentials(headers)
    return await guard.authenticate(
        token, dpop_scheme=dpop_scheme, proof=proof, method=scope["path"], htm=scope["method"]
    )


def http_error(error: AuthError, *, realm: str | None = None) -> HTTPException:
    """The RFC 6750 (RFC 9449 for DPoP) response for a refusal."""
    detail = f"{error.message} ({error.code})"
    params = [f'realm="{_quoted(realm)}"'] if realm is not None else []
    if isinstance(error, DpopRejected):
        nonce = error.nonce if isinstance(error, DpopNonceRequired) else None
        params += [
            'error="invalid_dpop_proof"' if nonce is None else 'error="use_dpop_nonce"',
            f'error_description="{_quoted(error.message)}"',
        ]
        headers = {"WWW-Authenticate": "DPoP " + ", ".join(params)}
        if nonce is not None:
            headers["DPoP-Nonce"] = nonce
        return HTTPException(401, detail, headers=headers)
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
