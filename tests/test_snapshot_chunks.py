"""The revocation snapshot in chunks of bounded size: cut by bytes, whatever kind of entry fills them.

The end-to-end test loads 100,000 revoked sessions into a real Redis (in the store's own key layout,
pipelined: 100k ``RevokeSession`` calls would take minutes) and lets a real replica load them from a
real auth service over gRPC, with gRPC's default 4 MiB receive limit.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from hypothesis import given
from hypothesis import strategies as st

from authmesh._auth_service.snapshot_chunks import SNAPSHOT_CHUNK_BYTES, snapshot_chunks
from authmesh._auth_service.store import REVOKED_SESSIONS, RevocationSnapshot
from authmesh._resource_service.app import ResourceApp
from authmesh._shared.claims import new_uuid7
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.jose import decode_compact
from authmesh._shared.settings import ResourceSettings
from authmesh.auth.v1 import auth_pb2
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.auth_support import SERVICE, auth_settings, bearer, running_auth
from tests.waiting import eventually

REVOKED_SESSION_COUNT = 100_000
WRITE_BATCH = 10_000
DEADLINE = 60.0
# gRPC's default receive limit, which the replica's client keeps.
GRPC_DEFAULT_RECEIVE_BYTES = 4 * 1024 * 1024
USER = ("alice", "alice-password-1")

texts = st.text(min_size=1, max_size=40)
snapshots = st.builds(
    RevocationSnapshot,
    tokens=st.lists(st.tuples(texts, st.integers(0, 2**40)), max_size=60),
    sessions=st.lists(st.tuples(texts, texts, st.integers(0, 2**45)), max_size=60),
    users=st.lists(st.tuples(texts, st.integers(0, 2**45)), max_size=60),
    retired_key_ids=st.lists(texts, max_size=20),
)


def contents(chunks: list[auth_pb2.RevocationSnapshotChunk]) -> RevocationSnapshot:
    """Every entry of the chunks, in order, as the store's snapshot."""
    return RevocationSnapshot(
        tokens=[(token.jti, token.exp) for chunk in chunks for token in chunk.tokens],
        sessions=[(s.sid, s.sub, s.revoked_at_unix_ms) for chunk in chunks for s in chunk.sessions],
        users=[(user.sub, user.not_before_ms) for chunk in chunks for user in chunk.users],
        retired_key_ids=[kid for chunk in chunks for kid in chunk.retired_key_ids],
    )


def entries(chunk: auth_pb2.RevocationSnapshotChunk) -> int:
    return len(chunk.tokens) + len(chunk.sessions) + len(chunk.users) + len(chunk.retired_key_ids)


@given(snapshots, st.integers(64, 2048))
def test_every_entry_is_sent_once_in_order_and_no_chunk_is_over_the_bound(
    snapshot: RevocationSnapshot, max_bytes: int
) -> None:
    chunks = list(snapshot_chunks(snapshot, 42, max_bytes))
    assert contents(chunks) == snapshot
    assert chunks
    assert all(chunk.stream_sequence == 42 for chunk in chunks)
    for chunk in chunks:
        # Over the bound only where one entry alone is (strings of up to 40 characters may be 160
        # UTF-8 bytes, more than the smallest bounds tried here).
        assert chunk.ByteSize() <= max_bytes or entries(chunk) == 1
    assert all(entries(chunk) > 0 for chunk in chunks[:-1]) or len(chunks) == 1


def test_an_empty_snapshot_is_one_chunk_with_the_sequence() -> None:
    (chunk,) = snapshot_chunks(RevocationSnapshot([], [], [], []), 7)
    assert chunk == auth_pb2.RevocationSnapshotChunk(stream_sequence=7)


def test_multi_byte_characters_are_counted_as_the_bytes_they_encode_to() -> None:
    sub = "ü" * 1000  # 2000 bytes in UTF-8
    snapshot = RevocationSnapshot([], [], [(sub, 1)] * 10, [])
    chunks = list(snapshot_chunks(snapshot, 1, 4100))
    assert [len(chunk.users) for chunk in chunks] == [2, 2, 2, 2, 2]
    assert max(chunk.ByteSize() for chunk in chunks) <= 4100


def test_kinds_share_chunks_and_fill_each_up_to_the_bound() -> None:
    snapshot = RevocationSnapshot(
        tokens=[(str(uuid.uuid4()), 1_900_000_000)] * 5000,
        sessions=[(str(uuid.uuid4()), f"usr_{uuid.uuid4().hex}", 1_800_000_000_000)] * 5000,
        users=[(f"usr_{uuid.uuid4().hex}", 1_800_000_000_000)] * 5000,
        retired_key_ids=["key-1"] * 5000,
    )
    chunks = list(snapshot_chunks(snapshot, 3, 64 * 1024))
    assert contents(chunks) == snapshot
    sizes = [chunk.ByteSize() for chunk in chunks]
    assert max(sizes) <= 64 * 1024
    # Counted from an upper bound per entry, but not a loose one: every chunk but the last is well filled.
    assert min(sizes[:-1]) >= 64 * 1024 * 0.6
    assert any(len(chunk.tokens) and len(chunk.sessions) for chunk in chunks)


async def write_revoked_sessions(redis_url: str, sessions: list[tuple[str, str]]) -> None:
    """Sessions ``(sid, sub)`` marked revoked now where the snapshot reads them (the store's
    ``revoked_sessions`` index, members ``"sid sub"``), in batches; no event goes on the stream."""
    revoked_ms = int(time.time() * 1000)
    client = redis.from_url(redis_url)
    try:
        for start in range(0, len(sessions), WRITE_BATCH):
            batch = sessions[start : start + WRITE_BATCH]
            await client.zadd(REVOKED_SESSIONS, {f"{sid} {sub}": revoked_ms for sid, sub in batch})
    finally:
        await client.aclose()


def replica_settings(nats_url: str, auth_address: str, **overrides: Any) -> ResourceSettings:
    values: dict[str, Any] = {
        "nats_urls": [nats_url],
        "grpc_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "auth_target": auth_address,
        "service_account": ":".join(SERVICE),
        "instance": "replica-snapshot",
        "shutdown_grace": 0.2,
    }
    values.update(overrides)
    return ResourceSettings(**values)


async def test_a_replica_loads_a_snapshot_of_100000_revoked_sessions_in_chunks_under_the_receive_limit(
    redis_url: str, nats_url: str
) -> None:
    # Issue 10.6: every session once went into the first chunk; at ~49k sessions it passed the 4 MiB
    # receive limit, every replica's snapshot failed with RESOURCE_EXHAUSTED, and a replica fell back
    # to replaying the stream, which does not hold sessions written outside it: they were accepted.
    async with running_auth(auth_settings(redis_url, [nats_url])) as (app, client):
        await client.create_user(*USER)
        alice = await client.login(*USER)
        # Alice's session among them: only the snapshot can tell a replica it is revoked.
        alice_sub = decode_compact(alice.access_token).unverified_payload["sub"]
        others = [(new_uuid7(), f"usr_{uuid.uuid4().hex}") for _ in range(REVOKED_SESSION_COUNT - 1)]
        await write_revoked_sessions(redis_url, [(alice.session_id, alice_sub), *others])

        service = await client.login(*SERVICE, ("service",))
        chunks = [
            chunk
            async for chunk in client.stub.SnapshotRevocations(
                auth_pb2.SnapshotRevocationsRequest(), metadata=bearer(service.access_token), timeout=DEADLINE
            )
        ]
        assert sum(len(chunk.sessions) for chunk in chunks) == REVOKED_SESSION_COUNT
        assert max(chunk.ByteSize() for chunk in chunks) <= SNAPSHOT_CHUNK_BYTES < GRPC_DEFAULT_RECEIVE_BYTES

        async with ResourceApp(replica_settings(nats_url, app.grpc_address)) as replica:

            async def ready() -> bool:
                return replica.ready

            await eventually(ready, within=DEADLINE, what="the replica to load its revocation state")
            assert replica.denylist.sizes().sessions == REVOKED_SESSION_COUNT
            async with grpc.aio.insecure_channel(replica.grpc_address) as channel:
                stub = resource_pb2_grpc.ResourceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.WhoAmI(
                        resource_pb2.WhoAmIRequest(), metadata=bearer(alice.access_token), timeout=10
                    )
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert error_reason(caught.value) == "SESSION_REVOKED"
