"""Sessions that keep an access token fresh for the calls a service or a script makes.

A session logs in once (a user's password, or a service account's), then attaches its access token to
every call made through its channel and renews it:

- before it expires: a call made within ``renew_margin`` seconds of the token's end (at most half its
  lifetime) first spends the refresh token for a new pair (the refresh token rotates);
- when a server refuses it as expired: a unary call answered ``UNAUTHENTICATED`` with reason
  ``TOKEN_EXPIRED`` renews and is made again, once.

Renewal is single-flight: however many calls find the token due at once, one ``Refresh`` is made and
every call uses its result. A session the auth service refuses to renew (revoked, reused refresh token,
user revoked, wrong password) has ended: :class:`~authmesh._shared.errors.SessionEnded` is raised, then
and on every later call, without asking the auth service again, and a password is never used to open a
new session behind a revoked one. Only a refresh token that has simply run out of time is replaced by a
fresh login, and only when the session holds a password. An auth service that cannot be reached is an
:class:`~authmesh._shared.errors.Unavailable` for that call; the next call tries again.

:class:`TokenSession` is for ``grpc.aio`` code; :class:`SyncTokenSession` for ``grpc`` (threads). Both
decide with the same rules (:class:`_Grant`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Self, TypedDict, Unpack

import grpc
import structlog

from authmesh._shared.auth_api import AuthApi, Revocation, Tokens
from authmesh._shared.auth_client import channel_options
from authmesh._shared.errors import ConfigurationError, SessionEnded, TokenMissing, Unavailable
from authmesh._shared.grpc_errors import bearer_token, error_reason
from authmesh._shared.lifecycle import Startable
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc

DEFAULT_RENEW_MARGIN_SECONDS = 30.0
DEFAULT_TIMEOUT_SECONDS = 10.0
TOKEN_EXPIRED = "TOKEN_EXPIRED"
AUTHORIZATION = "authorization"
AUTH_TARGET_VARIABLE = "AUTHMESH_AUTH_TARGET"
CLIENT_ACCOUNT_VARIABLE = "AUTHMESH_CLIENT_ACCOUNT"
CLIENT_SCOPES_VARIABLE = "AUTHMESH_CLIENT_SCOPES"
_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Grant:
    """The tokens a session holds and when to renew them (Unix seconds)."""

    tokens: Tokens
    renew_at: float

    @classmethod
    def of(cls, tokens: Tokens, now: float, margin: float) -> _Grant:
        lifetime = max(tokens.expires_at - now, 0.0)
        return cls(tokens, tokens.expires_at - min(margin, lifetime / 2))

    def due(self, now: float) -> bool:
        return now >= self.renew_at


class SessionOptions(TypedDict, total=False):
    """How a session logs in and renews (keyword arguments of both sessions).

    Attributes:
        scopes: Scopes to ask for; empty asks for every scope the user holds.
        renew_margin: Renew when this many seconds of the access token are left (at most half its life).
        timeout: Deadline of each ``Login`` and ``Refresh``, seconds.
        credentials: Channel credentials for the auth service and the session's channels (TLS);
            None: insecure.
        on_renew: Called with every new token pair (to store it, say).
        clock: Unix seconds.
    """

    scopes: Sequence[str]
    renew_margin: float
    timeout: float
    credentials: grpc.ChannelCredentials | None
    on_renew: Callable[[Tokens], None] | None
    clock: Callable[[], float]


class _Login(NamedTuple):
    username: str
    password: str
    scopes: tuple[str, ...]


def service_account(value: str) -> tuple[str, str]:
    """``(username, password)`` from ``username:password`` (the ``AUTHMESH_SERVICE_ACCOUNT`` format).

    Raises:
        ConfigurationError: The value is not ``username:password``.
    """
    username, separator, password = value.partition(":")
    if not separator or not username or not password:
        raise ConfigurationError("a service account is written username:password")
    return username, password


class _Session:
    """What both sessions share: their settings, the rules for when and how to renew, and the failure
    that ends them (the arguments are documented on the two public classes)."""

    def __init__(
        self,
        auth_target: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tokens: Tokens | None = None,
        **options: Unpack[SessionOptions],
    ) -> None:
        scopes = options.get("scopes", ())
        renew_margin = options.get("renew_margin", DEFAULT_RENEW_MARGIN_SECONDS)
        clock = options.get("clock", time.time)
        if renew_margin < 0:
            raise ConfigurationError("renew_margin must not be negative")
        self.auth_target = auth_target
        self._login = _credentials(username, password, scopes, tokens)
        self._margin = renew_margin
        self._timeout = options.get("timeout", DEFAULT_TIMEOUT_SECONDS)
        self._credentials = options.get("credentials")
        self._on_renew = options.get("on_renew")
        self._clock = clock
        self._grant = None if tokens is None else _Grant.of(tokens, clock(), renew_margin)
        self._ended: SessionEnded | None = None
        self.renewals = 0
        self._setup()

    def _setup(self) -> None:
        """Build what the session calls the auth service with (not connected yet)."""
        raise NotImplementedError

    @classmethod
    def login(cls, auth_target: str, username: str, password: str, **options: Unpack[SessionOptions]) -> Self:
        """A session that logs in as ``username`` (on entry) and renews as needed."""
        return cls(auth_target, username=username, password=password, **options)

    @classmethod
    def from_service_account(cls, auth_target: str, account: str, **options: Unpack[SessionOptions]) -> Self:
        """A session of a service account given as ``username:password``."""
        username, password = service_account(account)
        return cls(auth_target, username=username, password=password, **options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **options: Unpack[SessionOptions]) -> Self:
        """A session configured by the environment, for twelve-factor services and scripts.

        Reads ``AUTHMESH_AUTH_TARGET`` (``host:port`` of the auth service), ``AUTHMESH_CLIENT_ACCOUNT``
        (``username:password`` of the account the program calls as) and, if set,
        ``AUTHMESH_CLIENT_SCOPES`` (space-separated scopes to ask for; unset: every scope it holds).

        Raises:
            ConfigurationError: A variable is missing or malformed.
        """
        target, account = environ.get(AUTH_TARGET_VARIABLE), environ.get(CLIENT_ACCOUNT_VARIABLE)
        if not target or not account:
            raise ConfigurationError(
                f"set {AUTH_TARGET_VARIABLE} (host:port) and {CLIENT_ACCOUNT_VARIABLE} (username:password)"
            )
        scopes = environ.get(CLIENT_SCOPES_VARIABLE)
        if scopes is not None and "scopes" not in options:
            options["scopes"] = tuple(scopes.split())
        return cls.from_service_account(target, account, **options)

    @classmethod
    def resume(cls, auth_target: str, tokens: Tokens, **options: Unpack[SessionOptions]) -> Self:
        """A session that continues from stored tokens (renewed with their refresh token only)."""
        return cls(auth_target, tokens=tokens, **options)

    @property
    def tokens(self) -> Tokens | None:
        """The current tokens, if the session has any yet."""
        return None if self._grant is None else self._grant.tokens

    def _held(self) -> _Grant:
        if self._ended is not None:
            raise self._ended
        if self._grant is None:
            raise SessionEnded("not logged in", code="NOT_LOGGED_IN")
        return self._grant

    def _fresh(self) -> _Grant | None:
        if self._ended is not None:
            raise self._ended
        grant = self._grant
        return grant if grant is not None and not grant.due(self._clock()) else None

    def _plan(self, stale: _Grant | None) -> tuple[_Grant | None, str | None]:
        """Under the renewal lock: (a grant someone else already renewed, or the refresh token to spend).

        Both None: log in (first use, or the refresh token has run out of time).
        """
        if self._ended is not None:
            raise self._ended
        current = self._grant
        if current is not None and current is not stale and not current.due(self._clock()):
            return current, None
        if current is not None and current.tokens.refresh_expires_at > self._clock():
            return None, current.tokens.refresh_token
        if self._login is None:
            self._ended = SessionEnded(
                "the refresh token has expired; log in again", code="REFRESH_TOKEN_EXPIRED"
            )
            raise self._ended
        return None, None

    def _store(self, tokens: Tokens) -> _Grant:
        self._grant = _Grant.of(tokens, self._clock(), self._margin)
        self.renewals += 1
        return self._grant

    def _refused(self, method: str, error: grpc.RpcError) -> Exception:
        """What a failed ``Login`` or ``Refresh`` means: an ended session, or an unreachable service."""
        code = error.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            reason = error_reason(error) or code.name
            self._ended = SessionEnded(
                f"the auth service refused {method} ({reason}); log in again", code=reason
            )
            _log.warning("session ended", method=method, reason=reason)
            return self._ended
        return Unavailable(
            f"auth service {self.auth_target} did not answer {method} ({code.name}: {error.details()})",
            code="AUTH_UNAVAILABLE",
        )


def _with_token(metadata: Iterable[tuple[str, Any]] | None, token: str) -> list[tuple[str, Any]]:
    kept = [(key, value) for key, value in (metadata or ()) if key != AUTHORIZATION]
    kept.append((AUTHORIZATION, f"Bearer {token}"))
    return kept


def _expired(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.UNAUTHENTICATED and error_reason(error) == TOKEN_EXPIRED


class TokenSession(_Session, Startable):
    """A logged-in session for ``grpc.aio`` clients: tokens attached to every call, renewed in time.

    Build one with :meth:`login`, :meth:`from_service_account`, :meth:`from_env` or :meth:`resume`,
    enter it (``async with``), then open channels with :meth:`channel` or pass :meth:`interceptors` to
    ``grpc.aio.*_channel(..., interceptors=...)``::

        async with TokenSession.login("auth:50051", "alice", password) as session:
            async with session.channel("docs:50061") as channel:
                reply = await DocsStub(channel).Get(request)

    Args:
        auth_target: ``host:port`` of the auth service.
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

    async def metadata(self) -> tuple[tuple[str, str]]:
        """Call metadata carrying the current access token (for a call made without the interceptors)."""
        return ((AUTHORIZATION, f"Bearer {await self.access_token()}"),)

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

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Client interceptors that attach the token to every call (and renew it on ``TOKEN_EXPIRED``)."""
        return [_AioUnaryUnary(self), _AioUnaryStream(self), _AioStreamUnary(self), _AioStreamStream(self)]

    def channel(self, target: str, *, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A channel to ``target`` whose calls carry this session's token (close it or ``async with`` it)."""
        merged = [*channel_options(), *options]
        if self._credentials is None:
            return grpc.aio.insecure_channel(target, options=merged, interceptors=self.interceptors())
        return grpc.aio.secure_channel(
            target, self._credentials, options=merged, interceptors=self.interceptors()
        )

    async def _current(self) -> _Grant:
        return self._fresh() or await self._renew(self._grant)

    async def _renew(self, stale: _Grant | None) -> _Grant:
        async with self._lock:
            current, refresh_token = self._plan(stale)
            if current is not None:
                return current
            method = "Refresh" if refresh_token is not None else "Login"
            try:
                if refresh_token is not None:
                    tokens = await self._api.refresh(refresh_token)
                else:
                    assert self._login is not None  # _plan ends a session without one
                    tokens = await self._api.login(*self._login)
            except grpc.aio.AioRpcError as error:
                raise self._refused(method, error) from error
            grant = self._store(tokens)
        if self._on_renew is not None:
            self._on_renew(tokens)
        return grant


class SyncTokenSession(_Session):
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

    def _current(self) -> _Grant:
        return self._fresh() or self._renew(self._grant)

    def _renew(self, stale: _Grant | None) -> _Grant:
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


def _credentials(
    username: str | None, password: str | None, scopes: Sequence[str], tokens: Tokens | None
) -> _Login | None:
    if (username is None) != (password is None):
        raise ConfigurationError("give both a username and a password, or neither")
    if username is None or password is None:
        if tokens is None:
            raise ConfigurationError("a session needs a username and password, or tokens to resume")
        return None
    return _Login(username, password, tuple(scopes))


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


def forward_token(
    context: grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any],
) -> tuple[tuple[str, str]]:
    """The caller's bearer token as metadata for a downstream call, from inside a protected handler.

    The downstream service must accept the same audience (it is the caller's token, unchanged); its
    own verification and revocation checks apply as they did here.

    Args:
        context: The handler's servicer context (sync or ``grpc.aio``).

    Returns:
        Metadata to pass as ``metadata=`` to the downstream call.

    Raises:
        TokenMissing: The call carried no bearer token (an open method, say).
    """
    token = bearer_token(context.invocation_metadata())
    if token is None:
        raise TokenMissing("no bearer token to forward")
    return ((AUTHORIZATION, f"Bearer {token}"),)


# --- grpc.aio interceptors -----------------------------------------------------------------------------


def _aio_details(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*_with_token(details.metadata, token)),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, session: TokenSession) -> None:
        self._session = session

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        grant = await self._session._current()
        call = await continuation(_aio_details(client_call_details, grant.tokens.access_token), request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            if not _expired(error):
                return call
            # The server's clock (or lifetime) ended the token before ours did: renew once, call again.
            renewed = await self._session._renew(grant)
            return await continuation(_aio_details(client_call_details, renewed.tokens.access_token), request)
        return call


class _AioAttach:
    """Attaches the session's token (renewed when due) to a streaming call; no retry on a stream."""

    def __init__(self, session: TokenSession) -> None:
        self._session = session

    async def _attach(self, continuation: Any, client_call_details: Any, request: Any, /) -> Any:
        token = await self._session.access_token()
        return await continuation(_aio_details(client_call_details, token), request)


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
        _with_token(details.metadata, token),
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
        if isinstance(error, grpc.RpcError) and _expired(error):
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


__all__ = [
    "SyncTokenSession",
    "TokenSession",
    "forward_token",
    "service_account",
]
