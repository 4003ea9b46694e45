"""The soak run: verifications on every replica while tokens are revoked at random, checked as it goes.

For ``seconds``, against a stack (normally a fresh :class:`~authmesh.stack.LocalStack`):

* **load**: on every replica a few workers call ``WhoAmI`` in a loop with tokens drawn from a pool that
  holds live tokens and recently revoked ones, and record every answer with the time its call started;
* **checker**: every ``revoke_interval`` seconds one live token is revoked (by token or by session); the
  moment the revoking call returns is its acknowledgement. Any acceptance of that token in a call that
  started later than the staleness bound after the acknowledgement is a *late acceptance*: the one thing
  authmesh promises never happens. For each revocation a probe per replica asks until the replica
  refuses, which measures propagation (from the start of the revoking call to the first refusal, so
  one round trip is included: an upper bound);
* **faults** (when the stack can cut links): every few seconds one replica's NATS link is cut, by a reset
  or silently, for two staleness bounds, then restored.

:func:`run_soak` returns a :class:`SoakReport`; it is ``ok`` when there was no late acceptance, no
``UNKNOWN``/``INTERNAL`` answer, and at least one revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import grpc

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.jose import decode_compact
from authmesh.bench.common import percentile
from authmesh.client import AuthApi, ResourceApi
from authmesh.refusal_watch import Answer, watch_until_refused

USER_SCOPES = ("docs:read",)
WORKERS_PER_REPLICA = 4
REVOKE_INTERVAL_SECONDS = 0.25
LIVE_POOL = 24
# How many of the latest revoked tokens stay under test (older ones have been refused long enough).
REVOKED_UNDER_TEST = 48
CALL_TIMEOUT_SECONDS = 2.0
PROPAGATION_DEADLINE_SECONDS = 10.0
FAULT_INTERVAL_SECONDS = 3.0
# A cut lasts this many staleness bounds: long enough for the replica to turn degraded and fall back.
FAULT_LENGTH_IN_BOUNDS = 2.0
# Clock reads of two processes on one machine; not propagation, which the bound itself covers.
LATE_MARGIN_SECONDS = 0.1
# A replica that cannot be reached answers at once; asking it again straight away would only spin.
UNREACHABLE_PAUSE_SECONDS = 0.01
FORBIDDEN_CODES = frozenset({"UNKNOWN", "INTERNAL"})
LOCAL_STALENESS_BOUND = 1.0
HEARTBEATS_PER_BOUND = 5
# Password hashing is not what a soak run measures; cheap Argon2 keeps the logins from dominating it.
CHEAP_HASHING = {
    "AUTHMESH_ARGON2_TIME_COST": "1",
    "AUTHMESH_ARGON2_MEMORY_KIB": "1024",
    "AUTHMESH_ARGON2_PARALLELISM": "1",
}


class NatsLinks(Protocol):
    """A stack that can cut one replica off from NATS (``LocalStack`` can)."""

    async def cut_nats(self, index: int, *, silent: bool = False) -> None:
        """Cut replica ``index`` off."""

    async def restore_nats(self, index: int) -> None:
        """Give replica ``index`` its link back."""


@dataclass(frozen=True, slots=True)
class SoakReplica:
    """One replica to load."""

    name: str
    grpc: str


@dataclass(frozen=True, slots=True)
class SoakTarget:
    """What a soak run needs to know about a stack.

    Attributes:
        auth_grpc: The auth service's gRPC address.
        replicas: The resource replicas.
        admin: The admin's ``(username, password)``.
        staleness_bound: The replicas' staleness bound, seconds.
        links: Cuts NATS links for fault injection; None runs without faults.
    """

    auth_grpc: str
    replicas: tuple[SoakReplica, ...]
    admin: tuple[str, str] = field(repr=False)
    staleness_bound: float
    links: NatsLinks | None = None


@dataclass(frozen=True, slots=True)
class LateAcceptance:
    """A revoked token accepted later than the staleness bound after its revocation."""

    replica: str
    token_id: str
    seconds_after_revocation: float


@dataclass(frozen=True, slots=True)
class InjectedFault:
    """One fault and when it happened (seconds since the run started)."""

    kind: str
    replica: str
    at_seconds: float
    seconds: float


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank percentiles of a sample, milliseconds."""

    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Percentiles | None:
        """The percentiles of ``values_ms``; None for an empty sample."""
        if not values_ms:
            return None
        p50, p90, p99 = (round(percentile(values_ms, q), 3) for q in (50, 90, 99))
        return cls(len(values_ms), p50, p90, p99, round(max(values_ms), 3))


@dataclass(frozen=True, slots=True)
class SoakReport:
    """What a soak run saw.

    Attributes:
        seconds: How long the load ran.
        replicas: The replicas' names.
        staleness_bound: The bound late acceptances are judged against, seconds.
        verifications: ``WhoAmI`` calls made by the load workers.
        outcomes: Those calls by answer (``OK`` or the refusal's reason).
        revocations: Revocations acknowledged.
        revocation_failures: Revoking calls that failed (counted, retried with another token).
        late_acceptances: Revoked tokens accepted after the bound: must be empty.
        forbidden_answers: ``UNKNOWN``/``INTERNAL`` answers: must be 0.
        propagation: From each revoking call's start to each replica's first refusal.
        propagation_timeouts: Probes that saw no refusal within their deadline.
        faults: The faults injected.
    """

    seconds: float
    replicas: tuple[str, ...]
    staleness_bound: float
    verifications: int
    outcomes: dict[str, int]
    revocations: int
    revocation_failures: int
    late_acceptances: tuple[LateAcceptance, ...]
    forbidden_answers: int
    propagation: Percentiles | None
    propagation_timeouts: int
    faults: tuple[InjectedFault, ...]

    @property
    def ok(self) -> bool:
        """No late acceptance, no forbidden answer, no probe that timed out, and something was revoked."""
        return (
            not self.late_acceptances
            and self.forbidden_answers == 0
            and self.propagation_timeouts == 0
            and self.revocations > 0
        )

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values."""
        document = asdict(self)
        document["ok"] = self.ok
        return document


@dataclass(slots=True)
class _Tracked:
    access: str
    session_id: str
    token_id: str
    revoked_at: float | None = None


class _Soak:
    """One run's state; see the module docstring."""

    def __init__(
        self,
        target: SoakTarget,
        auth: AuthApi,
        replicas: Sequence[ResourceApi],
        *,
        username: str,
        password: str,
        revoke_interval: float,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self._target = target
        self._auth = auth
        self._replicas = replicas
        self._username = username
        self._password = password
        self._revoke_interval = revoke_interval
        self._clock = clock
        self._rng = rng
        self._stop = asyncio.Event()
        self._started = clock()
        self._live: list[_Tracked] = []
        self._revoked: deque[_Tracked] = deque(maxlen=REVOKED_UNDER_TEST)
        self._outcomes: Counter[str] = Counter()
        self._late: list[LateAcceptance] = []
        self._forbidden = 0
        self._revocations = 0
        self._revocation_failures = 0
        self._propagation_ms: list[float] = []
        self._propagation_timeouts = 0
        self._faults: list[InjectedFault] = []
        self._probes: set[asyncio.Task[None]] = set()

    async def fill_pool(self) -> None:
        """Log in until the live pool is full."""
        while len(self._live) < LIVE_POOL:
            self._live.append(await self._login())

    async def run(self, seconds: float, *, faults: bool) -> SoakReport:
        """Run load, checker and faults for ``seconds``; wait for the probes; report."""
        self._started = self._clock()
        tasks = [
            asyncio.create_task(self._load(index))
            for index in range(len(self._replicas))
            for _ in range(WORKERS_PER_REPLICA)
        ]
        tasks.append(asyncio.create_task(self._check()))
        if faults and self._target.links is not None:
            tasks.append(asyncio.create_task(self._inject(self._target.links)))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)
            # Each probe ends by its own deadline.
            await asyncio.gather(*self._probes)
        return self._report(self._clock() - self._started)

    async def _login(self) -> _Tracked:
        tokens = await self._auth.login(self._username, self._password)
        token_id = str(decode_compact(tokens.access_token).unverified_payload["jti"])
        return _Tracked(tokens.access_token, tokens.session_id, token_id)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless the run stops first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _load(self, index: int) -> None:
        replica = self._replicas[index]
        name = self._target.replicas[index].name
        bound = self._target.staleness_bound + LATE_MARGIN_SECONDS
        while not self._stop.is_set():
            under_test = self._live + list(self._revoked)
            tracked = self._rng.choice(under_test)
            started = self._clock()
            answer = await replica.outcome(tracked.access, call_timeout=CALL_TIMEOUT_SECONDS)
            self._outcomes[answer.label] += 1
            if answer.code in FORBIDDEN_CODES:
                self._forbidden += 1
            revoked_at = tracked.revoked_at
            if answer.accepted and revoked_at is not None and started > revoked_at + bound:
                self._late.append(LateAcceptance(name, tracked.token_id, round(started - revoked_at, 3)))
            if answer.code == "UNAVAILABLE":
                await self._pause(UNREACHABLE_PAUSE_SECONDS)

    async def _check(self) -> None:
        admin = await self._admin_token()
        while not self._stop.is_set():
            await self._pause(self._revoke_interval)
            if self._stop.is_set() or not self._live:
                return
            tracked = self._live.pop(self._rng.randrange(len(self._live)))
            started = self._clock()
            try:
                if self._rng.random() < 0.5:
                    await self._auth.revoke_token(admin, tracked.access, "soak")
                else:
                    await self._auth.revoke_session(admin, tracked.session_id, "soak")
            except grpc.aio.AioRpcError:
                self._revocation_failures += 1
                self._live.append(tracked)
                admin = await self._admin_token()
                continue
            tracked.revoked_at = self._clock()
            self._revocations += 1
            self._revoked.append(tracked)
            probe = asyncio.create_task(self._probe(tracked, started))
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)
            with contextlib.suppress(grpc.aio.AioRpcError):
                self._live.append(await self._login())

    async def _admin_token(self) -> str:
        tokens = await self._auth.admin_login(*self._target.admin)
        return tokens.access_token

    async def _probe(self, tracked: _Tracked, started: float) -> None:
        """Ask every replica about ``tracked`` until each refuses it; record how long that took."""

        async def until_refused(replica: ResourceApi) -> None:
            async def ask() -> Answer:
                return Answer.of(await replica.outcome(tracked.access, call_timeout=CALL_TIMEOUT_SECONDS))

            watched = await watch_until_refused(
                ask,
                until=started + PROPAGATION_DEADLINE_SECONDS,
                clock=self._clock,
                unanswered_pause=UNREACHABLE_PAUSE_SECONDS,
            )
            if watched.refused_at is None:
                self._propagation_timeouts += 1
            else:
                self._propagation_ms.append((watched.refused_at - started) * 1000)

        await asyncio.gather(*(until_refused(replica) for replica in self._replicas))

    async def _inject(self, links: NatsLinks) -> None:
        length = FAULT_LENGTH_IN_BOUNDS * self._target.staleness_bound
        while not self._stop.is_set():
            await self._pause(FAULT_INTERVAL_SECONDS)
            if self._stop.is_set():
                return
            index = self._rng.randrange(len(self._replicas))
            silent = self._rng.random() < 0.5
            at = self._clock() - self._started
            await links.cut_nats(index, silent=silent)
            try:
                await self._pause(length)
            finally:
                await links.restore_nats(index)
            kind = "nats-partition-silent" if silent else "nats-link-reset"
            self._faults.append(
                InjectedFault(kind, self._target.replicas[index].name, round(at, 3), round(length, 3))
            )

    def _report(self, seconds: float) -> SoakReport:
        return SoakReport(
            seconds=round(seconds, 3),
            replicas=tuple(replica.name for replica in self._target.replicas),
            staleness_bound=self._target.staleness_bound,
            verifications=sum(self._outcomes.values()),
            outcomes=dict(self._outcomes.most_common()),
            revocations=self._revocations,
            revocation_failures=self._revocation_failures,
            late_acceptances=tuple(self._late),
            forbidden_answers=self._forbidden,
            propagation=Percentiles.of(self._propagation_ms),
            propagation_timeouts=self._propagation_timeouts,
            faults=tuple(self._faults),
        )


async def run_soak(
    target: SoakTarget,
    seconds: float,
    *,
    faults: bool = True,
    revoke_interval: float = REVOKE_INTERVAL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    seed: int | None = None,
) -> SoakReport:
    """Soak a running stack for ``seconds``.

    Args:
        target: The stack.
        seconds: How long the load runs.
        faults: Inject NATS link faults (when the target can).
        revoke_interval: Seconds between two revocations.
        clock: Monotonic seconds (every time in the report is measured with it).
        seed: Seeds the random choices, for a run that can be repeated.

    Returns:
        The report.

    Raises:
        ConfigurationError: The target has no replica.
        grpc.aio.AioRpcError: The setup (admin login, user, first tokens) failed.
    """
    if not target.replicas:
        raise ConfigurationError("a soak run needs at least one replica")
    password = secrets.token_urlsafe(18)
    username = f"soak-{secrets.token_hex(4)}"
    async with contextlib.AsyncExitStack() as stack:
        auth = await stack.enter_async_context(AuthApi(target.auth_grpc))
        replicas = [
            await stack.enter_async_context(ResourceApi(replica.grpc, timeout=CALL_TIMEOUT_SECONDS))
            for replica in target.replicas
        ]
        admin = (await auth.admin_login(*target.admin)).access_token
        await auth.create_user(admin, username, password, USER_SCOPES)
        soak = _Soak(
            target,
            auth,
            replicas,
            username=username,
            password=password,
            revoke_interval=revoke_interval,
            clock=clock,
            rng=random.Random(seed),  # noqa: S311  # picks tokens and faults, not secrets
        )
        await soak.fill_pool()
        return await soak.run(seconds, faults=faults)


async def run_local_soak(
    seconds: float,
    replicas: int,
    *,
    staleness_bound: float = LOCAL_STALENESS_BOUND,
    nats_cluster: int = 1,
    faults: bool = True,
    seed: int | None = None,
) -> SoakReport:
    """Start a fresh :class:`~authmesh.stack.LocalStack`, soak it, stop it.

    Args:
        seconds: How long the load runs.
        replicas: How many resource replicas.
        staleness_bound: The replicas' staleness bound, seconds (heartbeats come five times per bound).
        nats_cluster: NATS nodes (1, 3 or 5).
        faults: Inject NATS link faults.
        seed: Seeds the random choices.

    Returns:
        The report.

    Raises:
        ConfigurationError: The stack could not start.
    """
    from authmesh.stack import LocalStack

    heartbeat = min(1.0, staleness_bound / HEARTBEATS_PER_BOUND)
    env = {**CHEAP_HASHING, "AUTHMESH_HEARTBEAT_INTERVAL": f"{heartbeat:g}"}
    async with LocalStack(
        replicas=replicas, nats_cluster=nats_cluster, staleness_bound=staleness_bound, env=env
    ) as stack:
        target = SoakTarget(
            auth_grpc=stack.auth_grpc,
            replicas=tuple(SoakReplica(replica.name, replica.grpc) for replica in stack.replicas),
            admin=stack.admin_credentials,
            staleness_bound=staleness_bound,
            links=stack,
        )
        return await run_soak(target, seconds, faults=faults, seed=seed)
