"""A small async client for authmesh: the auth service, resource replicas, their health, a token file.

The command-line client and the demo are built on it; the auth service's client, :class:`AuthApi`,
is the library's (re-exported here with its value types), and so is the token file,
:mod:`authmesh.token_file`. Calls raise ``grpc.aio.AioRpcError`` as gRPC does;
:class:`RpcProblem` turns one into the status code, the ``ErrorInfo`` reason and the message, which is
all a person or a script needs to know about a failure. :meth:`ResourceApi.outcome` never raises for a
refusal: it is what polling loops use to watch a token go from accepted to rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authmesh._shared.auth_api import (
    ADMIN_SCOPE,
    DEFAULT_TIMEOUT_SECONDS,
    AuthApi,
    KeyRotation,
    Revocation,
    Tokens,
    bearer,
    dpop_metadata,
)
from authmesh._shared.auth_client import channel_options
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.tls import TlsFiles, open_channel
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.token_file import (
    TOKEN_FILE_NAME,
    TOKEN_FILE_VERSION,
    StoredLogin,
    TokenFile,
    default_token_path,
)

DEFAULT_AUTH_TARGET = "127.0.0.1:50051"
DEFAULT_RESOURCE_TARGET = "127.0.0.1:50061"
ACCEPTED = "OK"
__all__ = [
    "ACCEPTED",
    "ADMIN_SCOPE",
    "DEFAULT_AUTH_TARGET",
    "DEFAULT_RESOURCE_TARGET",
    "DEFAULT_TIMEOUT_SECONDS",
    "TOKEN_FILE_NAME",
    "TOKEN_FILE_VERSION",
    "AuthApi",
    "Health",
    "Identity",
    "KeyRotation",
    "Outcome",
    "ResourceApi",
    "Revocation",
    "RpcProblem",
    "StoredLogin",
    "TokenFile",
    "Tokens",
    "bearer",
    "check_health",
    "default_token_path",
]


@dataclass(frozen=True, slots=True)
class RpcProblem:
    """Why a call failed, in the terms of the contract.

    Attributes:
        code: The gRPC status code's name (``UNAUTHENTICATED``, ``UNAVAILABLE``, ...).
        reason: The ``ErrorInfo.reason`` (``SESSION_REVOKED``, ...), when the server sent one.
        message: The status message.
    """

    code: str
    reason: str | None
    message: str

    @classmethod
    def from_error(cls, error: grpc.aio.AioRpcError) -> RpcProblem:
        """Read a failed call."""
        return cls(code=error.code().name, reason=error_reason(error), message=error.details() or "")

    @property
    def label(self) -> str:
        """The reason when there is one, else the status code: what a summary shows."""
        return self.reason or self.code

    def __str__(self) -> str:
        head = f"{self.code} ({self.reason})" if self.reason else self.code
        return f"{head}: {self.message}" if self.message else head


@dataclass(frozen=True, slots=True)
class Identity:
    """What a replica's ``WhoAmI`` said.

    Attributes:
        subject: ``sub`` of the token.
        scopes: Its scopes.
        session_id: ``sid``.
        token_id: ``jti``.
        instance: The replica that answered.
    """

    subject: str
    scopes: tuple[str, ...]
    session_id: str
    token_id: str
    instance: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a replica answered one protected call.

    Attributes:
        label: ``OK`` when accepted, else the error reason (or the status code without one).
        code: The gRPC status code's name (``OK`` when accepted).
        instance: The replica that answered, when it accepted.
    """

    label: str
    code: str
    instance: str = ""

    @property
    def accepted(self) -> bool:
        """Whether the call was accepted."""
        return self.code == ACCEPTED


@dataclass(frozen=True, slots=True)
class Health:
    """One service's ``grpc.health.v1`` answer.

    Attributes:
        target: Where it was asked.
        status: ``SERVING``, ``NOT_SERVING``, ... or ``UNREACHABLE``.
        detail: Why it could not be asked, when unreachable.
    """

    target: str
    status: str
    detail: str = ""

    @property
    def serving(self) -> bool:
        """Whether the service says it serves."""
        return self.status == "SERVING"


async def check_health(channel: grpc.aio.Channel, target: str, call_timeout: float) -> Health:
    """Ask a service's health endpoint (the whole server, service name ``""``).

    Args:
        channel: A channel to the service.
        target: Its address, for the answer.
        call_timeout: The call's gRPC deadline, seconds.

    Returns:
        The answer; ``UNREACHABLE`` when the call failed.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=call_timeout)
    except grpc.aio.AioRpcError as error:
        return Health(target, "UNREACHABLE", str(RpcProblem.from_error(error)))
    return Health(target, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class _Channel:
    """A channel to one target (TLS when ``tls`` has a CA), opened on entry and closed on exit."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.tls = tls
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise RuntimeError(f"the client for {self.target} is not open")
        return self._channel

    async def __aenter__(self) -> Self:
        self._channel = open_channel(self.target, self.tls, channel_options())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace=None)


class ResourceApi(_Channel):
    """One resource-service replica (an async context manager).

    Args:
        target: ``host:port`` of the replica.
        timeout: Deadline of each call, seconds.
        tls: The CA to verify the server against (and a client certificate); plaintext without.
    """

    _resource_stub: resource_pb2_grpc.ResourceServiceAsyncStub | None = None
    _stub_for: grpc.aio.Channel | None = None

    @property
    def _stub(self) -> resource_pb2_grpc.ResourceServiceAsyncStub:
        channel = self.channel
        if self._resource_stub is None or self._stub_for is not channel:
            self._resource_stub, self._stub_for = resource_pb2_grpc.ResourceServiceStub(channel), channel
        return self._resource_stub

    async def whoami(
        self, token: str, *, call_timeout: float | None = None, proof: str | None = None
    ) -> Identity:
        """``WhoAmI`` with ``token``: as a bearer token, or with ``proof`` as ``DPoP`` and its proof.

        Raises:
            grpc.aio.AioRpcError: The replica refused the token or could not be reached.
        """
        metadata = bearer(token) if proof is None else dpop_metadata(token, proof)
        response = await self._stub.WhoAmI(
            resource_pb2.WhoAmIRequest(), metadata=metadata, timeout=call_timeout or self.timeout
        )
        return Identity(
            subject=response.subject,
            scopes=tuple(response.scopes),
            session_id=response.session_id,
            token_id=response.token_id,
            instance=response.instance,
        )

    async def outcome(
        self, token: str, *, call_timeout: float | None = None, proof: str | None = None
    ) -> Outcome:
        """How the replica answers ``WhoAmI`` with ``token`` (and ``proof``); never raises for a refusal."""
        try:
            identity = await self.whoami(token, call_timeout=call_timeout, proof=proof)
        except grpc.aio.AioRpcError as error:
            problem = RpcProblem.from_error(error)
            return Outcome(label=problem.label, code=problem.code)
        return Outcome(label=ACCEPTED, code=ACCEPTED, instance=identity.instance)
