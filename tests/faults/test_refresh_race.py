"""Many clients refreshing one refresh token at the same instant: one wins, the rest expose the theft."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.auth_support import auth_settings, running_auth
from tests.faults import OK, Auth, everywhere, in_process_replicas, outcome

ROUNDS = 100
CONCURRENCY = 16
# The concurrent refreshes go out over several connections, as from several stolen copies.
CHANNELS = 4
USER = ("racer", "racer-password-1")


async def test_of_sixteen_concurrent_refreshes_exactly_one_wins_and_the_reuse_revokes_the_session_everywhere(
    redis_url: str, nats_url: str
) -> None:
    """Invariant, in each of 100 rounds of 16 concurrent ``Refresh`` calls with one refresh token:

    - exactly one call succeeds;
    - every other call is refused: at least one as ``REFRESH_TOKEN_REUSED`` (the reuse that revokes the
      session), the rest as ``REFRESH_TOKEN_REUSED`` or ``REFRESH_TOKEN_INVALID`` (session already revoked);
    - the session is revoked for good: the winner's new access token is inactive by ``Introspect`` and
      refused by both resource replicas (``SESSION_REVOKED``), and the winner's new refresh token is refused.
    """
    async with running_auth(auth_settings(redis_url, [nats_url])) as (app, client):
        await client.create_user(*USER)
        auth = Auth(client.channel)
        service = await auth.service()
        channels = [grpc.aio.insecure_channel(app.grpc_address) for _ in range(CHANNELS)]
        stubs = [auth_pb2_grpc.AuthServiceStub(channel) for channel in channels]
        tallies: Counter[str] = Counter()
        try:
            async with in_process_replicas(app.grpc_address, [nats_url], 2) as replicas:
                for round_number in range(ROUNDS):
                    pair = await client.login(*USER)
                    request = auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)
                    results = await asyncio.gather(
                        *(
                            outcome(stubs[index % CHANNELS].Refresh(request, timeout=10))
                            for index in range(CONCURRENCY)
                        )
                    )
                    labels = Counter(label for label, _ in results)
                    tallies.update(labels)
                    assert labels[OK] == 1, f"round {round_number}: {dict(labels)}"
                    assert labels["REFRESH_TOKEN_REUSED"] >= 1, f"round {round_number}: {dict(labels)}"
                    assert set(labels) <= {OK, "REFRESH_TOKEN_REUSED", "REFRESH_TOKEN_INVALID"}, labels
                    (winner,) = [reply for label, reply in results if label == OK]

                    assert not await auth.active(winner.access_token, service)
                    assert not await auth.active(pair.access_token, service)
                    again, _ = await outcome(
                        client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=winner.refresh_token))
                    )
                    assert again == "REFRESH_TOKEN_INVALID"
                    # The reuse was broadcast before its RPC returned: the replicas have it already or
                    # within milliseconds.
                    await everywhere(replicas, winner.access_token, "SESSION_REVOKED", within=5)
        finally:
            for channel in channels:
                await channel.close()
        assert tallies[OK] == ROUNDS
