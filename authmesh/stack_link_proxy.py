"""A TCP proxy between a replica and NATS, so the local stack can cut that link and restore it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from authmesh.processes import LOOPBACK

_PROXY_CONNECT_TIMEOUT_SECONDS = 2.0
_PROXY_CLOSE_TIMEOUT_SECONDS = 2.0
_PROXY_CHUNK_BYTES = 64 * 1024


class LinkProxy:
    """A TCP proxy on 127.0.0.1 in front of one upstream address; it can cut the link on demand.

    Two kinds of cut: ``cut()`` resets every connection and refuses new ones, so the client sees the
    disconnect at once; ``cut(silent=True)`` keeps connections open but moves no byte in either
    direction, a partition the client notices only by what stops arriving (heartbeats). ``restore()``
    lets bytes flow again; after a silent cut nothing is lost, as after a healed network.

    Args:
        name: For errors.
        upstream: ``(host, port)`` to forward to.
    """

    def __init__(self, name: str, upstream: tuple[str, int]) -> None:
        self.name = name
        self.upstream = upstream
        self._server: asyncio.Server | None = None
        self._port = 0
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The port it listens on (after ``start``)."""
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self._port}"

    @property
    def state(self) -> str:
        """``open``, ``cut`` or ``silent``."""
        if self._refusing:
            return "cut"
        return "open" if self._flowing.is_set() else "silent"

    @property
    def connections(self) -> int:
        """How many client connections are linked to the upstream now."""
        return len(self._links)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self._port = int(self._server.sockets[0].getsockname()[1])

    def cut(self, *, silent: bool = False) -> None:
        """Cut the link.

        Args:
            silent: Keep connections open but move no byte, instead of resetting them.
        """
        if silent:
            self._refusing = False
            self._flowing.clear()
            return
        self._refusing = True
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()
        # Wakes handlers and pumps parked by a silent cut; they find their connections gone.
        self._flowing.set()

    def restore(self) -> None:
        """Let connections through again."""
        self._refusing = False
        self._flowing.set()

    async def aclose(self) -> None:
        """Stop listening, reset every connection and wait (with a deadline) for the handlers to end."""
        if self._server is not None:
            self._server.close()
        self.cut()
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=_PROXY_CLOSE_TIMEOUT_SECONDS)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PROXY_CLOSE_TIMEOUT_SECONDS):
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            if not self._refusing:
                await self._flowing.wait()  # a silent cut stalls new connections too
            if self._refusing:
                return
            try:
                async with asyncio.timeout(_PROXY_CONNECT_TIMEOUT_SECONDS):
                    upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            except (OSError, TimeoutError):
                return
            link = (writer, upstream_writer)
            self._links.add(link)
            try:
                await self._pump_both_ways(reader, writer, upstream_reader, upstream_writer)
            finally:
                self._links.discard(link)
                upstream_writer.transport.abort()
        finally:
            writer.transport.abort()
            if handler is not None:
                self._handlers.discard(handler)

    async def _pump_both_ways(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        pumps = [
            asyncio.create_task(self._pump(reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, writer)),
        ]
        try:
            # Either side closing ends the link.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(_PROXY_CHUNK_BYTES)
                if not data:
                    return
                # Bytes read just before a silent cut wait for the restore instead of slipping through.
                await self._flowing.wait()
                if self._refusing:
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            return
