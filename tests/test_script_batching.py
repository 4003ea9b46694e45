"""Script calls made together go out as one batch: each caller still gets its own answer, and a batch's
failure is an outage for each of its callers, never a wrong answer. Against a real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import pytest_asyncio
import redis.asyncio as redis

from authmesh._auth_service.redis_scripts import LuaScript, ReplicaAck, ScriptRunner
from authmesh._auth_service.store import (
    REVOKED_SESSIONS,
    AuthStore,
    RotationResult,
    SessionRecord,
    refresh_key,
)
from authmesh._shared.errors import StoreError, Unavailable
from authmesh.processes import RedisServer
from tests.waiting import eventually

TTL_MS = 600_000
CALLERS = 24
# Long enough for the test to act while a batch's WAIT holds its replies back.
WAIT_TIMEOUT_MS = 1500
# Holds Redis for ARGV[1] turns of an empty loop (TIME stands still inside a script), so that a batch
# stays out while the test makes more calls.
BUSY_SCRIPT = LuaScript.of("for _ = 1, tonumber(ARGV[1]) do end return 'done'")
ECHO_SCRIPT = LuaScript.of("return ARGV[1]")


@pytest_asyncio.fixture(loop_scope="session")
async def client(own_redis: RedisServer) -> AsyncIterator[redis.Redis]:
    """A client on a Redis of the test's own."""
    client = redis.from_url(own_redis.url, socket_timeout=5, socket_connect_timeout=1)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def store(client: redis.Redis) -> AuthStore:
    """A store that acknowledges writes once the primary has them."""
    return AuthStore(client, access_ttl=300, leeway=5)


def token_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


async def open_chain(store: AuthStore, index: int) -> str:
    """A new session whose first refresh token hashes to the returned value."""
    first = token_hash(f"chain-{index}-0")
    now_ms = int(time.time() * 1000)
    session = SessionRecord(
        sid=f"sid-{index}",
        sub=f"sub-{index}",
        username=f"user-{index}",
        scopes=("a",),
        created_ms=now_ms,
        revoked_ms=0,
    )
    await store.open_session(session, first, TTL_MS)
    return first


async def rotate(store: AuthStore, old: str, new: str) -> RotationResult:
    return await store.rotate_refresh(old, new, int(time.time() * 1000), TTL_MS, f"reuse-{new}")


async def test_concurrent_refreshes_of_distinct_chains_all_succeed(store: AuthStore) -> None:
    firsts = [await open_chain(store, index) for index in range(CALLERS)]
    seconds = [token_hash(f"chain-{index}-1") for index in range(CALLERS)]
    results = await asyncio.gather(
        *(rotate(store, old, new) for old, new in zip(firsts, seconds, strict=True))
    )
    assert [(result.status, result.sid) for result in results] == [("ok", f"sid-{i}") for i in range(CALLERS)]
    # Every successor is live: the next rotations, batched too, go on.
    thirds = [token_hash(f"chain-{index}-2") for index in range(CALLERS)]
    again = await asyncio.gather(*(rotate(store, old, new) for old, new in zip(seconds, thirds, strict=True)))
    assert {result.status for result in again} == {"ok"}


async def test_concurrent_refreshes_of_one_token_let_exactly_one_win(
    store: AuthStore, client: redis.Redis
) -> None:
    first = await open_chain(store, 0)
    results = await asyncio.gather(*(rotate(store, first, token_hash(f"rival-{i}")) for i in range(CALLERS)))
    statuses = [result.status for result in results]
    assert statuses.count("ok") == 1
    # The first loser is the reuse that revokes the session; the others find it revoked.
    assert statuses.count("reused") == 1
    assert statuses.count("revoked") == CALLERS - 2
    # Reuse revoked the session: the winner's successor is refused as well.
    winner = statuses.index("ok")
    assert (await rotate(store, token_hash(f"rival-{winner}"), token_hash("late"))).status == "revoked"
    assert await client.zcard(REVOKED_SESSIONS) == 1


async def test_an_error_reply_fails_only_the_call_it_answers(store: AuthStore, client: redis.Redis) -> None:
    firsts = [await open_chain(store, index) for index in range(4)]
    # A refresh token stored as a string: the rotation script's HMGET on it is a WRONGTYPE error reply.
    broken = token_hash("broken")
    await client.set(refresh_key(broken), "not a hash")
    calls = [rotate(store, old, token_hash(f"next-{i}")) for i, old in enumerate(firsts)]
    calls.insert(2, rotate(store, broken, token_hash("next-broken")))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[2], StoreError)
    assert not isinstance(results[2], Unavailable)
    assert [result.status for result in results if isinstance(result, RotationResult)] == ["ok"] * 4


async def test_a_batch_is_answered_only_once_wait_has_covered_every_write(client: redis.Redis) -> None:
    # A Redis without replicas: WAIT 1 answers 0 when its timeout ends.
    store = AuthStore(client, access_ttl=300, leeway=5, replica_ack=ReplicaAck(replicas=1, timeout_ms=200))
    plain = AuthStore(client, access_ttl=300, leeway=5)
    firsts = [await open_chain(plain, index) for index in range(8)]
    started = time.monotonic()
    results = await asyncio.gather(
        *(rotate(store, old, token_hash(f"next-{i}")) for i, old in enumerate(firsts)), return_exceptions=True
    )
    assert time.monotonic() - started >= 0.2
    for result in results:
        assert isinstance(result, Unavailable)
        assert result.code == "STORE_NOT_REPLICATED"
    # The writes are on the primary: a retry of each finds its token spent by itself, not by someone else.
    assert (await rotate(plain, token_hash("next-3"), token_hash("after"))).status == "ok"


async def test_a_connection_lost_mid_batch_fails_every_caller_once_and_the_next_call_works(
    own_redis: RedisServer, client: redis.Redis
) -> None:
    store = AuthStore(
        client, access_ttl=300, leeway=5, replica_ack=ReplicaAck(replicas=1, timeout_ms=WAIT_TIMEOUT_MS)
    )
    plain = AuthStore(client, access_ttl=300, leeway=5)
    firsts = [await open_chain(plain, index) for index in range(8)]
    seconds = [token_hash(f"second-{index}") for index in range(8)]
    # The script loaded beforehand: the batch's first round runs it (no NOSCRIPT round before).
    assert (await rotate(plain, token_hash("nobody"), token_hash("nobody-next"))).status == "invalid"
    batch = asyncio.gather(
        *(rotate(store, old, new) for old, new in zip(firsts, seconds, strict=True)), return_exceptions=True
    )

    async def every_script_ran() -> bool:
        return all([await client.exists(refresh_key(new)) for new in seconds])

    # The scripts ran and their replies wait behind WAIT; then the batch's connection is cut.
    await eventually(every_script_ran, within=WAIT_TIMEOUT_MS / 2000, what="the batch's scripts to run")
    killer = redis.from_url(own_redis.url)
    try:
        await killer.client_kill_filter(_type="normal", skipme=True)
    finally:
        await killer.aclose()
    results = await batch
    for result in results:
        assert isinstance(result, Unavailable)
        assert result.code == "STORE_UNAVAILABLE"
    # Nothing was sent again: each rotation ran once, so each successor is live and no session revoked.
    for index, second in enumerate(seconds):
        assert (await rotate(plain, second, token_hash(f"third-{index}"))).status == "ok"
    assert await client.zcard(REVOKED_SESSIONS) == 0


async def test_a_killed_redis_fails_the_batch_and_a_restarted_one_serves(
    own_redis: RedisServer, store: AuthStore
) -> None:
    firsts = [await open_chain(store, index) for index in range(8)]
    own_redis.kill()
    results = await asyncio.gather(
        *(rotate(store, old, token_hash(f"next-{i}")) for i, old in enumerate(firsts)), return_exceptions=True
    )
    for result in results:
        assert isinstance(result, Unavailable)
        assert result.code == "STORE_UNAVAILABLE"
    await own_redis.restart()
    assert (await rotate(store, token_hash("nobody"), token_hash("nobody-next"))).status == "invalid"


async def test_a_caller_that_gives_up_leaves_the_others_their_answers(store: AuthStore) -> None:
    firsts = [await open_chain(store, index) for index in range(6)]
    calls = [
        asyncio.ensure_future(rotate(store, old, token_hash(f"next-{i}"))) for i, old in enumerate(firsts)
    ]
    await asyncio.sleep(0)  # one turn of the loop: every call has joined the batch, none is answered
    calls[1].cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r.status for r in results if isinstance(r, RotationResult)] == ["ok"] * 5
    # The abandoned reply was read and dropped: the next call gets its own.
    assert (await rotate(store, token_hash("nobody"), token_hash("nobody-next"))).status == "invalid"


async def test_a_batch_whose_script_redis_forgot_loads_it_and_runs_each_call_once(
    store: AuthStore, client: redis.Redis
) -> None:
    firsts = [await open_chain(store, index) for index in range(6)]
    await client.script_flush()
    results = await asyncio.gather(
        *(rotate(store, old, token_hash(f"next-{i}")) for i, old in enumerate(firsts))
    )
    assert {result.status for result in results} == {"ok"}
    # Run once each: the successors are live and no session was revoked as a reuse.
    assert (await rotate(store, token_hash("next-0"), token_hash("next-0-1"))).status == "ok"
    assert await client.zcard(REVOKED_SESSIONS) == 0


async def test_calls_made_while_a_batch_is_out_go_out_together_even_when_made_turns_apart(
    client: redis.Redis,
) -> None:
    runner = ScriptRunner(client.connection_pool)
    await runner.run(ECHO_SCRIPT, [], ["warm"])  # the scripts are loaded and a connection is kept
    await runner.run(BUSY_SCRIPT, [], ["1"])
    sent_before = runner.batches_sent
    busy = asyncio.ensure_future(runner.run(BUSY_SCRIPT, [], ["20000000"]))

    async def busy_batch_out() -> bool:
        return runner.batches_sent == sent_before + 1

    await eventually(busy_batch_out, within=5, what="the busy script's batch is sent")
    echoes = []
    for index in range(20):
        # One call per turn of the event loop, as a loaded service makes them between gRPC requests.
        echoes.append(asyncio.ensure_future(runner.run(ECHO_SCRIPT, [], [f"echo-{index}"])))
        await asyncio.sleep(0)
    assert await busy == b"done"
    assert await asyncio.gather(*echoes) == [f"echo-{index}".encode() for index in range(20)]
    assert runner.batches_sent == sent_before + 2


async def test_an_idle_runner_sends_a_call_at_once(
    client: redis.Redis,
) -> None:
    runner = ScriptRunner(client.connection_pool)
    await runner.run(ECHO_SCRIPT, [], ["warm"])
    sent_before = runner.batches_sent
    call = asyncio.ensure_future(runner.run(ECHO_SCRIPT, [], ["alone"]))
    await asyncio.sleep(0)  # the sender's first turn
    await asyncio.sleep(0)
    assert runner.batches_sent == sent_before + 1  # not held back for company
    assert await call == b"alone"
