"""The gRPC server interceptors (``grpc.aio`` and sync ``grpc.server``) that verify bearer tokens locally.

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

The interceptor then checks what the method needs (:mod:`authmesh._shared.scopes`; with a policy, a
method it does not list is refused) and hands the verified claims to the handler through a context
variable (:func:`current_claims`): each aio call runs in its own task, and the sync interceptor clears
the variable when its call ends, so it never leaks from one call to another. Errors become statuses
through :mod:`authmesh._shared.grpc_errors`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol, cast

import grpc

from authmesh._shared.claims import AccessClaims
from authmesh._shared.dpop import HTTP_METHOD, DpopMode, ProofGate, proof_from_metadata
from authmesh._shared.errors import (
    AuthError,
    ConfigurationError,
    DpopNonceRequired,
    RateLimited,
    TokenMissing,
    Unavailable,
    UnknownKey,
)
from authmesh._shared.grpc_errors import presented_token, to_grpc_status
from authmesh._shared.grpc_handlers import (
    BoundedCache,
    Continuation,
    RpcHandler,
    WrappedHandlers,
    rebuild_handler,
)
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.metrics import VerificationMetrics
from authmesh._shared.scopes import OPEN_SERVICE_PREFIXES, AccessPolicy
from authmesh._shared.staleness import REVOCATION_STATE_STALE, IntrospectionFallback, StalenessMonitor
from authmesh._shared.verifier import TokenVerifier

# OPEN_SERVICE_PREFIXES lives with the policy; importers of this module keep finding it here.
__all__ = [
    "OPEN_SERVICE_PREFIXES",
    "AuthInterceptor",
    "Authenticator",
    "SyncAuthInterceptor",
    "bind_claims",
    "current_claims",
]

# A refusal's handler depends on the handler it stands in for and on the error's class, code and text.
_RefusalKey = tuple[RpcHandler, type[AuthError], str, str]

RunOnLoop = Callable[[Coroutine[Any, Any, Any]], Any]
"""Runs a coroutine on the guard's event loop from another thread and returns its result."""

_claims: ContextVar[AccessClaims | None] = ContextVar("authmesh_claims", default=None)


def bind_claims(claims: AccessClaims | None) -> None:
    """Make ``claims`` what :func:`current_claims` returns in this context (None: no call)."""
    _claims.set(claims)


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
        self,
        token: str | None,
        *,
        dpop_scheme: bool = False,
        proof: str | None = None,
        method: str = "",
        htm: str = HTTP_METHOD,
    ) -> AccessClaims:
        """Verify an access token, and the call's DPoP proof.

        Args:
            token: The token from the ``authorization`` metadata, or None when there was none.
            dpop_scheme: Whether it came as ``authorization: DPoP …`` rather than ``Bearer``.
            proof: The ``dpop`` metadata value.
            method: The gRPC method path, or an HTTP request's path (what the proof's ``htu`` names).
            htm: The HTTP method the proof must name (``POST`` for gRPC, the request's for HTTP).

        Returns:
            The verified claims.

        Raises:
            TokenRejected: The token is not acceptable (``UNAUTHENTICATED``).
            Unavailable: The service cannot decide now (``UNAVAILABLE``).
        """
        try:
            presented, bound_to = self._proven(token, dpop_scheme, proof, method, htm)
            claims, degraded = await self._verified(presented, bound_to)
        except AuthError as error:
            raise self._refused(error) from None
        return self._accepted(claims, degraded)

    def authenticate_blocking(
        self,
        token: str | None,
        run: RunOnLoop,
        *,
        dpop_scheme: bool = False,
        proof: str | None = None,
        method: str = "",
    ) -> AccessClaims:
        """Verify an access token and the call's DPoP proof from a thread that is not the event loop's
        (a sync gRPC server's).

        The usual case (a known key, a fresh revocation state) is decided right here, without I/O; only
        an unknown ``kid`` or a stale state goes to the event loop, through ``run``. The proof is checked
        (and spent) here, once.

        Args:
            token: The token from the ``authorization`` metadata, or None when there was none.
            run: Runs a coroutine on the event loop that owns the key cache and the fallback, and returns
                its result (raising :class:`Unavailable` when it takes too long).
            dpop_scheme: As for :meth:`authenticate`.
            proof: As for :meth:`authenticate`.
            method: As for :meth:`authenticate`.

        Raises:
            TokenRejected: The token is not acceptable (``UNAUTHENTICATED``).
            Unavailable: The service cannot decide now (``UNAVAILABLE``).
        """
        try:
            presented, bound_to = self._proven(token, dpop_scheme, proof, method)
            claims, degraded = self._decide_locally(presented, bound_to), False
            if claims is None:
                claims, degraded = run(self._verified(presented, bound_to))
        except AuthError as error:
            raise self._refused(error) from None
        return self._accepted(claims, degraded)

    def _decide_locally(self, token: str, bound_to: str | None) -> AccessClaims | None:
        """The claims when no I/O is needed to decide; None when the auth service must be asked."""
        try:
            claims = self._verifier.verify(token, bound_to=bound_to)
        except UnknownKey:
            return None
        staleness = self._staleness
        if staleness is not None and staleness.degraded:
            return None
        return claims

    def _proven(
        self, token: str | None, dpop_scheme: bool, proof: str | None, method: str, htm: str = HTTP_METHOD
    ) -> tuple[str, str | None]:
        """The token, if there is one and the revocation state is ready to judge it, and the ``jkt``
        its DPoP proof proved (None for a bearer call the policy allows)."""
        if not self._ready():
            raise Unavailable("revocation state still loading", code=REVOCATION_STATE_STALE)
        if token is None:
            raise TokenMissing()
        bound_to = self._dpop.proven_key(proof, method, dpop_scheme=dpop_scheme, access_token=token, htm=htm)
        return token, bound_to

    def _accepted(self, claims: AccessClaims, degraded: bool) -> AccessClaims:
        if self._metrics is not None:
            self._metrics.accepted(degraded)
        return claims

    def _refused(self, error: AuthError) -> AuthError:
        if self._metrics is not None:
            if isinstance(error, Unavailable):
                self._metrics.unavailable(error.code)
            else:
                self._metrics.rejected(error.code)
        return error

    async def _verified(self, token: str, bound_to: str | None) -> tuple[AccessClaims, bool]:
        try:
            claims = self._verifier.verify(token, bound_to=bound_to)
        except UnknownKey as unknown:
            if not await self._keys.refresh_for(unknown.kid):
                raise
            claims = self._verifier.verify(token, bound_to=bound_to)
        staleness = self._staleness
        if staleness is None or not staleness.degraded:
            return claims, False
        if self._fallback is None:
            raise Unavailable("revocation state stale", code=REVOCATION_STATE_STALE)
        await self._fallback.check(token, claims)
        return claims, True


class TokenAuthenticator(Protocol):
    """Decides about an access token on the server's event loop (:class:`Authenticator`, a guard)."""

    async def authenticate(
        self,
        token: str | None,
        *,
        dpop_scheme: bool = False,
        proof: str | None = None,
        method: str = "",
        htm: str = HTTP_METHOD,
    ) -> AccessClaims:
        """The verified claims, or an :class:`AuthError`."""
        ...


class BlockingTokenAuthenticator(Protocol):
    """Decides about an access token from a sync server's worker thread (a guard entered with ``with``)."""

    def authenticate_blocking(
        self, token: str | None, *, dpop_scheme: bool = False, proof: str | None = None, method: str = ""
    ) -> AccessClaims:
        """The verified claims, or an :class:`AuthError`."""
        ...


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The ``grpc.aio`` server interceptor: verifies every call that is not open, against the policy.

    Args:
        authenticator: Decides about each token.
        policy: Which methods are open and what the others need; any valid token for every method
            that is not open by default.
    """

    def __init__(self, authenticator: TokenAuthenticator, policy: AccessPolicy | None = None) -> None:
        self._authenticator = authenticator
        self._gate = policy or AccessPolicy()
        # A refused call is the cheap path an attacker can drive at will: its handler is built once per
        # handler and reason, not per call.
        self._refusals: BoundedCache[_RefusalKey, RpcHandler] = BoundedCache()

    def intercept_service(  # returns the coroutine grpc.aio awaits
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Coroutine[Any, Any, RpcHandler | None]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # A sync grpc.server calls this from a plain thread and would wait on the coroutine forever.
            raise ConfigurationError(
                "AuthInterceptor is for grpc.aio servers; a sync grpc.server needs "
                "ResourceGuard.sync_interceptor() (entered with `with guard:`)"
            ) from None
        return self._intercept(continuation, handler_call_details)

    async def _intercept(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> RpcHandler | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or self._gate.is_open(method):
            return handler
        try:
            token, dpop_scheme, proof = presented_credentials(handler_call_details.invocation_metadata)
            claims = await self._authenticator.authenticate(
                token, dpop_scheme=dpop_scheme, proof=proof, method=method
            )
            self._gate.requirement(method).check(claims)
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


class SyncAuthInterceptor(grpc.ServerInterceptor):
    """The sync ``grpc.server`` interceptor: the same decision as :class:`AuthInterceptor`.

    The check runs in the server's worker thread, inside the handler it wraps, so :func:`current_claims`
    works in sync handlers. The usual case is decided in that thread without I/O; an unknown ``kid`` or
    a stale revocation state is handed to the guard's event loop (running in its own thread) and waited
    for with a deadline, so no call hangs.

    Args:
        authenticator: Decides about each token (deciding what needs I/O on the guard's event loop).
        policy: As for :class:`AuthInterceptor`.
    """

    def __init__(self, authenticator: BlockingTokenAuthenticator, policy: AccessPolicy | None = None) -> None:
        self._authenticator = authenticator
        self._gate = policy or AccessPolicy()
        self._wrapped = WrappedHandlers(self._guarded)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], RpcHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> RpcHandler | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or self._gate.is_open(method):
            return handler
        return self._wrapped.get(handler, method)

    def _admit(self, method: str, context: grpc.ServicerContext) -> AccessClaims:
        """The caller's claims, or the call ends here with the refusal's status."""
        try:
            token, dpop_scheme, proof = presented_credentials(context.invocation_metadata())
            claims = self._authenticator.authenticate_blocking(
                token, dpop_scheme=dpop_scheme, proof=proof, method=method
            )
            self._gate.requirement(method).check(claims)
        except AuthError as error:
            context.abort_with_status(to_grpc_status(error))
            raise AssertionError("unreachable: abort_with_status raises") from None  # pragma: no cover
        return claims

    def _guarded(self, handler: RpcHandler, method: str) -> RpcHandler:
        behavior = cast(
            Callable[..., Any],
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream,
        )
        admit = self._admit

        # Worker threads are reused: the claims are cleared when the call ends, not left for the next.
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            _claims.set(admit(method, context))
            try:
                return behavior(request, context)
            finally:
                _claims.set(None)

        def guarded_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            _claims.set(admit(method, context))
            try:
                yield from behavior(request, context)
            finally:
                _claims.set(None)

        return rebuild_handler(handler, guarded_stream if handler.response_streaming else guarded)


def presented_credentials(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> tuple[str | None, bool, str | None]:
    """A call's access token, whether it came under the DPoP scheme, and its DPoP proof.

    Raises:
        DpopRejected: More than one proof, or a binary one.
    """
    presented = presented_token(metadata)
    proof = proof_from_metadata(metadata)
    return (None, False, proof) if presented is None else (presented[0], presented[1], proof)


def _refusal(handler: RpcHandler, error: AuthError) -> RpcHandler:
    """A handler of the same kind that ends the call with the error's status."""
    status = to_grpc_status(error)

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # pragma: no cover - abort raises; the yield makes this a stream handler

    return rebuild_handler(handler, refuse_stream if handler.response_streaming else refuse)
