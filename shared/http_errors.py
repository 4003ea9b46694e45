"""The HTTP edge of the error hierarchy: one table from error class to HTTP status and OAuth error code.

Bearer-token refusals follow RFC 6750 §3: 401 with ``WWW-Authenticate: Bearer error="invalid_token"``,
403 with ``error="insufficient_scope"``; a refused DPoP proof (RFC 9449 §7.1) 401 with
``WWW-Authenticate: DPoP error="invalid_dpop_proof"`` (``use_dpop_nonce`` and a ``DPoP-Nonce`` header when
a nonce is wanted). A service that cannot decide answers 503 with ``Retry-After``.
The Envoy ext_authz answers and the auth service's OAuth endpoints both use this table, as the gRPC side
uses :mod:`authmesh._shared.grpc_errors`.
"""

from __future__ import annotations

from dataclasses import dataclass

from authmesh._shared.errors import (
    AlreadyExists,
    AuthError,
    DpopNonceRequired,
    DpopRejected,
    InsufficientScope,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    TokenRejected,
    Unavailable,
)

# Most specific first: the first class an error is an instance of decides. The codes are RFC 6750's
# (invalid_token, insufficient_scope, invalid_request) and RFC 6749's (temporarily_unavailable).
HTTP_STATUS_BY_ERROR: tuple[tuple[type[AuthError], int, str], ...] = (
    (TokenRejected, 401, "invalid_token"),
    (PermissionDenied, 403, "insufficient_scope"),
    (InvalidRequest, 400, "invalid_request"),
    (NotFound, 404, "invalid_request"),
    (AlreadyExists, 409, "invalid_request"),
    (RateLimited, 429, "temporarily_unavailable"),
    (Unavailable, 503, "temporarily_unavailable"),
)
# Seconds a client waits before retrying a 503: a stale revocation state recovers with the next heartbeat.
UNAVAILABLE_RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True, slots=True)
class HttpRefusal:
    """How an error is answered over HTTP.

    Attributes:
        status: The HTTP status code.
        error: The OAuth error code (``invalid_token``, ``insufficient_scope``, ...).
        description: What was wrong (the error's message; never a secret).
        reason: authmesh's stable reason code (``TOKEN_REVOKED``, ...).
        headers: ``WWW-Authenticate`` for 401 and 403, ``Retry-After`` for 429 and 503.
    """

    status: int
    error: str
    description: str
    reason: str
    headers: tuple[tuple[str, str], ...]

    def body(self) -> dict[str, str]:
        """The JSON error body (RFC 6749 §5.2 names, plus the reason code)."""
        return {"error": self.error, "error_description": self.description, "reason": self.reason}


def http_refusal(error: AuthError) -> HttpRefusal:
    """The HTTP answer for an error."""
    status, code = 500, "server_error"
    for kind, kind_status, kind_code in HTTP_STATUS_BY_ERROR:
        if isinstance(error, kind):
            status, code = kind_status, kind_code
            break
    headers: list[tuple[str, str]] = []
    if isinstance(error, DpopRejected):
        # RFC 9449 §7.1: a refused proof is answered with a DPoP challenge (and the nonce it asks for).
        nonce = error.nonce if isinstance(error, DpopNonceRequired) else None
        dpop_code = "invalid_dpop_proof" if nonce is None else "use_dpop_nonce"
        challenge = f'DPoP error="{dpop_code}", error_description="{_quoted(error.message)}"'
        headers.append(("www-authenticate", challenge))
        if nonce is not None:
            headers.append(("dpop-nonce", nonce))
        return HttpRefusal(status, dpop_code, error.message, error.code, tuple(headers))
    if status in (401, 403):
        challenge = f'Bearer error="{code}", error_description="{_quoted(error.message)}"'
        if isinstance(error, InsufficientScope):
            challenge += f', scope="{_quoted(error.required)}"'
        headers.append(("www-authenticate", challenge))
    if isinstance(error, RateLimited):
        headers.append(("retry-after", f"{max(1, round(error.retry_after))}"))
    elif status == 503:
        headers.append(("retry-after", str(UNAVAILABLE_RETRY_AFTER_SECONDS)))
    return HttpRefusal(status, code, error.message, error.code, tuple(headers))


def _quoted(text: str) -> str:
    """``text`` as the inside of an RFC 9110 quoted-string (printable ASCII, escaped quotes)."""
    printable = "".join(char if " " <= char <= "~" else "?" for char in text)
    return printable.replace("\\", "\\\\").replace('"', '\\"')
