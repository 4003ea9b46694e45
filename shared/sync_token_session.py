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
from authmesh._shared.errors import SessionEnded, Unavailable
from authmesh._shared.session_rules import AUTHORIZATION, Grant, SessionRules, refused_as_expired, with_token
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
        self._channel = _sync_channel(self.auth_target, self._credentials, [], ())
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

    def metadata(self) -> tuple[tuple[str, str]]:
        """Call metadata carrying the current access token (for a call made without the interceptor)."""
        return ((AUTHORIZATION, f"Bearer {self.access_token()}"),)

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

    def interceptor(self) -> _SyncInterceptor:
        """A client interceptor for ``grpc.intercept_channel`` that attaches and renews the token."""
        return _SyncInterceptor(self)

    def call_credentials(self) -> grpc.CallCredentials:
        """Call credentials carrying the token, for a secure channel (renewed when due; no retry)."""
        return grpc.metadata_call_credentials(_TokenPlugin(self), name="authmesh")

    def channel(self, target: str, *, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``target`` whose calls carry this session's token (close it, or use ``with``)."""
        return _sync_channel(target, self._credentials, [self.interceptor()], options)

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
                if refresh_token is not None:
                    pair = self._api().Refresh(
                        auth_pb2.RefreshRequest(refresh_token=refresh_token), timeout=self._timeout
                    )
                else:
                    assert self._login is not None  # _plan ends a session without one
                    username, password, scopes = self._login
                    pair = self._api().Login(
                        auth_pb2.LoginRequest(username=username, password=password, scopes=list(scopes)),
                        timeout=self._timeout,
                    )
            except grpc.RpcError as error:
                raise self._refused(method, error) from error
            tokens = Tokens.from_pair(pair, self._clock())
            grant = self._store(tokens)
        if self._on_renew is not None:
            self._on_renew(tokens)
        return grant


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


def _sync_details(details: grpc.ClientCallDetails, token: str) -> _SyncDetails:
    return _SyncDetails(
        details.method,
        details.timeout,
        with_token(details.metadata, token),
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

    def __init__(self, session: SyncTokenSession) -> None:
        self._session = session

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        grant = self._session._current()
        outcome = continuation(_sync_details(client_call_details, grant.tokens.access_token), request)
        error = outcome.exception()
        if isinstance(error, grpc.RpcError) and refused_as_expired(error):
            renewed = self._session._renew(grant)
            return continuation(_sync_details(client_call_details, renewed.tokens.access_token), request)
        return outcome

    def _attach(self, continuation: Any, client_call_details: Any, request: Any, /) -> Any:
        return continuation(_sync_details(client_call_details, self._session.access_token()), request)

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
