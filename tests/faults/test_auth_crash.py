"""``kill -9`` of the auth service in the middle of refreshes and revocations, then a restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as redis

from authmesh._auth_service.store import OUTBOX
from authmesh.auth.v1 import auth_pb2
from tests.faults import (
    OK,
    Auth,
    auth_at,
    auth_process,
    event_ids,
    everywhere,
    in_process_replicas,
    outcome,
    stream_events,
    wait_serving,
)
from tests.waiting import eventually

KILLS = 2
CHAINS = 6
REVOCABLE = 30
# Kill once this much has been acknowledged in the cycle, while the workers are still busy.
REFRESHES_BEFORE_KILL = 30
REVOCATIONS_BEFORE_KILL = 8
DEADLINE = 30.0
PASSWORD = "crash-password-1"
# What a call cut short by the crash may answer: the client saw the connection go.
CUT_SHORT = {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"}


@dataclass
class Chain:
    """One session's refresh tokens in the order they were issued."""

    spent: list[str]
    current: str


@dataclass
class Ledger:
    """What the clients saw acknowledged (or cut short) across every crash."""

    chains: list[Chain] = field(default_factory=list)
    refreshes: int = 0
    revoked_tokens: list[tuple[str, str]] = field(default_factory=list)
    revoked_sessions: list[tuple[str, str]] = field(default_factory=list)
    cut_short: int = 0
    surprises: list[str] = field(default_factory=list)


async def refresh_chain(auth: Auth, chain: Chain, ledger: Ledger, stop: asyncio.Event) -> None:
    """Rotate the chain's refresh token until told to stop or a call is cut short."""
    while not stop.is_set():
        label, reply = await outcome(
            auth.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=chain.current), timeout=5)
        )
        if label != OK:
            if label in CUT_SHORT:
                ledger.cut_short += 1
            else:
                ledger.surprises.append(f"Refresh answered {label}")
            return
        chain.spent.append(chain.current)
        chain.current = reply.refresh_token
        ledger.refreshes += 1


async def revoke_all(
    auth: Auth,
    pool: list[auth_pb2.TokenPair],
    admin: tuple[tuple[str, str]],
    ledger: Ledger,
    stop: asyncio.Event,
) -> None:
    """Revoke the pool's tokens one by one (every other one by its session) until stopped or cut short."""
    while pool and not stop.is_set():
        pair = pool.pop()
        by_session = len(pool) % 2 == 0
        call: Awaitable[auth_pb2.RevokeResponse]
        if by_session:
            call = auth.stub.RevokeSession(
                auth_pb2.RevokeSessionRequest(session_id=pair.session_id, reason="crash test"),
                metadata=admin,
                timeout=5,
            )
        else:
            call = auth.stub.RevokeToken(
                auth_pb2.RevokeTokenRequest(token=pair.access_token, reason="crash test"),
                metadata=admin,
                timeout=5,
            )
        label, reply = await outcome(call)
        if label != OK:
            if label in CUT_SHORT:
                ledger.cut_short += 1
            else:
                ledger.surprises.append(f"revocation answered {label}")
            return
        acknowledged = (pair.access_token, reply.event_id)
        (ledger.revoked_sessions if by_session else ledger.revoked_tokens).append(acknowledged)


def busy(ledger: Ledger, refreshes_before: int, revocations_before: int) -> Callable[[], Awaitable[bool]]:
    """A condition: this cycle has acknowledged enough refreshes and revocations to crash in the middle."""

    async def check() -> bool:
        revocations = len(ledger.revoked_tokens) + len(ledger.revoked_sessions) - revocations_before
        refreshes = ledger.refreshes - refreshes_before
        return refreshes >= REFRESHES_BEFORE_KILL and revocations >= REVOCATIONS_BEFORE_KILL

    return check


async def test_kill_9_of_the_auth_service_spends_no_refresh_token_twice_and_loses_no_acknowledged_revocation(
    tmp_path: Path, redis_url: str, nats_url: str
) -> None:
    """Invariant, over two ``kill -9`` of the auth-service process while refresh chains and revocations run:

    - no refresh token is ever usable twice: every token presented before, during or after the crashes
      (including those whose call the crash cut short) succeeds at most once in total;
    - every revocation whose RPC returned OK is in force after the restarts: ``Introspect`` calls the token
      inactive, both resource replicas (running through the crashes) refuse it, and its event is in
      ``AUTH_EVENTS``;
    - nothing written but not broadcast stays behind: the outbox drains after the restart.
    """
    process = auth_process(tmp_path / "auth", redis_url, [nats_url])
    ledger = Ledger()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(process.stop)
        await process.start()
        auth = await stack.enter_async_context(auth_at(process.grpc_address))
        await auth.create_user("crash", PASSWORD)
        replicas = await stack.enter_async_context(in_process_replicas(process.grpc_address, [nats_url], 2))
        for cycle in range(KILLS):
            chains = [Chain([], (await auth.login("crash", PASSWORD)).refresh_token) for _ in range(CHAINS)]
            ledger.chains.extend(chains)
            pool = [await auth.login("crash", PASSWORD) for _ in range(REVOCABLE)]
            admin = await auth.admin()
            refreshes_before = ledger.refreshes
            revocations_before = len(ledger.revoked_tokens) + len(ledger.revoked_sessions)
            stop = asyncio.Event()
            workers = [
                *(asyncio.create_task(refresh_chain(auth, chain, ledger, stop)) for chain in chains),
                asyncio.create_task(revoke_all(auth, pool, admin, ledger, stop)),
            ]

            await eventually(
                busy(ledger, refreshes_before, revocations_before),
                within=DEADLINE,
                what=f"load before crash {cycle + 1}",
            )
            process.kill()
            stop.set()
            await asyncio.gather(*workers)
            await process.start()
            await wait_serving(auth)

        assert ledger.surprises == []
        assert ledger.cut_short >= 1, "the crash never interrupted a call in flight"

        # Revocations acknowledged before a crash are in force, everywhere.
        service = await auth.service()
        for token, _ in ledger.revoked_tokens + ledger.revoked_sessions:
            assert not await auth.active(token, service)
        for token, _ in ledger.revoked_tokens:
            await everywhere(replicas, token, "TOKEN_REVOKED")
        for token, _ in ledger.revoked_sessions:
            await everywhere(replicas, token, "SESSION_REVOKED")
        stored = event_ids(await stream_events([nats_url]))
        acknowledged = {event for _, event in ledger.revoked_tokens + ledger.revoked_sessions}
        assert acknowledged <= stored

        store = redis.from_url(redis_url)
        try:

            async def outbox_empty() -> bool:
                return int(await store.hlen(OUTBOX)) == 0

            await eventually(outbox_empty, within=DEADLINE, what="the outbox to drain after the restart")
        finally:
            await store.aclose()

        # Every refresh token ever issued, presented twice more: none succeeds a second time overall.
        successes: Counter[str] = Counter()
        for chain in ledger.chains:
            successes.update(chain.spent)
        for chain in ledger.chains:
            for token in [chain.current, chain.current, *chain.spent]:
                label, _ = await outcome(auth.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=token)))
                if label == OK:
                    successes[token] += 1
                else:
                    assert label in {"REFRESH_TOKEN_REUSED", "REFRESH_TOKEN_INVALID"}, label
        assert max(successes.values()) == 1
