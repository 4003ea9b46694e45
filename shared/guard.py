"""One object that protects a service: :class:`ResourceGuard`.

It builds the whole resource side a service needs to verify authmesh tokens locally and to hear of every
revocation: the token rules (issuer, audience, lifetime and leeway, read from the auth service's RFC 8414
metadata), the key cache, the denylist fed by the revocation consumer (snapshot, then the stream from the
next sequence), the staleness monitor with its ``Introspect`` fallback, and the verifier. It is entered
once, waits until the revocation state has caught up, and fails closed: until then, and whenever the
state is stale and ``Introspect`` cannot be reached, every protected call is refused.

::

    guard = ResourceGuard.from_env()
    server = grpc.aio.server(interceptors=[guard.aio_interceptor(policy={...})])
    async with guard:
        ...

A sync ``grpc.server`` enters it with ``with guard:`` instead: the guard's event loop then runs in a
thread of its own, and :meth:`ResourceGuard.sync_interceptor` hands it only what needs I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Collection, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import structlog
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from authmesh._shared.auth_client import DEFAULT_LOGIN_TIMEOUT_SECONDS, AuthClient
from authmesh._shared.auth_metadata import TokenRules, fetch_token_rules
from authmesh._shared.claims import AccessClaims
from authmesh._shared.consumer import RevocationConsumer
from authmesh._shared.denylist import Denylist
from authmesh._shared.dpop import HTTP_METHOD, ProofGate, proof_gate
from authmesh._shared.errors import ConfigurationError, Unavailable
from authmesh._shared.interceptor import Authenticator, AuthInterceptor, SyncAuthInterceptor
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.lifecycle import Startable
from authmesh._shared.metrics import RevocationMetrics, VerificationMetrics
from authmesh._shared.scopes import OPEN_SERVICE_PREFIXES, AccessPolicy, ScopeRequirement
from authmesh._shared.settings import CommonSettings, ResourceSettings, credentials
from authmesh._shared.staleness import REVOCATION_STATE_STALE, IntrospectionFallback, StalenessMonitor
from authmesh._shared.tls import TlsFiles, check_https_url
from authmesh._shared.verifier import NoRevocations, RevocationCheck, TokenVerifier, VerifierPolicy

GUARD_NOT_STARTED = "GUARD_NOT_STARTED"
DEFAULT_READY_TIMEOUT = 30.0
# How long a sync server's worker waits for the guard's loop (a key refetch, an Introspect call).
DEFAULT_CALL_TIMEOUT = 5.0
_THREAD_STOP_SECONDS = 15.0
_log = structlog.get_logger(__name__)


class ResourceGuard(Startable):
    """Verifies authmesh access tokens for one service, and keeps up with every revocation.

    Args:
        auth_target: ``host:port`` of the auth service's gRPC API (keys, snapshot, ``Introspect``).
        nats_urls: The NATS servers that carry the revocation events. Required: without them a revoked
            token is accepted until it expires, which only ``unsafe_without_revocation`` allows.
        auth_url: The auth service's HTTP base URL; issuer, audience, token lifetime and leeway are read
            from its metadata there. Without it they must be given by hand (``issuer``, ``audience``,
            ``access_token_ttl``).
        nats_user: NATS user (the stack's resource user).
        nats_password: NATS password.
        service_account: ``(username, password)`` of an account with scope ``service``: for the
            revocation snapshot at start and the ``Introspect`` fallback while the state is stale.
            Without it the guard replays the stream at start and refuses calls while stale. An empty
            password logs in by this service's client certificate (``tls``) instead.
        login_timeout: Deadline, seconds, of the service account's first ``Login`` (an Argon2id check
            on a host that may be busy); doubled after each timeout.
        issuer: ``iss`` to require; with ``auth_url``, checked against the auth service's.
        audience: ``aud`` to require; with ``auth_url``, checked against the auth service's.
        access_token_ttl: The auth service's access-token lifetime, seconds; with ``auth_url``, checked.
        leeway: Clock leeway on ``exp``/``nbf``, seconds; the auth service's by default.
        staleness_bound: Seconds without a heartbeat before the state counts as stale.
        ready_timeout: Seconds entering the guard waits for the state to catch up before it fails.
        wait_ready: Whether entering waits until ready (a server that reports readiness itself may
            enter at once and call :meth:`wait_ready`; calls are refused until then either way).
        call_timeout: Deadline, seconds, of a sync server's wait for the guard's event loop.
        registry: Where to register the guard's metrics; none when None.
        name: The NATS connection name.
        dpop: The service's DPoP (RFC 9449) policy and proof verifier (:func:`proof_gate` builds it
            from settings); bearer tokens only when None. A key-bound token presented as a bearer
            token is refused either way.
        unsafe_without_revocation: Build without a revocation source: revoked tokens stay valid until
            they expire. For tests and tools only.
        tls: The CA the auth service and NATS are verified against, and this service's certificate
            for them (see :mod:`authmesh._shared.tls`); plaintext by default.

    Raises:
        ConfigurationError: A setting is missing or contradicts another.
    """

    def __init__(
        self,
        *,
        auth_target: str,
        nats_urls: Sequence[str] = (),
        auth_url: str | None = None,
        nats_user: str | None = None,
        nats_password: str | None = None,
        service_account: tuple[str, str] | None = None,
        login_timeout: float = DEFAULT_LOGIN_TIMEOUT_SECONDS,
        issuer: str | None = None,
        audience: str | None = None,
        access_token_ttl: float | None = None,
        leeway: float | None = None,
        staleness_bound: float = 3.0,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        wait_ready: bool = True,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        registry: CollectorRegistry | None = None,
        name: str = "authmesh-resource-guard",
        dpop: ProofGate | None = None,
        unsafe_without_revocation: bool = False,
        tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
    ) -> None:
        if not nats_urls and not unsafe_without_revocation:
            raise ConfigurationError(
                "a ResourceGuard needs nats_urls (AUTHMESH_NATS_URLS) to hear of revocations; "
                "unsafe_without_revocation=True accepts revoked tokens until they expire"
            )
        if nats_urls and unsafe_without_revocation:
            raise ConfigurationError("unsafe_without_revocation=True contradicts the nats_urls given")
        if auth_url is None and (issuer is None or audience is None or access_token_ttl is None):
            raise ConfigurationError(
                "without auth_url (AUTHMESH_AUTH_URL) to read them from, issuer, audience and "
                "access_token_ttl must be given"
            )
        if auth_url is not None:
            check_https_url(auth_url, tls, "AUTHMESH_AUTH_URL")
        if min(staleness_bound, ready_timeout, call_timeout, login_timeout) <= 0:
            raise ConfigurationError(
                "staleness_bound, ready_timeout, call_timeout and login_timeout must be positive"
            )
        self._auth_target = auth_target
        self._auth_url = auth_url
        self._nats_urls = list(nats_urls)
        self._nats_user = nats_user
        self._nats_password = nats_password
        self._service_account = service_account
        self._login_timeout = login_timeout
        self._given = {"issuer": issuer, "audience": audience, "access_token_ttl": access_token_ttl}
        self._leeway = leeway
        self._staleness_bound = staleness_bound
        self._ready_timeout = ready_timeout
        self._wait_ready = wait_ready
        self._call_timeout = call_timeout
        self._registry = registry
        self._name = name
        self._dpop = dpop
        self._unsafe = unsafe_without_revocation
        self._tls = tls
        self._authenticator: Authenticator | None = None
        self._rules: TokenRules | None = None
        self._auth: AuthClient | None = None
        self.keys: KeyCache | None = None
        self.denylist: Denylist | None = None
        self.staleness: StalenessMonitor | None = None
        self.consumer: RevocationConsumer | None = None
        self._exit = contextlib.AsyncExitStack()
        self._loops: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None
        self._thread_error: BaseException | None = None

    @classmethod
    def from_env(cls, settings: ResourceSettings | None = None, **overrides: Any) -> ResourceGuard:
        """A guard configured from ``AUTHMESH_*`` variables (see :class:`ResourceSettings`).

        ``AUTHMESH_ISSUER``, ``AUTHMESH_AUDIENCE``, ``AUTHMESH_ACCESS_TOKEN_TTL`` and
        ``AUTHMESH_LEEWAY`` are passed on only where they are set, so that with ``AUTHMESH_AUTH_URL``
        the auth service's values apply and set ones are checked against them.

        Args:
            settings: Settings already read; read from the environment when None.
            overrides: Keyword arguments of :class:`ResourceGuard` that win over the settings.
        """
        settings = settings or ResourceSettings()
        chosen = settings.model_fields_set
        arguments: dict[str, Any] = {
            "auth_target": settings.auth_target,
            "auth_url": settings.auth_url,
            "nats_urls": settings.nats_urls,
            "nats_user": settings.nats_user,
            "nats_password": settings.nats_password.get_secret_value() if settings.nats_password else None,
            "service_account": credentials(settings.service_account) if settings.service_account else None,
            "login_timeout": settings.login_timeout,
            "staleness_bound": settings.staleness_bound,
            "name": f"resource-guard {settings.instance}",
            # Nonces are bound to the configured audience: the same on every replica of the service.
            "dpop": proof_gate(settings, settings.grpc_listen, settings.audience),
            "tls": settings.tls,
        }
        for field in ("issuer", "audience", "access_token_ttl", "leeway"):
            if field in chosen or settings.auth_url is None:
                arguments[field] = getattr(settings, field)
        arguments.update(overrides)
        return cls(**arguments)

    # --- what it offers -----------------------------------------------------------------------------

    def aio_interceptor(
        self,
        policy: Mapping[str, ScopeRequirement] | None = None,
        *,
        open_methods: Collection[str] = (),
        open_prefixes: tuple[str, ...] = OPEN_SERVICE_PREFIXES,
    ) -> AuthInterceptor:
        """The interceptor for a ``grpc.aio`` server (enter the guard with ``async with``).

        Args:
            policy: Full method name → :class:`ScopeRequirement`. When given, methods it does not list
                are refused and every method it names must exist. None: any valid token, every method.
            open_methods: Full method names that need no token.
            open_prefixes: Method-name prefixes that need no token (health and reflection by default).

        Raises:
            ConfigurationError: The policy names a method no loaded service has.
        """
        return AuthInterceptor(
            self, AccessPolicy(policy, open_methods=open_methods, open_prefixes=open_prefixes)
        )

    def sync_interceptor(
        self,
        policy: Mapping[str, ScopeRequirement] | None = None,
        *,
        open_methods: Collection[str] = (),
        open_prefixes: tuple[str, ...] = OPEN_SERVICE_PREFIXES,
    ) -> SyncAuthInterceptor:
        """The interceptor for a sync ``grpc.server`` (enter the guard with ``with``).

        Args and raises as for :meth:`aio_interceptor`.
        """
        return SyncAuthInterceptor(
            self, AccessPolicy(policy, open_methods=open_methods, open_prefixes=open_prefixes)
        )

    @property
    def ready(self) -> bool:
        """Whether calls are served: started, and the revocation state caught up."""
        if self._authenticator is None:
            return False
        return self.consumer is None or self.consumer.ready

    @property
    def rules(self) -> TokenRules:
        """Issuer, audience, lifetime and leeway in force (known once started)."""
        if self._rules is None:
            raise Unavailable("the guard is not started", code=GUARD_NOT_STARTED)
        return self._rules

    async def wait_ready(self) -> None:
        """Wait until :attr:`ready` (bound it with your own deadline)."""
        if self.consumer is not None:
            await self.consumer.wait_ready()

    async def authenticate(
        self,
        token: str | None,
        *,
        dpop_scheme: bool = False,
        proof: str | None = None,
        method: str = "",
        htm: str = HTTP_METHOD,
    ) -> AccessClaims:
        """Verify an access token and the call's DPoP proof (from any event loop).

        Args as for :meth:`Authenticator.authenticate`.

        Raises:
            TokenRejected: The token is not acceptable.
            Unavailable: The guard cannot decide now (not ready, stale and no fallback, keys unreachable).
        """
        authenticator = self._require_started()
        decision = authenticator.authenticate(
            token, dpop_scheme=dpop_scheme, proof=proof, method=method, htm=htm
        )
        if self._thread is not None and asyncio.get_running_loop() is not self._loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(decision, self._require_loop()))
        return await decision

    def authenticate_blocking(
        self, token: str | None, *, dpop_scheme: bool = False, proof: str | None = None, method: str = ""
    ) -> AccessClaims:
        """Verify an access token and the call's DPoP proof from a sync server's thread (the guard
        entered with ``with``).

        Raises:
            TokenRejected: The token is not acceptable.
            Unavailable: The guard cannot decide now, or its loop did not answer within the deadline.
        """
        return self._require_started().authenticate_blocking(
            token, self._run_on_loop, dpop_scheme=dpop_scheme, proof=proof, method=method
        )

    # --- async life cycle ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop following revocations and close the connections; every call is refused from now on."""
        self._authenticator = None
        loops, self._loops = self._loops, None
        if loops is not None:
            loops.cancel()
            try:
                await loops
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:  # already failed closed (no call was served on it); stopping goes on
                _log.exception("the guard's background loops failed")
        await self._exit.aclose()

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        rules = self._rules = await self._resolve_rules()
        settings = self._consumer_settings(rules)
        auth = self._auth = await self._exit.enter_async_context(
            AuthClient(
                self._auth_target,
                service_account=self._service_account,
                login_timeout=self._login_timeout,
                tls=self._tls,
            )
        )
        keys = self.keys = KeyCache(auth.get_jwks)
        self._exit.push_async_callback(keys.aclose)
        fallback: IntrospectionFallback | None = None
        revocations: RevocationCheck = NoRevocations()
        if not self._unsafe:
            self.denylist = revocations = Denylist(
                access_token_ttl=rules.access_token_ttl, leeway=rules.leeway
            )
            self.staleness = StalenessMonitor(self._staleness_bound)
            if self._service_account is not None:
                fallback = IntrospectionFallback(
                    auth, max_age=self._staleness_bound, timeout=min(1.0, self._staleness_bound)
                )
                self._exit.push_async_callback(fallback.aclose)
            self.consumer = RevocationConsumer(
                settings,
                self.denylist,
                keys,
                self.staleness,
                snapshot=auth if self._service_account is not None else None,
                observer=RevocationMetrics(self._registry) if self._registry is not None else None,
                name=self._name,
            )
        else:
            _log.warning("ResourceGuard without revocation: revoked tokens are accepted until they expire")
        verifier = TokenVerifier(
            keys,
            revocations,
            VerifierPolicy(
                issuer=rules.issuer,
                audience=rules.audience,
                leeway=rules.leeway,
                max_lifetime=rules.access_token_ttl,
            ),
        )
        consumer = self.consumer
        self._authenticator = Authenticator(
            verifier,
            keys,
            staleness=self.staleness,
            fallback=fallback,
            ready=(lambda: consumer.ready) if consumer is not None else (lambda: True),
            metrics=VerificationMetrics(self._registry) if self._registry is not None else None,
            dpop=self._dpop,
        )
        self._loops = asyncio.get_running_loop().create_task(self._run_loops(), name="resource-guard")
        if self._wait_ready and consumer is not None:
            try:
                async with asyncio.timeout(self._ready_timeout):
                    await self._wait_for(consumer)
            except TimeoutError:
                raise Unavailable(
                    f"revocation state did not catch up within {self._ready_timeout:g} s "
                    f"(NATS {', '.join(self._nats_urls)}, auth service {self._auth_target})",
                    code=REVOCATION_STATE_STALE,
                ) from None

    async def _wait_for(self, consumer: RevocationConsumer) -> None:
        loops = self._loops
        assert loops is not None  # started just before
        ready = asyncio.ensure_future(consumer.wait_ready())
        try:
            await asyncio.wait((ready, loops), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if loops.done():
            loops.result()  # a background loop that died says why
            raise Unavailable("the revocation consumer stopped", code=REVOCATION_STATE_STALE)

    async def _resolve_rules(self) -> TokenRules:
        given = self._given
        if self._auth_url is None:
            assert given["issuer"] is not None  # checked in __init__
            assert given["audience"] is not None
            assert given["access_token_ttl"] is not None
            return TokenRules(
                issuer=str(given["issuer"]),
                audience=str(given["audience"]),
                access_token_ttl=float(given["access_token_ttl"]),
                leeway=5.0 if self._leeway is None else self._leeway,
            )
        published = await fetch_token_rules(self._auth_url, within=self._ready_timeout, tls=self._tls)
        for field, value in given.items():
            theirs = getattr(published, field)
            if value is not None and value != theirs:
                raise ConfigurationError(
                    f"{field} is {value!r} here but the auth service at {self._auth_url} says {theirs!r}: "
                    f"remove the setting (it is read from the auth service) or make them agree"
                )
        leeway = published.leeway if self._leeway is None else self._leeway
        return TokenRules(published.issuer, published.audience, published.access_token_ttl, leeway)

    def _consumer_settings(self, rules: TokenRules) -> CommonSettings:
        # Built from this guard's own arguments only: model_construct reads no environment.
        return CommonSettings.model_construct(
            nats_urls=self._nats_urls or ["nats://127.0.0.1:4222"],
            nats_user=self._nats_user,
            nats_password=None if self._nats_password is None else SecretStr(self._nats_password),
            issuer=rules.issuer,
            audience=rules.audience,
            access_token_ttl=int(rules.access_token_ttl),
            leeway=rules.leeway,
            staleness_bound=self._staleness_bound,
            tls_ca_file=self._tls.ca_file,
            tls_cert_file=self._tls.cert_file,
            tls_key_file=self._tls.key_file,
        )

    async def _run_loops(self) -> None:
        auth = self._auth
        assert auth is not None  # started before the loops
        async with asyncio.TaskGroup() as group:
            if self.consumer is not None:
                group.create_task(self.consumer.run(), name="revocation-consumer")
            group.create_task(auth.run_token_refresher(), name="service-token-refresher")

    def _require_started(self) -> Authenticator:
        authenticator = self._authenticator
        if authenticator is None:
            raise Unavailable("the resource guard is not running", code=GUARD_NOT_STARTED)
        return authenticator

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise Unavailable("the resource guard is not running", code=GUARD_NOT_STARTED)
        return self._loop

    # --- sync life cycle: the event loop in a thread of its own -------------------------------------

    def __enter__(self) -> Self:
        if self._thread is not None:
            raise ConfigurationError("this ResourceGuard is already running")
        started = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve_in_thread(started)), name="authmesh-guard", daemon=True
        )
        self._thread.start()
        started.wait()
        if self._thread_error is not None:
            self._thread.join(_THREAD_STOP_SECONDS)
            self._thread = None
            raise self._thread_error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop a guard entered with ``with`` (its thread and loop)."""
        thread, loop, stop = self._thread, self._loop, self._thread_stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(_THREAD_STOP_SECONDS)
        self._thread = None

    async def _serve_in_thread(self, started: threading.Event) -> None:
        self._thread_stop = stop = asyncio.Event()
        try:
            async with self:
                started.set()
                await stop.wait()
        except BaseException as error:  # handed to the thread that entered the guard
            self._thread_error = error
        finally:
            started.set()

    def _run_on_loop(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        loop = self._loop
        if loop is None or self._thread is None:
            coroutine.close()
            raise Unavailable(
                "a sync server needs the guard entered with `with guard:` (its loop runs in a thread)",
                code=GUARD_NOT_STARTED,
            )
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(timeout=self._call_timeout)
        except TimeoutError:
            future.cancel()
            raise Unavailable(
                f"the auth service did not answer within {self._call_timeout:g} s",
                code=REVOCATION_STATE_STALE,
            ) from None
