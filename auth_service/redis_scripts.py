"""Lua scripts run with ``EVALSHA`` at a low CPU cost, on connections of a redis-py client's pool.

Every state change of the auth service is one script call, and a Refresh is little more than one: the
client side of that call is on the hot path.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from authmesh._shared.errors import Unavailable

# The deadline of a script call when the client has no socket timeout: a script call never waits forever.
DEFAULT_SCRIPT_TIMEOUT_SECONDS = 5.0
# At most this many connections (and never more than half the pool) stay borrowed between script calls.
MAX_IDLE_SCRIPT_CONNECTIONS = 32


@dataclass(frozen=True, slots=True)
class ReplicaAck:
    """How many replicas must hold a write before it is acknowledged, and how long to wait for them.

    Replication is asynchronous: a primary that dies right after answering takes the write with it,
    and the replica promoted in its place never had it. ``WAIT`` on the writing connection holds the
    answer until that many replicas have the write.
    """

    replicas: int
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script and the SHA1 Redis caches it under."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> LuaScript:
        """The script with its SHA1 computed once."""
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


class ScriptRunner:
    """Runs Lua scripts with ``EVALSHA`` on connections borrowed from the client's pool, at a low CPU cost.

    A Refresh is one script call, and redis-py's command path (retry wrapper, observability hooks, command
    packing in Python, the pool's lock and health check, a task per write for the socket timeout) was a
    large share of its CPU. Here a command is packed by hiredis and sent on a connection kept borrowed
    between calls, under one deadline for the whole round trip. What the usual path guarantees still
    holds:

    - connections belong to the client's pool, so closing the client closes them too;
    - the deadline is the client's socket timeout; a connection whose call failed, timed out or was
      cancelled is disconnected and handed back to the pool, never reused as it is;
    - failures are redis-py's exceptions (``ConnectionError``, ``TimeoutError``, ``ResponseError``);
    - a ``NOSCRIPT`` reply (``SCRIPT FLUSH``, a Redis restarted) loads the script and retries once.

    A call is not retried after a connection error: its script may have run, and rotating a refresh
    token twice would look like reuse.

    Args:
        pool: The client's connection pool.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._socket_timeout: float | None = pool.connection_kwargs.get("socket_timeout")
        self._deadline = self._socket_timeout or DEFAULT_SCRIPT_TIMEOUT_SECONDS
        self._max_idle = min(MAX_IDLE_SCRIPT_CONNECTIONS, pool.max_connections // 2)
        self._idle: list[AbstractConnection] = []

    async def run(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[str | int],
        ack: ReplicaAck | None = None,
    ) -> Any:
        """The script's reply; with ``ack``, only once that many replicas hold what it wrote.

        Raises:
            redis.exceptions.RedisError: Redis failed, did not answer in time, or the script failed.
            Unavailable: ``STORE_NOT_REPLICATED``: too few replicas had the write in time (it may
                still be on the primary; a retry of the call is idempotent).
        """
        conn = await self._acquire()
        try:
            reply = await self._evalsha(conn, script, keys, args)
            if ack is not None and ack.replicas > 0:
                await self._wait_for_replicas(conn, ack)
            return reply
        except (ResponseError, Unavailable):
            raise  # the reply was read in full: the connection is in step
        except BaseException:
            # A lost connection, the deadline or a cancellation may leave a reply in flight.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await self._release(conn)

    async def _evalsha(
        self, conn: AbstractConnection, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            async with asyncio.timeout(self._deadline):
                try:
                    return await self._call(conn, command)
                except NoScriptError:
                    await self._call(conn, ("SCRIPT", "LOAD", script.source))
                    return await self._call(conn, command)
        except TimeoutError as error:
            raise RedisTimeoutError(f"no reply from Redis within {self._deadline} s") from error

    async def _wait_for_replicas(self, conn: AbstractConnection, ack: ReplicaAck) -> None:
        try:
            async with asyncio.timeout(self._deadline + ack.timeout_ms / 1000):
                acked = await self._call(conn, ("WAIT", ack.replicas, ack.timeout_ms))
        except TimeoutError as error:
            raise RedisTimeoutError("no reply from Redis to WAIT") from error
        if int(acked) < ack.replicas:
            raise Unavailable(
                f"the store's write reached {acked} of {ack.replicas} replicas in {ack.timeout_ms} ms",
                code="STORE_NOT_REPLICATED",
            )

    @staticmethod
    async def _call(conn: AbstractConnection, command: tuple[str | int, ...]) -> Any:
        packed = hiredis.pack_command(command)  # type: ignore[arg-type]  # the stub types it as a 1-tuple
        await conn.send_packed_command(packed, check_health=False)
        return await conn.read_response()

    async def _acquire(self) -> AbstractConnection:
        if not self._idle:
            # A deprecation decorator hides get_connection's signature from mypy.
            conn: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            # Our deadline bounds the round trip; the connection's own would cost a task per write.
            conn.socket_timeout = None
            return conn
        conn = self._idle.pop()
        # Closed by the server while idle (a restart, an idle timeout): reconnect before anything is sent
        # on it, instead of failing a call whose script never reached Redis.
        if conn.is_connected and await _closed_or_unsolicited(conn):
            await conn.disconnect()
        return conn

    async def _release(self, conn: AbstractConnection) -> None:
        if conn.is_connected and len(self._idle) < self._max_idle:
            self._idle.append(conn)
            return
        conn.socket_timeout = self._socket_timeout
        await self._pool.release(conn)


async def _closed_or_unsolicited(conn: AbstractConnection) -> bool:
    """Whether an idle connection is unfit for a call: the server closed or reset it, or sent a reply
    nobody is waiting for.

    redis-py up to 8.1 answers a closed connection's ``can_read`` with True; from 8.2 its parsers raise
    ``ConnectionError`` instead. Both mean the same here, and nothing has been sent yet.
    """
    try:
        return bool(await conn.can_read())
    except RedisConnectionError:
        return True
