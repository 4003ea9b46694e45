"""The auth service as a resource service sees it: keys, introspection and the revocation snapshot.

``GetJwks`` is open to anyone. ``Introspect`` and ``SnapshotRevocations`` need a token with scope
``service``: the client logs in with the configured service account when it first needs one and keeps
the token fresh with ``Refresh`` (logging in again when the refresh token is refused). Every failure to
reach the auth service or to get an answer from it is an
:class:`~authmesh._shared.errors.Unavailable`, so callers fail closed on one exception type.

A ``Login`` checks a password with Argon2id, which takes far longer than any other call, the more so on
a busy host: it gets its own deadline, doubled after each ``DEADLINE_EXCEEDED`` (up to a ceiling). A
``RATE_LIMITED`` answer is respected: no ``Login`` is sent until the window it names has passed, and the
``Unavailable`` raised meanwhile carries the seconds left, which the token refresher's backoff waits out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import grpc
import structlog

from authmesh._shared.backoff import backoff
from authmesh._shared.denylist import SnapshotChunk
from authmesh._shared.errors import Unavailable
from authmesh._shared.events import SessionRevokedEvent, UserRevokedEvent
from authmesh._shared.grpc_errors import retry_after as asked_retry_after
from authmesh._shared.grpc_targets import balanced_channel_options, balanced_target
from authmesh._shared.lifecycle import raise_if_cancelled
from authmesh._shared.staleness import Introspection
from authmesh._shared.tls import TlsFiles, open_channel
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc

AUTH_UNAVAILABLE = "AUTH_UNAVAILABLE"
SERVICE_SCOPE = "service"
# Renew the service token when this share of its lifetime is left.
_RENEW_AT_REMAINING = 1 / 3
_MIN_RENEW_SECONDS = 1.0
DEFAULT_LOGIN_TIMEOUT_SECONDS = 10.0
# A Login that timed out doubles the next one's deadline up to this: a check that slow means trouble.
MAX_LOGIN_TIMEOUT_SECONDS = 60.0
_log = structlog.get_logger(__name__)


def channel_options() -> list[tuple[str, int]]:
    """Client channel options: keepalive the servers permit, and quick reconnects after an outage."""
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


@dataclass(frozen=True, slots=True)
class _ServiceToken:
    access_token: str
    refresh_token: str
    renew_at: float
    expires_at: float


class AuthClient:
    """An async client for the auth service, used by resource services.

    Args:
        target: ``host:port`` of the auth service, or several, comma-separated (balanced round-robin).
        service_account: ``(username, password)`` for ``Introspect`` and ``SnapshotRevocations``; an
            empty password logs in by the client certificate in ``tls`` (an auth service that maps
            the certificate to the account, see :mod:`authmesh._shared.certificate_identity`).
        timeout: Deadline of one unary call, seconds.
        login_timeout: Deadline of the service account's first ``Login``, seconds (an Argon2id check).
        snapshot_timeout: Deadline of a whole ``SnapshotRevocations`` stream, seconds.
        clock: Monotonic seconds.
        tls: The CA to verify the auth service against (and this service's certificate for mutual
            TLS); plaintext without a CA.
    """

    def __init__(
        self,
        target: str,
        *,
        service_account: tuple[str, str] | None = None,
        timeout: float = 2.0,
        login_timeout: float = DEFAULT_LOGIN_TIMEOUT_SECONDS,
        snapshot_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
    ) -> None:
        self._targets = target
        self._target = balanced_target(target)
        self._tls = tls
        self._account = service_account
        self._timeout = timeout
        self._login_timeout = min(login_timeout, MAX_LOGIN_TIMEOUT_SECONDS)
        self._login_not_before = 0.0
        self._snapshot_timeout = snapshot_timeout
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._stub: auth_pb2_grpc.AuthServiceAsyncStub | None = None
        self._token: _ServiceToken | None = None
        self._renew_lock = asyncio.Lock()
        self._renewed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._channel = open_channel(
            self._target, self._tls, [*channel_options(), *balanced_channel_options(self._targets)]
        )
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace=None)

    async def get_jwks(self) -> str:
        """The JWK Set as JSON text.

        Raises:
            Unavailable: The auth service could not be reached.
        """
        try:
            response = await self._api().GetJwks(auth_pb2.GetJwksRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise _unavailable("GetJwks", error, self._target) from error
        return response.jwks_json

    async def introspect(self, token: str) -> Introspection:
        """Ask the auth service whether ``token`` is active.

        Raises:
            Unavailable: No service account, or the auth service could not answer.
        """
        request = auth_pb2.IntrospectRequest(token=token)
        for attempt in range(2):
            metadata = await self._service_metadata()
            try:
                response = await self._api().Introspect(request, metadata=metadata, timeout=self._timeout)
            except grpc.aio.AioRpcError as error:
                if attempt == 0 and error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._forget_token()  # our own token was refused: log in afresh, once
                    continue
                raise _unavailable("Introspect", error, self._target) from error
            return Introspection(
                active=response.active,
                subject=response.subject,
                session_id=response.session_id,
                token_id=response.token_id,
                inactive_reason=response.inactive_reason,
            )
        raise Unavailable("auth service refused the service account", code=AUTH_UNAVAILABLE)

    async def snapshot(self) -> AsyncIterator[SnapshotChunk]:
        """Stream the auth service's revocation snapshot.

        Yields:
            The snapshot in chunks; each carries the stream sequence it reflects.

        Raises:
            Unavailable: No service account, or the stream failed (chunks already yielded stay valid:
                revocations only ever add).
        """
        metadata = await self._service_metadata()
        call = self._api().SnapshotRevocations(
            auth_pb2.SnapshotRevocationsRequest(), metadata=metadata, timeout=self._snapshot_timeout
        )
        try:
            async for chunk in call:
                yield _chunk(chunk)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._forget_token()
            raise _unavailable("SnapshotRevocations", error, self._target) from error
        finally:
            call.cancel()

    async def run_token_refresher(self) -> None:
        """Keep the service token fresh until cancelled (returns at once without a service account)."""
        if self._account is None:
            return
        while True:
            raise_if_cancelled()
            token = self._token
            wait = 0.0 if token is None else token.renew_at - self._clock()
            if wait > 0:
                self._renewed.clear()
                # Wake early when a caller renewed it first, and re-read the new deadline.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._renewed.wait()
                continue
            async for attempt in backoff(Unavailable, what="service token renewal"):
                with attempt:
                    raise_if_cancelled()
                    # A stale ``token`` is fine: _renew returns whatever another caller renewed first.
                    await self._renew(token)

    async def _service_metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token
        if token is None or token.expires_at <= self._clock():
            token = await self._renew(token)
        return (("authorization", f"Bearer {token.access_token}"),)

    async def _renew(self, stale: _ServiceToken | None) -> _ServiceToken:
        """Replace ``stale`` (refresh it, or log in when there is none or the refresh is refused)."""
        if self._account is None:
            raise Unavailable("no service account configured", code="SERVICE_ACCOUNT_MISSING")
        async with self._renew_lock:
            current = self._token
            if current is not None and current is not stale:
                return current  # renewed by someone else while we waited for the lock
            pair: auth_pb2.TokenPair | None = None
            if current is not None:
                try:
                    pair = await self._api().Refresh(
                        auth_pb2.RefreshRequest(refresh_token=current.refresh_token), timeout=self._timeout
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                        raise _unavailable("Refresh", error, self._target) from error
            if pair is None:
                pair = await self._login()
            self._token = renewed = self._service_token(pair)
            self._renewed.set()
            return renewed

    async def _login(self) -> auth_pb2.TokenPair:
        if self._account is None:
            raise Unavailable("no service account configured", code="SERVICE_ACCOUNT_MISSING")
        wait = self._login_not_before - self._clock()
        if wait > 0:
            raise Unavailable("auth service Login is rate limited", code=AUTH_UNAVAILABLE, retry_after=wait)
        username, password = self._account
        try:
            return await self._api().Login(
                auth_pb2.LoginRequest(username=username, password=password, scopes=[SERVICE_SCOPE]),
                timeout=self._login_timeout,
            )
        except grpc.aio.AioRpcError as error:
            retry_after = 0.0
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._login_timeout = min(self._login_timeout * 2, MAX_LOGIN_TIMEOUT_SECONDS)
            elif error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                retry_after = asked_retry_after(error) or 1.0
                self._login_not_before = self._clock() + retry_after
            raise _unavailable("Login", error, self._target, retry_after=retry_after) from error

    def _forget_token(self) -> None:
        self._token = None
        self._renewed.set()

    def _service_token(self, pair: auth_pb2.TokenPair) -> _ServiceToken:
        now = self._clock()
        lifetime = max(float(pair.expires_in), _MIN_RENEW_SECONDS)
        return _ServiceToken(
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            renew_at=now + max(lifetime * (1 - _RENEW_AT_REMAINING), _MIN_RENEW_SECONDS),
            expires_at=now + lifetime,
        )

    def _api(self) -> auth_pb2_grpc.AuthServiceAsyncStub:
        if self._stub is None:
            raise Unavailable("auth client is closed", code=AUTH_UNAVAILABLE)
        return self._stub


def _unavailable(
    method: str, error: grpc.aio.AioRpcError, target: str, *, retry_after: float = 0.0
) -> Unavailable:
    _log.warning("auth service call failed", method=method, code=error.code().name, target=target)
    return Unavailable(
        f"auth service {method} at {target} failed", code=AUTH_UNAVAILABLE, retry_after=retry_after
    )


def _chunk(chunk: auth_pb2.RevocationSnapshotChunk) -> SnapshotChunk:
    return SnapshotChunk(
        # The wire messages themselves (they have jti and exp): 100k value objects would cost 0.2 s.
        tokens=chunk.tokens,
        sessions=tuple(SessionRevokedEvent(sid=session.sid, sub=session.sub) for session in chunk.sessions),
        session_revoked_at_ms={
            session.sid: session.revoked_at_unix_ms
            for session in chunk.sessions
            if session.revoked_at_unix_ms
        },
        users=tuple(UserRevokedEvent(sub=user.sub, not_before_ms=user.not_before_ms) for user in chunk.users),
        retired_key_ids=tuple(chunk.retired_key_ids),
        stream_sequence=chunk.stream_sequence,
        key_bindings=tuple((binding.jkt, binding.revoked_at_unix_ms) for binding in chunk.key_bindings),
    )
