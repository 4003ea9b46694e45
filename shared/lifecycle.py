"""Running a service process: until SIGTERM or SIGINT, then a graceful stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Self

import structlog

_log = structlog.get_logger(__name__)


class Startable:
    """An async context manager that starts on entry and stops with :meth:`aclose` on exit.

    A start that fails half-way is undone at once: whatever ``_start`` had set up is closed before the
    error propagates.
    """

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop and release everything (safe after a partial start)."""
        raise NotImplementedError


def raise_if_cancelled() -> None:
    """Honour a cancellation of the current task that was requested but swallowed on the way.

    Every loop that runs until cancelled calls this once per turn. On Python 3.11
    ``asyncio.wait_for`` (which nats-py's requests use) returns its result instead of raising when the
    cancellation and the result arrive together (CPython gh-86296); the task then runs on, the request
    still counted by ``Task.cancelling()``, and whoever awaits it after cancelling waits forever.

    Raises:
        asyncio.CancelledError: The current task has a cancellation pending.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def run_until_signalled(app: Callable[[], AbstractAsyncContextManager[object]]) -> None:
    """Enter the app (started when entered, stopped gracefully when left) and wait for a signal.

    A signal that arrives while the app is still starting (waiting for NATS or Redis, say) cancels the
    start, which undoes what it had set up; the process then ends normally.

    Args:
        app: Builds the service's composition root, an async context manager.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        starting = asyncio.current_task()
        started = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            stop.set()
            if starting is not None and not started.is_set():
                _log.info("stopping while starting", signal=sig.name)
                starting.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            async with app():
                started.set()
                await stop.wait()
        except asyncio.CancelledError:
            if started.is_set() or not stop.is_set() or starting is None:
                raise
            starting.uncancel()

    asyncio.run(main())
