"""NATS restarted, NATS down while revoking, and the stream leader of a 3-node cluster killed.

``tests/test_auth_faults.py`` already covers a session revocation retried after an outage; these cover the
other revocations, a restart in the middle of a stream of revocations, and a cluster losing its leader.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from authmesh._shared.events import EventType
from authmesh._shared.jose import decode_compact
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import NatsCluster, NatsServer
from tests.auth_support import auth_settings, running_auth
from tests.faults import (
    OK,
    Auth,
    StoredEvent,
    event_ids,
    everywhere,
    in_process_replicas,
    jti_of,
    outcome,
    stream_events,
    stream_info,
)
from tests.waiting import eventually

PASSWORD = "nats-password-1"
USER = "revoked-often"
DEADLINE = 30.0
BEFORE = 8
AFTER = 8
BROKER_DOWN = {"BROKER_UNAVAILABLE"}
# A refused revocation is retried after this pause (the answer comes at once while NATS is down).
RETRY_PAUSE_SECONDS = 0.05
PACE_SECONDS = 0.01


def bodies_on(events: list[StoredEvent], subject: str) -> list[dict[str, object]]:
    """The event bodies (unverified; the tests check the stream's content, not its trust) on ``subject``."""
    found = []
    for event in events:
        if event.subject == subject:
            payload = decode_compact(event.data).unverified_payload
            (body,) = payload["events"].values()
            found.append(body)
    return found


def no_event_twice(events: list[StoredEvent]) -> bool:
    """Whether every event id appears at most once in the stream (JetStream dedup held)."""
    counts = Counter(str(decode_compact(event.data).unverified_payload["jti"]) for event in events)
    return all(count == 1 for count in counts.values())


@dataclass
class Revocations:
    """Revocations made one after another by a worker, with what each call answered."""

    acknowledged: list[tuple[str, str]] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)


async def revoke_until(auth: Auth, user: str, out: Revocations, stop: asyncio.Event) -> None:
    """Log in and revoke the token, again and again; a call refused as unavailable is retried with the
    same token after a short pause, and a successful one is followed by a shorter one (a steady rate)."""
    admin = await auth.admin()
    pair = await auth.login(user, PASSWORD)
    while not stop.is_set():
        label, reply = await outcome(
            auth.stub.RevokeToken(
                auth_pb2.RevokeTokenRequest(token=pair.access_token), metadata=admin, timeout=10
            )
        )
        out.answers[label] += 1
        pause = RETRY_PAUSE_SECONDS
        if label == OK:
            out.acknowledged.append((pair.access_token, reply.event_id))
            pair = await auth.login(user, PASSWORD)
            pause = PACE_SECONDS
        elif label not in BROKER_DOWN:
            out.wrong.append(label)
            pair = await auth.login(user, PASSWORD)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_a_nats_restart_under_revocations_loses_no_acknowledged_event_and_the_service_resumes(
    redis_url: str, own_nats: NatsServer, how: str
) -> None:
    """Invariant, with NATS killed (``kill -9``) or stopped, then restarted, while tokens are revoked:

    - every revocation whose RPC returned OK has its event in ``AUTH_EVENTS`` afterwards, once;
    - while NATS is down revocations answer ``UNAVAILABLE`` (``BROKER_UNAVAILABLE``), nothing else;
    - revocations succeed again after the restart without restarting the auth service, and a resource
      replica (in this process) that lived through the outage refuses every acknowledged revocation.
    """
    async with running_auth(auth_settings(redis_url, [own_nats.url])) as (app, client):
        auth = Auth(client.channel)
        await auth.create_user(USER, PASSWORD)
        async with in_process_replicas(app.grpc_address, [own_nats.url], 1) as replicas:
            out = Revocations()
            stop = asyncio.Event()
            worker = asyncio.create_task(revoke_until(auth, USER, out, stop))
            try:

                def at_least(count: int, label: str = OK) -> Callable[[], Awaitable[bool]]:
                    async def check() -> bool:
                        if worker.done():
                            worker.result()
                        return out.answers[label] >= count

                    return check

                await eventually(at_least(BEFORE), within=DEADLINE, what="revocations before the outage")
                if how == "kill":
                    own_nats.kill()
                else:
                    await own_nats.stop()
                await eventually(
                    at_least(3, "BROKER_UNAVAILABLE"), within=DEADLINE, what="refusals during it"
                )
                acknowledged_during_outage = out.answers[OK]
                await own_nats.start()
                await eventually(
                    at_least(acknowledged_during_outage + AFTER), within=DEADLINE, what="revocations after it"
                )
            finally:
                stop.set()
                await worker
            assert out.wrong == []
            stored = await stream_events([own_nats.url])
            assert {event for _, event in out.acknowledged} <= event_ids(stored)
            assert no_event_twice(stored)
            for token, _ in out.acknowledged:
                await everywhere(replicas, token, "TOKEN_REVOKED", within=DEADLINE)


@pytest.mark.parametrize("kind", ["token", "logout", "user"])
async def test_a_revocation_made_while_nats_is_down_is_unavailable_and_its_retry_takes_effect_once(
    redis_url: str, own_nats: NatsServer, kind: str
) -> None:
    """Invariant, for a revocation called while NATS is down and retried once it is back:

    - the first call answers ``UNAVAILABLE`` (``BROKER_UNAVAILABLE``), the retry OK;
    - no event appears twice in ``AUTH_EVENTS``; a token or logout revocation has exactly one event (the
      retry returns the same event id as the one stored), a user revocation at most one per call, the
      retry's event among them;
    - the revoked token is inactive by ``Introspect``.
    """
    async with running_auth(auth_settings(redis_url, [own_nats.url])) as (_, client):
        auth = Auth(client.channel)
        subject = await auth.create_user("victim", PASSWORD)
        pair = await auth.login("victim", PASSWORD)
        admin = await auth.admin()

        def call() -> Awaitable[auth_pb2.RevokeResponse]:
            if kind == "token":
                return client.stub.RevokeToken(
                    auth_pb2.RevokeTokenRequest(token=pair.access_token), metadata=admin, timeout=10
                )
            if kind == "logout":
                return client.stub.Logout(
                    auth_pb2.LogoutRequest(refresh_token=pair.refresh_token), timeout=10
                )
            return client.stub.RevokeUser(
                auth_pb2.RevokeUserRequest(subject=subject), metadata=admin, timeout=10
            )

        await own_nats.stop()
        first, _ = await outcome(call())
        assert first == "BROKER_UNAVAILABLE"
        await own_nats.start()
        replies: list[auth_pb2.RevokeResponse] = []

        async def retried() -> bool:
            label, reply = await outcome(call())
            if label == OK:
                replies.append(reply)
            else:
                assert label in BROKER_DOWN, label
            return label == OK

        await eventually(retried, within=DEADLINE, what="the retried revocation to succeed")
        (reply,) = replies
        stored = await stream_events([own_nats.url])
        assert no_event_twice(stored)
        if kind == "token":
            matching = [
                b
                for b in bodies_on(stored, EventType.TOKEN_REVOKED.subject)
                if b["jti"] == jti_of(pair.access_token)
            ]
            assert len(matching) == 1
        elif kind == "logout":
            matching = [
                b for b in bodies_on(stored, EventType.SESSION_REVOKED.subject) if b["sid"] == pair.session_id
            ]
            assert len(matching) == 1
        else:
            matching = [b for b in bodies_on(stored, EventType.USER_REVOKED.subject) if b["sub"] == subject]
            assert 1 <= len(matching) <= 2
        assert reply.event_id in event_ids(stored)
        assert not await auth.active(pair.access_token)


async def test_a_key_rotation_retried_after_a_broker_outage_makes_exactly_one_new_key(
    redis_url: str, own_nats: NatsServer
) -> None:
    """Invariant: a rotation refused with ``UNAVAILABLE`` and retried (with the same ``request_id``, the
    call's idempotency key) leaves exactly one new key."""
    async with running_auth(auth_settings(redis_url, [own_nats.url])) as (_, client):
        auth = Auth(client.channel)
        admin = await auth.admin()
        before = await auth.jwks_kids()
        request = auth_pb2.RotateSigningKeyRequest(retire_previous=False, request_id="rotate-after-outage")
        await own_nats.stop()
        first, _ = await outcome(client.stub.RotateSigningKey(request, metadata=admin, timeout=10))
        assert first == "BROKER_UNAVAILABLE"
        await own_nats.start()

        async def retried() -> bool:
            label, _ = await outcome(client.stub.RotateSigningKey(request, metadata=admin, timeout=10))
            return label == OK

        await eventually(retried, within=DEADLINE, what="the retried rotation to succeed")
        assert len(await auth.jwks_kids() - before) == 1


async def stream_leader(cluster: NatsCluster) -> int:
    """The index of the node that leads ``AUTH_EVENTS``."""
    client = await nats.connect(servers=cluster.urls, connect_timeout=2, max_reconnect_attempts=3)
    try:
        info = await stream_info(client.jetstream(timeout=5))
    finally:
        await client.close()
    assert info.cluster is not None
    assert info.cluster.leader is not None
    names = [node.server_name for node in cluster.nodes]
    return names.index(info.cluster.leader)


async def test_killing_the_stream_leader_of_a_three_node_cluster_loses_no_acknowledged_revocation(
    tmp_path: Path, redis_url: str
) -> None:
    """Invariant, with ``AUTH_EVENTS`` replicated on 3 nodes and its leader killed (``kill -9``) while tokens
    are revoked, then restarted:

    - every revocation whose RPC returned OK has its event in the stream afterwards, once;
    - during the election revocations answer OK or ``UNAVAILABLE`` only, and they succeed again without a
      restart of the auth service or of the resource replica, which refuses every acknowledged revocation.
    """
    async with AsyncExitStack() as stack:
        cluster = await stack.enter_async_context(NatsCluster(tmp_path / "cluster", size=3))
        settings = auth_settings(redis_url, cluster.urls, stream_replicas=3)
        app, client = await stack.enter_async_context(running_auth(settings))
        auth = Auth(client.channel)
        await auth.create_user(USER, PASSWORD)
        replicas = await stack.enter_async_context(
            in_process_replicas(app.grpc_address, cluster.urls, 1, stream_replicas=3)
        )
        out = Revocations()
        stop = asyncio.Event()
        worker = asyncio.create_task(revoke_until(auth, USER, out, stop))
        try:

            def acknowledged(count: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    if worker.done():
                        worker.result()
                    return out.answers[OK] >= count

                return check

            await eventually(acknowledged(BEFORE), within=DEADLINE, what="revocations before the kill")
            leader = await stream_leader(cluster)
            cluster.kill_node(leader)
            killed_at = out.answers[OK]
            await eventually(
                acknowledged(killed_at + AFTER), within=DEADLINE, what="revocations after the kill"
            )
            await cluster.restart_node(leader, timeout=DEADLINE)
            restarted_at = out.answers[OK]
            await eventually(
                acknowledged(restarted_at + 3), within=DEADLINE, what="revocations after the restart"
            )
        finally:
            stop.set()
            await worker
        assert out.wrong == []
        stored = await stream_events(cluster.urls)
        assert {event for _, event in out.acknowledged} <= event_ids(stored)
        assert no_event_twice(stored)
        for token, _ in out.acknowledged:
            await everywhere(replicas, token, "TOKEN_REVOKED", within=DEADLINE)
        assert not await auth.active(out.acknowledged[-1][0])
