"""The one exception hierarchy of authmesh.

Every error carries a stable UPPER_SNAKE ``code`` (the ``ErrorInfo.reason`` on the wire) and a message
that says what was wrong without echoing a token, a password or a key. The gRPC edge maps each class to
a status code in one table (``authmesh._shared.grpc_errors``).

::

    AuthError
    ├── TokenRejected                     UNAUTHENTICATED
    │   ├── TokenMissing                  TOKEN_MISSING
    │   ├── MalformedToken                MALFORMED_TOKEN
    │   ├── TokenTooLarge                 TOKEN_TOO_LARGE
    │   ├── UnsupportedAlgorithm          UNSUPPORTED_ALGORITHM
    │   ├── WrongTokenType                WRONG_TOKEN_TYPE
    │   ├── UnknownKey                    KEY_UNKNOWN
    │   ├── KeyRevoked                    KEY_REVOKED
    │   ├── BadSignature                  BAD_SIGNATURE
    │   ├── InvalidClaim                  INVALID_CLAIM
    │   ├── WrongIssuer                   WRONG_ISSUER
    │   ├── WrongAudience                 WRONG_AUDIENCE
    │   ├── TokenExpired                  TOKEN_EXPIRED
    │   ├── TokenNotYetValid              TOKEN_NOT_YET_VALID
    │   ├── TokenRevoked                  TOKEN_REVOKED / SESSION_REVOKED / USER_REVOKED
    │   ├── InvalidCredentials            INVALID_CREDENTIALS
    │   │   └── CertificateNotAccepted    CERTIFICATE_NOT_ACCEPTED (a login by client certificate)
    │   ├── InvalidRefreshToken           REFRESH_TOKEN_INVALID
    │   ├── RefreshTokenReused            REFRESH_TOKEN_REUSED
    │   ├── UserDisabled                  USER_DISABLED
    │   ├── DpopRejected                  DPOP_PROOF_INVALID (a DPoP proof, RFC 9449)
    │   │   ├── DpopProofMissing          DPOP_PROOF_MISSING
    │   │   ├── DpopProofReplayed         DPOP_PROOF_REPLAYED
    │   │   ├── DpopKeyMismatch           DPOP_KEY_MISMATCH
    │   │   └── DpopNonceRequired         DPOP_NONCE_REQUIRED (the nonce in trailing ``dpop-nonce``)
    │   └── SessionEnded                  the auth service's reason (a client's session cannot renew)
    ├── PermissionDenied                  PERMISSION_DENIED
    │   ├── InsufficientScope             INSUFFICIENT_SCOPE
    │   └── NotOwner                      NOT_OWNER
    ├── InvalidRequest                    INVALID_ARGUMENT (codes: FIELD_REQUIRED, FIELD_TOO_LARGE, ...)
    ├── AlreadyExists                     ALREADY_EXISTS (USER_EXISTS)
    ├── NotFound                          NOT_FOUND (SESSION_NOT_FOUND, USER_NOT_FOUND)
    ├── RateLimited                       RESOURCE_EXHAUSTED (RATE_LIMITED)
    ├── Unavailable                       UNAVAILABLE (BROKER_UNAVAILABLE, KEYS_UNAVAILABLE,
    │   │                                 REVOCATION_STATE_STALE, ...)
    │   └── StoreUnavailable              STORE_UNAVAILABLE (the store cannot be reached or timed out)
    ├── StoreError                        INTERNAL (STORE_ERROR: the store answered a command with an error)
    ├── ConfigurationError                CONFIGURATION_INVALID (raised at start, never on the wire)
    └── EventRejected                     EVENT_* (an event on NATS we cannot trust: EVENT_WRONG_SUBJECT,
                                          EVENT_FOREIGN_ISSUER, EVENT_BAD_SIGNATURE, EVENT_MALFORMED, ...)
"""

from __future__ import annotations

from typing import ClassVar


class AuthError(Exception):
    """Root of every error authmesh raises on purpose.

    Args:
        message: What was wrong, for people; never contains a secret.
        code: Overrides the class's stable code where one class covers several reasons.
    """

    code: ClassVar[str] = "AUTH_ERROR"
    default_message: ClassVar[str] = "authentication error"

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code  # type: ignore[misc]  # an instance may narrow its class's code
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class TokenRejected(AuthError):
    """A credential or token was not accepted."""

    code = "TOKEN_REJECTED"
    default_message = "token rejected"


class TokenMissing(TokenRejected):
    """No bearer token was presented."""

    code = "TOKEN_MISSING"
    default_message = "bearer token missing"


class MalformedToken(TokenRejected):
    """The token is not a well-formed compact JWS of the kind we issue."""

    code = "MALFORMED_TOKEN"
    default_message = "token malformed"


class TokenTooLarge(MalformedToken):
    """The token exceeds the size cap and was not decoded."""

    code = "TOKEN_TOO_LARGE"
    default_message = "token too large"


class UnsupportedAlgorithm(MalformedToken):
    """The header names an algorithm other than ES256, or an unsupported header parameter."""

    code = "UNSUPPORTED_ALGORITHM"
    default_message = "token algorithm not accepted"


class WrongTokenType(MalformedToken):
    """The ``typ`` header is not the expected one (``at+jwt`` for access tokens)."""

    code = "WRONG_TOKEN_TYPE"
    default_message = "wrong token type"


class UnknownKey(TokenRejected):
    """No public key is known for the token's ``kid``.

    Args:
        kid: The key id the token or event named, so a caller can fetch keys for it without decoding
            the token again.
    """

    code = "KEY_UNKNOWN"
    default_message = "signing key unknown"

    def __init__(self, kid: str, message: str | None = None) -> None:
        self.kid = kid
        super().__init__(message)


class KeyRevoked(TokenRejected):
    """The token was signed with a key that has been retired."""

    code = "KEY_REVOKED"
    default_message = "signing key revoked"


class BadSignature(TokenRejected):
    """The signature does not verify."""

    code = "BAD_SIGNATURE"
    default_message = "bad signature"


class InvalidClaim(TokenRejected):
    """A required claim is missing or of the wrong type.

    Args:
        claim: The claim's name.
        message: Overrides the default message.
    """

    code = "INVALID_CLAIM"

    def __init__(self, claim: str, message: str | None = None) -> None:
        self.claim = claim
        super().__init__(message or f"claim {claim!r} missing or invalid")


class WrongIssuer(TokenRejected):
    """``iss`` is not the configured issuer."""

    code = "WRONG_ISSUER"
    default_message = "wrong issuer"


class WrongAudience(TokenRejected):
    """``aud`` does not name this service's audience."""

    code = "WRONG_AUDIENCE"
    default_message = "wrong audience"


class TokenExpired(TokenRejected):
    """``exp`` (plus leeway) has passed."""

    code = "TOKEN_EXPIRED"
    default_message = "token expired"


class TokenNotYetValid(TokenRejected):
    """``nbf`` or ``iat`` lies in the future (beyond the leeway)."""

    code = "TOKEN_NOT_YET_VALID"
    default_message = "token not yet valid"


class TokenRevoked(TokenRejected):
    """The token, its session, its user or its key has been revoked.

    ``code`` is ``TOKEN_REVOKED``, ``SESSION_REVOKED`` or ``USER_REVOKED``.
    """

    code = "TOKEN_REVOKED"
    default_message = "token revoked"


class InvalidCredentials(TokenRejected):
    """Unknown user or wrong password (deliberately indistinguishable)."""

    code = "INVALID_CREDENTIALS"
    default_message = "invalid username or password"


class CertificateNotAccepted(InvalidCredentials):
    """A login by client certificate that the auth service does not accept for that account: no
    verified certificate, a certificate whose names are not mapped to the account, or an auth service
    not configured for certificate logins."""

    code = "CERTIFICATE_NOT_ACCEPTED"
    default_message = "the client certificate does not identify this account"


class InvalidRefreshToken(TokenRejected):
    """The refresh token is unknown, expired or belongs to a revoked session."""

    code = "REFRESH_TOKEN_INVALID"
    default_message = "refresh token invalid"


class RefreshTokenReused(TokenRejected):
    """A spent refresh token was presented again: its whole session has been revoked."""

    code = "REFRESH_TOKEN_REUSED"
    default_message = "refresh token reused; session revoked"


class UserDisabled(TokenRejected):
    """The account is disabled: it can neither log in nor refresh until an admin enables it again."""

    code = "USER_DISABLED"
    default_message = "account disabled"


class DpopRejected(TokenRejected):
    """A DPoP proof (RFC 9449) is malformed, mis-signed, stale or made for another call."""

    code = "DPOP_PROOF_INVALID"
    default_message = "DPoP proof invalid"


class DpopProofMissing(DpopRejected):
    """A key-bound token came without a proof (or as a bearer token), or a proof was required."""

    code = "DPOP_PROOF_MISSING"
    default_message = "DPoP proof missing"


class DpopProofReplayed(DpopRejected):
    """This replica has already accepted a proof with the same ``jti``."""

    code = "DPOP_PROOF_REPLAYED"
    default_message = "DPoP proof replayed"


class DpopKeyMismatch(DpopRejected):
    """The proof's key is not the key the token (or the session) is bound to."""

    code = "DPOP_KEY_MISMATCH"
    default_message = "DPoP key does not match the token's binding"


class DpopNonceRequired(DpopRejected):
    """The service wants a fresh server nonce in the proof.

    Args:
        nonce: The nonce to put in the next proof (sent in trailing metadata ``dpop-nonce``).
    """

    code = "DPOP_NONCE_REQUIRED"

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        super().__init__("DPoP nonce required")


class SessionEnded(TokenRejected):
    """The auth service refused to open or renew a client's session; nothing is retried.

    ``code`` is the auth service's reason: ``REFRESH_TOKEN_INVALID`` (the session was revoked or the
    refresh token expired), ``REFRESH_TOKEN_REUSED``, ``INVALID_CREDENTIALS``, ``USER_REVOKED``, ...
    Raised by the renewing clients only, never on the wire.
    """

    code = "SESSION_ENDED"
    default_message = "the session has ended; log in again"


class PermissionDenied(AuthError):
    """A valid principal may not do this."""

    code = "PERMISSION_DENIED"
    default_message = "permission denied"


class InsufficientScope(PermissionDenied):
    """The token lacks a scope the call needs.

    Args:
        required: The scope that was missing.
    """

    code = "INSUFFICIENT_SCOPE"

    def __init__(self, required: str) -> None:
        self.required = required
        super().__init__(f"scope {required!r} required")


class NotOwner(PermissionDenied):
    """The caller is neither the owner of the session or token nor an admin."""

    code = "NOT_OWNER"
    default_message = "not the owner of this session"


class InvalidRequest(AuthError):
    """The request itself is malformed (empty, oversized or ill-formed fields)."""

    code = "INVALID_REQUEST"
    default_message = "invalid request"


class AlreadyExists(AuthError):
    """The thing to create exists already."""

    code = "ALREADY_EXISTS"
    default_message = "already exists"


class NotFound(AuthError):
    """The thing named does not exist."""

    code = "NOT_FOUND"
    default_message = "not found"


class RateLimited(AuthError):
    """Too many attempts; try again later.

    Args:
        retry_after: Seconds until the limit resets.
    """

    code = "RATE_LIMITED"

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__("too many attempts; try again later")


class Unavailable(AuthError):
    """A dependency is down, or the local state cannot be trusted to decide; retrying is safe.

    Args:
        message: What was wrong.
        code: The stable code.
        retry_after: Seconds the dependency asked us to wait before trying again, if it said.
    """

    code = "UNAVAILABLE"
    default_message = "service unavailable"

    def __init__(
        self, message: str | None = None, *, code: str | None = None, retry_after: float = 0.0
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class StoreUnavailable(Unavailable):
    """The store could not be reached or did not answer in time."""

    code = "STORE_UNAVAILABLE"
    default_message = "token store unavailable"


class StoreError(AuthError):
    """The store answered with an error (a script error, ``WRONGTYPE``, out of memory): not an outage.

    Retrying will not help until an operator acts; the service's log names the command and the reply.
    """

    code = "STORE_ERROR"
    default_message = "token store error"


class ConfigurationError(AuthError):
    """The settings are invalid; raised at start."""

    code = "CONFIGURATION_INVALID"
    default_message = "invalid configuration"


class EventRejected(AuthError):
    """An event read from NATS cannot be trusted (bad signature, malformed, unknown type)."""

    code = "EVENT_REJECTED"
    default_message = "event rejected"
