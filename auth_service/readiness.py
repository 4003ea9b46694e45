"""Whether the auth service's dependencies answer: gRPC health, ``/readyz`` and a line naming the target.

A probe pings Redis and checks the NATS connection every ``interval`` seconds. While either is
unreachable the gRPC health of the service is ``NOT_SERVING`` (a load balancer stops sending it calls
that could only fail) and ``/readyz`` answers 503 naming what is down; ``/healthz`` only says the
process is alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from nats.aio.client import Client as NatsClient
from redis.exceptions import RedisError

from authmesh._auth_service.store import AuthStore
from authmesh._shared.connecting import describe
from authmesh._shared.errors import AuthError
from authmesh._shared.lifecycle import raise_if_cancelled

PROBE_TIMEOUT_SECONDS = 1.0
_log = structlog.get_logger(__name__)


class DependencyProbe:
    """Probes Redis and NATS and reports the outcome to gRPC health.

    Args:
        store: The Redis state (pinged).
        nats: The NATS connection (its state is read).
        redis_target: Redis's address without credentials, named when it is unreachable.
        nats_targets: The NATS servers (without credentials), named when none is connected.
        set_serving: Sets the gRPC health of the service.
    """

    def __init__(
        self,
        store: AuthStore,
        nats: NatsClient,
        *,
        redis_target: str,
        nats_targets: str,
        set_serving: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._store = store
        self._nats = nats
        self._redis_target = redis_target
        self._nats_targets = nats_targets
        self._set_serving = set_serving
        self.problems: dict[str, str] = {}

    @property
    def ready(self) -> bool:
        """Whether every dependency answered at the latest probe."""
        return not self.problems

    async def probe(self) -> dict[str, str]:
        """Probe once; returns what is unreachable (dependency → message naming its target)."""
        problems: dict[str, str] = {}
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                await self._store.ping()
        except (AuthError, RedisError, OSError, TimeoutError) as error:
            cause = describe(error.__cause__ or error)
            problems["redis"] = f"Redis at {self._redis_target} unreachable: {cause}"
        if not self._nats.is_connected:
            problems["nats"] = f"NATS at {self._nats_targets} unreachable (not connected)"
        return problems

    async def run(self, interval: float) -> None:
        """Probe every ``interval`` seconds until cancelled; flip health and log on every change."""
        while True:
            raise_if_cancelled()
            problems = await self.probe()
            if problems != self.problems:
                for name, message in problems.items():
                    if self.problems.get(name) != message:
                        _log.warning("dependency unreachable", dependency=name, error=message)
                for name in self.problems.keys() - problems.keys():
                    _log.info("dependency reachable again", dependency=name)
                if bool(problems) != bool(self.problems):
                    await self._set_serving(not problems)
                self.problems = problems
            await asyncio.sleep(interval)

    def routes(self) -> list[web.RouteDef]:
        """``/healthz`` (the process answers) and ``/readyz`` (its dependencies answer)."""

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def readyz(_: web.Request) -> web.Response:
            if self.problems:
                return web.json_response({"status": "not ready", "unreachable": self.problems}, status=503)
            return web.json_response({"status": "ready"})

        return [web.get("/healthz", healthz), web.get("/readyz", readyz)]
