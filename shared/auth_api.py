"""The auth service's RPCs as one async client, one method each.

Everything that talks to ``authmesh.auth.v1.AuthService`` as a client goes through :class:`AuthApi`:
the renewing sessions (:mod:`authmesh._shared.token_session`), the admin client, the command-line client,
the demo and the benchmarks. Calls raise ``grpc.aio.AioRpcError`` as gRPC does; the layers above decide
what a failure means to them.

A method that acts as someone takes that someone's access token as ``caller``; ``None`` sends no
``authorization`` metadata of its own, for a channel whose interceptors attach it (a session's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from authmesh._shared.auth_client import channel_options
from authmesh._shared.dpop import DPOP_METADATA_KEY
from authmesh._shared.grpc_targets import balanced_target, client_channel_options
from authmesh._shared.lifecycle import Startable
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 10.0
# The scope of administrative tokens: they are for the auth service's own audience only.
ADMIN_SCOPE = "admin"


@dataclass(frozen=True, slots=True)
class Tokens:
    """A token pair as issued, with absolute expiry times.

    Attributes:
        access_token: The ES256 JWT.
        refresh_token: The opaque refresh token.
        session_id: The session both belong to.
        scopes: The granted scopes.
        expires_at: When the access token expires, Unix seconds.
        refresh_expires_at: When the refresh token expires, Unix seconds.
    """

    access_token: str
    refresh_token: str
    session_id: str
    scopes: tuple[str, ...]
    expires_at: float
    refresh_expires_at: float

    @classmethod
    def from_pair(cls, pair: auth_pb2.TokenPair, now: float) -> Tokens:
        """Tokens from a ``TokenPair`` received at Unix time ``now``."""
        return cls(
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            session_id=pair.session_id,
            scopes=tuple(pair.scope.split()),
            expires_at=now + pair.expires_in,
            refresh_expires_at=now + pair.refresh_expires_in,
        )


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revocation the auth service made durable and broadcast.

    Attributes:
        revoked_at_unix_ms: When, by the auth service's clock.
        event_id: The id of the event on ``AUTH_EVENTS``.
    """

    revoked_at_unix_ms: int
    event_id: str


@dataclass(frozen=True, slots=True)
class KeyRotation:
    """The result of ``RotateSigningKey``.

    Attributes:
        kid: The new active signing key.
        previous_kid: The key it replaced.
    """

    kid: str
    previous_kid: str


@dataclass(frozen=True, slots=True)
class User:
    """A user as ``ListUsers`` shows it.

    Attributes:
        username: The login name.
        subject: ``sub`` of its tokens.
        scopes: The scopes it holds.
        created_at_unix_ms: When it was created.
        disabled: Whether it is disabled (``DisableUser``).
    """

    username: str
    subject: str
    scopes: tuple[str, ...]
    created_at_unix_ms: int
    disabled: bool


@dataclass(frozen=True, slots=True)
class UserPage:
    """One page of ``ListUsers``.

    Attributes:
        users: The users, in username order.
        next_page_token: Pass it back for the next page; empty on the last.
    """

    users: tuple[User, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """What ``Introspect`` said about a token.

    Attributes:
        active: Whether the token would be accepted now.
        subject: ``sub`` (active tokens only).
        scopes: Its scopes (active tokens only).
        session_id: ``sid`` (active tokens only).
        token_id: ``jti`` (active tokens only).
        expires_at: ``exp``, Unix seconds (active tokens only).
        inactive_reason: Why it is not active (``TOKEN_REVOKED``, ...); empty when active.
    """

    active: bool
    subject: str
    scopes: tuple[str, ...]
    session_id: str
    token_id: str
    expires_at: int
    inactive_reason: str


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token`` as a bearer token."""
    return (("authorization", f"Bearer {token}"),)


def dpop_metadata(token: str, proof: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a DPoP-bound ``token`` and the call's proof."""
    return (("authorization", f"DPoP {token}"), (DPOP_METADATA_KEY, proof))


def _proof(dpop: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if dpop is None else ((DPOP_METADATA_KEY, dpop),)


def _as(caller: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if caller is None else bearer(caller)


class AuthApi(Startable):
    """The auth service's RPCs over one channel (an async context manager).

    Every method raises ``grpc.aio.AioRpcError`` when the call fails.

    Args:
        target: ``host:port`` of the auth service, or several ``ip:port`` separated by commas: calls
            are balanced over those that are up (``round_robin``; only reads are retried on another).
        timeout: Deadline of each call, seconds.
        credentials: Channel credentials (TLS); None for an insecure channel.
        interceptors: Client interceptors of the channel (a session's, to act as its user).
        clock: Unix seconds, for the expiry times of the tokens it returns.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self._clock = clock
        self.timeout = timeout
        self._credentials = credentials
        self._interceptors = list(interceptors)
        self._channel: grpc.aio.Channel | None = None
        self._auth_stub: auth_pb2_grpc.AuthServiceAsyncStub | None = None

    async def _start(self) -> None:
        self.open()

    def open(self) -> None:
        """Open the channel (entering the context manager does it).

        Raises:
            ConfigurationError: The target is not one address or a list of literal addresses.
        """
        if self._channel is not None:
            return
        target = balanced_target(self.target)
        options = [*channel_options(), *client_channel_options(self.target)]
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(target, options=options, interceptors=self._interceptors)
        else:
            channel = grpc.aio.secure_channel(
                target, self._credentials, options=options, interceptors=self._interceptors
            )
        self._channel, self._auth_stub = channel, auth_pb2_grpc.AuthServiceStub(channel)

    async def aclose(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        channel, self._channel, self._auth_stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace=None)

    @property
    def _stub(self) -> auth_pb2_grpc.AuthServiceAsyncStub:
        if self._auth_stub is None:
            raise RuntimeError(f"the client for {self.target} is not open")
        return self._auth_stub

    async def login(
        self, username: str, password: str, scopes: tuple[str, ...] = (), *, dpop: str | None = None
    ) -> Tokens:
        """Log in; an empty ``scopes`` asks for the user's resource scopes (never ``admin``).

        ``dpop`` is a DPoP proof for ``Login``: the session and its tokens are then bound to its key.
        """
        request = auth_pb2.LoginRequest(username=username, password=password, scopes=list(scopes))
        pair = await self._stub.Login(request, timeout=self.timeout, metadata=_proof(dpop))
        return Tokens.from_pair(pair, self._clock())

    async def admin_login(self, username: str, password: str) -> Tokens:
        """Log in for the administrative RPCs: scope ``admin``, for the auth service's audience."""
        return await self.login(username, password, (ADMIN_SCOPE,))

    async def refresh(self, refresh_token: str, *, dpop: str | None = None) -> Tokens:
        """Spend a refresh token for a new pair in the same session (a bound one needs ``dpop``)."""
        pair = await self._stub.Refresh(
            auth_pb2.RefreshRequest(refresh_token=refresh_token), timeout=self.timeout, metadata=_proof(dpop)
        )
        return Tokens.from_pair(pair, self._clock())

    async def logout(self, refresh_token: str) -> Revocation:
        """Revoke the refresh token's session."""
        response = await self._stub.Logout(
            auth_pb2.LogoutRequest(refresh_token=refresh_token), timeout=self.timeout
        )
        return _revocation(response)

    async def revoke_token(self, caller: str | None, token: str, reason: str = "") -> Revocation:
        """Revoke one access token, or a refresh token's session, as ``caller`` (an access token)."""
        response = await self._stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=token, reason=reason),
            metadata=_as(caller),
            timeout=self.timeout,
        )
        return _revocation(response)

    async def revoke_session(self, caller: str | None, session_id: str, reason: str = "") -> Revocation:
        """Revoke one session as ``caller``."""
        response = await self._stub.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=session_id, reason=reason),
            metadata=_as(caller),
            timeout=self.timeout,
        )
        return _revocation(response)

    async def revoke_user(self, caller: str | None, subject: str, reason: str = "") -> Revocation:
        """Revoke every session and token of a user, as ``caller`` (an admin)."""
        response = await self._stub.RevokeUser(
            auth_pb2.RevokeUserRequest(subject=subject, reason=reason),
            metadata=_as(caller),
            timeout=self.timeout,
        )
        return _revocation(response)

    async def revoke_key_binding(self, caller: str | None, jkt: str, reason: str = "") -> Revocation:
        """Refuse every token bound to the DPoP key ``jkt`` (RFC 7638 thumbprint; a lost device) and the
        refresh of its sessions, as ``caller`` (an admin)."""
        response = await self._stub.RevokeKeyBinding(
            auth_pb2.RevokeKeyBindingRequest(jkt=jkt, reason=reason),
            metadata=_as(caller),
            timeout=self.timeout,
        )
        return _revocation(response)

    async def disable_user(self, caller: str | None, subject: str, reason: str = "") -> Revocation:
        """Disable a user (no login or refresh until enabled; all it holds revoked), as ``caller`` (admin)."""
        response = await self._stub.DisableUser(
            auth_pb2.DisableUserRequest(subject=subject, reason=reason),
            metadata=_as(caller),
            timeout=self.timeout,
        )
        return _revocation(response)

    async def enable_user(self, caller: str | None, subject: str) -> None:
        """Let a disabled user log in again, as ``caller`` (an admin); what was revoked stays revoked."""
        await self._stub.EnableUser(
            auth_pb2.EnableUserRequest(subject=subject), metadata=_as(caller), timeout=self.timeout
        )

    async def rotate_signing_key(self, caller: str | None, *, retire_previous: bool = False) -> KeyRotation:
        """Make a new signing key active, as ``caller`` (an admin); ``retire_previous`` for a compromise."""
        response = await self._stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(retire_previous=retire_previous),
            metadata=_as(caller),
            timeout=self.timeout,
        )
        return KeyRotation(kid=response.kid, previous_kid=response.previous_kid)

    async def jwks(self) -> str:
        """The public keys as JWK Set JSON text."""
        response = await self._stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=self.timeout)
        return response.jwks_json

    async def introspect(self, caller: str | None, token: str) -> TokenStatus:
        """Whether ``token`` is active, asked as ``caller`` (an admin or a service account)."""
        response = await self._stub.Introspect(
            auth_pb2.IntrospectRequest(token=token), metadata=_as(caller), timeout=self.timeout
        )
        return TokenStatus(
            active=response.active,
            subject=response.subject,
            scopes=tuple(response.scope.split()),
            session_id=response.session_id,
            token_id=response.token_id,
            expires_at=response.expires_at,
            inactive_reason=response.inactive_reason,
        )

    async def create_user(
        self, caller: str | None, username: str, password: str, scopes: tuple[str, ...]
    ) -> str:
        """Add a user, as ``caller`` (an admin); returns its subject."""
        response = await self._stub.CreateUser(
            auth_pb2.CreateUserRequest(username=username, password=password, scopes=list(scopes)),
            metadata=_as(caller),
            timeout=self.timeout,
        )
        return response.subject

    async def list_users(
        self, caller: str | None, *, page_size: int = 0, page_token: str = "", username_prefix: str = ""
    ) -> UserPage:
        """One page of users in username order, as ``caller`` (an admin)."""
        response = await self._stub.ListUsers(
            auth_pb2.ListUsersRequest(
                page_size=page_size, page_token=page_token, username_prefix=username_prefix
            ),
            metadata=_as(caller),
            timeout=self.timeout,
        )
        return UserPage(
            users=tuple(
                User(
                    username=user.username,
                    subject=user.subject,
                    scopes=tuple(user.scopes),
                    created_at_unix_ms=user.created_at_unix_ms,
                    disabled=user.disabled,
                )
                for user in response.users
            ),
            next_page_token=response.next_page_token,
        )


def _revocation(response: auth_pb2.RevokeResponse) -> Revocation:
    return Revocation(revoked_at_unix_ms=response.revoked_at_unix_ms, event_id=response.event_id)
