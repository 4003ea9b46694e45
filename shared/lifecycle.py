"""Running a service process: until SIGTERM or SIGINT, then a graceful stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager


def run_until_signalled(app: Callable[[], AbstractAsyncContextManager[object]]) -> None:
    """Enter the app (started when entered, stopped gracefully when left) and wait for a signal.

    Args:
        app: Builds the service's composition root, an async context manager.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with app():
            await stop.wait()

    asyncio.run(main())
