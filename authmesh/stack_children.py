"""The local stack's child processes: any server command, the authmesh services, and their gRPC health."""

# Starting and stopping own their deadlines, as in authmesh.processes.
# ruff: noqa: ASYNC109

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles, open_channel
from authmesh.processes import ServerProcess

# A service imports grpc, cryptography and pydantic, connects to Redis and NATS, and a replica loads
# the snapshot before it serves: seconds, not milliseconds.
SERVICE_START_TIMEOUT_SECONDS = 30.0


async def grpc_health_status(
    target: str,
    timeout: float,
    service: str = "",
    tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
) -> str | None:
    """The ``grpc.health.v1`` status of ``service`` at ``target``.

    Args:
        target: ``host:port``.
        timeout: Seconds for the whole check.
        service: The service name to ask about; ``""`` is the server as a whole.
        tls: The CA to verify the server against (and a client certificate); plaintext without.

    Returns:
        The status name (``SERVING``, ``NOT_SERVING``, ...), or None when the server did not answer.
    """
    async with open_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


Probe = Callable[[float], Awaitable[bool]]


class ChildProcess(ServerProcess):
    """Any command run as a server child process with exactly the given environment.

    Args:
        name: Short name, used for the log file and in errors.
        data_dir: Working directory and home of the log.
        command: The argument list.
        env: The complete environment of the child.
        probe: Says, within the timeout it is given, whether the child is ready.
    """

    def __init__(
        self, name: str, data_dir: Path, command: Sequence[str], env: Mapping[str, str], probe: Probe
    ) -> None:
        super().__init__(name, data_dir)
        self._command = list(command)
        self._env = dict(env)
        self._probe = probe

    def command(self) -> list[str]:
        """The argument list."""
        return list(self._command)

    async def is_ready(self, timeout: float) -> bool:
        """What the probe says."""
        return await self._probe(timeout)

    def environment(self) -> dict[str, str]:
        """Exactly the service's own environment, not the parent's."""
        return self._env


def authmesh_command(*args: str) -> list[str]:
    """``authmesh <args>`` run by this interpreter, whether or not the console script is on PATH."""
    return [sys.executable, "-m", "authmesh.cli", *args]


class ServiceProcess(ChildProcess):
    """An authmesh service (``auth-server`` or ``resource-server``), ready when its health is SERVING.

    Args:
        name: The part's name (``auth``, ``resource-1``), also its log file's name.
        data_dir: Its working directory.
        command: ``auth-server`` or ``resource-server``.
        env: Its complete environment.
        grpc_address: Where its gRPC server listens (``AUTHMESH_GRPC_LISTEN``).
        http_address: Where its HTTP side listens (``AUTHMESH_HTTP_LISTEN``).
        probe_tls: How the health probe reaches it (plaintext by default).
    """

    def __init__(
        self,
        name: str,
        data_dir: Path,
        *,
        command: str,
        env: Mapping[str, str],
        grpc_address: str,
        http_address: str,
        probe_tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
    ) -> None:
        super().__init__(name, data_dir, authmesh_command(command), env, self._serving)
        self.grpc_address = grpc_address
        self.http_address = http_address
        self.probe_tls = probe_tls

    async def _serving(self, timeout: float) -> bool:
        return await grpc_health_status(self.grpc_address, timeout, tls=self.probe_tls) == "SERVING"

    async def start(self, timeout: float = SERVICE_START_TIMEOUT_SECONDS) -> None:
        """Start the service and wait until its gRPC health is SERVING.

        Raises:
            ConfigurationError: It exited or was not SERVING in time (the message names it and ends
                with the tail of its log); it is stopped when this is raised.
        """
        try:
            await super().start(timeout)
        except ConfigurationError as error:
            raise ConfigurationError(
                f"{self.name} (gRPC {self.grpc_address}) did not become healthy: {error.message}"
            ) from None
