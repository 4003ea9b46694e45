"""Waiting on a condition with a deadline: the only way tests wait for something to happen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

POLL_SECONDS = 0.02


async def eventually(condition: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Poll ``condition`` until it returns True; fail the test after ``within`` seconds.

    Args:
        condition: An async predicate.
        within: The deadline in seconds.
        what: What is awaited, for the failure message.
    """
    deadline = time.monotonic() + within
    while True:
        if await condition():
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {within:.1f} s waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)
