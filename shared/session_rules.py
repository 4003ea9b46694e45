"""The rules both renewing sessions follow: when to renew, how, and what ends a session for good.

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

:class:`~authmesh._shared.token_session.TokenSession` (``grpc.aio``) and
:class:`~authmesh._shared.sync_token_session.SyncTokenSession` (``grpc``, threads) are built on
:class:`SessionRules`; they differ only in how they call the auth service and wait for each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Self, TypedDict, Unpack

import grpc
import structlog

from authmesh._shared.auth_api import Tokens
from authmesh._shared.dpop import DPOP_METADATA_KEY, ProofSigner, default_origin
from authmesh._shared.errors import ConfigurationError, SessionEnded, Unavailable
from authmesh._shared.grpc_errors import DPOP_NONCE_METADATA_KEY, error_reason
from authmesh._shared.grpc_targets import balanced_target

DEFAULT_RENEW_MARGIN_SECONDS = 30.0
DEFAULT_TIMEOUT_SECONDS = 10.0
TOKEN_EXPIRED = "TOKEN_EXPIRED"
DPOP_NONCE_REQUIRED = "DPOP_NONCE_REQUIRED"
AUTHORIZATION = "authorization"
AUTH_TARGET_VARIABLE = "AUTHMESH_AUTH_TARGET"
CLIENT_ACCOUNT_VARIABLE = "AUTHMESH_CLIENT_ACCOUNT"
CLIENT_SCOPES_VARIABLE = "AUTHMESH_CLIENT_SCOPES"
_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Grant:
    """The tokens a session holds and when to renew them (Unix seconds)."""

    tokens: Tokens
    renew_at: float

    @classmethod
    def of(cls, tokens: Tokens, now: float, margin: float) -> Grant:
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
        dpop_key: Bind the session to this key (DPoP, RFC 9449): ``Login`` and ``Refresh`` carry a
            proof, and so does every call, with the token as ``authorization: DPoP …``.
        auth_origin: The auth service's origin as it knows itself (``scheme://host:port``, for the
            proofs' ``htu``); by default ``http(s)://<auth_target>``; required with a key and several
            auth targets (their shared ``AUTHMESH_DPOP_ORIGINS``).
    """

    scopes: Sequence[str]
    renew_margin: float
    timeout: float
    credentials: grpc.ChannelCredentials | None
    on_renew: Callable[[Tokens], None] | None
    clock: Callable[[], float]
    dpop_key: ProofSigner | None
    auth_origin: str | None


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


class SessionRules:
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
        # Checked now (a malformed list is a configuration error, not a failed call later).
        balanced_target(auth_target)
        self.auth_target = auth_target
        self._login = _credentials(username, password, scopes, tokens)
        self._margin = renew_margin
        self._timeout = options.get("timeout", DEFAULT_TIMEOUT_SECONDS)
        self._credentials = options.get("credentials")
        self._on_renew = options.get("on_renew")
        self._clock = clock
        self._dpop_key = options.get("dpop_key")
        auth_origin = options.get("auth_origin")
        if auth_origin is None and self._dpop_key is not None and "," in auth_target:
            # Each process names itself by its own address unless they share AUTHMESH_DPOP_ORIGINS.
            raise ConfigurationError("a DPoP-bound session over several auth processes needs auth_origin")
        self._auth_origin = auth_origin or default_origin(auth_target, secure=self._credentials is not None)
        # The latest nonce each origin asked for (RFC 9449 §8), put in the next proof for it.
        self._nonces: dict[str, str] = {}
        self._grant = None if tokens is None else Grant.of(tokens, clock(), renew_margin)
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
        """A session of a service account given as ``username:password``, or as a bare ``username`` that
        logs in by the client certificate in ``credentials`` (the auth service maps the certificate to
        the account: ``AUTHMESH_CERTIFICATE_ACCOUNTS``).

        Raises:
            ConfigurationError: The account is malformed, or a bare username comes without credentials.
        """
        if ":" not in account and account.strip():
            if options.get("credentials") is None:
                raise ConfigurationError(
                    "a service account without a password logs in by its client certificate: "
                    "give credentials (TLS with the certificate)"
                )
            # An empty password on a mutual-TLS connection asks for a login by certificate.
            return cls(auth_target, username=account.strip(), password="", **options)
        username, password = service_account(account)
        return cls(auth_target, username=username, password=password, **options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **options: Unpack[SessionOptions]) -> Self:
        """A session configured by the environment, for twelve-factor services and scripts.

        Reads ``AUTHMESH_AUTH_TARGET`` (``host:port`` of the auth service), ``AUTHMESH_CLIENT_ACCOUNT``
        (``username:password`` of the account the program calls as, or a bare ``username`` logging in by
        the client certificate in ``credentials``) and, if set,
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
    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """The credentials of the session's channels (TLS), None for insecure ones."""
        return self._credentials

    @property
    def tokens(self) -> Tokens | None:
        """The current tokens, if the session has any yet."""
        return None if self._grant is None else self._grant.tokens

    def _held(self) -> Grant:
        if self._ended is not None:
            raise self._ended
        if self._grant is None:
            raise SessionEnded("not logged in", code="NOT_LOGGED_IN")
        return self._grant

    def _fresh(self) -> Grant | None:
        if self._ended is not None:
            raise self._ended
        grant = self._grant
        return grant if grant is not None and not grant.due(self._clock()) else None

    def _plan(self, stale: Grant | None) -> tuple[Grant | None, str | None]:
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

    def _store(self, tokens: Tokens) -> Grant:
        self._grant = Grant.of(tokens, self._clock(), self._margin)
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

    def _auth_proof(self, method: str) -> str | None:
        """A proof for ``Login`` or ``Refresh`` at the auth service, when the session has a key."""
        if self._dpop_key is None:
            return None
        origin = self._auth_origin
        return self._dpop_key.proof(origin, method, nonce=self._nonces.get(origin))

    def _call_metadata(
        self, metadata: Iterable[tuple[str, Any]] | None, method: str | bytes, token: str, origin: str
    ) -> list[tuple[str, Any]]:
        """The call's metadata with the token (and, with a key, a fresh proof for this method)."""
        if self._dpop_key is None:
            return with_token(metadata, token)
        path = method.decode() if isinstance(method, bytes) else method
        proof = self._dpop_key.proof(origin, path, access_token=token, nonce=self._nonces.get(origin))
        return with_token(metadata, token, proof=proof)

    def _take_nonce(self, error: grpc.RpcError, origin: str) -> bool:
        """Keep the nonce a refusal asked for; whether it was such a refusal."""
        if self._dpop_key is None or error_reason(error) != DPOP_NONCE_REQUIRED:
            return False
        trailers: tuple[Any, ...] = error.trailing_metadata() or ()
        for entry in trailers:
            key, value = entry
            if key == DPOP_NONCE_METADATA_KEY and isinstance(value, str):
                self._nonces[origin] = value
                return True
        return False


def with_token(
    metadata: Iterable[tuple[str, Any]] | None, token: str, *, proof: str | None = None
) -> list[tuple[str, Any]]:
    kept = [(key, value) for key, value in (metadata or ()) if key not in (AUTHORIZATION, DPOP_METADATA_KEY)]
    if proof is None:
        kept.append((AUTHORIZATION, f"Bearer {token}"))
    else:
        kept.append((AUTHORIZATION, f"DPoP {token}"))
        kept.append((DPOP_METADATA_KEY, proof))
    return kept


def refused_as_expired(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.UNAUTHENTICATED and error_reason(error) == TOKEN_EXPIRED


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
