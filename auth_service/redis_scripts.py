"""Lua scripts run with ``EVALSHA`` at a low CPU cost, on connections of a redis-py client's pool.

Every state change of the auth service is one script call, and a Refresh is little more than one: the
client side of that call is on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from authmesh._shared.errors import Unavailable

# The deadline of a script call when the client has no socket timeout: a script call never waits forever.
DEFAULT_SCRIPT_TIMEOUT_SECONDS = 5.0
# At most this many connections (and never more than half the pool) stay borrowed between script calls.
MAX_IDLE_SCRIPT_CONNECTIONS = 32
# Batches out at once per acknowledgement rule: calls made meanwhile wait and go out together next, so a
# loaded service sends fewer, larger batches. Redis runs one script at a time whatever the number of
# batches out, so one is enough without an acknowledgement; a batch that waits for replicas (``WAIT``)
# holds only its connection, and a second one keeps a slow replica from queueing every other write.
MAX_BATCHES_OUT = 1
MAX_ACKED_BATCHES_OUT = 2
# After a batch returns, the next one waits while calls are still arriving (each turn of the event loop
# adds one more), for at most this long. Under load the service makes its script calls a few at a time
# between gRPC requests, so without this a batch carries one or two calls and Redis pays a read, a
# write, an AOF write and an fsync for each; an idle service's call still goes out at once.
MAX_GATHER_SECONDS = 0.003
# The most script calls one batch carries (one write, one read buffer).
MAX_BATCH_CALLS = 256


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
    between calls, under one deadline for the whole round trip.

    Calls made while a batch is out (or in the same turn of the event loop) are sent together as the
    next batch: one write, one read of every reply, one fsync in Redis and, with a :class:`ReplicaAck`,
    one ``WAIT`` after the last script of the batch, so no call is answered before the replicas hold
    every write of its batch. What the usual path guarantees still holds:

    - connections belong to the client's pool, so closing the client closes them too;
    - the deadline is the client's socket timeout; a connection whose batch failed, timed out or was
      interrupted is disconnected and handed back to the pool, never reused as it is;
    - failures are redis-py's exceptions (``ConnectionError``, ``TimeoutError``, ``ResponseError``); an
      error reply fails only the call it answers, a lost connection or the deadline every call of the
      batch;
    - a ``NOSCRIPT`` reply (``SCRIPT FLUSH``, a Redis restarted) loads the script and retries once;
    - a caller that gives up (its own deadline, a cancellation) leaves the batch in step: its reply is
      still read, then dropped.

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
        # Calls waiting for the next batch, and batches out, per acknowledgement rule.
        self._queued: dict[ReplicaAck | None, list[_Call]] = {}
        self._out: dict[ReplicaAck | None, int] = {}
        self._senders: set[asyncio.Task[None]] = set()
        # Batches sent so far (each is one write to Redis and one read of its replies).
        self.batches_sent = 0

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
        if ack is not None and ack.replicas <= 0:
            ack = None
        loop = asyncio.get_running_loop()
        packed = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))  # type: ignore[arg-type]
        call = _Call(script, packed, loop.create_future())
        queued = self._queued.get(ack)
        if queued is None:
            queued = self._queued[ack] = []
        queued.append(call)
        out = self._out.get(ack, 0)
        if len(queued) == 1 and out < (MAX_BATCHES_OUT if ack is None else MAX_ACKED_BATCHES_OUT):
            self._out[ack] = out + 1
            sender = loop.create_task(self._send_queued(ack))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await call.reply

    async def _send_queued(self, ack: ReplicaAck | None) -> None:
        """Send what is queued for ``ack`` as batches, one after another, until nothing is left; the first
        at once, each later one once calls have stopped arriving (see ``MAX_GATHER_SECONDS``)."""
        try:
            first = True
            while True:
                if not first:
                    await self._gather(ack)
                first = False
                queued = self._queued.pop(ack, None)
                if not queued:
                    break
                if len(queued) > MAX_BATCH_CALLS:
                    self._queued[ack] = queued[MAX_BATCH_CALLS:] + self._queued.get(ack, [])
                    queued = queued[:MAX_BATCH_CALLS]
                await self._send_batch(queued, ack)
        except BaseException as error:
            # Stopped between batches (the service shutting down): what waits for the next one would
            # otherwise wait forever, and so would every later call, queued behind it.
            for call in self._queued.pop(ack, []):
                if not call.reply.done():
                    call.reply.set_exception(_batch_failure(error))
            raise
        finally:
            self._out[ack] -= 1

    async def _gather(self, ack: ReplicaAck | None) -> None:
        """Let the event loop turn while each turn queues more calls for ``ack``, up to a full batch or
        ``MAX_GATHER_SECONDS``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + MAX_GATHER_SECONDS
        queued = len(self._queued.get(ack, ()))
        while 0 < queued < MAX_BATCH_CALLS and loop.time() < until:
            await asyncio.sleep(0)
            now_queued = len(self._queued.get(ack, ()))
            if now_queued == queued:
                return
            queued = now_queued

    async def _send_batch(self, calls: list[_Call], ack: ReplicaAck | None) -> None:
        self.batches_sent += 1
        deadline = self._deadline + (ack.timeout_ms / 1000 if ack is not None else 0)
        conn: AbstractConnection | None = None
        try:
            conn = await self._acquire()
            async with asyncio.timeout(deadline):
                missing = await self._round(conn, calls, ack)
                if missing:
                    scripts = {call.script.sha: call.script for call in missing}
                    loads = [
                        hiredis.pack_command(("SCRIPT", "LOAD", script.source))  # type: ignore[arg-type]
                        for script in scripts.values()
                    ]
                    for call in await self._round(conn, missing, ack, loads):
                        call.outcome = NoScriptError("the script was not loaded after SCRIPT LOAD")
        except BaseException as error:
            if conn is not None:
                # A lost connection, the deadline or an interruption may leave replies in flight.
                await conn.disconnect(nowait=True)
            for call in calls:
                if not call.reply.done():
                    call.reply.set_exception(_batch_failure(error))
            if not isinstance(error, Exception):
                raise
        else:
            for call in calls:
                if not call.reply.done():
                    if isinstance(call.outcome, BaseException):
                        call.reply.set_exception(call.outcome)
                    else:
                        call.reply.set_result(call.outcome)
        finally:
            if conn is not None:
                await self._release(conn)

    async def _round(
        self,
        conn: AbstractConnection,
        calls: list[_Call],
        ack: ReplicaAck | None,
        prelude: Sequence[bytes] = (),
    ) -> list[_Call]:
        """Send ``prelude``, the calls' scripts and, with ``ack``, ``WAIT`` in one write, and read every
        reply (the prelude's are dropped); the calls whose script Redis did not know."""
        packed = [*prelude, *(call.command for call in calls)]
        if ack is not None:
            packed.append(hiredis.pack_command(("WAIT", ack.replicas, ack.timeout_ms)))  # type: ignore[arg-type]
        # One buffer, not a list: on TLS, asyncio makes a record of each buffer it is given, and Redis
        # reads one record per turn of its event loop, with an fsync of the AOF after each turn.
        await conn.send_packed_command(b"".join(packed), check_health=False)
        for _ in prelude:
            with contextlib.suppress(ResponseError):
                await conn.read_response()
        missing: list[_Call] = []
        for call in calls:
            try:
                call.outcome = await conn.read_response()
            except NoScriptError:
                missing.append(call)
            except ResponseError as error:
                call.outcome = error  # the reply was read in full: the connection is in step
        if ack is not None:
            acked = int(await conn.read_response())
            if acked < ack.replicas:
                retried = set(missing)
                for call in calls:
                    # A script that failed answers with its own error, not with the replicas' count.
                    if call not in retried and not isinstance(call.outcome, ResponseError):
                        call.outcome = Unavailable(
                            f"the store's write reached {acked} of {ack.replicas} replicas "
                            f"in {ack.timeout_ms} ms",
                            code="STORE_NOT_REPLICATED",
                        )
        return missing

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


@dataclass(slots=True, eq=False)
class _Call:
    """One script call of a batch: what to send, what came back, and who waits for it."""

    script: LuaScript
    command: bytes
    reply: asyncio.Future[Any]
    outcome: Any = None


def _batch_failure(error: BaseException) -> RedisError:
    """What a call of a batch that failed as a whole raises: an exception of its own, so that no two
    callers share (and extend) one traceback."""
    if isinstance(error, TimeoutError | RedisTimeoutError):
        return RedisTimeoutError(str(error) or "no reply from Redis in time")
    if isinstance(error, RedisConnectionError):
        return RedisConnectionError(str(error))
    return RedisConnectionError(f"the batch's connection failed: {type(error).__name__}: {error}")


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
