"""The propagation benchmark's prober: watches replicas refuse a revoked token, in a worker process.

Each prober holds one warm channel to each of its share of the replicas and follows ``AUTH_EVENTS``
itself; it starts probing (with :func:`~authmesh.refusal_watch.watch_until_refused`) only once the
revocation event reaches it, and reports the ``time.monotonic_ns`` of every first refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from authmesh._shared.events import TokenRevokedEvent
from authmesh._shared.jose import b64url_decode
from authmesh._shared.nats_wiring import inbox_prefix
from authmesh.bench.common import JsonDict
from authmesh.refusal_watch import ACCEPTED, NO_ANSWER, REFUSED, Answer, watch_until_refused
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc

# Each probe's own gRPC deadline.
PROBE_TIMEOUT_SECONDS = 2.0


class Prober:
    """Warm channels to some replicas and a view of the event stream; watches a refusal spread.

    The driving process makes the revoking call; each prober is *armed* before it (primes its replicas
    with the token), starts probing once the event reaches its own subscription, and *reports* the
    ``time.monotonic_ns`` of every first refusal.
    """

    def __init__(self) -> None:
        self._replicas: list[Any] = []
        self._channels: list[grpc.aio.Channel] = []
        self._nats: NatsClient | None = None
        self._watching: dict[bytes, asyncio.Future[int]] = {}
        self._armed: asyncio.Task[JsonDict] | None = None

    async def setup(self, command: JsonDict) -> JsonDict:
        """Open channels to ``replicas``; watch the stream (``nats_urls``, ``nats_user``, ``nats_password``).

        Returns:
            How many replicas this prober watches.
        """
        await self.aclose()
        for target in command["replicas"]:
            channel = grpc.aio.insecure_channel(str(target))
            self._channels.append(channel)
            self._replicas.append(resource_pb2_grpc.ResourceServiceStub(channel).WhoAmI)
        self._nats = await nats.connect(
            servers=list(command["nats_urls"]),
            user=command["nats_user"],
            password=command["nats_password"],
            inbox_prefix=inbox_prefix(command["nats_user"]),
            connect_timeout=5,
            max_reconnect_attempts=0,
        )
        # The live copy of the stream, as the replicas follow it.
        await self._nats.subscribe(TokenRevokedEvent.TYPE.live_subject, cb=self._on_event)
        await self._nats.flush(timeout=5)
        return {"replicas": len(self._replicas)}

    async def _on_event(self, message: Msg) -> None:
        seen = time.monotonic_ns()
        try:
            payload = b64url_decode(message.data.split(b".")[1])
        except (IndexError, ValueError):
            return
        for jti, waiter in self._watching.items():
            if jti in payload and not waiter.done():
                waiter.set_result(seen)

    async def arm(self, command: JsonDict) -> JsonDict:
        """Prime every replica with ``victim``, then watch for its revocation in the background.

        Returns:
            ``primed``: whether every replica accepted the token (otherwise nothing is watched).
        """
        victim = str(command["victim"])
        interval = float(command["interval_ms"]) / 1000
        deadline = float(command["deadline_s"])
        accepts = _asker(victim)
        if not await self._prime(accepts):
            return {"primed": False}
        jti = json.loads(b64url_decode(victim.split(".")[1].encode()))["jti"].encode()
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._watching = {jti: seen}
        stop_at = time.monotonic_ns() + int(deadline * 1e9)

        async def watch(whoami: Any) -> JsonDict:
            watched = await watch_until_refused(
                lambda: accepts(whoami), until=stop_at, clock=time.monotonic_ns, interval=interval
            )
            refused = None if watched.refused_at is None else int(watched.refused_at)
            accepted = None if watched.last_accepted_sent is None else int(watched.last_accepted_sent)
            return {"rejected_ns": refused, "accepted_ns": accepted, "probes": watched.probes}

        async def follow() -> JsonDict:
            try:
                # No replica can refuse before the event exists: probing starts once it is on the wire.
                async with asyncio.timeout(deadline):
                    seen_ns = await seen
            except TimeoutError:
                return {"seen_ns": None, "replicas": []}
            finally:
                self._watching = {}
            watched = await asyncio.gather(*(watch(whoami) for whoami in self._replicas))
            return {"seen_ns": seen_ns, "replicas": watched}

        self._armed = asyncio.ensure_future(follow())
        return {"primed": True}

    async def _prime(self, accepts: Callable[[Any], Awaitable[Answer]]) -> bool:
        """Whether every replica accepts the token now (which also caches its verification there)."""
        primed = await asyncio.gather(*(accepts(whoami) for whoami in self._replicas))
        return all(answer.accepted for answer in primed)

    async def prime(self, command: JsonDict) -> JsonDict:
        """Ask every replica once with ``victim``; ``primed`` says whether all of them accepted it."""
        return {"primed": await self._prime(_asker(str(command["victim"])))}

    async def ask(self, command: JsonDict) -> JsonDict:
        """Ask every replica once with ``victim``, all at the same moment (``at_ns``, if given).

        Returns:
            Per replica: ``refused`` (None when it did not answer), ``sent_ns`` and ``answered_ns``.
        """
        accepts = _asker(str(command["victim"]))
        at_ns = command.get("at_ns")
        if at_ns is not None:
            # Aim half a millisecond early: a sleep ends on the next millisecond tick at the soonest.
            await asyncio.sleep(max(0.0, (int(at_ns) - time.monotonic_ns()) / 1e9 - 0.0005))

        async def one(whoami: Any) -> JsonDict:
            sent = time.monotonic_ns()
            answer = await accepts(whoami)
            return {
                "refused": answer.refused if answer.accepted or answer.refused else None,
                "sent_ns": sent,
                "answered_ns": time.monotonic_ns(),
            }

        return {"replicas": await asyncio.gather(*(one(whoami) for whoami in self._replicas))}

    async def report(self, command: JsonDict) -> JsonDict:
        """What the armed watch saw: ``seen_ns``; per replica ``rejected_ns``, ``accepted_ns``, ``probes``."""
        armed, self._armed = self._armed, None
        if armed is None:
            raise RuntimeError("not armed")
        return await armed

    async def aclose(self) -> None:
        """Close every channel and the stream view."""
        for channel in self._channels:
            await channel.close(grace=None)
        self._channels.clear()
        self._replicas.clear()
        client, self._nats = self._nats, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


def _asker(token: str) -> Callable[[Any], Awaitable[Answer]]:
    """Asks one replica's ``WhoAmI`` with ``token``: accepted, refused (``UNAUTHENTICATED``) or no answer."""
    metadata = (("authorization", f"Bearer {token}"),)
    request = resource_pb2.WhoAmIRequest()

    async def accepts(whoami: Any) -> Answer:
        try:
            await whoami(request, metadata=metadata, timeout=PROBE_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            return REFUSED if error.code() == grpc.StatusCode.UNAUTHENTICATED else NO_ANSWER
        return ACCEPTED

    return accepts
