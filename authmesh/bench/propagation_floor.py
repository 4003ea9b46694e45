"""The propagation benchmark's floor: the same machine's NATS fan-out, without authmesh.

:class:`FloorSubscriber` runs in the worker processes, :class:`FloorSampler` in the driving one; the
method is described in :mod:`authmesh.bench.propagation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import RePublish, StorageType, StreamConfig

from authmesh.bench.common import JsonDict, Latency, Worker

# Floor messages are about the size of a revocation event (a signed SET).
FLOOR_PAYLOAD_BYTES = 520
FLOOR_STREAM = "BENCH_FLOOR"
FLOOR_SUBJECT = "bench.floor"
# Where the floor stream republishes what it stores, as AUTH_EVENTS does to auth.live.>.
FLOOR_LIVE_SUBJECT = "bench.floor-live"
# Quiet time after each floor message, so its fan-out never overlaps what comes next.
FLOOR_GAP_SECONDS = 0.01
_FLOOR_COLLECT_SECONDS = 5.0


async def create_floor_stream(url: str) -> None:
    client = await nats.connect(servers=[url], connect_timeout=5, max_reconnect_attempts=0)
    try:
        await client.jetstream(timeout=5).add_stream(
            StreamConfig(
                name=FLOOR_STREAM,
                subjects=[f"{FLOOR_SUBJECT}.>"],
                storage=StorageType.FILE,
                republish=RePublish(src=f"{FLOOR_SUBJECT}.>", dest=f"{FLOOR_LIVE_SUBJECT}.>"),
            )
        )
    finally:
        await client.close()


class FloorSubscriber:
    """A plain nats-py subscriber that writes down when each floor message arrives."""

    def __init__(self) -> None:
        self._client: NatsClient | None = None
        self._arrivals: dict[str, dict[int, int]] = {"core": {}, "jetstream": {}}
        self._subscriptions: list[Any] = []

    async def subscribe(self, command: JsonDict) -> JsonDict:
        """Subscribe to ``subject`` on ``url``: a core subscription, and one to the stream's live copy."""
        await self.aclose()
        self._client = await nats.connect(
            servers=[str(command["url"])], connect_timeout=5, max_reconnect_attempts=0
        )
        subject = str(command["subject"])
        self._arrivals = {"core": {}, "jetstream": {}}

        def recorder(mode: str) -> Callable[[Msg], Any]:
            arrivals = self._arrivals[mode]

            async def record(message: Msg) -> None:
                arrivals[int(message.data[:12])] = time.monotonic_ns()

            return record

        self._subscriptions.append(await self._client.subscribe(f"{subject}.core", cb=recorder("core")))
        live = subject.replace(FLOOR_SUBJECT, FLOOR_LIVE_SUBJECT, 1)
        self._subscriptions.append(await self._client.subscribe(f"{live}.js", cb=recorder("jetstream")))
        await self._client.flush(timeout=5)
        return {"subscribed": subject}

    async def collect(self, command: JsonDict) -> JsonDict:
        """Every arrival so far: mode → message index → ``monotonic_ns``."""
        return {
            mode: {str(index): at for index, at in arrivals.items()}
            for mode, arrivals in self._arrivals.items()
        }

    async def aclose(self) -> None:
        """Unsubscribe and disconnect."""
        client, self._client = self._client, None
        self._subscriptions.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


class FloorSampler:
    """The fan-out floor: publishes to N subscriber processes between revocations, and times them.

    Args:
        subscribers: The subscriber processes (one per replica being compared).
        url: The floor's own NATS server.
        run_id: Makes the subjects of this run unique.
    """

    def __init__(self, subscribers: Sequence[Worker], url: str, run_id: int) -> None:
        self._subscribers = subscribers
        self._url = url
        self._subject = f"{FLOOR_SUBJECT}.{run_id}"
        self._sent: dict[str, dict[int, int]] = {"core": {}, "jetstream": {}}
        self._client: NatsClient | None = None

    async def __aenter__(self) -> FloorSampler:
        for subscriber in self._subscribers:
            await subscriber.request({"op": "subscribe", "url": self._url, "subject": self._subject})
        self._client = await nats.connect(servers=[self._url], connect_timeout=5, max_reconnect_attempts=0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def publish(self, index: int) -> None:
        """One core publish and one JetStream publish, each followed by a quiet gap."""
        client = self._client
        assert client is not None  # entered
        payload = f"{index:012d}".encode().ljust(FLOOR_PAYLOAD_BYTES, b".")
        self._sent["core"][index] = time.monotonic_ns()
        await client.publish(f"{self._subject}.core", payload)
        await client.flush(timeout=5)
        await asyncio.sleep(FLOOR_GAP_SECONDS)
        self._sent["jetstream"][index] = time.monotonic_ns()
        await client.jetstream(timeout=5).publish(f"{self._subject}.js", payload, timeout=5)
        await asyncio.sleep(FLOOR_GAP_SECONDS)

    async def results(self) -> dict[str, JsonDict]:
        """Per mode: the latency to the last subscriber, and how many messages some subscriber missed."""
        collected = [
            await subscriber.request({"op": "collect"}, timeout=_FLOOR_COLLECT_SECONDS)
            for subscriber in self._subscribers
        ]
        for subscriber in self._subscribers:
            await subscriber.request({"op": "unsubscribe"})
        result = {}
        for mode, times in self._sent.items():
            last = []
            missing = 0
            for index, at in times.items():
                arrivals = [arrival[mode].get(str(index)) for arrival in collected]
                if None in arrivals:
                    missing += 1
                    continue
                last.append((max(int(arrival) for arrival in arrivals) - at) / 1e6)
            result[mode] = {"latency": Latency.of(last).to_json(), "missing": missing}
        return result
