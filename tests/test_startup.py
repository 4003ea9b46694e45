"""A service that cannot reach NATS or Redis at start says where and why, retries for the connect timeout,
then exits non-zero with one line; SIGTERM ends it at once while it is still connecting. Real processes
(``authmesh auth-server`` / ``resource-server``) against ports nothing listens on."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from authmesh.processes import free_port
from tests.waiting import eventually

DEADLINE_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 1.5
KEK = "startup-test-kek-0123456789"


class ServiceProcess:
    """A service started as ``python -m authmesh.cli …`` whose stderr is collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def said(self, text: str) -> bool:
        """Whether a line so far contains ``text``."""
        return any(text in line for line in self.lines)

    async def wait_until_said(self, text: str) -> None:
        """Wait (within the deadline) until a line contains ``text``."""

        async def said() -> bool:
            return self.said(text)

        await eventually(said, within=DEADLINE_SECONDS, what=f"a line saying {text!r}")

    async def exit_status(self) -> int:
        """Wait for the process to end (within the deadline) and for its last lines."""
        status = await asyncio.wait_for(self.process.wait(), DEADLINE_SECONDS)
        await asyncio.wait_for(self._reader, DEADLINE_SECONDS)
        return status


@asynccontextmanager
async def service(command: str, **settings: str) -> AsyncIterator[ServiceProcess]:
    """``authmesh <command>`` with ``AUTHMESH_<NAME>`` settings on free loopback ports."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHMESH_")}
    env |= {
        "AUTHMESH_GRPC_LISTEN": f"127.0.0.1:{free_port()}",
        "AUTHMESH_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
        "AUTHMESH_LOG_FORMAT": "console",
    }
    env |= {f"AUTHMESH_{name.upper()}": value for name, value in settings.items()}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "authmesh.cli",
        command,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    running = ServiceProcess(process)
    try:
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), DEADLINE_SECONDS)


def closed_url(scheme: str) -> tuple[str, str]:
    """A URL of a loopback port nothing listens on, and its ``host:port``."""
    address = f"127.0.0.1:{free_port()}"
    return f"{scheme}://{address}", address


async def test_an_auth_service_without_redis_names_it_retries_and_exits_with_one_line(nats_url: str) -> None:
    url, address = closed_url("redis")
    async with service(
        "auth-server",
        redis_url=url.replace("redis://", "redis://user:hunter2-secret@"),
        nats_urls=nats_url,
        key_encryption_key=KEK,
        connect_timeout=str(CONNECT_TIMEOUT_SECONDS),
    ) as auth:
        assert await auth.exit_status() == 1
    retries = [line for line in auth.lines if "cannot reach Redis yet; retrying" in line]
    assert retries
    # The store is named by its URL without credentials (a Sentinel URL names its Sentinels).
    assert f"address=redis://{address}" in retries[0]
    assert "Connect call failed" in retries[0]
    assert auth.lines[-1].startswith(
        f"STORE_UNAVAILABLE: cannot reach Redis at redis://{address} within {CONNECT_TIMEOUT_SECONDS:g} s "
        "(AUTHMESH_CONNECT_TIMEOUT): "
    )
    assert not auth.said("hunter2-secret")
    assert not auth.said("Traceback")


async def test_an_auth_service_without_nats_names_it_and_exits_with_one_line(redis_url: str) -> None:
    url, address = closed_url("nats")
    async with service(
        "auth-server",
        redis_url=redis_url,
        nats_urls=url,
        key_encryption_key=KEK,
        connect_timeout=str(CONNECT_TIMEOUT_SECONDS),
    ) as auth:
        assert await auth.exit_status() == 1
    assert any("cannot reach NATS yet; retrying" in line and address in line for line in auth.lines)
    assert auth.lines[-1].startswith(f"BROKER_UNAVAILABLE: cannot reach NATS at {address} within 1.5 s")
    assert not auth.said("Traceback")


async def test_a_resource_replica_without_nats_names_it_and_exits_with_one_line() -> None:
    url, address = closed_url("nats")
    async with service(
        "resource-server",
        nats_urls=url,
        auth_target=f"127.0.0.1:{free_port()}",
        connect_timeout=str(CONNECT_TIMEOUT_SECONDS),
    ) as replica:
        assert await replica.exit_status() == 1
    assert any("cannot reach NATS yet; retrying" in line and address in line for line in replica.lines)
    assert replica.lines[-1].startswith(f"BROKER_UNAVAILABLE: cannot reach NATS at {address} within 1.5 s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_stops_an_auth_service_that_is_still_waiting_for_redis(
    nats_url: str, sig: signal.Signals
) -> None:
    url, _ = closed_url("redis")
    async with service(
        "auth-server", redis_url=url, nats_urls=nats_url, key_encryption_key=KEK, connect_timeout="600"
    ) as auth:
        await auth.wait_until_said("cannot reach Redis yet; retrying")
        auth.process.send_signal(sig)
        assert await auth.exit_status() == 0
    assert auth.said("stopping while starting")


async def test_sigterm_stops_a_resource_replica_that_is_still_waiting_for_nats() -> None:
    url, _ = closed_url("nats")
    async with service(
        "resource-server", nats_urls=url, auth_target=f"127.0.0.1:{free_port()}", connect_timeout="600"
    ) as replica:
        await replica.wait_until_said("cannot reach NATS yet; retrying")
        replica.process.send_signal(signal.SIGTERM)
        assert await replica.exit_status() == 0


async def test_a_replica_whose_auth_service_is_away_says_what_it_waits_for(nats_url: str) -> None:
    async with service(
        "resource-server", nats_urls=nats_url, auth_target=f"127.0.0.1:{free_port()}"
    ) as replica:
        await replica.wait_until_said("resource service not ready yet")
        replica.process.send_signal(signal.SIGTERM)
        assert await replica.exit_status() == 0
    [line] = [line for line in replica.lines if "resource service not ready yet" in line][:1]
    assert "waiting_for=" in line
    assert "auth service" in line
