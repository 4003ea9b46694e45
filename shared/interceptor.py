"""The async gRPC server interceptor any service adds to verify bearer tokens locally.

Every call outside the open services (health, reflection, and any the service names) must carry
``authorization: Bearer <access token>``. The :class:`Authenticator` decides:

1. refuse everything (``UNAVAILABLE``) until the revocation state has caught up with the stream;
2. verify the token with :class:`~authmesh._shared.verifier.TokenVerifier` (signature with cached
   keys, claims, denylist); a ``kid`` the cache does not know triggers one shared key refetch and a
   second try, and
   when that refetch fails the call is ``UNAVAILABLE`` (``KEYS_UNAVAILABLE``), not ``UNAUTHENTICATED``;
3. when the revocation state is stale, confirm the token with ``Introspect``
   (:class:`~authmesh._shared.staleness.IntrospectionFallback`).

With DPoP (RFC 9449) a call carries ``authorization: DPoP <token>`` and a ``dpop`` proof: the service's
:class:`~authmesh._shared.dpop.ProofGate` checks the proof against the call's method and the token,
and the verifier then requires the token to be bound to the proof's key. A key-bound token presented
as a bearer token is refused whatever the service's policy.

The interceptor then checks the method's required scope and hands the verified claims to the handler
through a context variable (:func:`current_claims`); each call runs in its own task, so the variable
never leaks from one call to another. Errors become statuses through :mod:`authmesh._shared.grpc_errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from typing import Any

import grpc

from authmesh._shared.claims import AccessClaims
from authmesh._shared.dpop import DpopMode, ProofGate, proof_from_metadata
from authmesh._shared.errors import (
    AuthError,
    DpopNonceRequired,
    InsufficientScope,
    RateLimited,
    TokenMissing,
    Unavailable,
    UnknownKey,
)
from authmesh._shared.grpc_errors import presented_token, to_grpc_status
from authmesh._shared.grpc_handlers import BoundedCache, Continuation, RpcHandler, rebuild_handler
from authmesh._shared.jose import decode_compact
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.metrics import VerificationMetrics
from authmesh._shared.staleness import REVOCATION_STATE_STALE, IntrospectionFallback, StalenessMonitor
from authmesh._shared.verifier import TokenVerifier

# Methods of these services never need a token: load balancers and tools call them unauthenticated.
OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# A refusal's handler depends on the handler it stands in for and on the error's class, code and text.
_RefusalKey = tuple[RpcHandler, type[AuthError], str, str]

_claims: ContextVar[AccessClaims | None] = ContextVar("authmesh_claims", default=None)


def current_claims() -> AccessClaims:
    """The verified claims of the call being handled.

    Raises:
        TokenMissing: Called outside an authenticated call (a handler on an open method, say).
    """
    claims = _claims.get()
    if claims is None:
        raise TokenMissing()
    return claims


class Authenticator:
    """Turns a bearer token into verified claims, or an error; the interceptor's whole decision.

    Args:
        verifier: Local verification (keys, claims, denylist).
        keys: The key cache behind the verifier, for the unknown-``kid`` refetch.
        staleness: How fresh the revocation state is; None when it is always trusted.
        fallback: ``Introspect`` for tokens checked while stale; None refuses them instead.
        ready: Whether the revocation state has caught up (no call is served before).
        metrics: Verification outcomes.
        dpop: The service's DPoP policy and proof verifier; bearer tokens only when None.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        keys: KeyCache,
        *,
        staleness: StalenessMonitor | None = None,
        fallback: IntrospectionFallback | None = None,
        ready: Callable[[], bool] = lambda: True,
        metrics: VerificationMetrics | None = None,
        dpop: ProofGate | None = None,
    ) -> None:
        self._verifier = verifier
        self._dpop = dpop if dpop is not None else ProofGate(DpopMode.OFF, None)
        self._keys = keys
        self._staleness = staleness
        self._fallback = fallback
        self._ready = ready
        self._metrics = metrics

    async def authenticate(
        self, token: str | None, *, dpop_scheme: bool = False, proof: str | None = None, method: str = ""
    ) -> AccessClaims:
        """Verify an access token, and the call's DPoP proof.

        Args:
            token: The token from the ``authorization`` metadata, or None when there was none.
            dpop_scheme: Whether it came as ``authorization: DPoP …`` rather than ``Bearer``.
            proof: The ``dpop`` metadata value.
            method: The gRPC method path (what the proof's ``htu`` must name).

        Returns:
            The verified claims.

        Raises:
            TokenRejected: The token is not acceptable (``UNAUTHENTICATED``).
            Unavailable: The service cannot decide now (``UNAVAILABLE``).
        """
        try:
            claims, degraded = await self._authenticate(token, dpop_scheme, proof, method)
        except AuthError as error:
            if self._metrics is not None:
                if isinstance(error, Unavailable):
                    self._metrics.unavailable(error.code)
                else:
                    self._metrics.rejected(error.code)
            raise
        if self._metrics is not None:
            self._metrics.accepted(degraded)
        return claims

    async def _authenticate(
        self, token: str | None, dpop_scheme: bool, proof: str | None, method: str
    ) -> tuple[AccessClaims, bool]:
        if not self._ready():
            raise Unavailable("revocation state still loading", code=REVOCATION_STATE_STALE)
        if token is None:
            raise TokenMissing()
        bound_to = self._dpop.proven_key(proof, method, dpop_scheme=dpop_scheme, access_token=token)
        try:
            claims = self._verifier.verify(token, bound_to=bound_to)
        except UnknownKey:
            # verify() decoded the token before asking for its key, so this cannot fail now.
            if not await self._keys.refresh_for(decode_compact(token).kid):
                raise
            claims = self._verifier.verify(token, bound_to=bound_to)
        staleness = self._staleness
        if staleness is None or not staleness.degraded:
            return claims, False
        if self._fallback is None:
            raise Unavailable("revocation state stale", code=REVOCATION_STATE_STALE)
        await self._fallback.check(token, claims)
        return claims, True


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the bearer token of every call that is not open, and enforces per-method scopes.

    Args:
        authenticator: Decides about each token.
        required_scopes: Full method name (``/pkg.Service/Method``) → scope the token must hold.
        open_methods: Full method names that need no token.
        open_prefixes: Method-name prefixes that need no token (health and reflection by default).
    """

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        required_scopes: Mapping[str, str] | None = None,
        open_methods: Collection[str] = (),
        open_prefixes: tuple[str, ...] = OPEN_SERVICE_PREFIXES,
    ) -> None:
        self._authenticator = authenticator
        self._required = dict(required_scopes or {})
        self._open = frozenset(open_methods)
        self._open_prefixes = open_prefixes
        # A refused call is the cheap path an attacker can drive at will: its handler is built once per
        # handler and reason, not per call.
        self._refusals: BoundedCache[tuple[RpcHandler, type[AuthError], str, str], RpcHandler] = (
            BoundedCache()
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> RpcHandler | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method in self._open or method.startswith(self._open_prefixes):
            return handler
        metadata = handler_call_details.invocation_metadata
        try:
            presented = presented_token(metadata)
            claims = await self._authenticator.authenticate(
                None if presented is None else presented[0],
                dpop_scheme=presented is not None and presented[1],
                proof=proof_from_metadata(metadata),
                method=method,
            )
            scope = self._required.get(method)
            if scope is not None and not claims.has_scope(scope):
                raise InsufficientScope(scope)
        except AuthError as error:
            return self._refusal(handler, error)
        _claims.set(claims)
        return handler

    def _refusal(self, handler: RpcHandler, error: AuthError) -> RpcHandler:
        if isinstance(error, RateLimited | DpopNonceRequired):  # its status carries a per-call value
            return _refusal(handler, error)
        key = (handler, type(error), error.code, error.message)
        refusal = self._refusals.get(key)
        if refusal is None:
            refusal = self._refusals.keep(key, _refusal(handler, error))
        return refusal


def _refusal(handler: RpcHandler, error: AuthError) -> RpcHandler:
    """A handler of the same kind that ends the call with the error's status."""
    status = to_grpc_status(error)

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # pragma: no cover - abort raises; the yield makes this a stream handler

    return rebuild_handler(handler, refuse_stream if handler.response_streaming else refuse)
