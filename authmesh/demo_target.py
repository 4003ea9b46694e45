"""The stack the demo story runs on: its addresses, its admin, and how to cut a replica off from NATS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from authmesh._shared.tls import TlsFiles


class NatsLink(Protocol):
    """A stack that can cut a replica off from NATS and reconnect it (``LocalStack`` can)."""

    async def cut_nats(self, index: int, *, silent: bool = False) -> None:
        """Cut replica ``index``'s connection to NATS; ``silent``: no reset, bytes just stop flowing."""
        ...

    async def restore_nats(self, index: int) -> None:
        """Reconnect replica ``index`` to NATS."""
        ...


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    """One replica the demo talks to.

    Attributes:
        name: How the demo names it (its instance name where known).
        grpc: gRPC ``host:port``.
        http: HTTP ``host:port`` (``/healthz``), when known.
    """

    name: str
    grpc: str
    http: str | None = None


@dataclass(frozen=True, slots=True)
class DemoTarget:
    """The stack the story runs on.

    Attributes:
        auth_grpc: The auth service's gRPC ``host:port``.
        replicas: The resource replicas.
        admin: ``(username, password)`` of an admin.
        local: Whether the demo started the stack itself.
        staleness_bound: The replicas' staleness bound in seconds, when known.
        nats: How to cut a replica off from NATS; None skips that act.
        tls: How to reach the services over TLS; plaintext by default.
        gateway: Base URL of an Envoy with authmesh's ext_authz in front of a service with no authmesh
            code; None skips that act.
    """

    auth_grpc: str
    replicas: tuple[ReplicaTarget, ...]
    admin: tuple[str, str]
    local: bool = False
    staleness_bound: float | None = None
    nats: NatsLink | None = None
    tls: TlsFiles = field(default_factory=TlsFiles)
    gateway: str | None = None
