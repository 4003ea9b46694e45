"""What the auth service does, free of protobuf: login, refresh rotation, revocation, keys, users.

Every method that changes revocation state writes Redis (state and outbox event in one atomic step),
then has the publisher deliver the event, and returns only once JetStream acknowledged it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from authmesh._auth_service import validation
from authmesh._auth_service.audit import audit, username_hash
from authmesh._auth_service.grants import ADMIN_SCOPE, SERVICE_SCOPE, Audiences, Grant
from authmesh._auth_service.keyring import Keyring
from authmesh._auth_service.metrics import AuthMetrics
from authmesh._auth_service.outbox import to_record
from authmesh._auth_service.passwords import PasswordChecker
from authmesh._auth_service.publisher import EventPublisher
from authmesh._auth_service.store import (
    AuthStore,
    LoginOutcome,
    RevocationResult,
    RevocationSnapshot,
    SessionRecord,
    UserRecord,
    hash_refresh_token,
)
from authmesh._shared.claims import ACCESS_TOKEN_TYPE, AccessClaims, new_uuid7
from authmesh._shared.errors import (
    AlreadyExists,
    CertificateNotAccepted,
    DpopKeyMismatch,
    DpopProofMissing,
    InvalidCredentials,
    InvalidRefreshToken,
    KeyRevoked,
    NotFound,
    RateLimited,
    RefreshTokenReused,
    TokenExpired,
    TokenMissing,
    TokenRejected,
    TokenRevoked,
    UnknownKey,
    UserDisabled,
    WrongAudience,
)
from authmesh._shared.events import (
    EventBody,
    KeyBindingRevokedEvent,
    KeyRevokedEvent,
    KeyRotatedEvent,
    SecurityEvent,
    SessionRevokedEvent,
    TokenRevokedEvent,
    UserRevokedEvent,
)
from authmesh._shared.jose import encode_header, sign_with_header
from authmesh._shared.metrics import LabelledChildren
from authmesh._shared.settings import AuthSettings
from authmesh._shared.verifier import NoRevocations, TokenVerifier, VerifierPolicy

REFRESH_TOKEN_PREFIX = "amr_"
KEY_RELOAD_COOLDOWN_SECONDS = 1.0
ROTATION_REQUEST_TTL_SECONDS = 600
# Signing keys whose access-token header stays encoded (only the active one is in use, bar a rotation).
MAX_CACHED_HEADERS = 8
_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    """A token pair and what the client needs to know about it."""

    access_token: str
    refresh_token: str
    expires_in: int
    refresh_expires_in: int
    session_id: str
    scopes: tuple[str, ...]
    jkt: str | None = None


@dataclass(frozen=True, slots=True)
class Introspection:
    """The answer to an introspection: active, or the reason it is not."""

    active: bool
    claims: AccessClaims | None = None
    inactive_reason: str = ""


class AuthCore:
    """The auth service's behaviour.

    Args:
        settings: The service's settings.
        store: Redis state.
        keyring: Signing keys.
        passwords: Argon2id hashing.
        publisher: Event delivery.
        metrics: Counters.
        clock: Unix time in seconds.
    """

    def __init__(
        self,
        settings: AuthSettings,
        store: AuthStore,
        keyring: Keyring,
        passwords: PasswordChecker,
        publisher: EventPublisher,
        metrics: AuthMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keyring = keyring
        self._passwords = passwords
        # Checks whose login was cancelled (the client's deadline) run on to settle their budget unit.
        self._settling: set[asyncio.Task[bool]] = set()
        self._publisher = publisher
        self._metrics = metrics
        self._clock = clock
        self._last_key_reload = -KEY_RELOAD_COOLDOWN_SECONDS
        self._refreshes = LabelledChildren(metrics.refreshes)
        # An access token's header segment by signing kid: the same bytes on every token of a key.
        self._access_headers: dict[str, str] = {}
        self._audiences = Audiences(auth=settings.auth_audience, resource=settings.audience)
        self._resource_verifier, self._auth_verifier = (
            TokenVerifier(
                keyring,
                NoRevocations(),
                VerifierPolicy(issuer=settings.issuer, audience=audience, leeway=settings.leeway),
                clock,
            )
            for audience in (settings.audience, settings.auth_audience)
        )

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # credentials

    async def login(
        self, username: str, password: str, scopes: list[str], *, jkt: str | None = None
    ) -> IssuedTokens:
        """Check a password and open a session.

        Args:
            username: The user.
            password: Their password.
            scopes: Scopes asked for.
            jkt: The key of the request's verified DPoP proof: the session and its tokens are bound to it.

        Raises:
            InvalidRequest: Malformed fields, or scopes the user does not hold.
            RateLimited: Too many failed attempts for this username.
            InvalidCredentials: Unknown user or wrong password.
            UserDisabled: The account is disabled.
        """
        validation.username(username)
        validation.password(password)
        requested = validation.scopes(scopes)
        await self._refuse_revoked_binding(jkt)
        user, matched = await self._check_password(username, password)
        if not matched:
            self._metrics.logins.labels("invalid_credentials").inc()
            audit("login_failed", user=username_hash(username), reason="INVALID_CREDENTIALS")
            raise InvalidCredentials()
        assert user is not None  # a check never matches without a stored hash
        grant = self._audiences.grant(requested, user.scopes)
        await self._rehash_if_outdated(user, password)
        return await self._open_session(user, grant, jkt, method="password")

    async def certificate_login(
        self, username: str, scopes: list[str], *, certified: bool, jkt: str | None = None
    ) -> IssuedTokens:
        """Open a session for an account its client certificate identifies (no password).

        Args:
            username: The account asked for.
            scopes: Scopes asked for.
            certified: Whether the connection's verified certificate maps to ``username`` (see
                :mod:`authmesh._shared.certificate_identity`).
            jkt: The key of the request's verified DPoP proof, as for :meth:`login`.

        Raises:
            InvalidRequest: Malformed fields, or scopes the user does not hold.
            CertificateNotAccepted: No certificate for this account, or no such account.
            UserDisabled: The account is disabled.
        """
        validation.username(username)
        requested = validation.scopes(scopes)
        await self._refuse_revoked_binding(jkt)
        user = await self._store.get_user(username) if certified else None
        if user is None:
            self._metrics.logins.labels("invalid_credentials").inc()
            audit(
                "login_failed",
                user=username_hash(username),
                method="certificate",
                reason=CertificateNotAccepted.code,
            )
            raise CertificateNotAccepted()
        grant = self._audiences.grant(requested, user.scopes)
        return await self._open_session(user, grant, jkt, method="certificate")

    async def _refuse_revoked_binding(self, jkt: str | None) -> None:
        if jkt is not None and await self._store.key_binding_revoked(jkt):
            raise TokenRevoked("key binding revoked", code="TOKEN_REVOKED")

    async def _open_session(
        self, user: UserRecord, grant: Grant, jkt: str | None, *, method: str
    ) -> IssuedTokens:
        """Open a session for an authenticated ``user`` and issue its first pair."""
        username = user.username
        now_ms = self._now_ms()
        sid = new_uuid7(now_ms)
        refresh_token = _new_refresh_token()
        # The token is dated by the instant the session was written with, never by a later clock read:
        # a RevokeUser between the two would otherwise revoke the session in Redis and yet not cover the
        # token at the replicas.
        try:
            issued_ms = await self._store.open_session(
                SessionRecord(
                    sid=sid,
                    sub=user.sub,
                    username=username,
                    scopes=grant.scopes,
                    created_ms=now_ms,
                    revoked_ms=0,
                    jkt=jkt,
                ),
                hash_refresh_token(refresh_token),
                self._settings.refresh_token_ttl * 1000,
            )
        except UserDisabled:
            audit(
                "login_failed",
                user=username_hash(username),
                sub=user.sub,
                method=method,
                reason="USER_DISABLED",
            )
            raise
        access_token = await self._mint(
            sub=user.sub, sid=sid, grant=grant, client_id=username, issued_ms=issued_ms, jkt=jkt
        )
        self._metrics.logins.labels("ok").inc()
        audit(
            "login_succeeded",
            user=username_hash(username),
            sub=user.sub,
            sid=sid,
            scopes=" ".join(grant.scopes),
            method=method,
        )
        return self._pair(access_token, refresh_token, sid, grant.scopes, jkt)

    async def _check_password(self, username: str, password: str) -> tuple[UserRecord | None, bool]:
        """The user and whether ``password`` is theirs, within the username's failure budget.

        Only a failed check counts against the username. Once a check has started it is settled by its
        real outcome even when the login is cancelled meanwhile (a client whose deadline passed): a right
        password then clears the failures rather than leaving a unit spent, and a guess cancelled after
        it was sent still counts.

        Raises:
            RateLimited: The budget is used up by failures in the window and checks in flight.
        """
        check_id = uuid.uuid4().hex
        try:
            await self._store.reserve_login_check(
                username,
                check_id,
                max_failures=self._settings.login_max_failures,
                lease=self._settings.login_window,
            )
        except RateLimited:
            self._metrics.logins.labels("rate_limited").inc()
            audit("login_failed", user=username_hash(username), reason="RATE_LIMITED")
            raise
        try:
            user = await self._store.get_user(username)
            check = await self._passwords.start_verify(user.password_hash if user else None, password)
        except BaseException:
            await self._store.settle_login_check(
                username, check_id, LoginOutcome.ABANDONED, self._settings.login_window
            )
            raise
        settling = asyncio.create_task(self._settle(username, check_id, check))
        self._settling.add(settling)
        settling.add_done_callback(self._settled)
        return user, await asyncio.shield(settling)

    async def _settle(self, username: str, check_id: str, check: asyncio.Future[bool]) -> bool:
        try:
            matched = await check
        except BaseException:
            outcome = LoginOutcome.ABANDONED
            raise
        else:
            outcome = LoginOutcome.SUCCEEDED if matched else LoginOutcome.FAILED
            return matched
        finally:
            await self._store.settle_login_check(username, check_id, outcome, self._settings.login_window)

    async def wait_settled(self) -> None:
        """Wait until every started password check has settled its budget unit (each ends within one
        Argon2id check and one store call)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def _settled(self, task: asyncio.Task[bool]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.warning("a login's password check was not settled", error=type(task.exception()).__name__)

    async def refresh(self, refresh_token: str, *, jkt: str | None = None) -> IssuedTokens:
        """Spend a refresh token and issue a new pair in the same session.

        A session bound to a DPoP key refreshes only with a proof of that key (``jkt``), and a proof of
        any key does not bind a session that is not bound.

        Raises:
            InvalidRefreshToken: Unknown, expired, or its session or its user is revoked.
            RefreshTokenReused: A spent token: the session is now revoked and broadcast.
            UserDisabled: The account is disabled.
            Unavailable: The reuse (or an earlier one's) event could not be broadcast yet.
            DpopKeyMismatch: The request did not prove the session's key.
        """
        validation.token(refresh_token, "refresh_token")
        successor = _new_refresh_token()
        now_ms = self._now_ms()
        reuse_event_id = new_uuid7(now_ms)
        result = await self._store.rotate_refresh(
            hash_refresh_token(refresh_token),
            hash_refresh_token(successor),
            now_ms,
            self._settings.refresh_token_ttl * 1000,
            reuse_event_id,
            jkt,
        )
        self._refreshes(result.status).inc()
        if result.status == "reused":
            audit("refresh_token_reused", sid=result.sid, sub=result.sub)
            # The event exactly as the script wrote it to the outbox (without an origin).
            event = SecurityEvent(
                event_id=reuse_event_id,
                issuer=self._settings.issuer,
                issued_at=now_ms // 1000,
                occurred_at_ms=now_ms,
                body=SessionRevokedEvent(sid=result.sid, sub=result.sub),
            )
            # Like every revocation, answered only once JetStream has the event: when NATS is down the
            # client gets UNAVAILABLE, and its retry finds the session revoked and delivers it then.
            await self._publisher.deliver_written(event, result.active_kid)
            raise RefreshTokenReused()
        if result.status == "revoked" and result.revoke_event:
            # Revoked by an event that may still be in the outbox (a reuse answered UNAVAILABLE).
            await self._publisher.deliver(result.revoke_event)
        if result.status == "disabled":
            raise UserDisabled()
        if result.status == "key_mismatch":
            raise DpopProofMissing() if jkt is None else DpopKeyMismatch()
        if result.status != "ok":
            raise InvalidRefreshToken()
        grant = self._audiences.of_session(result.scopes)
        access_token = await self._mint(
            sub=result.sub,
            sid=result.sid,
            grant=grant,
            client_id=result.username,
            active_kid=result.active_kid,
            issued_ms=result.issued_ms,
            jkt=result.jkt,
        )
        return self._pair(access_token, successor, result.sid, grant.scopes, result.jkt)

    async def logout(self, refresh_token: str) -> RevocationResult:
        """Revoke the session a refresh token belongs to.

        Raises:
            InvalidRefreshToken: The token is unknown.
        """
        validation.token(refresh_token, "refresh_token")
        sid = await self._store.session_of_refresh(hash_refresh_token(refresh_token))
        if sid is None:
            raise InvalidRefreshToken()
        session = await self._store.get_session(sid)
        if session is None:
            raise InvalidRefreshToken()
        return await self._revoke_session(session, by=session.sub, reason="logout")

    async def _rehash_if_outdated(self, user: UserRecord, password: str) -> None:
        """Store a hash made with the current Argon2 parameters when the stored one was made with others."""
        if self._passwords.needs_rehash(user.password_hash):
            fresh = await self._passwords.hash(password)
            if await self._store.replace_password_hash(user.username, user.password_hash, fresh):
                _log.info("password rehashed with the current parameters", username=user.username)

    # revocation

    async def revoke_token(self, caller: AccessClaims, token: str, reason: str) -> RevocationResult:
        """Revoke one access token (by jti), or the session of a refresh token.

        Raises:
            NotOwner: The token is someone else's and the caller is not an admin.
            TokenRejected: The access token is not one of ours.
            InvalidRefreshToken: The refresh token is unknown.
        """
        validation.token(token)
        validation.reason(reason)
        if token.count(".") == 2:
            try:
                claims = await self._verify_signed(token, any_audience=True, ignore_binding=True)
            except (TokenExpired, KeyRevoked):
                # Already dead everywhere: nothing to broadcast.
                return RevocationResult(self._now_ms(), "", already=True)
            self._audiences.require_owner(caller, claims.sub)
            now_ms = self._now_ms()
            event = self._event(TokenRevokedEvent(jti=claims.jti, exp=claims.exp), now_ms)
            keep_ms = int((claims.exp + self._settings.leeway) * 1000) - now_ms + 60_000
            result = await self._store.revoke_token(
                claims.jti, claims.exp, now_ms, event.event_id, to_record(event), keep_ms
            )
            await self._broadcast(event, result)
            self._metrics.revocations.labels("token").inc()
            audit("token_revoked", jti=claims.jti, sub=claims.sub, by=caller.sub, reason=reason)
            return result
        sid = await self._store.session_of_refresh(hash_refresh_token(token))
        session = await self._store.get_session(sid) if sid else None
        if session is None:
            raise InvalidRefreshToken()
        self._audiences.require_owner(caller, session.sub)
        return await self._revoke_session(session, by=caller.sub, reason=reason)

    async def revoke_session(self, caller: AccessClaims, sid: str, reason: str) -> RevocationResult:
        """Revoke one session.

        Raises:
            NotFound: No such session.
            NotOwner: Someone else's, and the caller is not an admin.
        """
        validation.identifier(sid, "session_id")
        validation.reason(reason)
        session = await self._store.get_session(sid)
        if session is None:
            raise NotFound("session not found", code="SESSION_NOT_FOUND")
        self._audiences.require_owner(caller, session.sub)
        return await self._revoke_session(session, by=caller.sub, reason=reason)

    async def revoke_user(self, caller: AccessClaims, sub: str, reason: str) -> RevocationResult:
        """Revoke every session and token of a user issued up to now.

        Raises:
            WrongAudience: The caller's token is not for the auth audience.
            InsufficientScope: The caller is not an admin.
            NotFound: No such user.
        """
        return await self._cut_user(caller, sub, reason, disable=False)

    async def revoke_key_binding(self, caller: AccessClaims, jkt: str, reason: str) -> RevocationResult:
        """Revoke a DPoP key binding (a lost device): its tokens are refused, its sessions cannot refresh.

        Raises:
            WrongAudience: The caller's token is not for the auth audience.
            InsufficientScope: The caller is not an admin.
            InvalidRequest: ``jkt`` is not a thumbprint.
        """
        self._audiences.require_auth_scope(caller, ADMIN_SCOPE)
        validation.jkt(jkt)
        validation.reason(reason)
        now_ms = self._now_ms()
        event = self._event(KeyBindingRevokedEvent(jkt=jkt), now_ms)
        result = await self._store.revoke_key_binding(
            jkt, now_ms, event.event_id, to_record(event), self._settings.refresh_token_ttl * 1000
        )
        await self._broadcast(event, result)
        self._metrics.revocations.labels("key_binding").inc()
        _log.info("key binding revoked", jkt=jkt, by=caller.sub, reason=reason)
        return result

    async def disable_user(self, caller: AccessClaims, sub: str, reason: str) -> RevocationResult:
        """Disable an account: no login or refresh until enabled again; every session is revoked.

        Raises:
            WrongAudience: The caller's token is not for the auth audience.
            InsufficientScope: The caller is not an admin.
            NotFound: No such user.
        """
        return await self._cut_user(caller, sub, reason, disable=True)

    async def enable_user(self, caller: AccessClaims, sub: str) -> None:
        """Let a disabled account log in again (its revoked sessions stay revoked).

        Raises:
            WrongAudience: The caller's token is not for the auth audience.
            InsufficientScope: The caller is not an admin.
            NotFound: No such user.
        """
        self._audiences.require_auth_scope(caller, ADMIN_SCOPE)
        validation.identifier(sub, "subject")
        if not await self._store.user_exists(sub):
            raise NotFound("user not found", code="USER_NOT_FOUND")
        await self._store.enable_user(sub)
        audit("user_enabled", sub=sub, by=caller.sub)

    async def _cut_user(
        self, caller: AccessClaims, sub: str, reason: str, *, disable: bool
    ) -> RevocationResult:
        """Revoke every session and token of a user (and disable it) and broadcast it, as an admin."""
        self._audiences.require_auth_scope(caller, ADMIN_SCOPE)
        validation.identifier(sub, "subject")
        validation.reason(reason)
        if not await self._store.user_exists(sub):
            raise NotFound("user not found", code="USER_NOT_FOUND")
        now_ms = self._now_ms()
        event = self._event(UserRevokedEvent(sub=sub, not_before_ms=now_ms), now_ms)
        result = await self._store.revoke_user(
            sub,
            now_ms,
            event.event_id,
            to_record(event),
            disable_reason=(reason or "disabled") if disable else "",
        )
        # The script moves the cut past every token already issued to the user: the event carries it.
        cut = dataclasses.replace(event, body=UserRevokedEvent(sub=sub, not_before_ms=result.revoked_at_ms))
        await self._broadcast(cut, result)
        self._metrics.revocations.labels("user").inc()
        audit("user_disabled" if disable else "user_revoked", sub=sub, by=caller.sub, reason=reason)
        return result

    async def rotate_signing_key(
        self, caller: AccessClaims, retire_previous: bool, request_id: str = ""
    ) -> tuple[str, str]:
        """Make a new active signing key; with ``retire_previous`` reject the old key's tokens at once.

        Args:
            caller: Who asks (an admin).
            retire_previous: Key compromise: the previous key's tokens die at once.
            request_id: Optional idempotency key; a repeat completes the first call's broadcast and
                returns its rotation instead of rotating again.

        Returns:
            (new kid, previous kid).

        Raises:
            WrongAudience: The caller's token is not for the auth audience.
            InsufficientScope: The caller is not an admin.
        """
        self._audiences.require_auth_scope(caller, ADMIN_SCOPE)
        if request_id:
            validation.identifier(request_id, "request_id")
            prior = await self._store.rotation(request_id)
            if prior is not None:
                kid, previous_kid, prior_events = prior
                for event_id in prior_events:
                    await self._publisher.deliver(event_id)
                return kid, previous_kid
        written: list[SecurityEvent] = []

        def events_for(kid: str, previous_kid: str) -> list[tuple[str, str]]:
            now_ms = self._now_ms()
            bodies: list[EventBody] = [KeyRotatedEvent(kid=kid, previous_kid=previous_kid)]
            if retire_previous and previous_kid:
                bodies.append(KeyRevokedEvent(kid=previous_kid))
            written[:] = [self._event(body, now_ms) for body in bodies]
            return [(event.event_id, to_record(event)) for event in written]

        rotation = await self._keyring.rotate(retire_previous=retire_previous, events_for=events_for)
        if request_id:
            # Saved before the broadcast, so a retry after UNAVAILABLE finds it.
            await self._store.save_rotation(
                request_id,
                rotation.kid,
                rotation.previous_kid,
                [event.event_id for event in written],
                ROTATION_REQUEST_TTL_SECONDS,
            )
        for event in written:
            await self._publisher.deliver_written(event)
        self._metrics.revocations.labels("key" if retire_previous else "rotation").inc()
        if retire_previous:
            self._resource_verifier.forget()
            self._auth_verifier.forget()
        audit(
            "signing_key_rotated",
            kid=rotation.kid,
            previous_kid=rotation.previous_kid,
            retired=retire_previous,
            by=caller.sub,
        )
        return rotation.kid, rotation.previous_kid

    # inspection

    async def introspect(self, caller: AccessClaims, token: str) -> Introspection:
        """Whether a token is active, from Redis state.

        Raises:
            WrongAudience: The caller's token is not for the auth audience.
            InsufficientScope: The caller is neither a service nor an admin.
        """
        self._audiences.require_auth_scope(caller, SERVICE_SCOPE, ADMIN_SCOPE)
        validation.token(token)
        try:
            claims = await self._verify_fresh(token, ignore_binding=True)
        except TokenRejected as error:
            return Introspection(active=False, inactive_reason=error.code)
        return Introspection(active=True, claims=claims)

    async def snapshot(self, caller: AccessClaims) -> tuple[RevocationSnapshot, int]:
        """Every revocation in force and the stream sequence it reflects.

        The sequence is read before Redis: every event up to it was written to Redis before it was
        published, so the snapshot holds at least its effect.
        """
        self._audiences.require_auth_scope(caller, SERVICE_SCOPE, ADMIN_SCOPE)
        sequence = await self._publisher.stream_sequence()
        return await self._store.snapshot(self._now_ms()), sequence

    async def jwks(self) -> str:
        """The JWK Set, reloaded first if another replica rotated the keys."""
        await self._keyring.signing_key()
        return self._keyring.jwks()

    # users

    async def create_user(self, caller: AccessClaims, username: str, password: str, scopes: list[str]) -> str:
        """Add a user; returns its subject.

        Raises:
            WrongAudience: The caller's token is not for the auth audience.
            InsufficientScope: The caller is not an admin.
            AlreadyExists: The username is taken.
        """
        self._audiences.require_auth_scope(caller, ADMIN_SCOPE)
        sub = await self.add_user(username, password, scopes)
        audit("user_created", sub=sub, user=username_hash(username), scopes=" ".join(scopes), by=caller.sub)
        return sub

    async def add_user(self, username: str, password: str, scopes: list[str] | tuple[str, ...]) -> str:
        """Add a user without an authorisation check (bootstrap accounts).

        Raises:
            AlreadyExists: The username is taken.
        """
        validation.username(username)
        validation.password(password, new=True)
        granted = validation.scopes(list(scopes))
        record = UserRecord(
            username=username,
            sub=f"usr_{uuid.uuid4().hex}",
            password_hash=await self._passwords.hash(password),
            scopes=granted,
            created_ms=self._now_ms(),
        )
        if not await self._store.create_user(record):
            raise AlreadyExists("user exists", code="USER_EXISTS")
        return record.sub

    async def list_users(
        self, caller: AccessClaims, page_size: int, page_token: str, username_prefix: str
    ) -> tuple[list[tuple[UserRecord, bool]], str]:
        """One page of users in username order (each with whether it is disabled), and the token of the
        next page (empty on the last).

        Raises:
            WrongAudience: The caller's token is not for the auth audience.
            InsufficientScope: The caller is not an admin.
            InvalidRequest: The page size is out of range, or the page token or prefix is not valid.
        """
        self._audiences.require_auth_scope(caller, ADMIN_SCOPE)
        limit = validation.page_size(page_size)
        after = validation.page_token(page_token)
        if username_prefix:
            validation.username(username_prefix)
        users, more = await self._store.list_users(after=after, prefix=username_prefix, limit=limit)
        return users, validation.next_page_token(users[-1][0].username) if more and users else ""

    async def index_users(self) -> None:
        """List users stored before the username index existed (idempotent; at start)."""
        if added := await self._store.index_users():
            _log.info("users indexed", count=added)

    async def ensure_user(self, username: str, password: str, scopes: tuple[str, ...]) -> None:
        """Create a configured account at start if it is absent."""
        if await self._store.get_user(username) is None:
            try:
                sub = await self.add_user(username, password, scopes)
                audit(
                    "user_created",
                    sub=sub,
                    user=username_hash(username),
                    scopes=" ".join(scopes),
                    by="config",
                )
            except AlreadyExists:
                pass  # another replica created it first

    # caller authentication

    async def authenticate(self, bearer: str | None) -> AccessClaims:
        """Verify the caller's bearer token against keys and Redis state.

        Raises:
            TokenRejected: Missing, invalid or revoked.
        """
        if bearer is None:
            raise TokenMissing()
        return await self._verify_fresh(bearer, any_audience=True)

    async def _verify_signed(
        self, token: str, *, any_audience: bool = False, ignore_binding: bool = False
    ) -> AccessClaims:
        """Signature and claims, reloading the keys once for a kid another replica just made.

        Args:
            token: The access token.
            any_audience: Accept the auth audience as well as the resource audience (a caller's own
                token, or a token to revoke); otherwise the resource audience only.
            ignore_binding: The token is looked at, not presented as a credential (a key-bound token
                is a credential only with a DPoP proof, which the auth service's own API does not take).
        """
        try:
            return self._verify_audiences(token, any_audience, ignore_binding)
        except UnknownKey:
            # Garbage kids must not each cost a Redis reload: at most one per cooldown.
            if time.monotonic() - self._last_key_reload < KEY_RELOAD_COOLDOWN_SECONDS:
                raise
            self._last_key_reload = time.monotonic()
            await self._keyring.reload()
            return self._verify_audiences(token, any_audience, ignore_binding)

    def _verify_audiences(self, token: str, any_audience: bool, ignore_binding: bool) -> AccessClaims:
        if not any_audience:
            return self._resource_verifier.verify(token, ignore_binding=ignore_binding)
        try:
            return self._auth_verifier.verify(token, ignore_binding=ignore_binding)
        except WrongAudience:
            return self._resource_verifier.verify(token, ignore_binding=ignore_binding)

    async def _verify_fresh(
        self, token: str, *, any_audience: bool = False, ignore_binding: bool = False
    ) -> AccessClaims:
        claims = await self._verify_signed(token, any_audience=any_audience, ignore_binding=ignore_binding)
        reason = await self._store.revocation_reason(
            claims.jti, claims.sid, claims.sub, claims.issued_at_ms, claims.kid, claims.jkt
        )
        if reason == "KEY_REVOKED":
            raise KeyRevoked()
        if reason is not None:
            raise TokenRevoked(code=reason)
        return claims

    # helpers

    async def _revoke_session(self, session: SessionRecord, *, by: str, reason: str) -> RevocationResult:
        now_ms = self._now_ms()
        event = self._event(SessionRevokedEvent(sid=session.sid, sub=session.sub), now_ms)
        result = await self._store.revoke_session(session.sid, now_ms, event.event_id, to_record(event))
        await self._broadcast(event, result)
        self._metrics.revocations.labels("session").inc()
        audit("session_revoked", sid=session.sid, sub=session.sub, by=by, reason=reason)
        return result

    async def _broadcast(self, event: SecurityEvent, result: RevocationResult) -> None:
        """Publish a revocation's event; return once JetStream has acknowledged it."""
        if result.event_id == event.event_id:
            # Stored by this call: publish the event in hand rather than read it back.
            await self._publisher.deliver_written(event, result.active_kid)
        else:
            # Revoked earlier: that event stays in the outbox until JetStream has acknowledged it.
            await self._publisher.deliver(result.event_id, result.active_kid)

    async def _mint(
        self,
        *,
        sub: str,
        sid: str,
        grant: Grant,
        client_id: str,
        issued_ms: int,
        active_kid: str | None = None,
        jkt: str | None = None,
    ) -> str:
        """Sign an access token issued at ``issued_ms``, the instant Redis dated it by."""
        key = await self._keyring.signing_key(active_kid)
        iat = issued_ms // 1000
        claims = AccessClaims(
            iss=self._settings.issuer,
            sub=sub,
            aud=(grant.audience,),
            exp=iat + self._settings.access_token_ttl,
            iat=iat,
            nbf=iat,
            jti=new_uuid7(issued_ms),
            sid=sid,
            scopes=grant.scopes,
            client_id=client_id,
            kid=key.kid,
            jkt=jkt,
        )
        header = self._access_headers.get(key.kid)
        if header is None:
            if len(self._access_headers) >= MAX_CACHED_HEADERS:
                self._access_headers.clear()
            header = self._access_headers[key.kid] = encode_header({"typ": ACCESS_TOKEN_TYPE, "kid": key.kid})
        return sign_with_header(header, claims.to_payload(), key.private_key)

    def _pair(
        self, access_token: str, refresh_token: str, sid: str, scopes: tuple[str, ...], jkt: str | None = None
    ) -> IssuedTokens:
        return IssuedTokens(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_in=self._settings.access_token_ttl,
            refresh_expires_in=self._settings.refresh_token_ttl,
            session_id=sid,
            scopes=scopes,
            jkt=jkt,
        )

    def _event(self, body: EventBody, now_ms: int) -> SecurityEvent:
        return SecurityEvent.new(body, self._settings.issuer, self._settings.instance, now_ms)


def _new_refresh_token() -> str:
    return REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(32)
