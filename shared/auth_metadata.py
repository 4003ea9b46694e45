"""What a resource service must enforce, as the auth service publishes it (RFC 8414 metadata).

The auth service serves ``GET /.well-known/oauth-authorization-server`` with the standard ``issuer``
and, as extension members, the audience it issues access tokens for, their lifetime and its clock
leeway. A resource service reads them at start instead of having them copied into its own settings: a
replica whose lifetime setting is lower than the auth service's would forget revocations while the
revoked tokens are still alive.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
import structlog

from authmesh._shared.errors import ConfigurationError, Unavailable
from authmesh._shared.settings import CommonSettings
from authmesh._shared.tls import TlsFiles, check_https_url, client_ssl_context

METADATA_PATH = "/.well-known/oauth-authorization-server"
AUDIENCE_MEMBER = "authmesh_access_token_audience"
LIFETIME_MEMBER = "authmesh_access_token_lifetime"
LEEWAY_MEMBER = "authmesh_leeway"
AUTH_METADATA_UNAVAILABLE = "AUTH_METADATA_UNAVAILABLE"
_RETRY_INITIAL_SECONDS = 0.2
_RETRY_MAX_SECONDS = 2.0
_log = structlog.get_logger(__name__)


def server_metadata_extensions(settings: CommonSettings) -> dict[str, Any]:
    """The extension members the auth service adds to its RFC 8414 metadata."""
    return {
        AUDIENCE_MEMBER: settings.audience,
        LIFETIME_MEMBER: settings.access_token_ttl,
        LEEWAY_MEMBER: settings.leeway,
    }


@dataclass(frozen=True, slots=True)
class TokenRules:
    """What every access token the auth service issues says, and how long it lives.

    Attributes:
        issuer: ``iss``.
        audience: ``aud`` of access tokens for resource services.
        access_token_ttl: Longest lifetime (``exp - iat``), seconds.
        leeway: Clock leeway on ``exp``/``nbf``, seconds.
    """

    issuer: str
    audience: str
    access_token_ttl: float
    leeway: float

    @classmethod
    def from_metadata(cls, document: object) -> TokenRules:
        """Read the rules from a metadata document.

        Raises:
            ConfigurationError: The document lacks a member or has one of the wrong type.
        """
        if not isinstance(document, dict):
            raise ConfigurationError("auth service metadata is not a JSON object")
        issuer, audience = document.get("issuer"), document.get(AUDIENCE_MEMBER)
        lifetime, leeway = document.get(LIFETIME_MEMBER), document.get(LEEWAY_MEMBER)
        if not isinstance(issuer, str) or not issuer or not isinstance(audience, str) or not audience:
            raise ConfigurationError(f"auth service metadata lacks issuer or {AUDIENCE_MEMBER}")
        for name, value in ((LIFETIME_MEMBER, lifetime), (LEEWAY_MEMBER, leeway)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigurationError(f"auth service metadata lacks a number {name}")
        assert isinstance(lifetime, int | float)  # checked just above
        assert isinstance(leeway, int | float)
        if lifetime <= 0 or leeway < 0:
            raise ConfigurationError("auth service metadata gives a negative lifetime or leeway")
        return cls(issuer=issuer, audience=audience, access_token_ttl=float(lifetime), leeway=float(leeway))


async def fetch_token_rules(
    auth_url: str,
    *,
    within: float,
    request_timeout: float = 2.0,
    tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
) -> TokenRules:
    """Read the auth service's rules, retrying (with jittered backoff) until ``within`` seconds pass.

    Args:
        auth_url: The auth service's HTTP base URL (``https://host:port``, or ``http://`` without TLS).
        within: Seconds to keep trying while the auth service cannot be reached.
        request_timeout: Deadline of one request, seconds.
        tls: ``https://`` is verified against ``tls.ca_file`` (and this process's certificate presented);
            with a CA, ``http://`` is refused (see :func:`authmesh._shared.tls.check_https_url`).

    Raises:
        ConfigurationError: The URL does not fit the TLS settings, or the auth service answered with
            metadata that lacks the rules.
        Unavailable: It could not be reached (or not verified) within ``within`` seconds.
    """
    check_https_url(auth_url, tls, "AUTHMESH_AUTH_URL")
    url = auth_url.rstrip("/") + METADATA_PATH
    deadline = time.monotonic() + within
    delay = _RETRY_INITIAL_SECONDS
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    # None (plaintext http://) only when check_https_url allowed it, that is without a CA.
    connector = aiohttp.TCPConnector(ssl=client_ssl_context(tls) or True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        while True:
            try:
                # A redirect could lead off https:// or to another host: metadata is read where configured.
                async with session.get(url, allow_redirects=False) as response:
                    if response.status != HTTPStatus.OK:
                        raise ValueError(f"HTTP {response.status}")
                    document = await response.json(content_type=None)
                return TokenRules.from_metadata(document)
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(
                        f"auth service metadata at {url} unavailable: {type(error).__name__}",
                        code=AUTH_METADATA_UNAVAILABLE,
                    ) from error
                _log.info("waiting for the auth service metadata", url=url, error=type(error).__name__)
                await asyncio.sleep(min(left, delay * random.uniform(0.5, 1.0)))  # noqa: S311  # jitter
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
