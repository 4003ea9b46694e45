"""The servers ``authmesh bench rpc`` measures beside the reference replica: sync gRPC and ASGI.

Each runs as its own process, configured like a service of one's own that joins the stack (the
variables of ``authmesh up --env-file``), protected by one :class:`~authmesh.ResourceGuard`, and serves
one protected call beside one the same server answers without a token:

* ``sync``: a sync ``grpc.server`` with ``guard.sync_interceptor(...)``: ``WhoAmI`` (protected) and
  ``grpc.health.v1.Health/Check`` (open);
* ``asgi``: a FastAPI app under uvicorn with :class:`~authmesh.asgi.BearerAuthMiddleware`:
  ``GET /whoami`` (protected; the handler reads ``current_claims()``) and ``GET /healthz`` (open).

``python -m authmesh.bench.protected_servers sync|asgi HOST:PORT`` runs one until SIGTERM or SIGINT.

"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import AsyncIterator
from concurrent import futures
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authmesh._shared.asgi import BearerAuthMiddleware
from authmesh._shared.grpc_server import grpc_server_options
from authmesh._shared.guard import ResourceGuard
from authmesh._shared.http_server import split_host_port
from authmesh._shared.interceptor import current_claims
from authmesh._shared.scopes import AUTHENTICATED
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.stack import ChildProcess, grpc_health_status

WHO_AM_I = "/authmesh.resource.v1.ResourceService/WhoAmI"
SYNC_WORKERS = 16
KINDS = ("sync", "asgi")


class _SyncWhoAmI(resource_pb2_grpc.ResourceServiceServicer):  # WhoAmI only
    def WhoAmI(  # gRPC method names are CamelCase
        self, request: resource_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> resource_pb2.WhoAmIResponse:
        claims = current_claims()
        return resource_pb2.WhoAmIResponse(subject=claims.sub, session_id=claims.sid, instance="sync")


def serve_sync(listen: str, stop: threading.Event) -> None:
    """A sync ``grpc.server``: ``WhoAmI`` protected, health open, until ``stop`` is set."""
    with ResourceGuard.from_env() as guard:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=SYNC_WORKERS),
            interceptors=[guard.sync_interceptor({WHO_AM_I: AUTHENTICATED})],
            options=grpc_server_options(),
        )
        resource_pb2_grpc.add_ResourceServiceServicer_to_server(_SyncWhoAmI(), server)  # type: ignore[abstract]
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_insecure_port(listen)
        server.start()
        stop.wait()
        server.stop(grace=1).wait()


def asgi_app(guard: ResourceGuard) -> Any:
    """The FastAPI app: ``/whoami`` protected, ``/healthz`` open; the guard runs in its lifespan."""
    from fastapi import FastAPI  # the dev extra: the bench is a development tool

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with guard:
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(BearerAuthMiddleware, guard=guard, open_paths={"/healthz"})

    @app.get("/whoami")
    async def whoami() -> dict[str, str]:
        claims = current_claims()
        return {"subject": claims.sub, "session_id": claims.sid}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "serving"}

    return app


def serve_asgi(listen: str) -> None:
    """The FastAPI app under uvicorn (which handles SIGTERM and SIGINT itself)."""
    import uvicorn

    host, port = split_host_port(listen)
    uvicorn.run(asgi_app(ResourceGuard.from_env()), host=host, port=port, log_level="warning")


def server_process(kind: str, listen: str, data_dir: Path, env: dict[str, str]) -> ChildProcess:
    """One of the servers as a child process, ready once it answers its open call."""
    command = [sys.executable, "-m", "authmesh.bench.protected_servers", kind, listen]

    async def answering(within: float) -> bool:
        if kind == "sync":
            return await grpc_health_status(listen, within) == "SERVING"
        return await _http_ok(f"http://{listen}/healthz", within)

    return ChildProcess(f"bench-{kind}", data_dir, command, env, answering)


async def _http_ok(url: str, within: float) -> bool:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=within)) as session,
            session.get(url) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def main(argv: list[str]) -> None:
    """``sync|asgi HOST:PORT``."""
    kind, listen = argv
    if kind == "asgi":
        serve_asgi(listen)
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve_sync(listen, stop)


if __name__ == "__main__":
    main(sys.argv[1:])
