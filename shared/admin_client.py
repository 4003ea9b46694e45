"""The auth service's administrative RPCs, made as a logged-in admin whose token renews.

::

    async with TokenSession.login(auth, "admin", password, scopes=("admin",)) as session:  # auth audience
        async with AdminClient(session) as admin:
            subject = await admin.create_user("bob", "bob-password-1", ("docs:read",))
            await admin.revoke_user(subject, reason="left the company")

Every method raises ``grpc.aio.AioRpcError`` when the auth service refuses or cannot be reached
(``PERMISSION_DENIED``/``INSUFFICIENT_SCOPE`` for a session without ``admin``), and
:class:`~authmesh._shared.errors.SessionEnded` when the session can no longer renew.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from authmesh._shared.auth_api import (
    DEFAULT_TIMEOUT_SECONDS,
    AuthApi,
    KeyRotation,
    Revocation,
    TokenStatus,
    User,
)
from authmesh._shared.lifecycle import Startable
from authmesh._shared.token_session import TokenSession

# ListUsers pages at most this many users; more pages than this is not a listing a command should print.
_PAGE_SIZE = 500
_MAX_PAGES = 10_000


class AdminClient(Startable):
    """Admin RPCs of the auth service over a session's renewing token (an async context manager).

    Args:
        session: An entered session of a user with the ``admin`` scope.
        timeout: Deadline of each call, seconds.
    """

    def __init__(self, session: TokenSession, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._api = AuthApi(
            session.auth_target,
            timeout=timeout,
            credentials=session.channel_credentials,
            interceptors=session.interceptors(),
        )

    async def _start(self) -> None:
        self._api.open()

    async def aclose(self) -> None:
        """Close the channel."""
        await self._api.aclose()

    async def create_user(self, username: str, password: str, scopes: tuple[str, ...] = ()) -> str:
        """Add a user; returns its subject (``ALREADY_EXISTS``/``USER_EXISTS`` if the name is taken)."""
        return await self._api.create_user(None, username, password, scopes)

    async def users(self, *, username_prefix: str = "") -> AsyncIterator[User]:
        """Every user (or those whose name starts with ``username_prefix``), in username order."""
        token = ""
        for _ in range(_MAX_PAGES):
            page = await self._api.list_users(
                None, page_size=_PAGE_SIZE, page_token=token, username_prefix=username_prefix
            )
            for user in page.users:
                yield user
            token = page.next_page_token
            if not token:
                return

    async def find_user(self, username: str) -> User | None:
        """The user named ``username``, or None."""
        page = await self._api.list_users(None, page_size=1, username_prefix=username)
        return next((user for user in page.users if user.username == username), None)

    async def revoke_user(self, subject: str, reason: str = "") -> Revocation:
        """Revoke every session and token of a user issued up to now."""
        return await self._api.revoke_user(None, subject, reason)

    async def disable_user(self, subject: str, reason: str = "") -> Revocation:
        """Disable a user: no login or refresh until enabled; every session and token of it is revoked."""
        return await self._api.disable_user(None, subject, reason)

    async def enable_user(self, subject: str) -> None:
        """Let a disabled user log in again (what was revoked stays revoked)."""
        await self._api.enable_user(None, subject)

    async def revoke_session(self, session_id: str, reason: str = "") -> Revocation:
        """Revoke one session."""
        return await self._api.revoke_session(None, session_id, reason)

    async def revoke_key_binding(self, jkt: str, reason: str = "") -> Revocation:
        """Refuse every token bound to the DPoP key ``jkt`` (its RFC 7638 thumbprint: a lost device),
        everywhere, and the refresh of the sessions bound to it."""
        return await self._api.revoke_key_binding(None, jkt, reason)

    async def revoke_token(self, token: str, reason: str = "") -> Revocation:
        """Revoke one access token, or a refresh token's session."""
        return await self._api.revoke_token(None, token, reason)

    async def rotate_signing_key(self, *, retire_previous: bool = False) -> KeyRotation:
        """Make a new signing key active; ``retire_previous`` rejects the old key's tokens at once."""
        return await self._api.rotate_signing_key(None, retire_previous=retire_previous)

    async def introspect(self, token: str) -> TokenStatus:
        """Whether ``token`` is active, by the auth service's own state."""
        return await self._api.introspect(None, token)
