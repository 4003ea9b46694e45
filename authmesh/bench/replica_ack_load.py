"""``authmesh bench replica-ack``'s load generator: ``python -m authmesh.bench.replica_ack_load --worker``.

:class:`RevocationLoad` is :class:`~authmesh.bench.rpc.LoadGenerator` with what the bench adds: a
``revoke`` kind of call that revokes a token no call has revoked yet, ``mint`` to fill the pool of such
tokens beforehand, and ``redis_floor``, which times one write script on the Redis primary with and
without ``WAIT 1`` (the floor of what waiting for a replica costs, without gRPC or an auth service).
"""

from __future__ import annotations

import asyncio
import sys
import time

import redis.asyncio as redis

from authmesh._auth_service.redis_scripts import LuaScript, ReplicaAck, ScriptRunner
from authmesh._shared.tls import TlsFiles, redis_tls_options
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.bench.common import JsonDict, Latency, serve_worker
from authmesh.bench.rpc import CALL_TIMEOUT_SECONDS, Call, LoadGenerator
from authmesh.processes import LOOPBACK

# AUTHMESH_REDIS_REPLICA_ACK_TIMEOUT's default, set for both services whatever the environment says.
REPLICA_ACK_TIMEOUT_SECONDS = 1.0
REVOKE_REASON = "bench replica-ack"
# The floor: one write the size of a revocation's outbox entry, through the auth service's script runner.
FLOOR_SCRIPT = LuaScript.of("return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])")
FLOOR_KEY_PREFIX = "bench:replica-ack:"
FLOOR_VALUE = "x" * 400
FLOOR_KEY_TTL_MS = 60_000
FLOOR_ACKS: dict[str, ReplicaAck | None] = {
    "no_wait": None,
    "wait": ReplicaAck(1, int(REPLICA_ACK_TIMEOUT_SECONDS * 1000)),
}


class TokensRanOut(Exception):
    """The load generator revoked every token minted for it before the slice ended."""


class StaleToken(Exception):
    """A token to revoke had expired: its revocation wrote nothing."""


class RevocationLoad(LoadGenerator):
    """:class:`~authmesh.bench.rpc.LoadGenerator` with one more kind of call, ``revoke``.

    Caller *i* of ``revoke`` takes the next unrevoked access token from the pool ``mint`` filled and
    revokes it with ``RevokeToken``, authorized by the ``revoker`` token given to ``setup``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._revocable: list[str] = []
        self._revoker = ""

    async def setup(self, command: JsonDict) -> JsonDict:
        """:meth:`LoadGenerator.setup`, and ``revoker``: the access token ``RevokeToken`` is called with."""
        answer = await super().setup(command)
        if "revoker" in command:
            self._revoker = str(command["revoker"])
        return {**answer, "revocable": len(self._revocable)}

    async def mint(self, command: JsonDict) -> JsonDict:
        """Add ``count`` access tokens to the pool: refresh every chain on ``target`` until there are.

        Returns:
            ``revocable``: the tokens in the pool now.
        """
        target, count = str(command["target"]), int(command["count"])
        if count < 0 or not self._refresh:
            raise ValueError("minting needs refresh tokens (setup) and a count of 0 or more")
        refresh = auth_pb2_grpc.AuthServiceStub(self._channel(target)).Refresh
        chains, pool = self._refresh, self._revocable
        wanted = len(pool) + count

        async def chain(index: int) -> None:
            while len(pool) < wanted:  # every turn adds one token or raises
                pair = await refresh(
                    auth_pb2.RefreshRequest(refresh_token=chains[index]), timeout=CALL_TIMEOUT_SECONDS
                )
                chains[index] = pair.refresh_token
                pool.append(pair.access_token)

        await asyncio.gather(*(chain(index) for index in range(len(chains))))
        return {"revocable": len(pool)}

    async def redis_floor(self, command: JsonDict) -> JsonDict:
        """Time one write script on the primary at ``port`` with and without ``WAIT 1``, one call at a time.

        The two alternate in ``slices`` slices of ``calls`` calls each (the order flips every pair), on
        the auth service's own :class:`ScriptRunner`: what ``WAIT`` costs in Redis alone, without gRPC.

        Returns:
            Per ``no_wait`` and ``wait``: ``latency`` over every call (ms).
        """
        slices, calls = int(command["slices"]), int(command["calls"])
        samples: dict[str, list[float]] = {name: [] for name in FLOOR_ACKS}
        async with redis_client(int(command["port"]), self._tls) as client:
            runner = ScriptRunner(client.connection_pool)
            for index in range(slices):
                order = list(FLOOR_ACKS) if index % 2 == 0 else list(FLOOR_ACKS)[::-1]
                for name in order:
                    for call in range(calls):
                        key = f"{FLOOR_KEY_PREFIX}{name}:{index}:{call}"
                        started = time.perf_counter_ns()
                        await runner.run(
                            FLOOR_SCRIPT, [key], [FLOOR_VALUE, FLOOR_KEY_TTL_MS], ack=FLOOR_ACKS[name]
                        )
                        samples[name].append((time.perf_counter_ns() - started) / 1e6)
        return {name: {"latency": Latency.of(values).to_json()} for name, values in samples.items()}

    async def pool(self, command: JsonDict) -> JsonDict:
        """``revocable``: the tokens in the pool now."""
        return {"revocable": len(self._revocable)}

    def _caller(self, kind: str, target: str, index: int) -> Call:
        if kind != "revoke":
            return super()._caller(kind, target, index)
        revoke = auth_pb2_grpc.AuthServiceStub(self._channel(target)).RevokeToken
        metadata = (("authorization", f"Bearer {self._revoker}"),)
        pool = self._revocable

        async def revoke_one() -> None:
            if not pool:
                raise TokensRanOut("every minted token is revoked: mint more before the slice")
            request = auth_pb2.RevokeTokenRequest(token=pool.pop(), reason=REVOKE_REASON)
            answer = await revoke(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
            if not answer.event_id:
                raise StaleToken("a token to revoke had expired: its revocation wrote nothing")

        return revoke_one


def worker_main() -> None:
    """The load generator's entry point (``python -m authmesh.bench.replica_ack_load --worker``)."""
    load = RevocationLoad()
    serve_worker(
        {
            "setup": load.setup,
            "run": load.run,
            "mint": load.mint,
            "pool": load.pool,
            "redis_floor": load.redis_floor,
        }
    )


def redis_client(port: int, tls: TlsFiles) -> redis.Redis:
    """A client of the Redis server at ``port`` (on TLS, with ``tls``'s CA and client certificate)."""
    options = {"ssl": True, **redis_tls_options("rediss://", tls)} if tls.ca_file is not None else {}
    return redis.Redis(host=LOOPBACK, port=port, socket_timeout=5, **options)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
