"""Composition root of the auth service: Redis, keys, NATS, the gRPC server, the HTTP side, shutdown.

Nothing else in the service reads settings from the environment or builds a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import redis.asyncio as redis
import structlog
import tenacity
from nats.aio.client import Client as NatsClient
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from authmesh._auth_service.core import AuthCore
from authmesh._auth_service.grants import ADMIN_SCOPE, SERVICE_SCOPE
from authmesh._auth_service.http_routes import http_routes
from authmesh._auth_service.keyring import Keyring, KeySealer
from authmesh._auth_service.metrics import AuthMetrics
from authmesh._auth_service.passwords import PasswordChecker
from authmesh._auth_service.publisher import EventPublisher
from authmesh._auth_service.readiness import DependencyProbe
from authmesh._auth_service.redis_client import connect_store, describe_redis_url
from authmesh._auth_service.redis_scripts import ReplicaAck
from authmesh._auth_service.servicer import AuthServicer
from authmesh._auth_service.store import AuthStore
from authmesh._shared.connecting import StartupConnection, address_of
from authmesh._shared.dpop import proof_gate
from authmesh._shared.errors import Unavailable
from authmesh._shared.grpc_server import RunningServer, start_grpc_server
from authmesh._shared.http_server import HttpServer, join_host_port, split_host_port
from authmesh._shared.lifecycle import Startable, run_until_signalled
from authmesh._shared.logs import configure_logging
from authmesh._shared.metrics import ServiceMetrics
from authmesh._shared.nats_wiring import connect_nats, ensure_stream
from authmesh._shared.settings import AuthSettings, credentials
from authmesh._shared.tls import REDIS_TLS_SCHEMES
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc

REDIS_TIMEOUT_SECONDS = 3.0
# How often Redis and NATS are probed for the health status.
PROBE_INTERVAL_SECONDS = 1.0
SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
# Redis is probed with a short socket timeout and an exponential backoff between probes, up to this.
STORE_PROBE_MAX_WAIT_SECONDS = 2.0
_log = structlog.get_logger(__name__)


class AuthApp(Startable):
    """The running auth service.

    Args:
        settings: Its settings.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics("auth", settings.instance)
        self.registry = self.metrics.registry
        self._stack = contextlib.AsyncExitStack()
        self._grpc: RunningServer | None = None
        self._http: HttpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._nats: NatsClient | None = None
        self.redis_target = describe_redis_url(settings.redis_url.get_secret_value())
        self.core: AuthCore | None = None
        self.publisher: EventPublisher | None = None
        self.probe: DependencyProbe | None = None

    @property
    def grpc_address(self) -> str:
        """Where gRPC listens (real port)."""
        host, _ = split_host_port(self.settings.grpc_listen)
        return join_host_port(host, self._grpc.port if self._grpc else 0)

    @property
    def http_address(self) -> str:
        """Where HTTP listens (real port)."""
        return self._http.address if self._http else self.settings.http_listen

    async def _start(self) -> None:
        settings = self.settings
        sealer = KeySealer(settings.require_key_encryption_key())
        connection = connect_store(settings, timeout=REDIS_TIMEOUT_SECONDS)
        self._stack.push_async_callback(connection.aclose)
        store = AuthStore(
            connection.client,
            access_ttl=settings.access_token_ttl,
            leeway=settings.leeway,
            replica_ack=_replica_ack(settings, replicated=connection.replicated),
        )
        await self._reach_store(connection.client)
        await store.check_server_version()
        keyring = Keyring(store, sealer, int((settings.access_token_ttl + settings.leeway) * 1000))
        await keyring.start()
        self._nats = await connect_nats(settings, name=f"auth-service {settings.instance}")
        self._stack.push_async_callback(self._close_nats)
        js = self._nats.jetstream()
        await ensure_stream(js, settings)
        counters = AuthMetrics.register(self.registry)
        self.publisher = EventPublisher(
            self._nats,
            js,
            store,
            keyring,
            issuer=settings.issuer,
            origin=settings.instance,
            published=counters.events_published,
        )
        passwords = PasswordChecker(
            time_cost=settings.argon2_time_cost,
            memory_kib=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        )
        self.core = AuthCore(settings, store, keyring, passwords, self.publisher, counters)
        # After gRPC has drained, before Redis closes: checks of logins whose clients left still settle.
        self._stack.push_async_callback(self.core.wait_settled)
        await self._ensure_accounts(self.core)

        servicer = AuthServicer(
            self.core,
            proof_gate(settings, settings.grpc_listen, settings.auth_audience),
            settings.certificate_logins,
        )
        self._grpc = await start_grpc_server(
            settings.grpc_listen,
            register=lambda server: auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server),
            service_names=(SERVICE_NAME,),
            interceptors=(self.metrics.grpc_interceptor(),),
            serving=False,
            tls=settings.tls,
        )
        self._stack.push_async_callback(self._stop_grpc)

        self.probe = DependencyProbe(
            store,
            self._nats,
            redis_target=self.redis_target,
            nats_targets=",".join(address_of(url) for url in settings.nats_urls),
            set_serving=self._grpc.set_serving,
        )
        self._http = await self._stack.enter_async_context(
            HttpServer(
                settings.http_listen,
                [*http_routes(self.core, settings, self._public_base), *self.probe.routes()],
                self.registry,
                tls=settings.tls,
            )
        )
        self._tasks.append(asyncio.create_task(self.publisher.run_heartbeat(settings.heartbeat_interval)))
        self._stack.push_async_callback(self._cancel_tasks)
        await self._grpc.set_serving(True)
        self._tasks.append(asyncio.create_task(self.probe.run(PROBE_INTERVAL_SECONDS)))
        _log.info("auth service ready", grpc=self.grpc_address, http=self.http_address)

    async def _reach_store(self, client: redis.Redis) -> None:
        """Wait until Redis answers, retrying with backoff for ``connect_timeout`` seconds.

        Raises:
            Unavailable: ``STORE_UNAVAILABLE`` naming the address and the last cause, when it never did.
        """
        url = self.settings.redis_url.get_secret_value()
        attempts = StartupConnection(
            "Redis", describe_redis_url(url), self.settings.connect_timeout, "STORE_UNAVAILABLE"
        )
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type((RedisConnectionError, RedisTimeoutError, OSError)),
            stop=tenacity.stop_after_delay(self.settings.connect_timeout),
            wait=tenacity.wait_exponential_jitter(
                multiplier=0.1, max=STORE_PROBE_MAX_WAIT_SECONDS, jitter=0.1
            ),
            before_sleep=lambda state: attempts.failed(_outcome_error(state)),
            reraise=True,
        )

        async def ping() -> None:
            # Not client.ping itself: tenacity awaits only what a coroutine function returns.
            await client.ping()

        try:
            await retrying(ping)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            attempts.failed(error)
            gave_up = attempts.gave_up()
            if self.settings.tls.verifies_servers and not url.startswith(REDIS_TLS_SCHEMES):
                # The likeliest cause with TLS configured: servers that speak only TLS, asked in plaintext.
                gave_up = Unavailable(
                    f"{gave_up.message}; the URL is plaintext: a Redis on TLS needs rediss:// "
                    "(rediss+sentinel:// for Sentinel)",
                    code=gave_up.code,
                )
            raise gave_up from error

    def _public_base(self) -> str:
        if self.settings.public_url:
            return self.settings.public_url
        return self._http.url if self._http is not None else f"http://{self.http_address}"

    async def _ensure_accounts(self, core: AuthCore) -> None:
        await core.index_users()
        if self.settings.bootstrap_admin is not None:
            username, password = credentials(self.settings.bootstrap_admin)
            await core.ensure_user(username, password, (ADMIN_SCOPE,))
        if self.settings.service_account is not None:
            username, password = credentials(self.settings.service_account)
            # An account that logs in by certificate only: a password nobody knows, never stored in clear.
            await core.ensure_user(username, password or secrets.token_urlsafe(32), (SERVICE_SCOPE,))

    async def _stop_grpc(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.settings.shutdown_grace)

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _close_nats(self) -> None:
        if self._nats is not None and not self._nats.is_closed:
            await self._nats.close()

    async def aclose(self) -> None:
        """Graceful stop: health NOT_SERVING, drain gRPC, stop loops, close connections."""
        await self._stack.aclose()


def _replica_ack(settings: AuthSettings, *, replicated: bool) -> ReplicaAck | None:
    replicas = settings.redis_min_replicas_acked
    if replicas is None:
        replicas = 1 if replicated else 0
    if replicas == 0:
        return None
    return ReplicaAck(replicas, int(settings.redis_replica_ack_timeout * 1000))


def _outcome_error(state: tenacity.RetryCallState) -> BaseException:
    error = state.outcome.exception() if state.outcome is not None else None
    return error if error is not None else TimeoutError("no answer")


def run(settings: AuthSettings) -> None:
    """Run the auth service until SIGTERM or SIGINT, then stop gracefully."""
    configure_logging(settings.log_level, settings.log_format, service="auth", instance=settings.instance)
    run_until_signalled(lambda: AuthApp(settings))
