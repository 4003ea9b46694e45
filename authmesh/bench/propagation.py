"""``authmesh bench propagation``: from a revocation RPC to every replica refusing the token.

**What is timed.** For 10, 3 and 1 replicas (one :class:`~authmesh.stack.LocalStack` with 10, then
replicas stopped), each of ``revocations`` rounds revokes a fresh access token with ``RevokeToken`` and
times, from the start of that RPC, until the *last* replica refuses the token. The report gives p50, p99
and max over rounds of that slowest replica, the RPC's own duration, and when the event went out.

**How refusal is seen.** Prober processes (one per CPU; each an asyncio loop with one warm channel to
each of its share of the replicas) watch for it; the driving process makes the revoking call. Before
the call every replica is primed with the token (it accepts it, and caches the verification). Each
prober also follows ``AUTH_EVENTS`` itself, and starts probing only when the revocation event reaches it:
before the event exists no replica can refuse, and probes then would only take CPU from the auth service.
From then on each replica is asked ``WhoAmI`` with the token, one call in flight per replica, the next
one ``interval_ms`` after an answer that still accepts. A replica's time is the arrival of its first
refusal: an upper bound that includes one round trip (the send time of its last accepting call is kept
as a lower bound). Times cross processes as ``time.monotonic_ns()``, one clock for the whole machine.

Each probe costs a replica about what a health check costs (a few hundred µs of CPU in Python gRPC),
so probes are few (about one per replica and revocation) and spread over one prober per CPU; on a
machine with fewer cores than replicas they still compete with the replicas applying the event. The
replicas' own view, with no probe involved, is read from their propagation histograms
(``authmesh_revocation_propagation_lag_seconds``: event time to applied) and shown beside.

**The floor.** The same machine's NATS fan-out without authmesh: a dedicated ``nats-server`` (JetStream,
file storage and a republished live copy, like ``AUTH_EVENTS``), N subscriber processes (plain nats-py,
one core subscription to the live copy each, as the replicas consume) and one publisher; a message's
time is from just before the publish until the last subscriber has it. The same for a core NATS
subscription. The floor is sampled between revocations (one message after each), so both see the same
background load.

Goal: p99 at most 10 ms with 10 replicas. This module is also the prober and the floor subscriber:
``python -m authmesh.bench.propagation --worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import RePublish, StorageType, StreamConfig
from rich.table import Table

from authmesh._shared.events import TokenRevokedEvent
from authmesh._shared.jose import b64url_decode
from authmesh._shared.nats_wiring import inbox_prefix
from authmesh.bench.common import (
    CpuAccount,
    Goal,
    JsonDict,
    Latency,
    Worker,
    add_goal_rows,
    bar_chart,
    cpus,
    environment,
    judge,
    measure_and_report,
    serve_worker,
)
from authmesh.client import AuthApi
from authmesh.processes import NatsServer
from authmesh.refusal_watch import ACCEPTED, NO_ANSWER, REFUSED, Answer, watch_until_refused
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.stack import READER_NATS_USER, LocalStack

GOAL_P99_MS = 10.0
# How the CPU account groups the run's processes.
CPU_PARTS = ("auth", "nats", "redis", "replicas", "probers", "driver")
REPLICA_COUNTS = (10, 3, 1)
VICTIM_USER = "bench-victim"
# A revocation that has not reached every replica by then counts as missing (and fails the goal).
DEADLINE_SECONDS = 3.0
# Each probe's own gRPC deadline.
PROBE_TIMEOUT_SECONDS = 2.0
# Quiet time between revocations, so one round's stragglers never overlap the next round.
SETTLE_SECONDS = 0.02
# Floor messages are about the size of a revocation event (a signed SET).
FLOOR_PAYLOAD_BYTES = 520
FLOOR_STREAM = "BENCH_FLOOR"
FLOOR_SUBJECT = "bench.floor"
# Where the floor stream republishes what it stores, as AUTH_EVENTS does to auth.live.>.
FLOOR_LIVE_SUBJECT = "bench.floor-live"
# Quiet time after each floor message, so its fan-out never overlaps what comes next.
FLOOR_GAP_SECONDS = 0.01
_FLOOR_COLLECT_SECONDS = 5.0
# Bucket bounds of the replicas' propagation histogram the report reads (seconds).
REPLICA_VIEW_BOUNDS = (0.0025, 0.005, 0.01, 0.025)
_PROPAGATION_BUCKETS_METRIC = "authmesh_revocation_propagation_lag_seconds_bucket"
GOALS = (Goal("p99_ms_at_10", "p99, RevokeToken → last of 10 replicas refusing", GOAL_P99_MS, False, "ms"),)


# --- the prober (worker side) -------------------------------------------------------------------------


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


def worker_main() -> None:
    """The prober's and floor subscriber's entry point (``python -m authmesh.bench.propagation --worker``)."""
    prober = Prober()
    subscriber = FloorSubscriber()

    async def unsubscribe(command: JsonDict) -> JsonDict:
        await subscriber.aclose()
        return {"closed": True}

    serve_worker(
        {
            "setup": prober.setup,
            "arm": prober.arm,
            "report": prober.report,
            "prime": prober.prime,
            "ask": prober.ask,
            "subscribe": subscriber.subscribe,
            "collect": subscriber.collect,
            "unsubscribe": unsubscribe,
        }
    )


# --- the driving side ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Round:
    """One revocation's spread.

    Attributes:
        rpc_ms: How long ``RevokeToken`` took.
        seen_ms: When the event reached the prober's own subscription (None if it did not in time).
        last_ms: Arrival of the last replica's first refusal (None if one never refused in time).
        last_lower_ms: The latest send time of an accepting probe, over replicas: a lower bound.
        probes: Probe calls made, over every replica.
    """

    rpc_ms: float
    seen_ms: float | None
    last_ms: float | None
    last_lower_ms: float | None
    probes: int


async def victim_tokens(stack: LocalStack, count: int) -> tuple[str, list[str]]:
    """The admin's access token, and ``count`` distinct access tokens of one user (refresh chain)."""
    async with AuthApi(stack.auth_grpc) as auth:
        admin = await auth.admin_login(*stack.admin_credentials)
        password = "bench-password-victim-1"
        await auth.create_user(admin.access_token, VICTIM_USER, password, ("docs:read",))
        tokens = await auth.login(VICTIM_USER, password)
        victims = [tokens.access_token]
        while len(victims) < count:
            tokens = await auth.refresh(tokens.refresh_token)
            victims.append(tokens.access_token)
    return admin.access_token, victims


class _Revoker:
    """Makes the revoking calls, from the driving process (an async context manager)."""

    def __init__(self, auth_target: str, caller: str) -> None:
        self._auth = AuthApi(auth_target, timeout=DEADLINE_SECONDS)
        self._caller = caller

    async def __aenter__(self) -> _Revoker:
        self._auth.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._auth.aclose()

    def start(self, token: str) -> tuple[int, Awaitable[Any]]:
        """Start revoking ``token``; the ``monotonic_ns`` just before the call, and the call to await."""
        started = time.monotonic_ns()
        return started, asyncio.ensure_future(self._auth.revoke_token(self._caller, token, "benchmark"))

    async def revoke(self, token: str) -> tuple[int, int]:
        """Revoke ``token``; the ``monotonic_ns`` just before the call and at its answer."""
        started, call = self.start(token)
        await call
        return started, time.monotonic_ns()


async def _propagation_rounds(
    probers: Sequence[Worker],
    revoker: _Revoker,
    victims: Sequence[str],
    replica_count: int,
    interval_ms: float,
    floor: _Floor | None,
    progress: Callable[[str], None],
    label: str,
    account: CpuAccount | None = None,
) -> list[Round]:
    rounds = []
    arm = {"op": "arm", "interval_ms": interval_ms, "deadline_s": DEADLINE_SECONDS}
    for index, victim in enumerate(victims):
        if index % 50 == 0:
            progress(f"{label}: revocation {index + 1} of {len(victims)}")
        armed = await asyncio.gather(*(prober.request({**arm, "victim": victim}) for prober in probers))
        if not all(answer["primed"] for answer in armed):
            for prober, answer in zip(probers, armed, strict=True):
                if answer["primed"]:
                    await prober.request({"op": "report"}, timeout=DEADLINE_SECONDS + 10)
            continue
        if account is not None:
            account.begin()
        started, returned = await revoker.revoke(victim)
        reports = await asyncio.gather(
            *(prober.request({"op": "report"}, timeout=DEADLINE_SECONDS + 10) for prober in probers)
        )
        if account is not None:
            # From the revoking call to the last refusal reported: what the spread itself cost.
            account.end()
        replicas = [replica for report in reports for replica in report["replicas"]]
        seen = [report["seen_ns"] for report in reports if report["seen_ns"] is not None]
        rejected = [replica["rejected_ns"] for replica in replicas]
        lower = [replica["accepted_ns"] for replica in replicas if replica["accepted_ns"] is not None]
        complete = len(replicas) == replica_count and None not in rejected
        rounds.append(
            Round(
                rpc_ms=(returned - started) / 1e6,
                seen_ms=(min(seen) - started) / 1e6 if seen else None,
                last_ms=(max(rejected) - started) / 1e6 if complete else None,
                last_lower_ms=(max(lower) - started) / 1e6 if lower else None,
                probes=sum(int(replica["probes"]) for replica in replicas),
            )
        )
        await asyncio.sleep(SETTLE_SECONDS)
        if floor is not None:
            # The floor takes its samples between revocations: both see the same background load.
            await floor.publish(index)
    return rounds


async def _deadline_rounds(
    probers: Sequence[Worker],
    revoker: _Revoker,
    victims: Sequence[str],
    replica_count: int,
    at_ms: float,
    progress: Callable[[str], None],
    label: str,
) -> JsonDict:
    """Revoke each token and ask every replica once, ``at_ms`` after the call started, with no probe before.

    Returns:
        ``rounds``, ``all_refused_share`` (rounds in which every replica refused when asked) and when the
        replicas were actually asked (``asked``, ms after the start of the call: a sleep is never exact).
    """
    all_refused = 0
    rounds = 0
    asked: list[float] = []
    for index, victim in enumerate(victims):
        if index % 50 == 0:
            progress(
                f"{label}: asking every replica {at_ms:g} ms after revocation {index + 1} of {len(victims)}"
            )
        primed = await asyncio.gather(
            *(prober.request({"op": "prime", "victim": victim}) for prober in probers)
        )
        if not all(answer["primed"] for answer in primed):
            continue
        started, call = revoker.start(victim)
        # The probers wait for the moment themselves: no message between processes delays the asking.
        ask = {"op": "ask", "victim": victim, "at_ns": started + int(at_ms * 1e6)}
        answers = await asyncio.gather(*(prober.request(ask) for prober in probers))
        await call
        replicas = [replica for answer in answers for replica in answer["replicas"]]
        rounds += 1
        if len(replicas) == replica_count and all(replica["refused"] is True for replica in replicas):
            all_refused += 1
        asked.append((max(replica["sent_ns"] for replica in replicas) - started) / 1e6)
        await asyncio.sleep(SETTLE_SECONDS)
    return {
        "at_ms": at_ms,
        "rounds": rounds,
        "all_refused": all_refused,
        "all_refused_share": all_refused / rounds if rounds else None,
        "asked": Latency.of(asked).to_json(),
    }


async def _replica_histograms(http_addresses: Sequence[str]) -> list[dict[float, float]]:
    """Each replica's own propagation histogram (``le`` → cumulative count, token revocations)."""
    histograms = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for address in http_addresses:
            async with session.get(f"http://{address}/metrics") as response:
                text = await response.text()
            buckets: dict[float, float] = {}
            for line in text.splitlines():
                if line.startswith(_PROPAGATION_BUCKETS_METRIC) and 'type="revoked.token"' in line:
                    le = line.split('le="', 1)[1].split('"', 1)[0]
                    buckets[float(le)] = float(line.rsplit(" ", 1)[1])
            histograms.append(buckets)
    return histograms


def _share_within(
    before: Sequence[dict[float, float]], after: Sequence[dict[float, float]], bound: float
) -> float | None:
    """The share of revocations each replica applied within ``bound`` seconds (the worst replica)."""
    shares = []
    for old, new in zip(before, after, strict=True):
        total = new.get(float("inf"), 0.0) - old.get(float("inf"), 0.0)
        if total <= 0:
            continue
        within = new.get(bound, 0.0) - old.get(bound, 0.0)
        shares.append(within / total)
    return min(shares) if shares else None


class _Floor:
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

    async def __aenter__(self) -> _Floor:
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


def _cpu_per_round(used: Mapping[str, float], rounds: int) -> dict[str, float]:
    """CPU milliseconds per revocation by part of the system: auth, NATS, Redis, replicas, probers, driver."""
    parts = dict.fromkeys(CPU_PARTS, 0.0)
    for name, seconds in used.items():
        part = _cpu_part(name)
        if part in parts:
            parts[part] += seconds * 1000 / max(rounds, 1)
    parts["total"] = sum(parts[part] for part in CPU_PARTS)
    return parts


def _cpu_part(process: str) -> str:
    """The part of the system a process of the run belongs to (a name of :data:`CPU_PARTS`)."""
    if process == CpuAccount.SELF:
        return "driver"
    if process == "authmesh-nats":
        return "nats"
    if process.startswith("resource-"):
        return "replicas"
    if process.startswith("prober-"):
        return "probers"
    return process  # auth, redis


def _summary(rounds: Sequence[Round], attempted: int) -> JsonDict:
    arrived = [round_.last_ms for round_ in rounds if round_.last_ms is not None]
    lower = [round_.last_lower_ms for round_ in rounds if round_.last_lower_ms is not None]
    return {
        "revocations": attempted,
        "measured": len(arrived),
        "missing": attempted - len(arrived),
        "last_replica": Latency.of(arrived).to_json(),
        "last_replica_lower_bound_p50_ms": statistics.median(lower) if lower else None,
        "rpc": Latency.of([round_.rpc_ms for round_ in rounds]).to_json(),
        "event_seen": Latency.of(
            [round_.seen_ms for round_ in rounds if round_.seen_ms is not None]
        ).to_json(),
        "probes_per_revocation": statistics.fmean(round_.probes for round_ in rounds) if rounds else 0.0,
    }


async def measure(
    *,
    replica_counts: Sequence[int] = REPLICA_COUNTS,
    revocations: int = 200,
    interval_ms: float = 1.0,
    probers: int | None = None,
    with_floor: bool = True,
    check_at_ms: float | None = GOAL_P99_MS,
    progress: Callable[[str], None] = lambda _: None,
) -> JsonDict:
    """Run the benchmark.

    Args:
        replica_counts: How many replicas, in turn (one stack with the most, then replicas stopped).
        revocations: Revocations timed per replica count.
        interval_ms: A probe's pause after an accepting answer.
        probers: Prober processes the replicas are shared among; one per CPU (at most one per replica)
            when None.
        with_floor: Measure the NATS fan-out floor too (one sample after each revocation).
        check_at_ms: Then revoke as many tokens again and ask every replica once this long after each
            call started, with no probe before (None skips this check).
        progress: Told what is being measured.

    Returns:
        A JSON-ready result (see ``docs/benchmarks.md``).
    """
    if revocations < 1 or interval_ms < 0 or not replica_counts or min(replica_counts) < 1:
        raise ValueError("revocations and replica counts must be positive, the interval not negative")
    if probers is not None and probers < 1:
        raise ValueError("probers must be positive")
    counts = sorted(set(replica_counts), reverse=True)
    most = counts[0]
    prober_count = min(most, probers if probers is not None else len(cpus()))
    progress(f"starting a local stack with {most} replicas")
    levels: list[JsonDict] = []
    with tempfile.TemporaryDirectory(prefix="authmesh-bench-floor-") as floor_dir:
        async with contextlib.AsyncExitStack() as resources:
            stack = await resources.enter_async_context(LocalStack(replicas=most))
            floor_nats = await resources.enter_async_context(NatsServer(Path(floor_dir)))
            await _create_floor_stream(floor_nats.url)
            prober_workers = [
                await resources.enter_async_context(Worker("authmesh.bench.propagation", f"prober {index}"))
                for index in range(prober_count)
            ]
            subscribers = [
                await resources.enter_async_context(
                    Worker("authmesh.bench.propagation", f"subscriber {index}")
                )
                for index in range(most if with_floor else 0)
            ]
            per_level = revocations * (2 if check_at_ms is not None else 1)
            caller, victims = await victim_tokens(stack, per_level * len(counts))
            revoker = await resources.enter_async_context(_Revoker(stack.auth_grpc, caller))
            assert stack.secrets is not None  # the stack is started
            reader = stack.secrets.nats_replica(READER_NATS_USER)
            running = most
            for level_index, count in enumerate(counts):
                while running > count:
                    running -= 1
                    await stack.stop_replica(running)
                replicas = stack.replicas[:count]
                active = prober_workers[: min(count, prober_count)]
                for index, prober in enumerate(active):
                    await prober.request(
                        {
                            "op": "setup",
                            "replicas": [replica.grpc for replica in replicas[index :: len(active)]],
                            "nats_urls": stack.nats_urls,
                            "nats_user": reader.username,
                            "nats_password": reader.password,
                        }
                    )
                before = await _replica_histograms([replica.http for replica in replicas])
                batch = victims[level_index * per_level : level_index * per_level + revocations]
                floor = None
                async with contextlib.AsyncExitStack() as level_resources:
                    if with_floor:
                        sampler = await level_resources.enter_async_context(
                            _Floor(subscribers[:count], floor_nats.url, level_index)
                        )
                    account = CpuAccount(
                        {**stack.pids(), **{f"prober-{i}": prober.pid for i, prober in enumerate(active)}}
                    )
                    rounds = await _propagation_rounds(
                        active,
                        revoker,
                        batch,
                        count,
                        interval_ms,
                        sampler if with_floor else None,
                        progress,
                        f"{count} replicas",
                        account,
                    )
                    cpu_per_round = _cpu_per_round(account.used, account.windows)
                    if with_floor:
                        floor = await sampler.results()
                after = await _replica_histograms([replica.http for replica in replicas])
                unperturbed = None
                if check_at_ms is not None:
                    unperturbed = await _deadline_rounds(
                        active,
                        revoker,
                        victims[level_index * per_level + revocations : (level_index + 1) * per_level],
                        count,
                        check_at_ms,
                        progress,
                        f"{count} replicas",
                    )
                    # The replicas' own view of these rounds, in which nothing probed them before the
                    # deadline: when each applied the event, without the observer's load.
                    quiet = await _replica_histograms([replica.http for replica in replicas])
                    unperturbed["replica_view_within"] = {
                        f"{bound * 1000:g}": _share_within(after, quiet, bound)
                        for bound in REPLICA_VIEW_BOUNDS
                    }
                levels.append(
                    {
                        "replicas": count,
                        "probers": len(active),
                        **_summary(rounds, len(batch)),
                        # The slowest replica's share of events applied within each bound (ms).
                        "replica_view_within": {
                            f"{bound * 1000:g}": _share_within(before, after, bound)
                            for bound in REPLICA_VIEW_BOUNDS
                        },
                        "floor": floor,
                        "unperturbed": unperturbed,
                        # Every process's CPU from the revoking call to the last refusal (the RPC, the
                        # event's delivery and application, the probes), and the wall time that much CPU
                        # takes at the least on this machine's CPUs.
                        "cpu_ms_per_round": cpu_per_round,
                        "cpu_floor_ms": cpu_per_round["total"] / len(cpus()),
                    }
                )
    levels.sort(key=lambda level: level["replicas"])
    at_ten = next((level for level in levels if level["replicas"] == 10), None)
    p99_at_ten = None
    if at_ten is not None and at_ten["missing"] == 0:
        p99_at_ten = at_ten["last_replica"]["p99"]
    elif at_ten is not None:
        p99_at_ten = float("inf")
    return {
        "benchmark": "propagation",
        "environment": environment(),
        "config": {
            "replica_counts": counts,
            "revocations": revocations,
            "interval_ms": interval_ms,
            "probers": prober_count,
            "floor": with_floor,
            "check_at_ms": check_at_ms,
            "deadline_s": DEADLINE_SECONDS,
        },
        "levels": levels,
        **judge(GOALS, {"p99_ms_at_10": p99_at_ten}),
    }


async def _create_floor_stream(url: str) -> None:
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


def run(**options: Any) -> JsonDict:
    """:func:`measure` from synchronous code."""
    return asyncio.run(measure(**options))


def render(result: Mapping[str, Any]) -> Table:
    """The result of :func:`run` as a table."""
    config = result["config"]
    table = Table(
        title=f"revocation propagation: RevokeToken start → last replica refusing, {config['revocations']} "
        f"revocations per row, probes {config['interval_ms']:g} ms apart"
    )
    for column in ("replicas", "what", "p50 ms", "p99 ms", "max ms", "note"):
        table.add_column(column, justify="left" if column in ("what", "note") else "right")
    for level in result["levels"]:
        last = level["last_replica"]
        missing = f"{level['missing']} never refused" if level["missing"] else ""
        shown = _view_shares(level.get("replica_view_within"))
        note = f"replicas' own view: {shown}" if shown else ""
        table.add_row(
            str(level["replicas"]),
            "authmesh: last replica refusing",
            f"{last['p50']:.2f}",
            f"{last['p99']:.2f}",
            f"{last['max']:.2f}",
            missing or note,
        )
        rpc = level["rpc"]
        table.add_row(
            "", "RevokeToken RPC itself", f"{rpc['p50']:.2f}", f"{rpc['p99']:.2f}", f"{rpc['max']:.2f}", ""
        )
        seen = level["event_seen"]
        table.add_row(
            "",
            "event on the wire (prober's subscription)",
            f"{seen['p50']:.2f}",
            f"{seen['p99']:.2f}",
            f"{seen['max']:.2f}",
            "",
        )
        check = level.get("unperturbed")
        if check is not None and check["all_refused_share"] is not None:
            table.add_row(
                "",
                f"no probe before: every replica refusing when asked at {check['at_ms']:g} ms",
                "",
                "",
                "",
                f"{check['all_refused_share']:.1%} of {check['rounds']} (asked at p50 "
                f"{check['asked']['p50']:.1f}, max {check['asked']['max']:.1f} ms)",
            )
            quiet_shown = _view_shares(check.get("replica_view_within"))
            if quiet_shown:
                table.add_row(
                    "",
                    "no probe before: replicas' own view (slowest replica applied)",
                    "",
                    "",
                    "",
                    quiet_shown,
                )
        cpu = level.get("cpu_ms_per_round")
        if cpu is not None:
            table.add_row(
                "",
                f"CPU per revocation, all processes: {cpu['total']:.1f} ms; on "
                f"{result['environment'].get('cpus', '?')} CPUs it needs ≥ {level['cpu_floor_ms']:.1f} ms",
                "",
                "",
                "",
                ", ".join(f"{part} {cpu[part]:.1f}" for part in CPU_PARTS),
            )
        for mode, label in (
            ("jetstream", "floor: JetStream publish → last subscriber"),
            ("core", "floor: core NATS"),
        ):
            floor = (level.get("floor") or {}).get(mode)
            if floor is None:
                continue
            latency = floor["latency"]
            lost = f"{floor['missing']} lost" if floor["missing"] else ""
            table.add_row(
                "", label, f"{latency['p50']:.2f}", f"{latency['p99']:.2f}", f"{latency['max']:.2f}", lost
            )
        table.add_section()
    add_goal_rows(table, result, 4)
    return table


def _view_shares(view: Mapping[str, float | None] | None) -> str:
    """A replicas'-own-view entry as text: the slowest replica's shares within 5 and 10 ms."""
    return ", ".join(
        f"{share:.0%} ≤ {bound} ms"
        for bound, share in (view or {}).items()
        if share is not None and bound in ("5", "10")
    )


def draw(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """A chart of :func:`run`'s result: p50 and p99 by replica count, beside the floor."""
    levels = result["levels"]
    series: dict[str, list[float]] = {}
    for quantile in ("p50", "p99"):
        series[f"authmesh {quantile}"] = [level["last_replica"][quantile] for level in levels]
        series[f"JetStream floor {quantile}"] = [
            (level.get("floor") or {}).get("jetstream", {}).get("latency", {}).get(quantile, float("nan"))
            for level in levels
        ]
    chart = bar_chart(
        directory / "propagation.png",
        title="RevokeToken start → last replica refusing, beside the NATS fan-out floor",
        groups=[f"{level['replicas']} replica{'s' if level['replicas'] > 1 else ''}" for level in levels],
        series=series,
        ylabel="ms",
        goal=GOAL_P99_MS,
        goal_label="goal: p99 at 10 replicas",
    )
    return [chart]


def main(
    json_path: Path | None,
    plot_dir: Path | None,
    *,
    revocations: int,
    interval_ms: float,
    probers: int | None = None,
    with_floor: bool = True,
    check_at_ms: float | None = GOAL_P99_MS,
    replica_counts: Sequence[int] = REPLICA_COUNTS,
) -> int:
    """Run the benchmark, print the table, write JSON and charts if asked.

    Returns:
        The exit status: 0 when the goal is met, 1 otherwise.
    """
    return measure_and_report(
        "propagation",
        "measuring revocation propagation…",
        lambda progress: run(
            replica_counts=replica_counts,
            revocations=revocations,
            interval_ms=interval_ms,
            probers=probers,
            with_floor=with_floor,
            check_at_ms=check_at_ms,
            progress=progress,
        ),
        render,
        draw,
        json_path,
        plot_dir,
    )


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
