"""The propagation benchmark's driver: revokes tokens and gathers what the probers saw of each revocation."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from authmesh.bench.common import CpuAccount, JsonDict, Latency, Worker
from authmesh.bench.propagation_floor import FloorSampler
from authmesh.client import AuthApi
from authmesh.stack import LocalStack

VICTIM_USER = "bench-victim"
# A revocation that has not reached every replica by then counts as missing (and fails the goal).
DEADLINE_SECONDS = 3.0
# Quiet time between revocations, so one round's stragglers never overlap the next round.
SETTLE_SECONDS = 0.02


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


class Revoker:
    """Makes the revoking calls, from the driving process (an async context manager)."""

    def __init__(self, auth_target: str, caller: str) -> None:
        self._auth = AuthApi(auth_target, timeout=DEADLINE_SECONDS)
        self._caller = caller

    async def __aenter__(self) -> Revoker:
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


async def probed_rounds(
    probers: Sequence[Worker],
    revoker: Revoker,
    victims: Sequence[str],
    replica_count: int,
    interval_ms: float,
    floor: FloorSampler | None,
    progress: Callable[[str], None],
    label: str,
    account: CpuAccount,
) -> list[Round]:
    """Revoke each token with every replica probed, the floor sampled and the CPU accounted in between."""
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
        account.begin()
        started, returned = await revoker.revoke(victim)
        reports = await asyncio.gather(
            *(prober.request({"op": "report"}, timeout=DEADLINE_SECONDS + 10) for prober in probers)
        )
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


async def deadline_rounds(
    probers: Sequence[Worker],
    revoker: Revoker,
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


def summarise(rounds: Sequence[Round], attempted: int) -> JsonDict:
    """One replica count's figures: the last replica, the RPC, the event on the wire, what went missing."""
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
