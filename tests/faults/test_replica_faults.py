"""Resource replicas (processes of a ``LocalStack``) cut off from NATS, and killed, while revocations flow.

The tests watch the replicas the way a client would: pollers call ``WhoAmI`` with revoked and live tokens
in a loop and record when each call started and what it got. The staleness bound is 1 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from authmesh.auth.v1 import auth_pb2
from authmesh.client import ResourceApi
from authmesh.stack import LocalStack
from tests.faults import FAST_AUTH_ENV, OK, Auth, auth_at, fetch_metrics, metric_sum
from tests.waiting import eventually

STALENESS_BOUND = 1.0
# A call that starts this long after the bound has passed has no excuse to accept a revoked token. The
# margin covers only the clock reads of two processes on one machine, not propagation.
MARGIN = 0.25
DEADLINE = 20.0
PASSWORD = "replica-fault-password"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    """One NATS, Redis, the auth service and two replicas, shared by the tests of this module."""
    async with LocalStack(
        replicas=2,
        base_dir=tmp_path_factory.mktemp("replica-faults"),
        env=FAST_AUTH_ENV,
        staleness_bound=STALENESS_BOUND,
    ) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def clients(stack: LocalStack) -> AsyncIterator[tuple[Auth, list[ResourceApi]]]:
    """A client of the stack's auth service and one of each replica."""
    async with AsyncExitStack() as exits:
        auth = await exits.enter_async_context(
            auth_at(stack.auth_grpc, admin=stack.admin_credentials, service=stack.service_credentials)
        )
        replicas = [
            await exits.enter_async_context(ResourceApi(replica.grpc, timeout=5))
            for replica in stack.replicas
        ]
        yield auth, replicas


async def healthz(stack: LocalStack, index: int) -> dict[str, Any]:
    """A replica's ``/healthz`` document (empty when it does not answer)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(f"http://{stack.replicas[index].http}/healthz") as reply,
        ):
            document = await reply.json()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    return document if isinstance(document, dict) else {}


@dataclass
class Watch:
    """Calls ``WhoAmI`` on replicas with tokens, round after round, and records every answer.

    Attributes:
        answers: ``(call started, replica index, token, label)`` for every call.
    """

    replicas: Sequence[ResourceApi]
    tokens: list[str]
    indexes: Sequence[int]
    answers: list[tuple[float, int, str, str]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""

        async def poll(index: int) -> None:
            while not stop.is_set():
                for token in list(self.tokens):
                    started = time.monotonic()
                    answer = await self.replicas[index].outcome(token, call_timeout=2)
                    self.answers.append((started, index, token, answer.label))
                    if stop.is_set():
                        return

        await asyncio.gather(*(poll(index) for index in self.indexes))

    def accepted(self, token: str, after: float, index: int | None = None) -> list[float]:
        """When calls that started after ``after`` accepted ``token`` (seconds after ``after``)."""
        return [
            round(started - after, 3)
            for started, where, seen, label in self.answers
            if seen == token and label == OK and started > after and (index is None or where == index)
        ]


async def user_token(auth: Auth, name: str) -> auth_pb2.TokenPair:
    """A fresh user's token pair."""
    await auth.create_user(name, PASSWORD)
    return await auth.login(name, PASSWORD)


def answered(replica: ResourceApi, token: str, label: str) -> Callable[[], Awaitable[bool]]:
    """A condition: the replica answers ``token`` with ``label`` now."""

    async def check() -> bool:
        return (await replica.outcome(token, call_timeout=2)).label == label

    return check


@pytest.mark.parametrize("silent", [False, True], ids=["connection-reset", "silent-partition"])
async def test_a_replica_cut_off_from_nats_fails_closed_within_the_staleness_bound_and_recovers_by_itself(
    stack: LocalStack, clients: tuple[Auth, list[ResourceApi]], silent: bool
) -> None:
    """Invariant, for a token revoked right after one replica's NATS link is cut (reset, or silently
    partitioned so the replica notices only missing heartbeats):

    - no replica accepts the token in a call that starts later than the staleness bound after the
      revocation was acknowledged; the cut-off replica refuses it (``TOKEN_REVOKED``, from ``Introspect``);
    - once the link is restored the replica recovers by itself: not degraded, the revocation applied
      from the stream, valid tokens accepted again.
    """
    auth, replicas = clients
    pair = await user_token(auth, f"cut-{'silent' if silent else 'reset'}")
    for replica in replicas:
        assert (await replica.outcome(pair.access_token)).accepted
    before = await fetch_metrics(stack.replicas[0].http)
    watch = Watch(replicas, [pair.access_token], [0, 1])
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch.run(stop))
    try:
        await stack.cut_nats(0, silent=silent)
        await auth.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=pair.access_token, reason="cut"), metadata=await auth.admin()
        )
        acknowledged = time.monotonic()
        await eventually(
            answered(replicas[0], pair.access_token, "TOKEN_REVOKED"), within=DEADLINE, what="refusal"
        )
        assert (await healthz(stack, 0)).get("degraded") is True
        await stack.restore_nats(0)

        async def recovered() -> bool:
            return (await healthz(stack, 0)).get("degraded") is False

        await eventually(recovered, within=DEADLINE, what="the replica to recover by itself")
    finally:
        await stack.restore_nats(0)
        stop.set()
        await watcher
    assert watch.accepted(pair.access_token, acknowledged + STALENESS_BOUND + MARGIN) == []

    async def applied_from_stream() -> bool:
        after = await fetch_metrics(stack.replicas[0].http)
        name = "authmesh_revocation_events_applied_total"
        labels = {"type": "revoked.token"}
        return metric_sum(after, name, labels) > metric_sum(before, name, labels)

    await eventually(applied_from_stream, within=DEADLINE, what="the missed event to be applied")
    assert (await replicas[0].outcome(pair.access_token)).label == "TOKEN_REVOKED"
    fresh = await auth.login(f"cut-{'silent' if silent else 'reset'}", PASSWORD)
    assert (await replicas[0].outcome(fresh.access_token)).accepted


@dataclass
class Revoker:
    """Revokes a pool of tokens one by one, by token, by session or by user, and records when."""

    auth: Auth
    acknowledged: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    async def run(self, pool: list[tuple[str, auth_pb2.TokenPair]], stop: asyncio.Event) -> None:
        """Revoke until the pool is empty or ``stop`` is set."""
        admin = await self.auth.admin()
        turn = 0
        while pool and not stop.is_set():
            subject, pair = pool.pop()
            turn += 1
            if turn % 3 == 0:
                await self.auth.stub.RevokeSession(
                    auth_pb2.RevokeSessionRequest(session_id=pair.session_id), metadata=admin, timeout=10
                )
                reason = "SESSION_REVOKED"
            elif turn % 3 == 1:
                await self.auth.stub.RevokeToken(
                    auth_pb2.RevokeTokenRequest(token=pair.access_token), metadata=admin, timeout=10
                )
                reason = "TOKEN_REVOKED"
            else:
                await self.auth.stub.RevokeUser(
                    auth_pb2.RevokeUserRequest(subject=subject), metadata=admin, timeout=10
                )
                reason = "USER_REVOKED"
            self.acknowledged[pair.access_token] = time.monotonic()
            self.reasons[pair.access_token] = reason
            # A steady trickle rather than a burst, so revocations land before, during and after the restart.
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


async def test_a_replica_killed_and_restarted_while_revocations_flow_serves_nothing_stale(
    stack: LocalStack, clients: tuple[Auth, list[ResourceApi]]
) -> None:
    """Invariant, with one replica killed (``kill -9``) and restarted while tokens, sessions and users are
    revoked one after another:

    - the restarted replica never accepts a token whose revocation was acknowledged before it was
      started (it serves nothing before it has caught up);
    - no replica accepts a token in a call that starts later than the staleness bound after its
      revocation was acknowledged;
    - afterwards every revoked token is refused by both replicas, for the right reason.
    """
    auth, replicas = clients
    pool = []
    for index in range(45):
        name = f"flow-{index}"
        subject = await auth.create_user(name, PASSWORD)
        pool.append((subject, await auth.login(name, PASSWORD)))
    tokens = [pair.access_token for _, pair in pool]
    revoker = Revoker(auth)
    watch = Watch(replicas, tokens, [0, 1])
    stop_revoking, stop_watching = asyncio.Event(), asyncio.Event()
    revoking = asyncio.create_task(revoker.run(pool, stop_revoking))
    watching = asyncio.create_task(watch.run(stop_watching))
    try:

        def revoked(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return len(revoker.acknowledged) >= count

            return check

        await eventually(revoked(8), within=DEADLINE, what="revocations before the kill")
        stack.kill_replica(1)
        await eventually(revoked(16), within=DEADLINE, what="revocations while the replica is down")
        restarting = time.monotonic()
        revoked_before_restart = {token for token, at in revoker.acknowledged.items() if at < restarting}
        await stack.start_replica(1)
        await eventually(revoked(30), within=DEADLINE, what="revocations after the restart")
    finally:
        stop_revoking.set()
        await revoking
        stop_watching.set()
        await watching
    for token in revoked_before_restart:
        assert watch.accepted(token, restarting, index=1) == [], (
            "served a revocation it had not caught up with"
        )
    for token, at in revoker.acknowledged.items():
        assert watch.accepted(token, at + STALENESS_BOUND + MARGIN) == []
    for token, reason in revoker.reasons.items():
        for replica in replicas:
            await eventually(answered(replica, token, reason), within=DEADLINE, what=f"{reason} everywhere")
