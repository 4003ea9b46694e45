"""The replica's revocation state as its own gRPC health service, ``authmesh.revocation``.

The replica as a whole stays ``SERVING`` while its revocation state is stale: it still answers, checking
each token with ``Introspect``. Whether that state is current is a separate question an operator (or a
load balancer that prefers current replicas) asks of ``authmesh.revocation``: ``SERVING`` while the
replica has caught up and hears heartbeats, ``NOT_SERVING`` while it is degraded or not yet ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from authmesh._shared.lifecycle import raise_if_cancelled
from authmesh._shared.staleness import StalenessMonitor

REVOCATION_HEALTH_SERVICE = "authmesh.revocation"
_log = structlog.get_logger(__name__)


async def report_revocation_state(
    health: health_aio.HealthServicer,
    staleness: StalenessMonitor,
    ready: Callable[[], bool],
    interval: float,
) -> None:
    """Keep ``authmesh.revocation``'s health in step with the revocation state, until cancelled.

    Args:
        health: The server's health servicer.
        staleness: Says whether heartbeats are overdue.
        ready: Whether the revocation state has caught up with the stream.
        interval: Seconds between looks.
    """
    reported: int | None = None
    while True:
        raise_if_cancelled()
        current = ready() and not staleness.degraded
        status = (
            health_pb2.HealthCheckResponse.SERVING if current else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if status != reported:
            await health.set(REVOCATION_HEALTH_SERVICE, status)
            if reported is not None:
                _log.warning(
                    "revocation state current" if current else "revocation state degraded",
                    staleness_seconds=round(staleness.seconds, 3),
                )
            reported = status
        await asyncio.sleep(interval)
