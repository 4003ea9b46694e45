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

Its parts live beside it, each in a module of its own: the secrets (:mod:`authmesh.stack_secrets`), the
NATS users and configuration (:mod:`authmesh.stack_nats_config`), the child processes and their health
(:mod:`authmesh.stack_children`) and the link proxy (:mod:`authmesh.stack_link_proxy`); this module
re-exports what its importers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.lifecycle import Startable
from authmesh._shared.settings import CommonSettings
from authmesh._shared.tls import TlsFiles
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
from authmesh.stack_children import (
    SERVICE_START_TIMEOUT_SECONDS,
    ChildProcess,
    Probe,
    ServiceProcess,
    authmesh_command,
    grpc_health_status,
)
from authmesh.stack_link_proxy import LinkProxy
from authmesh.stack_nats_config import (
    AUTH_PUBLISH_ALLOW,
    REPLICA_PUBLISH_ALLOW,
    REPLICA_PUBLISH_DENY,
    nats_authorization,
    own_inboxes,
    replica_names,
    stack_nats_cluster,
    stack_nats_config,
)
from authmesh.stack_secrets import (
    ADMIN_USERNAME,
    AUTH_NATS_USER,
    READER_NATS_USER,
    RESOURCE_NATS_USER,
    ROUTE_NATS_USER,
    SERVICE_USERNAME,
    Credentials,
    StackSecrets,
    new_password,
)

__all__ = [
    "ADMIN_USERNAME",
    "AUTH_NATS_USER",
    "AUTH_PUBLISH_ALLOW",
    "CLIENT_CERT_NAME",
    "GATEWAY_CERT_NAME",
    "NATS_CLUSTER_START_TIMEOUT_SECONDS",
    "READER_NATS_USER",
    "REDIS_USER",
    "REPLICA_PUBLISH_ALLOW",
    "REPLICA_PUBLISH_DENY",
    "RESOURCE_NATS_USER",
    "ROUTE_NATS_USER",
    "SECRETS_FILE",
    "SERVICE_START_TIMEOUT_SECONDS",
    "SERVICE_USERNAME",
    "TLS_DIR",
    "ChildProcess",
    "Credentials",
    "LinkProxy",
    "LocalStack",
    "Probe",
    "ReplicaInfo",
    "ServiceLogin",
    "ServiceProcess",
    "StackSecrets",
    "authmesh_command",
    "grpc_health_status",
    "nats_authorization",
    "new_password",
    "own_inboxes",
    "replica_names",
    "stack_nats_cluster",
    "stack_nats_config",
]

SECRETS_FILE = "stack-secrets.json"
REDIS_USER = "auth"
TLS_DIR = "tls"


class ServiceLogin(enum.StrEnum):
    """How the replicas of a TLS stack log in to the auth service as the service account."""

    CERTIFICATE = "certificate"
    PASSWORD = "password"


# The part whose certificate the stack itself (health probes, the demo) presents as a client.
CLIENT_CERT_NAME = "client"
# The Envoy gateway beside a stack (authmesh up --gateway): its HTTPS listener and its client side.
GATEWAY_CERT_NAME = "gateway"
NATS_CLUSTER_START_TIMEOUT_SECONDS = 30.0
_MAX_NATS_CLUSTER = 5

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """Where one resource replica listens."""

    name: str
    grpc: str
    http: str


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
        service_login: How the replicas of a TLS stack log in to the auth service: ``certificate``
            (their client certificates identify the service account, and the auth service demands a
            client certificate from every caller) or ``password``. A plaintext stack uses passwords.
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
        service_login: ServiceLogin = ServiceLogin.CERTIFICATE,
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
        self.certificate_login = tls and service_login is ServiceLogin.CERTIFICATE

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
    def http_scheme(self) -> str:
        """``https`` when the services' HTTP sides serve TLS (a TLS stack), else ``http``."""
        return "https" if self.tls else "http"

    @property
    def auth_url(self) -> str:
        """The auth service's HTTP base URL (``AUTHMESH_AUTH_URL``): ``https://`` on a TLS stack."""
        return f"{self.http_scheme}://{self.auth_http}"

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

    def tls_files(self, name: str) -> TlsFiles | None:
        """The certificate the stack issued for part ``name`` (None on a plaintext stack)."""
        return self._tls_files.get(name)

    def client_env(self) -> dict[str, str]:
        """The settings a client of this stack needs (with its client certificate on TLS)."""
        return {
            "AUTHMESH_AUTH_TARGET": self.auth_grpc,
            "AUTHMESH_AUTH_URL": self.auth_url,
            **_tls_env(self.client_tls),
        }

    def service_env(self) -> dict[str, str]:
        """Every setting a new resource service needs to join this stack (``authmesh up --env-file``).

        It connects to the NATS servers directly (not through a replica's link proxy) as the ``reader``
        user, which has a replica's permissions, and uses the stack's service account (by password) for the
        snapshot and ``Introspect``. On a TLS stack it gets the stack's client certificate, which every
        hop accepts (the auth service of a certificate-login stack demands one), and verifies every
        server (and the ``https://`` auth URL) against the stack's CA.
        """
        stack_secrets = self._require(self.secrets, "the stack's secrets")
        nats_user = stack_secrets.nats_replica(READER_NATS_USER)
        settings = {**self._base_env(), **self._extra_env}
        defaults = CommonSettings.model_fields
        return {
            "AUTHMESH_AUTH_TARGET": self.auth_grpc,
            "AUTHMESH_AUTH_URL": self.auth_url,
            "AUTHMESH_NATS_URLS": ",".join(self.nats_urls),
            "AUTHMESH_NATS_USER": nats_user.username,
            "AUTHMESH_NATS_PASSWORD": nats_user.password,
            "AUTHMESH_SERVICE_ACCOUNT": stack_secrets.service_account.joined,
            "AUTHMESH_ISSUER": settings.get("AUTHMESH_ISSUER", str(defaults["issuer"].default)),
            "AUTHMESH_AUDIENCE": settings.get("AUTHMESH_AUDIENCE", str(defaults["audience"].default)),
            **_tls_env(self.client_tls),
        }

    def auth_env(self, grpc_address: str, http_address: str) -> dict[str, str]:
        """The complete environment of one more auth-service replica on this stack's Redis and NATS.

        It is the stack's own auth service's, listening on ``grpc_address`` and ``http_address``.
        """
        stack_secrets = self._require(self.secrets, "the stack's secrets")
        return self._auth_env(stack_secrets, grpc_address, http_address)

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
                # With Sentinel, what the auth service is given (it holds no password).
                "url": self.sentinel_group.url
                if self.sentinel_group is not None
                else self._require(self.redis, "Redis").redacted_url,
                "log": str(self._require(self.redis, "Redis").log_path),
            },
            "auth": {
                "grpc": auth.grpc_address,
                "http": auth.http_address,
                "url": self.auth_url,
                "jwks_uri": f"{self.auth_url}/.well-known/jwks.json",
                "log": str(auth.log_path),
            },
            "replicas": [
                {
                    "name": process.name,
                    "grpc": process.grpc_address,
                    "http": process.http_address,
                    "url": f"{self.http_scheme}://{process.http_address}",
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
            # On TLS the group is closed by client certificate (no account: Sentinel would need one too).
            self.sentinel_group = SentinelGroup(
                self.data_dir / "redis-sentinel", tls=self._tls_files.get("redis")
            )
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
        # gRPC's C core writes its own lines to stderr, outside the services' log format, and at INFO
        # it writes one for every failed TLS handshake (a plaintext client, a port scanner); it reads
        # this variable once, when grpc is imported.
        env.setdefault("GRPC_VERBOSITY", "ERROR")
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
        if self.certificate_login:
            username = stack_secrets.service_account.username
            names = ",".join(f"{name}={username}" for name in replica_names(self.replica_count))
            env["AUTHMESH_TLS_REQUIRE_CLIENT_CERT"] = "true"
            env["AUTHMESH_CERTIFICATE_ACCOUNTS"] = names
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
                "AUTHMESH_AUTH_URL": self.auth_url,
                "AUTHMESH_NATS_URLS": ",".join(f"{scheme}://{link.address}" for link in links),
                "AUTHMESH_NATS_USER": stack_secrets.nats_replica(name).username,
                "AUTHMESH_NATS_PASSWORD": stack_secrets.nats_replica(name).password,
                # A replica of a certificate-login stack holds no password: its certificate is its identity.
                "AUTHMESH_SERVICE_ACCOUNT": stack_secrets.service_account.username
                if self.certificate_login
                else stack_secrets.service_account.joined,
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
        GATEWAY_CERT_NAME,
        *replica_names(replicas),
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
