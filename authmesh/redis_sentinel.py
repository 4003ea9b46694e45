"""A replicated Redis watched by Redis Sentinel, as local processes: for ``authmesh up`` and the tests.

The same ``redis-server`` binary runs the primary, its replicas (``replicaof``) and the Sentinels
(``--sentinel``). Sentinels agree that the primary is down after ``down_after_ms`` without an answer
(a quorum of two of three) and promote the replica with the most of the replication stream.

With TLS every server (data nodes and Sentinels) serves only TLS and demands a client certificate
from the CA; replication and the Sentinels' own connections use TLS too (``tls-replication yes``),
and clients reach the group by ``rediss+sentinel://``. The binary must be built with TLS.
"""

# As in authmesh.processes, starting owns its deadline: when it passes, what started must still stop.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.lifecycle import Startable
from authmesh._shared.tls import TlsFiles, redis_tls_options
from authmesh.processes import LOOPBACK, START_TIMEOUT_SECONDS, RedisServer, _redis_quote, free_port

SERVICE_NAME = "authmesh"
SENTINEL_QUORUM = 2
_POLL_SECONDS = 0.05
# A full sync starts at once instead of waiting 5 s for more replicas to share one transfer: a replica
# that joins (or rejoins after a failover) acknowledges writes sooner.
_DATA_NODE_CONFIG = ("repl-diskless-sync-delay 0",)


class SentinelServer(RedisServer):
    """One Redis Sentinel watching ``primary_port`` under the name ``service_name``.

    Args:
        data_dir: Directory for its configuration (which Sentinel rewrites) and log.
        primary_port: The primary's port on 127.0.0.1 at start.
        service_name: The name clients ask for.
        down_after_ms: How long the primary may be silent before it is considered down.
        failover_timeout_ms: Sentinel's ``failover-timeout``.
        tls: Serve only TLS (client certificates required) and reach the data nodes over TLS.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        primary_port: int,
        service_name: str = SERVICE_NAME,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(data_dir, appendonly=False, tls=tls)
        self.primary_port = primary_port
        self.service_name = service_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def config_path(self) -> Path:
        """The generated ``sentinel.conf``."""
        return self.data_dir / "sentinel.conf"

    def prepare(self) -> None:
        """Write ``sentinel.conf``."""
        name = self.service_name
        lines = [
            f"bind {LOOPBACK}",
            f"port {self.port}",
            "daemonize no",
            'logfile ""',
            f"dir {_redis_quote(str(self.data_dir))}",
            f"sentinel monitor {name} {LOOPBACK} {self.primary_port} {SENTINEL_QUORUM}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.tls is not None:
            lines[1] = "port 0"
            lines += [*_tls_lines(self.tls, self.port)]
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        """``redis-server <data_dir>/sentinel.conf --sentinel``."""
        return [str(self.binary), str(self.config_path), "--sentinel"]


def _tls_lines(files: TlsFiles, port: int) -> list[str]:
    """A Sentinel's TLS: only ``tls-port``, client certificates required, TLS to the data nodes."""
    return [
        f"tls-port {port}",
        f"tls-cert-file {_redis_quote(str(files.cert_file))}",
        f"tls-key-file {_redis_quote(str(files.key_file))}",
        f"tls-ca-cert-file {_redis_quote(str(files.ca_file))}",
        "tls-auth-clients yes",
        "tls-replication yes",
    ]


class SentinelGroup(Startable):
    """A primary, ``replicas`` replicas and three Sentinels on free loopback ports.

    Args:
        data_dir: Parent directory of every server's files.
        replicas: How many replicas follow the primary.
        down_after_ms: Sentinel's ``down-after-milliseconds``.
        failover_timeout_ms: Sentinel's ``failover-timeout``.
        tls: Every server on TLS with this certificate (see the module's docstring).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        replicas: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        tls: TlsFiles | None = None,
    ) -> None:
        primary_port = free_port()
        self.tls = tls
        # A replica (or a demoted primary) follows its primary over TLS too.
        config = (*_DATA_NODE_CONFIG, "tls-replication yes") if tls is not None else _DATA_NODE_CONFIG
        self.servers = [
            RedisServer(Path(data_dir) / "redis-0", port=primary_port, extra_config=config, tls=tls)
        ]
        for index in range(1, replicas + 1):
            self.servers.append(
                RedisServer(
                    Path(data_dir) / f"redis-{index}",
                    extra_config=(*config, f"replicaof {LOOPBACK} {primary_port}"),
                    tls=tls,
                )
            )
        self.sentinels = [
            SentinelServer(
                Path(data_dir) / f"sentinel-{index}",
                primary_port=primary_port,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                tls=tls,
            )
            for index in range(3)
        ]
        for index, server in enumerate(self.servers):
            server.name = f"redis-{index}"
        for index, sentinel in enumerate(self.sentinels):
            sentinel.name = f"sentinel-{index}"

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/authmesh/0`` (``rediss+sentinel://``
        on TLS)."""
        hosts = ",".join(f"{LOOPBACK}:{sentinel.port}" for sentinel in self.sentinels)
        scheme = "rediss+sentinel" if self.tls is not None else "redis+sentinel"
        return f"{scheme}://{hosts}/{SERVICE_NAME}/0"

    def client_options(self, files: TlsFiles) -> dict[str, Any]:
        """redis-py keyword arguments that reach one of its servers directly (TLS with ``files``)."""
        if self.tls is None:
            return {}
        return {"ssl": True, **redis_tls_options("rediss://", files)}

    @property
    def all_processes(self) -> list[RedisServer]:
        """Every server, data nodes first."""
        return [*self.servers, *self.sentinels]

    async def _start(self) -> None:
        """Start the data nodes, then the Sentinels, and wait until every replica follows the primary
        and every Sentinel knows every replica (before that a failover would have nowhere to go).

        Raises:
            ConfigurationError: The group did not form in time.
        """
        for server in self.all_processes:
            await server.start(START_TIMEOUT_SECONDS)
        await self._wait_until_formed(START_TIMEOUT_SECONDS)

    async def _wait_until_formed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # The group's own certificate is a member's: it is how the group checks on itself.
        options = self.client_options(self.tls) if self.tls is not None else {}
        followers = [
            redis.Redis(host=LOOPBACK, port=s.port, socket_timeout=1, **options) for s in self.servers[1:]
        ]
        sentinels = [
            redis.Redis(host=LOOPBACK, port=s.port, socket_timeout=1, **options) for s in self.sentinels
        ]
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(RedisError, OSError):
                    # Asked of each replica: a primary may call a replica online before its sync is done.
                    links = [await follower.info("replication") for follower in followers]
                    synced = all(
                        link.get("master_link_status") == "up" and not link.get("master_sync_in_progress")
                        for link in links
                    )
                    known = [len(await s.sentinel_slaves(SERVICE_NAME)) for s in sentinels]
                    if synced and min(known) == len(followers):
                        return
                await asyncio.sleep(_POLL_SECONDS)
        finally:
            for client in (*followers, *sentinels):
                await client.aclose()
        raise ConfigurationError(f"the Sentinel group did not form within {timeout:.0f} s")

    async def aclose(self) -> None:
        """Stop every server (Sentinels first, so none starts a failover while the rest stop)."""
        for server in reversed(self.all_processes):
            with contextlib.suppress(OSError):
                await server.stop()
