"""The whole authmesh stack as local processes: what ``authmesh up``, the demo and the fault tests run.

:class:`LocalStack` starts, in this order, each part waited for with its own deadline:

1. NATS with JetStream (one node, or a 3-node cluster whose ``AUTH_EVENTS`` keeps 3 replicas, routes
   only for nodes that know the route password), with users: ``auth`` publishes events and manages the
   stream; each replica (``resource-1`` …, and ``reader`` for tools) may only read it, each through an
   inbox of its own;
2. Redis (append-only, ``noeviction``);
3. one :class:`LinkProxy` per replica and NATS node, so a test can cut one replica off from NATS;
4. the auth service, until its gRPC health is ``SERVING``;
5. the resource replicas, until each one's gRPC health is ``SERVING`` (it has caught up with the stream).

Every service is ``python -m authmesh.cli auth-server|resource-server`` configured only through
``AUTHMESH_*`` variables, on free loopback ports. The secrets (key-encryption key, bootstrap admin,
service account, NATS passwords) are random and kept in the data directory, so a stack restarted on the
same directory finds its own Redis data usable. Stopping goes in reverse order (SIGTERM, then SIGKILL
after a deadline); every child also dies with the process that started it.

A stack is bound to the event loop it was started in (the link proxies run there).
"""

# Starting and stopping own their deadlines, as in authmesh.processes.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.events import LIVE_SUBJECTS, STREAM_NAME, STREAM_SUBJECTS
from authmesh._shared.lifecycle import Startable
from authmesh._shared.nats_wiring import inbox_prefix
from authmesh._shared.settings import CommonSettings
from authmesh._shared.tls import TlsFiles, open_channel
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.data_dir_lock import DataDirLock
from authmesh.processes import (
    LOOPBACK,
    START_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    NatsCluster,
    NatsServer,
    RedisServer,
    ServerProcess,
    free_ports,
)
from authmesh.redis_sentinel import SentinelGroup

AUTH_NATS_USER = "auth"
# The secrets file keeps one resource secret; each replica's NATS password is derived from it.
RESOURCE_NATS_USER = "resource"
# A NATS user with a replica's permissions for tools that watch the stream (benchmarks, tests).
READER_NATS_USER = "reader"
ROUTE_NATS_USER = "route"
ADMIN_USERNAME = "admin"
SERVICE_USERNAME = "svc-resource"
SECRETS_FILE = "stack-secrets.json"
REDIS_USER = "auth"
TLS_DIR = "tls"
# The part whose certificate the stack itself (health probes, the demo) presents as a client.
CLIENT_CERT_NAME = "client"
# A service imports grpc, cryptography and pydantic, connects to Redis and NATS, and a replica loads
# the snapshot before it serves: seconds, not milliseconds.
SERVICE_START_TIMEOUT_SECONDS = 30.0
NATS_CLUSTER_START_TIMEOUT_SECONDS = 30.0
_PROXY_CONNECT_TIMEOUT_SECONDS = 2.0
_PROXY_CLOSE_TIMEOUT_SECONDS = 2.0
_PROXY_CHUNK_BYTES = 64 * 1024
_SECRET_LENGTH = 32
_MAX_NATS_CLUSTER = 5

# What each NATS user may do. Anything not allowed is refused, and the explicit denials keep the
# refusals visible even if an allow pattern is widened later (NATS: deny wins).
_STREAM = STREAM_NAME
AUTH_PUBLISH_ALLOW = (
    *STREAM_SUBJECTS,
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    f"$JS.API.STREAM.INFO.{_STREAM}",
    f"$JS.API.STREAM.MSG.GET.{_STREAM}",
    f"$JS.API.DIRECT.GET.{_STREAM}",
    f"$JS.API.DIRECT.GET.{_STREAM}.>",
    # CREATE, UPDATE, DELETE and PURGE of this one stream.
    f"$JS.API.STREAM.*.{_STREAM}",
)
# A replica reads the stream's live copy (core NATS) and its history (direct gets): nothing it may send
# creates or changes anything on the server, so it cannot steer what another replica receives.
REPLICA_PUBLISH_ALLOW = (
    f"$JS.API.STREAM.INFO.{_STREAM}",
    f"$JS.API.DIRECT.GET.{_STREAM}",
)
REPLICA_PUBLISH_DENY = (
    *STREAM_SUBJECTS,
    *LIVE_SUBJECTS,
    "$JS.API.CONSUMER.>",
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
)


def own_inboxes(user: str) -> str:
    """The inboxes ``user`` alone may subscribe to: replies to its requests (see ``inbox_prefix``)."""
    return f"{inbox_prefix(user)}.>"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and its password (the password never appears in ``repr``)."""

    username: str
    password: str = field(repr=False)

    @property
    def joined(self) -> str:
        """``username:password``, the form ``AUTHMESH_BOOTSTRAP_ADMIN`` and ``--admin`` take."""
        return f"{self.username}:{self.password}"


def new_password() -> str:
    """A random password of letters and digits that starts with a letter.

    NATS parses a ``$VARIABLE`` in its configuration as a configuration value, so a secret that starts
    with a digit or a dash, or spells ``true``, would not reach it as a string; this alphabet always does.
    """
    first = secrets.choice(string.ascii_letters)
    rest = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(_SECRET_LENGTH - 1))
    return first + rest


@dataclass(frozen=True, slots=True)
class StackSecrets:
    """Every secret a stack needs; random, and kept in the data directory between runs."""

    key_encryption_key: str = field(repr=False)
    admin: Credentials
    service_account: Credentials
    nats_auth: Credentials
    nats_resource: Credentials
    # Files written before Redis had an account lack it; such a stack gets a new one at each start
    # (Redis reads its accounts from the configuration, not from its data).
    redis_password: str = field(repr=False, default_factory=new_password)

    def nats_replica(self, name: str) -> Credentials:
        """The NATS user of one replica (or of ``reader``): its own name, its own password.

        The password is derived from ``nats_resource`` (HMAC-SHA256 by the name), so the secrets file
        keeps one secret whatever the number of replicas, and no replica can work out another's.
        """
        return Credentials(name, _derived_password(self.nats_resource.password, name))

    @property
    def nats_route(self) -> Credentials:
        """The user NATS cluster routes authenticate as."""
        return Credentials(ROUTE_NATS_USER, _derived_password(self.nats_resource.password, ROUTE_NATS_USER))

    @classmethod
    def generate(cls) -> StackSecrets:
        """Fresh random secrets."""
        return cls(
            key_encryption_key=new_password(),
            admin=Credentials(ADMIN_USERNAME, new_password()),
            service_account=Credentials(SERVICE_USERNAME, new_password()),
            nats_auth=Credentials(AUTH_NATS_USER, new_password()),
            nats_resource=Credentials(RESOURCE_NATS_USER, new_password()),
        )

    @classmethod
    def load_or_create(cls, path: Path) -> StackSecrets:
        """The secrets stored at ``path``, or new ones written there (readable by the owner only).

        Raises:
            ConfigurationError: The file exists but is not what this function writes.
        """
        if path.exists():
            try:
                document = json.loads(path.read_text())
                return cls(
                    key_encryption_key=str(document["key_encryption_key"]),
                    admin=_credentials(document["admin"]),
                    service_account=_credentials(document["service_account"]),
                    nats_auth=_credentials(document["nats_auth"]),
                    nats_resource=_credentials(document["nats_resource"]),
                    redis_password=str(document.get("redis_password") or new_password()),
                )
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConfigurationError(f"{path} is not a stack secrets file: {error}") from None
        created = cls.generate()
        document = {
            "key_encryption_key": created.key_encryption_key,
            "admin": created.admin.joined,
            "service_account": created.service_account.joined,
            "nats_auth": created.nats_auth.joined,
            "nats_resource": created.nats_resource.joined,
            "redis_password": created.redis_password,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(document, file, indent=2)
        return created


def _derived_password(secret: str, label: str) -> str:
    """A password for ``label`` derived from ``secret``, in the alphabet of :func:`new_password`."""
    digest = hmac.new(secret.encode(), f"authmesh nats {label}".encode(), hashlib.sha256).hexdigest()
    return "k" + digest[: _SECRET_LENGTH - 1]


def _credentials(joined: object) -> Credentials:
    username, sep, password = str(joined).partition(":")
    if not sep or not username or not password:
        raise ValueError("credentials are not username:password")
    return Credentials(username, password)


def _conf_list(values: Sequence[str], indent: int) -> str:
    pad = " " * indent
    return "[\n" + ",\n".join(f"{pad}  {json.dumps(value)}" for value in values) + f"\n{pad}]"


def _conf_user(
    name: str, password: str, allow: Sequence[str], deny: Sequence[str], subscribe: Sequence[str]
) -> str:
    publish = f"          allow: {_conf_list(allow, 10)}\n"
    if deny:
        publish += f"          deny: {_conf_list(deny, 10)}\n"
    return (
        "    {\n"
        f"      user: {json.dumps(name)}\n"
        f"      password: {password}\n"
        "      permissions: {\n"
        f"        publish: {{\n{publish}        }}\n"
        f"        subscribe: {{\n          allow: {_conf_list(subscribe, 10)}\n        }}\n"
        "      }\n"
        "    }\n"
    )


def nats_authorization(auth_password: str, replicas: Sequence[tuple[str, str]]) -> str:
    """The NATS ``authorization`` block: the ``auth`` user and one user per replica, with permissions.

    ``docker-compose.yml`` mounts the same block (``deploy/nats/authorization.conf``) with the passwords
    taken from the environment; a test keeps the two identical.

    Args:
        auth_password: The ``auth`` user's password as a NATS configuration value: a quoted string, or a
            ``$VARIABLE`` the server resolves from its environment.
        replicas: Each replica's user name (one subject token) and password, likewise.

    Returns:
        Configuration text.
    """
    users = _conf_user(AUTH_NATS_USER, auth_password, AUTH_PUBLISH_ALLOW, (), (own_inboxes(AUTH_NATS_USER),))
    for name, password in replicas:
        subscribe = (*LIVE_SUBJECTS, own_inboxes(name))
        users += _conf_user(name, password, REPLICA_PUBLISH_ALLOW, REPLICA_PUBLISH_DENY, subscribe)
    return "authorization {\n  users: [\n" + users + "  ]\n}\n"


def compose_password_variable(user: str) -> str:
    """Where ``docker-compose.yml`` passes a NATS user's password: ``AUTHMESH_NATS_<USER>_PASSWORD``."""
    return f"AUTHMESH_NATS_{user.upper().replace('-', '_')}_PASSWORD"


def replica_names(count: int) -> list[str]:
    """The names of a stack's replicas, which are also their NATS users."""
    return [f"resource-{index + 1}" for index in range(count)]


def stack_nats_config(stack_secrets: StackSecrets, replicas: Sequence[str]) -> str:
    """The NATS configuration ``authmesh up`` runs with: the ``auth`` user, one per replica, ``reader``."""
    readers = [stack_secrets.nats_replica(name) for name in (*replicas, READER_NATS_USER)]
    return nats_authorization(
        json.dumps(stack_secrets.nats_auth.password),
        [(reader.username, json.dumps(reader.password)) for reader in readers],
    )


def stack_nats_cluster(
    data_dir: Path, stack_secrets: StackSecrets, config: str, *, size: int, tls: TlsFiles | None = None
) -> NatsCluster:
    """The stack's NATS cluster (not started): routes only for servers that know the route password.

    Args:
        data_dir: Where the nodes keep their files.
        stack_secrets: The route password's source.
        config: Configuration every node gets (users and permissions).
        size: How many nodes.
        tls: Clients and routes on TLS with this certificate and CA.
    """
    route = stack_secrets.nats_route
    return NatsCluster(
        data_dir,
        size=size,
        config_text=config,
        route_user=route.username,
        route_password=route.password,
        # Servers advertise their peers' client URLs, and a client reconnecting after a cut link would
        # reach a peer directly, around its link proxy.
        no_advertise=True,
        tls=tls,
    )


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
_T = TypeVar("_T")


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


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """Where one resource replica listens."""

    name: str
    grpc: str
    http: str


class LinkProxy:
    """A TCP proxy on 127.0.0.1 in front of one upstream address; it can cut the link on demand.

    Two kinds of cut: ``cut()`` resets every connection and refuses new ones, so the client sees the
    disconnect at once; ``cut(silent=True)`` keeps connections open but moves no byte in either
    direction, a partition the client notices only by what stops arriving (heartbeats). ``restore()``
    lets bytes flow again; after a silent cut nothing is lost, as after a healed network.

    Args:
        name: For errors.
        upstream: ``(host, port)`` to forward to.
    """

    def __init__(self, name: str, upstream: tuple[str, int]) -> None:
        self.name = name
        self.upstream = upstream
        self._server: asyncio.Server | None = None
        self._port = 0
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The port it listens on (after ``start``)."""
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self._port}"

    @property
    def state(self) -> str:
        """``open``, ``cut`` or ``silent``."""
        if self._refusing:
            return "cut"
        return "open" if self._flowing.is_set() else "silent"

    @property
    def connections(self) -> int:
        """How many client connections are linked to the upstream now."""
        return len(self._links)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self._port = int(self._server.sockets[0].getsockname()[1])

    def cut(self, *, silent: bool = False) -> None:
        """Cut the link.

        Args:
            silent: Keep connections open but move no byte, instead of resetting them.
        """
        if silent:
            self._refusing = False
            self._flowing.clear()
            return
        self._refusing = True
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()
        # Wakes handlers and pumps parked by a silent cut; they find their connections gone.
        self._flowing.set()

    def restore(self) -> None:
        """Let connections through again."""
        self._refusing = False
        self._flowing.set()

    async def aclose(self) -> None:
        """Stop listening, reset every connection and wait (with a deadline) for the handlers to end."""
        if self._server is not None:
            self._server.close()
        self.cut()
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=_PROXY_CLOSE_TIMEOUT_SECONDS)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PROXY_CLOSE_TIMEOUT_SECONDS):
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            if not self._refusing:
                await self._flowing.wait()  # a silent cut stalls new connections too
            if self._refusing:
                return
            try:
                async with asyncio.timeout(_PROXY_CONNECT_TIMEOUT_SECONDS):
                    upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            except (OSError, TimeoutError):
                return
            link = (writer, upstream_writer)
            self._links.add(link)
            try:
                await self._pump_both_ways(reader, writer, upstream_reader, upstream_writer)
            finally:
                self._links.discard(link)
                upstream_writer.transport.abort()
        finally:
            writer.transport.abort()
            if handler is not None:
                self._handlers.discard(handler)

    async def _pump_both_ways(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        pumps = [
            asyncio.create_task(self._pump(reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, writer)),
        ]
        try:
            # Either side closing ends the link.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(_PROXY_CHUNK_BYTES)
                if not data:
                    return
                # Bytes read just before a silent cut wait for the restore instead of slipping through.
                await self._flowing.wait()
                if self._refusing:
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            return


class LocalStack(Startable):
    """NATS, Redis, the auth service and N resource replicas as local processes (an async context manager).

    Args:
        replicas: How many resource replicas.
        nats_cluster: 1 for a single NATS server, 3 (or 5) for a cluster with ``AUTHMESH_STREAM_REPLICAS=3``.
        base_dir: Where every part keeps its files and log; a temporary directory (removed on close)
            when None. The secrets are kept there too, so a stack restarted on it finds its data usable.
        env: ``AUTHMESH_*`` settings for every service, over the stack's own.
        staleness_bound: The replicas' ``AUTHMESH_STALENESS_BOUND`` (seconds), unless ``env`` sets it.
        service_start_timeout: Seconds each service gets to become healthy.
        stop_timeout: Seconds each process gets to stop after SIGTERM before it is killed.
        tls: Every hop on TLS with certificates from a throwaway CA made in ``<data_dir>/tls``: gRPC
            (servers verified by their clients), NATS and Redis (both also demand client certificates;
            Redis an account and password too).
        redis_sentinel: Run Redis as a primary, two replicas and three Sentinels, which the auth service
            follows through a failover (and acknowledges writes once a replica has them).
    """

    def __init__(
        self,
        replicas: int = 3,
        nats_cluster: int = 1,
        base_dir: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        staleness_bound: float | None = None,
        service_start_timeout: float = SERVICE_START_TIMEOUT_SECONDS,
        stop_timeout: float = STOP_TIMEOUT_SECONDS,
        tls: bool = False,
        redis_sentinel: bool = False,
    ) -> None:
        if replicas < 0:
            raise ConfigurationError(f"replicas must be 0 or more, not {replicas}")
        if nats_cluster not in (1, 3, _MAX_NATS_CLUSTER):
            raise ConfigurationError(f"the NATS cluster has 1, 3 or 5 nodes, not {nats_cluster}")
        extra = dict(env or {})
        if staleness_bound is not None:
            extra.setdefault("AUTHMESH_STALENESS_BOUND", f"{staleness_bound:g}")
        foreign = sorted(name for name in extra if not name.startswith("AUTHMESH_"))
        if foreign:
            raise ConfigurationError(f"only AUTHMESH_* settings may be given, not {', '.join(foreign)}")
        self.replica_count = replicas
        self.nats_cluster_size = nats_cluster
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._temporary_dir: Path | None = None
        self._extra_env = extra
        self._service_start_timeout = service_start_timeout
        self._stop_timeout = stop_timeout
        self._stack = contextlib.AsyncExitStack()
        self.secrets: StackSecrets | None = None
        self.nats: NatsServer | NatsCluster | None = None
        self.redis: RedisServer | None = None
        self.redis_sentinel = redis_sentinel
        self.sentinel_group: SentinelGroup | None = None
        self.auth: ServiceProcess | None = None
        self.replica_processes: list[ServiceProcess] = []
        self.links: list[list[LinkProxy]] = []
        self.tls = tls
        self._tls_files: dict[str, TlsFiles] = {}

    # --- what runs where ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """Where every part keeps its files (the temporary directory once started, if none was given)."""
        return self._require(self._base_dir or self._temporary_dir, "the data directory")

    @property
    def nats_nodes(self) -> tuple[NatsServer, ...]:
        """Every NATS server of the stack."""
        if self.nats is None:
            return ()
        return self.nats.nodes if isinstance(self.nats, NatsCluster) else (self.nats,)

    @property
    def nats_urls(self) -> list[str]:
        """The NATS servers' own client URLs (the auth service's; replicas go through their proxies)."""
        return [node.url for node in self.nats_nodes]

    @property
    def redis_url(self) -> str:
        """The auth service's Redis (the Sentinels' URL when Redis runs under Sentinel)."""
        if self.sentinel_group is not None:
            return self.sentinel_group.url
        return self._require(self.redis, "Redis").url

    @property
    def auth_grpc(self) -> str:
        """The auth service's gRPC address."""
        return self._require(self.auth, "the auth service").grpc_address

    @property
    def auth_http(self) -> str:
        """The auth service's HTTP address (JWKS, metadata, metrics)."""
        return self._require(self.auth, "the auth service").http_address

    @property
    def replicas(self) -> list[ReplicaInfo]:
        """Where each resource replica listens."""
        return [
            ReplicaInfo(process.name, process.grpc_address, process.http_address)
            for process in self.replica_processes
        ]

    @property
    def admin_credentials(self) -> tuple[str, str]:
        """The bootstrap admin's ``(username, password)``."""
        admin = self._require(self.secrets, "the stack's secrets").admin
        return admin.username, admin.password

    @property
    def service_credentials(self) -> tuple[str, str]:
        """The ``(username, password)`` the replicas log in with (scope ``service``)."""
        account = self._require(self.secrets, "the stack's secrets").service_account
        return account.username, account.password

    def _parts(self) -> list[ServerProcess]:
        parts: list[ServerProcess] = [*self.nats_nodes]
        if self.sentinel_group is not None:
            parts += self.sentinel_group.all_processes
        parts += [part for part in (self.redis, self.auth) if part is not None and part not in parts]
        return parts + list(self.replica_processes)

    def pids(self) -> dict[str, int]:
        """The process id of every part that runs now, by name."""
        return {_part_name(part): part.pid for part in self._parts() if part.pid is not None and part.running}

    def exited(self) -> dict[str, Path]:
        """The parts that were started and have exited on their own since (name → log file).

        A part stopped with :meth:`stop_replica` or killed with :meth:`kill_replica` is not listed.
        """
        return {
            _part_name(part): part.log_path
            for part in self._parts()
            if part.pid is not None and not part.running
        }

    @property
    def client_tls(self) -> TlsFiles:
        """What a client of this stack verifies its servers with (plaintext when the stack is)."""
        return self._tls_files.get(CLIENT_CERT_NAME, TlsFiles())

    def client_env(self) -> dict[str, str]:
        """The settings a client of this stack needs."""
        env = {"AUTHMESH_AUTH_TARGET": self.auth_grpc}
        if self.client_tls.ca_file is not None:
            env["AUTHMESH_TLS_CA_FILE"] = str(self.client_tls.ca_file)
        return env

    def service_env(self) -> dict[str, str]:
        """Every setting a new resource service needs to join this stack (``authmesh up --env-file``).

        It connects to the NATS servers directly (not through a replica's link proxy) as the ``reader``
        user, which has a replica's permissions, and uses the stack's service account for the snapshot and
        ``Introspect``.
        """
        stack_secrets = self._require(self.secrets, "the stack's secrets")
        nats_user = stack_secrets.nats_replica(READER_NATS_USER)
        settings = {**self._base_env(), **self._extra_env}
        defaults = CommonSettings.model_fields
        return {
            "AUTHMESH_AUTH_TARGET": self.auth_grpc,
            "AUTHMESH_AUTH_URL": f"http://{self.auth_http}",
            "AUTHMESH_NATS_URLS": ",".join(self.nats_urls),
            "AUTHMESH_NATS_USER": nats_user.username,
            "AUTHMESH_NATS_PASSWORD": nats_user.password,
            "AUTHMESH_SERVICE_ACCOUNT": stack_secrets.service_account.joined,
            "AUTHMESH_ISSUER": settings.get("AUTHMESH_ISSUER", str(defaults["issuer"].default)),
            "AUTHMESH_AUDIENCE": settings.get("AUTHMESH_AUDIENCE", str(defaults["audience"].default)),
        }

    def describe(self) -> dict[str, Any]:
        """Everything ``authmesh up --json`` prints: addresses, credentials, logs and process ids."""
        auth = self._require(self.auth, "the auth service")
        username, password = self.admin_credentials
        return {
            "data_dir": str(self.data_dir),
            "nats": {
                "urls": self.nats_urls,
                "monitor": [node.monitor_url for node in self.nats_nodes],
                "cluster_size": self.nats_cluster_size,
                "logs": [str(node.log_path) for node in self.nats_nodes],
            },
            "redis": {
                "url": self._require(self.redis, "Redis").redacted_url,
                "log": str(self._require(self.redis, "Redis").log_path),
            },
            "auth": {
                "grpc": auth.grpc_address,
                "http": auth.http_address,
                "jwks_uri": f"http://{auth.http_address}/.well-known/jwks.json",
                "log": str(auth.log_path),
            },
            "replicas": [
                {
                    "name": process.name,
                    "grpc": process.grpc_address,
                    "http": process.http_address,
                    "nats_links": [link.address for link in links],
                    "log": str(process.log_path),
                }
                for process, links in zip(self.replica_processes, self.links, strict=True)
            ],
            "admin": {"username": username, "password": password},
            "client_env": self.client_env(),
            "tls": {name: str(files.cert_file) for name, files in self._tls_files.items()}
            | ({"ca": str(self.client_tls.ca_file)} if self.tls else {}),
            "pids": self.pids(),
        }

    # --- faults -------------------------------------------------------------------------------------

    async def stop_replica(self, index: int) -> None:
        """Stop replica ``index`` gracefully (SIGTERM, then SIGKILL after the stop deadline)."""
        await self.replica_processes[index].stop(self._stop_timeout)

    def kill_replica(self, index: int) -> None:
        """SIGKILL replica ``index``, as a crash would."""
        self.replica_processes[index].kill()

    async def start_replica(self, index: int) -> None:
        """Start replica ``index`` again (same ports and settings) and wait until it is SERVING."""
        await self.replica_processes[index].start(self._service_start_timeout)

    async def cut_nats(self, index: int, *, silent: bool = False) -> None:
        """Cut replica ``index`` off from NATS (see :meth:`LinkProxy.cut`).

        Args:
            index: Which replica.
            silent: Keep its connections open but move no byte, instead of resetting them.
        """
        for link in self.links[index]:
            link.cut(silent=silent)

    async def restore_nats(self, index: int) -> None:
        """Give replica ``index`` its NATS link back."""
        for link in self.links[index]:
            link.restore()

    # --- life cycle ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop everything in reverse order; remove the data directory if it was a temporary one."""
        try:
            await self._stack.aclose()
        finally:
            temporary, self._temporary_dir = self._temporary_dir, None
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)

    async def _start(self) -> None:
        if self._base_dir is None:
            self._temporary_dir = Path(tempfile.mkdtemp(prefix="authmesh-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Two stacks on one data directory would share (and corrupt) Redis's and NATS's files.
        self._stack.enter_context(DataDirLock(self.data_dir))
        self.secrets = StackSecrets.load_or_create(self.data_dir / SECRETS_FILE)
        if self.tls:
            self._tls_files = _issue_certificates(self.data_dir / TLS_DIR, self.replica_count)
        await self._start_nats(self.secrets)
        if self.redis_sentinel:
            self.sentinel_group = SentinelGroup(self.data_dir / "redis-sentinel")
            self.redis = self.sentinel_group.servers[0]
            await _named(self._stack.enter_async_context(self.sentinel_group), "redis-sentinel")
        else:
            self.redis = RedisServer(
                self.data_dir / "redis",
                appendonly=True,
                tls=self._tls_files.get("redis"),
                # The key-encryption key is as secret and as random; a TLS stack also closes Redis by account.
                user=(REDIS_USER, self.secrets.redis_password) if self.tls else None,
            )
            self._stack.push_async_callback(self.redis.stop, self._stop_timeout)
            await _named(self.redis.start(), "redis")
        await self._start_links()
        auth_grpc, auth_http, *replica_ports = free_ports(2 + 2 * self.replica_count)
        self.auth = ServiceProcess(
            "auth",
            self.data_dir / "auth",
            command="auth-server",
            env=self._auth_env(self.secrets, f"{LOOPBACK}:{auth_grpc}", f"{LOOPBACK}:{auth_http}"),
            grpc_address=f"{LOOPBACK}:{auth_grpc}",
            http_address=f"{LOOPBACK}:{auth_http}",
            probe_tls=self.client_tls,
        )
        self._stack.push_async_callback(self.auth.stop, self._stop_timeout)
        await self.auth.start(self._service_start_timeout)
        for index, name in enumerate(replica_names(self.replica_count)):
            grpc_address = f"{LOOPBACK}:{replica_ports[2 * index]}"
            http_address = f"{LOOPBACK}:{replica_ports[2 * index + 1]}"
            env = self._resource_env(self.secrets, name, grpc_address, http_address, self.links[index])
            self.replica_processes.append(
                ServiceProcess(
                    name,
                    self.data_dir / name,
                    command="resource-server",
                    env=env,
                    grpc_address=grpc_address,
                    http_address=http_address,
                    probe_tls=self.client_tls,
                )
            )
        self._stack.push_async_callback(self._stop_replicas)
        await _all_or_nothing(
            [process.start(self._service_start_timeout) for process in self.replica_processes]
        )

    async def _start_nats(self, stack_secrets: StackSecrets) -> None:
        tls = self._tls_files.get("nats")
        config = stack_nats_config(stack_secrets, replica_names(self.replica_count))
        if self.nats_cluster_size > 1:
            nats: NatsServer | NatsCluster = stack_nats_cluster(
                self.data_dir / "nats", stack_secrets, config, size=self.nats_cluster_size, tls=tls
            )
            self._stack.push_async_callback(nats.stop, self._stop_timeout)
            self.nats = nats
            await _named(nats.start(NATS_CLUSTER_START_TIMEOUT_SECONDS), "the NATS cluster")
        else:
            nats = NatsServer(self.data_dir / "nats", config_text=config, tls=tls)
            self._stack.push_async_callback(nats.stop, self._stop_timeout)
            self.nats = nats
            await _named(nats.start(START_TIMEOUT_SECONDS), "NATS")

    async def _start_links(self) -> None:
        for name in replica_names(self.replica_count):
            links = [
                LinkProxy(f"{name} → {node.server_name}", (LOOPBACK, node.port)) for node in self.nats_nodes
            ]
            self.links.append(links)
            for link in links:
                self._stack.push_async_callback(link.aclose)
                await link.start()

    async def _stop_replicas(self) -> None:
        await asyncio.gather(*(process.stop(self._stop_timeout) for process in self.replica_processes))

    def _base_env(self) -> dict[str, str]:
        # The children see what this process sees (PATH, locale, AUTHMESH_* tuning such as token
        # lifetimes), then the stack's own settings, then the caller's.
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["AUTHMESH_STREAM_REPLICAS"] = str(min(3, self.nats_cluster_size))
        return env

    def _auth_env(self, stack_secrets: StackSecrets, grpc_address: str, http_address: str) -> dict[str, str]:
        env = self._base_env()
        env.update(
            {
                "AUTHMESH_INSTANCE": "auth",
                "AUTHMESH_GRPC_LISTEN": grpc_address,
                "AUTHMESH_HTTP_LISTEN": http_address,
                "AUTHMESH_REDIS_URL": self.redis_url,
                "AUTHMESH_NATS_URLS": ",".join(self.nats_urls),
                "AUTHMESH_NATS_USER": stack_secrets.nats_auth.username,
                "AUTHMESH_NATS_PASSWORD": stack_secrets.nats_auth.password,
                "AUTHMESH_KEY_ENCRYPTION_KEY": stack_secrets.key_encryption_key,
                "AUTHMESH_BOOTSTRAP_ADMIN": stack_secrets.admin.joined,
                "AUTHMESH_SERVICE_ACCOUNT": stack_secrets.service_account.joined,
            }
        )
        env.update(_tls_env(self._tls_files.get("auth")))
        env.update(self._extra_env)
        return env

    def _resource_env(
        self,
        stack_secrets: StackSecrets,
        name: str,
        grpc_address: str,
        http_address: str,
        links: Sequence[LinkProxy],
    ) -> dict[str, str]:
        env = self._base_env()
        scheme = "tls" if self.tls else "nats"
        env.update(
            {
                "AUTHMESH_INSTANCE": name,
                "AUTHMESH_GRPC_LISTEN": grpc_address,
                "AUTHMESH_HTTP_LISTEN": http_address,
                "AUTHMESH_AUTH_TARGET": self.auth_grpc,
                "AUTHMESH_AUTH_URL": f"http://{self.auth_http}",
                "AUTHMESH_NATS_URLS": ",".join(f"{scheme}://{link.address}" for link in links),
                "AUTHMESH_NATS_USER": stack_secrets.nats_replica(name).username,
                "AUTHMESH_NATS_PASSWORD": stack_secrets.nats_replica(name).password,
                "AUTHMESH_SERVICE_ACCOUNT": stack_secrets.service_account.joined,
            }
        )
        env.update(_tls_env(self._tls_files.get(name)))
        env.update(self._extra_env)
        return env

    @staticmethod
    def _require(value: _T | None, what: str) -> _T:
        if value is None:
            raise ConfigurationError(f"{what} is not started")
        return value


def _issue_certificates(directory: Path, replicas: int) -> dict[str, TlsFiles]:
    """A new CA and a certificate for every part of a stack (and one for its own client calls)."""
    authority = CertificateAuthority.create("authmesh local stack CA")
    names = [
        "nats",
        "redis",
        "auth",
        CLIENT_CERT_NAME,
        *(f"resource-{index + 1}" for index in range(replicas)),
    ]
    return {name: authority.write_issued(directory, name, LOCAL_HOSTS) for name in names}


def _tls_env(files: TlsFiles | None) -> dict[str, str]:
    """The ``AUTHMESH_TLS_*`` settings that hand a service ``files``."""
    if files is None:
        return {}
    named = {"CA_FILE": files.ca_file, "CERT_FILE": files.cert_file, "KEY_FILE": files.key_file}
    return {f"AUTHMESH_TLS_{key}": str(path) for key, path in named.items() if path is not None}


def _part_name(part: ServerProcess) -> str:
    if isinstance(part, NatsServer):
        return part.server_name
    return part.name


async def _named(start: Awaitable[object], what: str) -> None:
    """Await a part's start; its error says which part did not come up."""
    begun = time.monotonic()
    try:
        await start
    except ConfigurationError as error:
        waited = time.monotonic() - begun
        raise ConfigurationError(f"{what} did not come up ({waited:.1f} s): {error.message}") from None


async def _all_or_nothing(starts: Sequence[Awaitable[None]]) -> None:
    """Await every start concurrently; raise the first error once all have finished."""
    outcomes = await asyncio.gather(*starts, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
