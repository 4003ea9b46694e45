"""Request-field checks: every bad input gets a clear INVALID_ARGUMENT before any work is done."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence

from authmesh._shared.errors import InvalidRequest

MAX_USERNAME = 128
MAX_PASSWORD = 1024
MIN_NEW_PASSWORD = 8
MAX_TOKEN = 8192
MAX_REASON = 512
MAX_ID = 128
MAX_SCOPES = 32
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")
# RFC 6749 §3.3 scope-token: printable ASCII except space, '"' and '\'.
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,64}")
_ID = re.compile(r"[A-Za-z0-9_.:-]+")
# An RFC 7638 SHA-256 thumbprint: 32 bytes as unpadded base64url.
_JKT = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")


def _required(name: str, value: str, limit: int) -> str:
    if not value:
        raise InvalidRequest(f"{name} is required", code="FIELD_REQUIRED")
    if len(value) > limit:
        raise InvalidRequest(f"{name} is longer than {limit} characters", code="FIELD_TOO_LARGE")
    return value


def username(value: str) -> str:
    """A username: 1-128 of letters, digits and ``._@+-``, starting with a letter or digit."""
    _required("username", value, MAX_USERNAME)
    if not _USERNAME.fullmatch(value):
        raise InvalidRequest("username has characters that are not allowed", code="FIELD_INVALID")
    return value


def password(value: str, *, new: bool = False) -> str:
    """A password (a new one at least 8 characters)."""
    _required("password", value, MAX_PASSWORD)
    if new and len(value) < MIN_NEW_PASSWORD:
        raise InvalidRequest(f"password must be at least {MIN_NEW_PASSWORD} characters", code="FIELD_INVALID")
    return value


def token(value: str, name: str = "token") -> str:
    """A token field (access or refresh token)."""
    _required(name, value, MAX_TOKEN)
    if not value.isascii() or not value.isprintable():
        raise InvalidRequest(f"{name} is malformed", code="FIELD_INVALID")
    return value


def identifier(value: str, name: str) -> str:
    """A session id or subject."""
    _required(name, value, MAX_ID)
    if not _ID.fullmatch(value):
        raise InvalidRequest(f"{name} is malformed", code="FIELD_INVALID")
    return value


def jkt(value: str) -> str:
    """A DPoP key thumbprint (RFC 7638, SHA-256, base64url)."""
    _required("jkt", value, MAX_ID)
    if not _JKT.fullmatch(value):
        raise InvalidRequest("jkt is not a SHA-256 JWK thumbprint", code="FIELD_INVALID")
    return value


def reason(value: str) -> str:
    """A free-text revocation reason (optional)."""
    if len(value) > MAX_REASON:
        raise InvalidRequest(f"reason is longer than {MAX_REASON} characters", code="FIELD_TOO_LARGE")
    return value


def scopes(values: Sequence[str]) -> tuple[str, ...]:
    """A list of scope tokens, without duplicates, order kept."""
    if len(values) > MAX_SCOPES:
        raise InvalidRequest(f"at most {MAX_SCOPES} scopes", code="FIELD_TOO_LARGE")
    for value in values:
        if not _SCOPE.fullmatch(value):
            raise InvalidRequest("scope has characters that are not allowed", code="FIELD_INVALID")
    return tuple(dict.fromkeys(values))


def page_size(value: int) -> int:
    """A page size: 1 to 1000, or 0 for the default (100)."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 0 < value <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"page_size must be between 1 and {MAX_PAGE_SIZE}", code="FIELD_INVALID")
    return value


def page_token(value: str) -> str:
    """The username a page token continues after ("" for the first page)."""
    if not value:
        return ""
    _required("page_token", value, MAX_USERNAME * 2)
    try:
        decoded = base64.urlsafe_b64decode(value.encode("ascii")).decode("ascii")
    except (ValueError, binascii.Error):
        raise InvalidRequest("page_token is not one this service issued", code="FIELD_INVALID") from None
    if not _USERNAME.fullmatch(decoded) or next_page_token(decoded) != value:
        raise InvalidRequest("page_token is not one this service issued", code="FIELD_INVALID")
    return decoded


def next_page_token(last_username: str) -> str:
    """The page token that continues after ``last_username`` (opaque to clients)."""
    return base64.urlsafe_b64encode(last_username.encode()).decode("ascii")
