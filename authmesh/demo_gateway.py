"""The demo's gateway act: a stolen token used through Envoy against a service with no authmesh code.

Alice logs in; the attacker copies her access token and calls the echo service behind Envoy, whose
ext_authz filter asks an authmesh replica: it passes, and the service sees Alice's verified identity.
The admin revokes the session; the gateway is polled without pause from the start of ``RevokeSession``
until its first refusal.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from authmesh.client import AuthApi
from authmesh.refusal_watch import ACCEPTED, NO_ANSWER, Answer, watch_until_refused

# Bounded polling: a refusal that does not come within this long is reported as never.
GATEWAY_REFUSAL_DEADLINE_SECONDS = 5.0
GATEWAY_PATH = "/docs/report"


@dataclass(frozen=True, slots=True)
class GatewayOutcome:
    """What the attacker saw through the gateway.

    Attributes:
        status_before: HTTP status of the stolen token before the revocation.
        upstream_subject: The ``x-authmesh-subject`` the upstream service received then.
        subject: The ``sub`` of Alice's token.
        revoke_ms: How long ``RevokeSession`` took.
        refused_after_ms: From the RPC's start to the gateway's first 401; None if it never came.
        reason: The refusal's reason code (``SESSION_REVOKED``).
        polls: Requests sent through the gateway while waiting.
    """

    status_before: int
    upstream_subject: str
    subject: str
    revoke_ms: float
    refused_after_ms: float | None
    reason: str
    polls: int

    @property
    def ok(self) -> bool:
        """Accepted with Alice's identity before; refused as SESSION_REVOKED after."""
        return (
            self.status_before == 200
            and self.upstream_subject == self.subject
            and self.refused_after_ms is not None
            and self.reason == "SESSION_REVOKED"
        )


async def _call(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, dict[str, object]]:
    async with http.get(url, headers={"authorization": f"Bearer {token}"}) as reply:
        body = await reply.json(content_type=None)
        return reply.status, body if isinstance(body, dict) else {}


async def stolen_token_through_the_gateway(
    auth: AuthApi,
    http: aiohttp.ClientSession,
    *,
    gateway_url: str,
    admin_token: str,
    alice: tuple[str, str],
    step: Callable[[str], None],
) -> GatewayOutcome:
    """Play the act.

    Args:
        auth: The auth service.
        http: An HTTP session (its timeout bounds every request).
        gateway_url: The gateway's base URL.
        admin_token: An admin's access token.
        alice: Alice's ``(username, password)``.
        step: Tells the audience what happens.

    Returns:
        What the attacker saw.
    """
    url = gateway_url.rstrip("/") + GATEWAY_PATH
    tokens = await auth.login(*alice)
    step(f"alice logs in (session {tokens.session_id}); the attacker copies her access token")
    status_before, body = await _call(http, url, tokens.access_token)
    headers = body.get("headers")
    seen = headers.get("x-authmesh-subject") if isinstance(headers, dict) else None
    upstream_subject = seen[0] if isinstance(seen, list) and seen else ""
    step(f"through Envoy to the echo service (no authmesh code): HTTP {status_before} as {upstream_subject}")
    started = time.perf_counter()

    async def revoke() -> float:
        await auth.revoke_session(admin_token, tokens.session_id, "token theft")
        return (time.perf_counter() - started) * 1000

    async def ask() -> Answer:
        try:
            status, body = await _call(http, url, tokens.access_token)
        except (aiohttp.ClientError, TimeoutError):
            return NO_ANSWER
        if status == 401:
            return Answer(accepted=False, refused=True, label=str(body.get("reason", "")))
        return ACCEPTED if status == 200 else Answer(accepted=False, refused=False, label=f"HTTP {status}")

    revocation = asyncio.ensure_future(revoke())
    try:
        watched = await watch_until_refused(
            ask, until=started + GATEWAY_REFUSAL_DEADLINE_SECONDS, clock=time.perf_counter
        )
        revoke_ms = await revocation
    finally:
        revocation.cancel()
    refused_after_ms = None if watched.refused_at is None else (watched.refused_at - started) * 1000
    reason, polls = watched.label, watched.probes
    step(
        f"the admin revokes the session: the gateway refused the stolen token after "
        f"{refused_after_ms:.1f} ms ({reason}, {polls} polls)"
        if refused_after_ms is not None
        else f"the gateway still accepted the stolen token {GATEWAY_REFUSAL_DEADLINE_SECONDS:g} s later"
    )
    subject = str(_unverified_claims(tokens.access_token).get("sub", ""))
    return GatewayOutcome(
        status_before, upstream_subject, subject, revoke_ms, refused_after_ms, reason, polls
    )


def _unverified_claims(token: str) -> dict[str, object]:
    """The token's payload, unverified: only to show whose token it is."""
    segment = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return claims if isinstance(claims, dict) else {}
