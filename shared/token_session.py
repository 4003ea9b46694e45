"""The renewing session for ``grpc.aio`` clients, and the client interceptors that attach its token.

The rules (when to renew, what ends a session) are :mod:`authmesh._shared.session_rules`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from authmesh._shared.auth_api import AuthApi, Revocation, Tokens
from authmesh._shared.auth_client import channel_options
from authmesh._shared.dpop import LOGIN_METHOD, REFRESH_METHOD, default_origin
from authmesh._shared.errors import SessionEnded
from authmesh._shared.lifecycle import Startable
from authmesh._shared.session_rules import AUTHORIZATION, Grant, SessionRules, refused_as_expired


class TokenSession(SessionRules, Startable):
    """A logged-in session for ``grpc.aio`` clients: tokens attached to every call, renewed in time.

    Build one with :meth:`login`, :meth:`from_service_account`, :meth:`from_env` or :meth:`resume`,
    enter it (``async with``), then open channels with :meth:`channel` or pass :meth:`interceptors` to
    ``grpc.aio.*_channel(..., interceptors=...)``::

        async with TokenSession.login("auth:50051", "alice", password) as session:
            async with session.channel("docs:50061") as channel:
                reply = await DocsStub(channel).Get(request)

    Args:
        auth_target: ``host:port`` of the auth service, or several ``ip:port`` separated by commas
            (balanced over those that are up).
        username: Who to log in as (None for a session resumed from stored tokens only).
        password: Their password.
        tokens: Tokens to start from (a stored login) instead of logging in.
        **options: See :class:`SessionOptions` (scopes, renew_margin, timeout, credentials, ...).
    """

    def _setup(self) -> None:
        self._api = AuthApi(
            self.auth_target, timeout=self._timeout, credentials=self._credentials, clock=self._clock
        )
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        self._api.open()
        await self.access_token()

    async def aclose(self) -> None:
        """Close the channel to the auth service (the session is not revoked: see :meth:`logout`)."""
        await self._api.aclose()

    async def access_token(self) -> str:
        """The current access token, renewed first when it is due.

        Raises:
            SessionEnded: The auth service refused to renew the session.
            Unavailable: The auth service could not be reached.
        """
        return (await self._current()).tokens.access_token

    async def metadata(
        self, method: str | None = None, *, origin: str | None = None
    ) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the current access token (for a call made without the interceptors).

        A session bound to a DPoP key needs the call's ``method`` (``/package.Service/Method``) and the
        service's ``origin`` for the proof.

        Raises:
            ValueError: A bound session without ``method`` and ``origin``.
        """
        token = await self.access_token()
        if self._dpop_key is None:
            return ((AUTHORIZATION, f"Bearer {token}"),)
        if method is None or origin is None:
            raise ValueError("a DPoP-bound session needs the call's method and origin for its proof")
        return tuple(self._call_metadata((), method, token, origin))

    async def renew(self) -> Tokens:
        """Renew now, whatever the token's age; returns the new pair."""
        return (await self._renew(self._grant)).tokens

    async def logout(self) -> Revocation:
        """Revoke the session at the auth service; the session cannot be used afterwards.

        Raises:
            grpc.aio.AioRpcError: The auth service refused (the session had ended) or was unreachable.
        """
        revocation = await self._api.logout(self._held().tokens.refresh_token)
        self._ended = SessionEnded("logged out", code="LOGGED_OUT")
        return revocation

    def interceptors(self, origin: str = "") -> list[grpc.aio.ClientInterceptor]:
        """Client interceptors that attach the token to every call (and renew it on ``TOKEN_EXPIRED``).

        Args:
            origin: The service's ``scheme://host:port``, for the DPoP proofs of a bound session.
        """
        return [
            _AioUnaryUnary(self, origin),
            _AioUnaryStream(self, origin),
            _AioStreamUnary(self, origin),
            _AioStreamStream(self, origin),
        ]

    def channel(
        self, target: str, *, options: Sequence[tuple[str, Any]] = (), origin: str | None = None
    ) -> grpc.aio.Channel:
        """A channel to ``target`` whose calls carry this session's token (close it or ``async with`` it).

        Args:
            target: ``host:port``.
            options: Channel options.
            origin: The service's name for DPoP proofs (default ``http(s)://<target>``).
        """
        merged = [*channel_options(), *options]
        secure = self._credentials is not None
        interceptors = self.interceptors(origin or default_origin(target, secure=secure))
        if self._credentials is None:
            return grpc.aio.insecure_channel(target, options=merged, interceptors=interceptors)
        return grpc.aio.secure_channel(target, self._credentials, options=merged, interceptors=interceptors)

    async def _current(self) -> Grant:
        return self._fresh() or await self._renew(self._grant)

    async def _renew(self, stale: Grant | None) -> Grant:
        async with self._lock:
            current, refresh_token = self._plan(stale)
            if current is not None:
                return current
            method = "Refresh" if refresh_token is not None else "Login"
            try:
                tokens = await self._ask(refresh_token)
            except grpc.aio.AioRpcError as error:
                if not self._take_nonce(error, self._auth_origin):
                    raise self._refused(method, error) from error
                try:
                    tokens = await self._ask(refresh_token)
                except grpc.aio.AioRpcError as again:
                    raise self._refused(method, again) from again
            grant = self._store(tokens)
        if self._on_renew is not None:
            self._on_renew(tokens)
        return grant

    async def _ask(self, refresh_token: str | None) -> Tokens:
        if refresh_token is not None:
            return await self._api.refresh(refresh_token, dpop=self._auth_proof(REFRESH_METHOD))
        assert self._login is not None  # _plan ends a session without one
        return await self._api.login(*self._login, dpop=self._auth_proof(LOGIN_METHOD))


# --- grpc.aio interceptors -----------------------------------------------------------------------------


def _aio_details(
    session: TokenSession, details: grpc.aio.ClientCallDetails, token: str, origin: str
) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*session._call_metadata(details.metadata, details.method, token, origin)),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, session: TokenSession, origin: str) -> None:
        self._session = session
        self._origin = origin

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        session, origin = self._session, self._origin
        grant = await session._current()
        token = grant.tokens.access_token
        call = await continuation(_aio_details(session, client_call_details, token, origin), request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            if refused_as_expired(error):
                # The server's clock (or lifetime) ended the token before ours did: renew once, call again.
                token = (await session._renew(grant)).tokens.access_token
            elif not session._take_nonce(error, origin):
                return call
            # Once more, with the renewed token or with the nonce the service asked for.
            return await continuation(_aio_details(session, client_call_details, token, origin), request)
        return call


class _AioAttach:
    """Attaches the session's token (renewed when due) to a streaming call; no retry on a stream."""

    def __init__(self, session: TokenSession, origin: str) -> None:
        self._session = session
        self._origin = origin

    async def _attach(self, continuation: Any, client_call_details: Any, request: Any, /) -> Any:
        token = await self._session.access_token()
        return await continuation(
            _aio_details(self._session, client_call_details, token, self._origin), request
        )


class _AioUnaryStream(_AioAttach, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._attach(continuation, client_call_details, request)


class _AioStreamUnary(_AioAttach, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._attach(continuation, client_call_details, request_iterator)


class _AioStreamStream(_AioAttach, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._attach(continuation, client_call_details, request_iterator)
