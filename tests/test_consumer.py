"""The revocation consumer against a real NATS JetStream, with events signed by a test key."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from authmesh._shared.claims import AccessClaims, new_uuid7
from authmesh._shared.consumer import RevocationConsumer
from authmesh._shared.denylist import Denylist, SnapshotChunk
from authmesh._shared.errors import KeyRevoked, TokenRevoked, Unavailable
from authmesh._shared.events import (
    STREAM_NAME,
    EventBody,
    EventType,
    HeartbeatEvent,
    KeyRevokedEvent,
    KeyRotatedEvent,
    SecurityEvent,
    SessionRevokedEvent,
    TokenRevokedEvent,
    UserRevokedEvent,
    encode_event,
)
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.keys import jwks_json
from authmesh._shared.nats_wiring import ensure_stream
from authmesh._shared.settings import ResourceSettings
from authmesh._shared.staleness import StalenessMonitor
from authmesh.processes import NatsServer
from tests.helpers_tokens import ISSUER, SigningKey, sign_json, unsigned_token

DEADLINE = 15.0
TTL = 300


class JwksServer:
    """The auth service's JWK Set as the key cache fetches it."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = {key.kid: key for key in keys}
        self.calls = 0

    async def fetch(self) -> str:
        self.calls += 1
        return jwks_json({kid: key.public_key for kid, key in self.keys.items()})


class Recorder:
    """A consumer observer that remembers what it was told."""

    def __init__(self) -> None:
        self.applied: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.lags: list[float] = []
        self.gaps = 0
        self.resyncs: list[str] = []

    def event_applied(self, event_type: str, lag_seconds: float | None) -> None:
        self.applied[event_type] += 1
        if lag_seconds is not None:
            self.lags.append(lag_seconds)

    def event_rejected(self, reason: str) -> None:
        self.rejected[reason] += 1

    def gap_detected(self) -> None:
        self.gaps += 1

    def resynchronised(self, source: str) -> None:
        self.resyncs.append(source)


class Snapshots:
    """A snapshot source handing out prepared snapshots in turn (the last one repeats)."""

    def __init__(self, *chunks: SnapshotChunk, fail: bool = False) -> None:
        self.chunks = list(chunks)
        self.fail = fail
        self.calls = 0

    async def snapshot(self) -> AsyncIterator[SnapshotChunk]:
        self.calls += 1
        if self.fail:
            raise Unavailable("auth service down")
        yield self.chunks[min(self.calls, len(self.chunks)) - 1]


class Publisher:
    """Publishes SETs to AUTH_EVENTS the way the auth service does."""

    def __init__(self, js: JetStreamContext, key: SigningKey) -> None:
        self.js = js
        self.key = key

    async def publish(
        self,
        body: EventBody,
        *,
        key: SigningKey | None = None,
        subject: str | None = None,
        now_ms: int | None = None,
    ) -> int:
        signer = key or self.key
        event = SecurityEvent.new(body, ISSUER, origin="test", now_ms=now_ms)
        data = encode_event(event, signer.private_key, signer.kid)
        return await self.raw(subject or event.type.subject, data, event.event_id)

    async def raw(self, subject: str, data: bytes, msg_id: str | None = None) -> int:
        ack = await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id or new_uuid7()})
        return ack.seq


def token_claims(*, sub: str = "user-1", sid: str = "session-1", kid: str = "k1") -> AccessClaims:
    now = int(time.time())
    return AccessClaims(
        iss=ISSUER,
        sub=sub,
        aud=("authmesh-resources",),
        exp=now + TTL,
        iat=now,
        nbf=now,
        jti=new_uuid7(now * 1000),
        sid=sid,
        scopes=("docs:read",),
        client_id="cli",
        kid=kid,
    )


def is_revoked(denylist: Denylist, claims: AccessClaims) -> bool:
    try:
        denylist.check(claims)
    except (TokenRevoked, KeyRevoked):
        return True
    return False


async def poll(condition: Callable[[], bool], within: float = DEADLINE) -> None:
    """Wait until ``condition()`` holds, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


def settings_for(url: str, **overrides: Any) -> ResourceSettings:
    values: dict[str, Any] = {
        "nats_urls": [url],
        "access_token_ttl": TTL,
        "leeway": 5,
        "staleness_bound": 3.0,
        "instance": "consumer-test",
    }
    values.update(overrides)
    return ResourceSettings(**values)


class Rig:
    """One consumer with its denylist, key cache and staleness monitor, plus a publisher."""

    def __init__(
        self, settings: ResourceSettings, publisher: Publisher, jwks: JwksServer, snapshots: Snapshots | None
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.jwks = jwks
        self.snapshots = snapshots
        self.denylist = Denylist(access_token_ttl=settings.access_token_ttl, leeway=settings.leeway)
        self.keys = KeyCache(jwks.fetch, cooldown=0.05)
        self.staleness = StalenessMonitor(settings.staleness_bound)
        self.recorder = Recorder()
        self.consumer = RevocationConsumer(
            settings,
            self.denylist,
            self.keys,
            self.staleness,
            snapshot=snapshots,
            observer=self.recorder,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RevocationConsumer]:
        task = asyncio.create_task(self.consumer.run())
        try:
            yield self.consumer
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await self.keys.aclose()

    async def ready(self) -> None:
        await asyncio.wait_for(self.consumer.wait_ready(), DEADLINE)


@asynccontextmanager
async def jetstream(url: str, settings: ResourceSettings) -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(servers=[url], connect_timeout=2, reconnect_time_wait=0.1)
    try:
        js = client.jetstream(timeout=5)
        await ensure_stream(js, settings)
        yield js
    finally:
        await client.close()


@asynccontextmanager
async def rig(
    url: str, *, snapshots: Snapshots | None = None, keys: tuple[SigningKey, ...] = (), **overrides: Any
) -> AsyncIterator[Rig]:
    settings = settings_for(url, **overrides)
    key = keys[0] if keys else SigningKey.generate("k1")
    async with jetstream(url, settings) as js:
        yield Rig(settings, Publisher(js, key), JwksServer(key, *keys[1:]), snapshots)


async def test_signed_revocations_published_on_jetstream_are_applied(nats_url: str) -> None:
    async with rig(nats_url) as r, r.running():
        await r.ready()
        token, session, user = token_claims(), token_claims(sid="s-2"), token_claims(sub="u-3")
        await r.publisher.publish(TokenRevokedEvent(jti=token.jti, exp=token.exp))
        await r.publisher.publish(SessionRevokedEvent(sid="s-2", sub="user-1"))
        await r.publisher.publish(UserRevokedEvent(sub="u-3", not_before_ms=int(time.time() * 1000)))
        await r.publisher.publish(KeyRevokedEvent(kid="k-old"))
        await poll(lambda: all(is_revoked(r.denylist, c) for c in (token, session, user)))
        # A retired key is the key cache's to refuse.
        await poll(lambda: "k-old" in r.keys.retired)
        assert not is_revoked(r.denylist, token_claims())
        assert r.recorder.rejected == Counter()
        assert len(r.recorder.lags) == 4


async def test_an_event_published_twice_is_applied_idempotently(nats_url: str) -> None:
    async with rig(nats_url) as r, r.running():
        await r.ready()
        token = token_claims()
        body = TokenRevokedEvent(jti=token.jti, exp=token.exp)
        for _ in range(3):
            await r.publisher.publish(body)
        await poll(lambda: r.recorder.applied[EventType.TOKEN_REVOKED.value] == 3)
        assert r.denylist.sizes().tokens == 1


async def test_forged_and_malformed_events_are_dropped_and_counted(nats_url: str) -> None:
    async with rig(nats_url) as r, r.running():
        await r.ready()
        target = token_claims()
        body = TokenRevokedEvent(jti=target.jti, exp=target.exp)
        stranger = SigningKey.generate("k-stranger")
        impostor = SigningKey.generate("k1")  # claims our kid, signs with another key
        await r.publisher.publish(body, key=stranger)
        await r.publisher.publish(body, key=impostor)
        event = SecurityEvent.new(body, ISSUER)
        payload = {
            "iss": ISSUER,
            "iat": event.issued_at,
            "jti": event.event_id,
            "toe": event.issued_at,
            "events": {EventType.TOKEN_REVOKED.uri: {"jti": target.jti, "exp": target.exp}},
        }
        await r.publisher.raw(
            EventType.TOKEN_REVOKED.subject,
            unsigned_token({"alg": "none", "typ": "secevent+jwt"}, payload).encode(),
        )
        await r.publisher.raw(EventType.TOKEN_REVOKED.subject, b"not a token at all")
        await r.publisher.raw(
            EventType.TOKEN_REVOKED.subject,
            sign_json(
                {"alg": "ES256", "typ": "secevent+jwt", "kid": "k1"},
                {**payload, "iss": "evil"},
                r.publisher.key,
            ).encode(),
        )
        await r.publisher.publish(body, subject=EventType.SESSION_REVOKED.subject)
        await r.publisher.raw(
            EventType.TOKEN_REVOKED.subject,
            sign_json({"alg": "ES256", "typ": "JWT", "kid": "k1"}, payload, r.publisher.key).encode(),
        )
        await poll(lambda: r.consumer.rejected == 7)
        assert not is_revoked(r.denylist, target)
        assert r.recorder.rejected == Counter(
            {
                "unknown_key": 1,
                "bad_signature": 1,
                "unsupported_algorithm": 1,
                "malformed_token": 1,
                "foreign_issuer": 1,
                "wrong_subject": 1,
                "wrong_type": 1,
            }
        )
        # The stream carries on: a genuine event after the forgeries is applied.
        await r.publisher.publish(body)
        await poll(lambda: is_revoked(r.denylist, target))


async def test_a_flood_of_events_with_made_up_kids_costs_few_key_fetches(nats_url: str) -> None:
    async with rig(nats_url) as r, r.running():
        await r.ready()
        before = r.jwks.calls
        body = HeartbeatEvent(seq=1)
        for n in range(30):
            await r.publisher.publish(body, key=SigningKey.generate(f"made-up-{n % 3}"))
        await poll(lambda: r.consumer.rejected == 30)
        assert r.jwks.calls - before <= 3


async def test_an_event_signed_with_a_key_added_after_start_is_verified_after_a_refetch(
    nats_url: str,
) -> None:
    async with rig(nats_url) as r, r.running():
        await r.ready()
        rotated = SigningKey.generate("k2")
        r.jwks.keys[rotated.kid] = rotated
        token = token_claims()
        await r.publisher.publish(TokenRevokedEvent(jti=token.jti, exp=token.exp), key=rotated)
        await poll(lambda: is_revoked(r.denylist, token))
        assert r.keys.is_known("k2")


async def test_key_events_refresh_and_evict_keys_in_the_cache(nats_url: str) -> None:
    async with rig(nats_url) as r, r.running():
        await r.ready()
        rotated = SigningKey.generate("k2")
        r.jwks.keys[rotated.kid] = rotated
        await r.publisher.publish(KeyRotatedEvent(kid="k2", previous_kid="k1"))
        await poll(lambda: r.keys.is_known("k2"))
        await r.publisher.publish(KeyRevokedEvent(kid="k1"), key=rotated)
        await poll(lambda: not r.keys.is_known("k1"))
        with pytest.raises(KeyRevoked):
            r.keys.public_key("k1")


async def test_a_replica_replays_the_stream_and_is_ready_only_once_it_has_caught_up(nats_url: str) -> None:
    async with rig(nats_url) as r:
        revoked = [token_claims() for _ in range(50)]
        for claims in revoked:
            await r.publisher.publish(TokenRevokedEvent(jti=claims.jti, exp=claims.exp))
        await r.publisher.publish(UserRevokedEvent(sub="u-late", not_before_ms=int(time.time() * 1000)))
        async with r.running():
            await r.ready()
            # Everything published before start is in force the moment the replica is ready.
            assert all(is_revoked(r.denylist, claims) for claims in revoked)
            assert is_revoked(r.denylist, token_claims(sub="u-late"))
            assert r.recorder.resyncs == ["replay"]
            assert r.recorder.lags == []  # replayed history is not propagation lag


async def test_an_empty_stream_makes_the_replica_ready_at_once(nats_url: str) -> None:
    async with rig(nats_url) as r, r.running():
        await r.ready()
        assert r.consumer.applied == 0


async def test_a_snapshot_is_loaded_and_the_stream_is_consumed_from_the_next_sequence(nats_url: str) -> None:
    in_snapshot, before_snapshot, after_snapshot = token_claims(), token_claims(), token_claims()
    snapshots = Snapshots()
    async with rig(nats_url, snapshots=snapshots) as r:
        sequence = await r.publisher.publish(
            TokenRevokedEvent(jti=before_snapshot.jti, exp=before_snapshot.exp)
        )
        # A snapshot reflecting that sequence but (to prove the event is not re-read) without its revocation.
        snapshots.chunks.append(
            SnapshotChunk(
                tokens=(TokenRevokedEvent(jti=in_snapshot.jti, exp=in_snapshot.exp),),
                retired_key_ids=("k-retired",),
                stream_sequence=sequence,
            )
        )
        async with r.running():
            await r.ready()
            assert is_revoked(r.denylist, in_snapshot)
            assert "k-retired" in r.keys.retired  # the key cache refuses its tokens
            assert not is_revoked(r.denylist, before_snapshot)
            await r.publisher.publish(TokenRevokedEvent(jti=after_snapshot.jti, exp=after_snapshot.exp))
            await poll(lambda: is_revoked(r.denylist, after_snapshot))
            assert r.recorder.resyncs == ["snapshot"]


async def test_a_snapshot_that_fails_falls_back_to_replaying_the_stream(nats_url: str) -> None:
    token = token_claims()
    async with rig(nats_url, snapshots=Snapshots(fail=True)) as r:
        await r.publisher.publish(TokenRevokedEvent(jti=token.jti, exp=token.exp))
        async with r.running():
            await r.ready()
            assert is_revoked(r.denylist, token)
            assert r.recorder.resyncs == ["replay"]


async def test_a_gap_in_the_stream_is_detected_and_resynchronised_from_a_snapshot(nats_url: str) -> None:
    lost = token_claims()
    snapshots = Snapshots()
    async with rig(nats_url, snapshots=snapshots) as r:
        first = await r.publisher.publish(HeartbeatEvent(seq=1))
        missing = await r.publisher.publish(TokenRevokedEvent(jti=lost.jti, exp=lost.exp))
        last = await r.publisher.publish(HeartbeatEvent(seq=2))
        await r.publisher.js.delete_msg(STREAM_NAME, missing)
        snapshots.chunks.append(SnapshotChunk(stream_sequence=first))
        # The second snapshot (after the gap) knows the lost revocation.
        snapshots.chunks.append(
            SnapshotChunk(tokens=(TokenRevokedEvent(jti=lost.jti, exp=lost.exp),), stream_sequence=last)
        )
        async with r.running():
            await r.ready()
            await poll(lambda: is_revoked(r.denylist, lost))
            assert r.recorder.gaps >= 1
            assert snapshots.calls >= 2


async def test_a_gap_without_a_snapshot_keeps_the_replica_degraded_until_the_lost_tokens_have_expired(
    nats_url: str,
) -> None:
    lost, later = token_claims(), token_claims()
    # Tokens live 2 s here: the lost revocation stops mattering 2 s after it was stored.
    async with rig(nats_url, access_token_ttl=2, leeway=0, staleness_bound=0.5) as r:
        await r.publisher.publish(HeartbeatEvent(seq=1))
        missing = await r.publisher.publish(TokenRevokedEvent(jti=lost.jti, exp=lost.exp))
        await r.publisher.publish(TokenRevokedEvent(jti=later.jti, exp=later.exp))
        await r.publisher.js.delete_msg(STREAM_NAME, missing)
        async with r.running():
            await r.ready()
            assert is_revoked(r.denylist, later)
            assert not is_revoked(r.denylist, lost)
            assert r.recorder.gaps == 1
            # Live heartbeats do not make it fresh while the lost revocation may still matter …
            applied = r.consumer.applied
            await r.publisher.publish(HeartbeatEvent(seq=2))
            await poll(lambda: r.consumer.applied > applied)
            assert r.staleness.degraded
            # … and it is fresh again once every token the lost event could have revoked has expired.
            for seq in range(3, 100):
                await r.publisher.publish(HeartbeatEvent(seq=seq))
                if not r.staleness.degraded:
                    break
                await asyncio.sleep(0.1)
            assert not r.staleness.degraded


async def test_an_event_missing_from_the_live_path_is_read_from_the_stream(nats_url: str) -> None:
    skipped, after = token_claims(), token_claims()
    async with rig(nats_url) as r, r.running():
        await r.ready()
        await r.publisher.publish(HeartbeatEvent(seq=1))
        await poll(lambda: r.consumer.last_sequence == 1)
        # Stored but not republished: only a read of the stream can find it.
        config = (await r.publisher.js.stream_info(STREAM_NAME)).config
        await r.publisher.js.update_stream(dataclasses.replace(config, republish=None))
        await r.publisher.publish(TokenRevokedEvent(jti=skipped.jti, exp=skipped.exp))
        await ensure_stream(r.publisher.js, r.settings)
        await r.publisher.publish(TokenRevokedEvent(jti=after.jti, exp=after.exp))

        await poll(lambda: is_revoked(r.denylist, after))
        assert is_revoked(r.denylist, skipped)
        assert r.recorder.gaps == 0
        assert r.consumer.last_sequence == 3


async def test_live_heartbeats_keep_the_state_fresh_and_their_absence_makes_it_stale(nats_url: str) -> None:
    async with rig(nats_url, staleness_bound=0.5) as r, r.running():
        await r.ready()
        assert r.staleness.degraded  # no heartbeat yet
        for seq in range(10):
            await r.publisher.publish(HeartbeatEvent(seq=seq))
            await asyncio.sleep(0.05)
        await poll(lambda: not r.staleness.degraded)
        await poll(lambda: r.staleness.degraded)  # heartbeats stopped
        assert r.staleness.seconds > 0.5


async def test_replayed_heartbeats_do_not_count_as_fresh(nats_url: str) -> None:
    async with rig(nats_url, staleness_bound=0.5) as r:
        old_ms = int(time.time() * 1000) - 60_000
        for seq in range(5):
            await r.publisher.publish(HeartbeatEvent(seq=seq), now_ms=old_ms + seq)
        async with r.running():
            await r.ready()
            assert r.consumer.applied == 5
            assert r.staleness.degraded


async def test_the_consumer_resumes_after_the_nats_server_restarts(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "nats") as server, rig(server.url) as r, r.running():
        await r.ready()
        before = token_claims()
        await r.publisher.publish(TokenRevokedEvent(jti=before.jti, exp=before.exp))
        await poll(lambda: is_revoked(r.denylist, before))
        await server.restart()
        await poll(lambda: r.publisher.js._nc.is_connected)
        after = token_claims()
        await r.publisher.publish(TokenRevokedEvent(jti=after.jti, exp=after.exp))
        await poll(lambda: is_revoked(r.denylist, after))
        assert r.consumer.connected


async def test_a_stream_that_is_recreated_is_followed_from_its_start(nats_url: str) -> None:
    async with rig(nats_url) as r, r.running():
        await r.ready()
        for seq in range(3):
            await r.publisher.publish(HeartbeatEvent(seq=seq))
        await poll(lambda: r.consumer.last_sequence == 3)
        await r.publisher.js.delete_stream(STREAM_NAME)
        await ensure_stream(r.publisher.js, r.settings)
        token = token_claims()
        await r.publisher.publish(TokenRevokedEvent(jti=token.jti, exp=token.exp))
        await poll(lambda: is_revoked(r.denylist, token))
