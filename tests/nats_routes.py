"""A nats-server that tries to join a cluster as a route without its credentials, and what happened."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from authmesh.processes import NatsClusterOptions, NatsServer, free_port

_VERDICT_SECONDS = 15.0
_POLL_SECONDS = 0.05
_REFUSED = "authorization violation"


async def route_count(monitor_url: str) -> int:
    """How many routes the server behind ``monitor_url`` has (its ``/routez``)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{monitor_url}/routez", timeout=aiohttp.ClientTimeout(2)) as reply,
    ):
        document = await reply.json()
    return int(document["num_routes"])


async def intruder_joins(data_dir: Path, route_url: str, cluster_name: str = "authmesh") -> bool:
    """Start a nats-server routing to ``route_url`` without credentials; whether it became a route.

    Returns:
        True once it has a route, False once the cluster refused it (its log says so).
    """
    options = NatsClusterOptions(name=cluster_name, port=free_port(), routes=(route_url,))
    async with NatsServer(data_dir, server_name="intruder", cluster=options) as intruder:
        deadline = time.monotonic() + _VERDICT_SECONDS
        while time.monotonic() < deadline:
            if await route_count(intruder.monitor_url) > 0:
                return True
            if _REFUSED in intruder.log_path.read_text(errors="replace").lower():
                return False
            await asyncio.sleep(_POLL_SECONDS)
    pytest.fail(f"the intruder neither joined nor was refused within {_VERDICT_SECONDS:g} s")
