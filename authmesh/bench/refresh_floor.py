"""The floor of ``authmesh bench refresh``: what a Refresh cannot avoid, served on its own.

A Refresh must spend the old refresh token and store the new one in Redis, durably, before it answers
(an acknowledged rotation must survive a crash: ``appendfsync always``), and it answers with a token
pair. This worker runs a gRPC server set up exactly as the auth service's (the same settings, read from
the auth service's environment, the same server options, interceptors and TLS), whose one method does
only that: it runs a two-write script through the auth service's :class:`ScriptRunner` on the stack's
Redis and returns as many bytes as a token pair takes. Its throughput against its own health check is
the best any Refresh can reach on this machine with the store's durability; the gap between it and
Refresh is what the auth service's own handler costs.

Run as ``python -m authmesh.bench.refresh_floor --worker`` with the auth service's environment
(:meth:`~authmesh.stack.LocalStack.auth_env`): ``start`` answers ``{"target", "pid"}``, ``stop`` stops
serving.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Any

import grpc

from authmesh._auth_service.redis_client import connect_store
from authmesh._auth_service.redis_scripts import LuaScript, ScriptRunner
from authmesh._shared.grpc_server import RunningServer, start_grpc_server
from authmesh._shared.metrics import ServiceMetrics
from authmesh._shared.settings import AuthSettings
from authmesh.bench.common import JsonDict, serve_worker

SERVICE_NAME = "authmesh.bench.v1.RefreshFloor"
ROTATE_METHOD = f"/{SERVICE_NAME}/Rotate"
# A serialized TokenPair of the benchmark's users on a local stack (a 560-character access token, the
# refresh token, the session id, the scope).
REPLY_BYTES = 676
# Spend the old token, store the new one with its lifetime: the writes a rotation cannot skip.
_ROTATE = LuaScript.of(
    """
redis.call('HSET', KEYS[1], 'state', 'spent')
redis.call('HSET', KEYS[2], 'state', 'live', 'exp_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
)
# Long enough for any run, short enough that the stack's Redis forgets the keys soon after.
_KEY_TTL_MS = 600_000
_REDIS_TIMEOUT_SECONDS = 5.0


class FloorServer:
    """The server of one worker: started once, stopped when the worker's input closes."""

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._resources = contextlib.AsyncExitStack()
        self._server: RunningServer | None = None
        self._numbers = itertools.count()
        self._reply = bytes(REPLY_BYTES)
        self._scripts: ScriptRunner | None = None

    async def start(self, _: JsonDict) -> JsonDict:
        """Connect to Redis and serve; answer where and as which process."""
        if self._server is not None:
            raise RuntimeError("the floor server is already started")
        settings = self._settings
        connection = connect_store(settings, timeout=_REDIS_TIMEOUT_SECONDS)
        self._resources.push_async_callback(connection.aclose)
        await connection.client.ping()
        self._scripts = ScriptRunner(connection.client.connection_pool)
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Rotate": grpc.unary_unary_rpc_method_handler(self._rotate)}
        )
        self._server = await start_grpc_server(
            settings.grpc_listen,
            register=lambda server: server.add_generic_rpc_handlers((handler,)),
            service_names=(SERVICE_NAME,),
            interceptors=(ServiceMetrics("auth", "floor").grpc_interceptor(),),
            tls=settings.tls,
        )
        self._resources.push_async_callback(self._server.server.stop, None)
        host = settings.grpc_listen.rpartition(":")[0]
        return {"target": f"{host}:{self._server.port}", "pid": os.getpid()}

    async def _rotate(self, request: bytes, _: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        assert self._scripts is not None, "served before it started"
        number = next(self._numbers)
        await self._scripts.run(
            _ROTATE,
            (f"bench:floor:{number}", f"bench:floor:{number + 1}"),
            (len(request), _KEY_TTL_MS),
        )
        return self._reply

    async def stop(self, _: JsonDict) -> JsonDict:
        """Stop serving and close the Redis connection."""
        await self._resources.aclose()
        self._server = None
        return {"stopped": True}


def main() -> None:
    """The worker's entry point: ``start`` and ``stop`` commands."""
    server = FloorServer(AuthSettings())
    serve_worker({"start": server.start, "stop": server.stop})


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    main()
