"""The helpers every service process and background loop relies on to stop."""

from __future__ import annotations

import asyncio

import pytest

from authmesh._shared.lifecycle import raise_if_cancelled

DEADLINE_SECONDS = 5.0


async def test_a_loop_stops_even_when_its_cancellation_was_swallowed_on_the_way() -> None:
    turns = 0
    waiting = asyncio.Event()

    async def loop() -> None:
        nonlocal turns
        while True:
            raise_if_cancelled()
            turns += 1
            try:
                waiting.set()
                await asyncio.sleep(DEADLINE_SECONDS * 2)
            except asyncio.CancelledError:
                # What asyncio.wait_for does on Python 3.11 when a result races the cancellation.
                pass

    task = asyncio.create_task(loop())
    await asyncio.wait_for(waiting.wait(), DEADLINE_SECONDS)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(DEADLINE_SECONDS):
            await task
    assert turns == 1, "the loop ended at the top of its next turn"


async def test_a_task_without_a_pending_cancellation_goes_on() -> None:
    async def turn() -> str:
        raise_if_cancelled()
        return "went on"

    assert await asyncio.create_task(turn()) == "went on"
