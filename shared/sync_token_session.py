"""The renewing session for sync ``grpc`` clients (thread-safe), its interceptor and call credentials.

The rules (when to renew, what ends a session) are :mod:`authmesh._shared.session_rules`.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from authmesh._shared.auth_api import Revocation, Tokens
from authmesh._shared.auth_client import channel_options
from authmesh._shared.dpop import DPOP_METADATA_KEY, LOGIN_METHOD, REFRESH_METHOD, default_origin
from authmesh._shared.errors import ConfigurationError, SessionEnded, Unavailable
from authmesh._shared.grpc_targets import balanced_target, client_channel_options
from authmesh._shared.session_rules import AUTHORIZATION, Grant, SessionRules, refused_as_expired
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc


class SyncTokenSession(SessionRules):
    """A logged-in session for ``grpc`` (sync) clients; the same rules as :class:`TokenSession`.

    Thread-safe: calls from many threads share one token and one renewal::

        with SyncTokenSession.login("auth:50051", "alice", password) as session:
            with session.channel("docs:50061") as channel:
                reply = DocsStub(channel).Get(request)

    Takes the same arguments as :class:`TokenSession`.
    """

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: auth_pb2_grpc.AuthServiceStub | None = None

    def __enter__(self) -> Self:
        target = balanced_target(self.auth_target)
        self._channel = _sync_channel(target, self._credentials, [], client_channel_options(self.auth_target))
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        try:
            self.access_token()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel to the auth service (the session is not revoked: see :meth:`logout`)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def access_token(self) -> str:
        """The current access token, renewed first when it is due.

        Raises:
            SessionEnded: The auth service refused to renew the session.
            Unavailable: The auth service could not be reached.
        """
        return self._current().tokens.access_token

    def metadata(
        self, method: str | None = None, *, origin: str | None = None
    ) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the current access token (for a call made without the interceptor).

        A session bound to a DPoP key needs the call's ``method`` and the service's ``origin``.

        Raises:
            ValueError: A bound session without ``method`` and ``origin``.
        """
        token = self.access_token()
        if self._dpop_key is None:
            return ((AUTHORIZATION, f"Bearer {token}"),)
        if method is None or origin is None:
            raise ValueError("a DPoP-bound session needs the call's method and origin for its proof")
        return tuple(self._call_metadata((), method, token, origin))

    def renew(self) -> Tokens:
        """Renew now, whatever the token's age; returns the new pair."""
        return self._renew(self._grant).tokens

    def logout(self) -> Revocation:
        """Revoke the session at the auth service; the session cannot be used afterwards.

        Raises:
            grpc.RpcError: The auth service refused (the session had ended) or was unreachable.
        """
        response = self._api().Logout(
            auth_pb2.LogoutRequest(refresh_token=self._held().tokens.refresh_token), timeout=self._timeout
        )
        self._ended = SessionEnded("logged out", code="LOGGED_OUT")
        return Revocation(revoked_at_unix_ms=response.revoked_at_unix_ms, event_id=response.event_id)

    def interceptor(self, origin: str = "") -> _SyncInterceptor:
        """A client interceptor for ``grpc.intercept_channel`` that attaches and renews the token.

        Args:
            origin: The service's ``scheme://host:port``, for the DPoP proofs of a bound session.
        """
        return _SyncInterceptor(self, origin)

    def call_credentials(self) -> grpc.CallCredentials:
        """Call credentials carrying the token, for a secure channel (renewed when due; no retry).

        Raises:
            ConfigurationError: The session is bound to a DPoP key (use :meth:`channel` or
                :meth:`interceptor`, which make a proof per call).
        """
        if self._dpop_key is not None:
            raise ConfigurationError(
                "a DPoP-bound session attaches its proofs with channel() or interceptor()"
            )
        return grpc.metadata_call_credentials(_TokenPlugin(self), name="authmesh")

    def channel(
        self, target: str, *, options: Sequence[tuple[str, Any]] = (), origin: str | None = None
    ) -> grpc.Channel:
        """A channel to ``target`` whose calls carry this session's token (close it, or use ``with``).

        Args:
            target: ``host:port``.
            options: Channel options.
            origin: The service's name for DPoP proofs (default ``http(s)://<target>``).
        """
        chosen = origin or default_origin(target, secure=self._credentials is not None)
        return _sync_channel(target, self._credentials, [self.interceptor(chosen)], options)

    def _api(self) -> auth_pb2_grpc.AuthServiceStub:
        if self._stub is None:
            raise Unavailable("the session is closed", code="AUTH_UNAVAILABLE")
        return self._stub

    def _current(self) -> Grant:
        return self._fresh() or self._renew(self._grant)

    def _renew(self, stale: Grant | None) -> Grant:
        with self._lock:
            current, refresh_token = self._plan(stale)
            if current is not None:
                return current
            method = "Refresh" if refresh_token is not None else "Login"
            try:
                pair = self._ask(refresh_token)
            except grpc.RpcError as error:
                if not self._take_nonce(error, self._auth_origin):
                    raise self._refused(method, error) from error
                try:
                    pair = self._ask(refresh_token)
                except grpc.RpcError as again:
                    raise self._refused(method, again) from again
            tokens = Tokens.from_pair(pair, self._clock())
            grant = self._store(tokens)
        if self._on_renew is not None:
            self._on_renew(tokens)
        return grant

    def _ask(self, refresh_token: str | None) -> auth_pb2.TokenPair:
        if refresh_token is not None:
            proof = self._auth_proof(REFRESH_METHOD)
            return self._api().Refresh(
                auth_pb2.RefreshRequest(refresh_token=refresh_token),
                timeout=self._timeout,
                metadata=() if proof is None else ((DPOP_METADATA_KEY, proof),),
            )
        assert self._login is not None  # _plan ends a session without one
        username, password, scopes = self._login
        proof = self._auth_proof(LOGIN_METHOD)
        return self._api().Login(
            auth_pb2.LoginRequest(username=username, password=password, scopes=list(scopes)),
            timeout=self._timeout,
            metadata=() if proof is None else ((DPOP_METADATA_KEY, proof),),
        )


def _sync_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    interceptors: list[grpc.UnaryUnaryClientInterceptor],
    options: Sequence[tuple[str, Any]],
) -> grpc.Channel:
    merged = [*channel_options(), *options]
    if credentials is None:
        channel = grpc.insecure_channel(target, options=merged)
    else:
        channel = grpc.secure_channel(target, credentials, options=merged)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


# --- grpc (sync) -------------------------------------------------------------------------------------


class _SyncDetails(
    collections.namedtuple(
        "_SyncDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


def _sync_details(
    session: SyncTokenSession, details: grpc.ClientCallDetails, token: str, origin: str
) -> _SyncDetails:
    return _SyncDetails(
        details.method,
        details.timeout,
        session._call_metadata(details.metadata, details.method, token, origin),
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class _SyncInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Attaches the session's token; a unary call refused with ``TOKEN_EXPIRED`` renews and runs again."""

    def __init__(self, session: SyncTokenSession, origin: str) -> None:
        self._session = session
        self._origin = origin

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        session, origin = self._session, self._origin
        grant = session._current()
        token = grant.tokens.access_token
        outcome = continuation(_sync_details(session, client_call_details, token, origin), request)
        error = outcome.exception()
        if not isinstance(error, grpc.RpcError):
            return outcome
        if refused_as_expired(error):
            token = session._renew(grant).tokens.access_token
        elif not session._take_nonce(error, origin):
            return outcome
        # Once more, with the renewed token or with the nonce the service asked for.
        return continuation(_sync_details(session, client_call_details, token, origin), request)

    def _attach(self, continuation: Any, client_call_details: Any, request: Any, /) -> Any:
        session = self._session
        return continuation(
            _sync_details(session, client_call_details, session.access_token(), self._origin), request
        )

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._attach(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._attach(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._attach(continuation, client_call_details, request_iterator)


class _TokenPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, session: SyncTokenSession) -> None:
        self._session = session

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            token = self._session.access_token()
        except Exception as error:  # the plugin must answer through the callback, never raise
            callback((), error)
            return
        callback(((AUTHORIZATION, f"Bearer {token}"),), None)
