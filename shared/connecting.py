"""Reaching NATS and Redis at start: say where and why it fails, retry for a bounded time, then give up
in one line.

A service started before its dependencies (a compose stack, a rolling restart) should wait for them a
while instead of dying at once, and one that can never reach them should say so and exit instead of
retrying in silence.
"""

from __future__ import annotations

import math
import time
from urllib.parse import urlsplit

import structlog

from authmesh._shared.errors import Unavailable

# While the cause stays the same, one line this often is enough to follow what a starting service does.
REPEAT_LOG_SECONDS = 5.0
_log = structlog.get_logger(__name__)


def address_of(url: str) -> str:
    """``host:port`` of a server URL, without the user name or password it may carry."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    host = parts.hostname or url
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port is not None else host


def describe(error: BaseException) -> str:
    """An error as a short cause: its type and message (``ConnectionRefusedError: [Errno 111] …``)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class StartupConnection:
    """What one dependency's connection attempts at start came to: logs failures, words the give-up.

    Args:
        what: The dependency (``NATS``, ``Redis``).
        address: Where it is looked for (``host:port``, comma-separated for a cluster; no credentials).
        timeout: Seconds the service keeps trying.
        code: The reason of the error it gives up with (``BROKER_UNAVAILABLE``, ``STORE_UNAVAILABLE``).
    """

    def __init__(self, what: str, address: str, timeout: float, code: str) -> None:
        self.what = what
        self.address = address
        self.timeout = timeout
        self.code = code
        self.failures = 0
        self.last_cause = ""
        self._last_logged = -math.inf

    def failed(self, error: BaseException) -> None:
        """Record a failed attempt; log it when its cause is new, and every few seconds while it lasts."""
        cause = describe(error)
        self.failures += 1
        now = time.monotonic()
        if cause != self.last_cause or now - self._last_logged >= REPEAT_LOG_SECONDS:
            _log.warning(
                f"cannot reach {self.what} yet; retrying",
                address=self.address,
                cause=cause,
                attempts=self.failures,
                gives_up_after=f"{self.timeout:g} s",
            )
            self._last_logged = now
        self.last_cause = cause

    def gave_up(self) -> Unavailable:
        """The error to exit with: where, for how long, and the last cause."""
        cause = self.last_cause or "no answer"
        return Unavailable(
            f"cannot reach {self.what} at {self.address} within {self.timeout:g} s "
            f"(AUTHMESH_CONNECT_TIMEOUT): {cause}",
            code=self.code,
        )
