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

Goal: p99 at most 10 ms with 10 replicas. The jobs live beside this module: the probers and floor
subscribers run as :mod:`~authmesh.bench.propagation_worker` processes (:mod:`.propagation_prober`,
:mod:`.propagation_floor`), the revocations are driven by :mod:`.propagation_driver`, the replicas' own
view is read by :mod:`.propagation_replica_view`, CPU is accounted by :mod:`.propagation_cpu`, and the
result is shown by :mod:`.propagation_report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from authmesh.bench.common import CpuAccount, JsonDict, Worker, cpus, environment, judge, measure_and_report
from authmesh.bench.propagation_cpu import cpu_ms_per_round
from authmesh.bench.propagation_driver import (
    DEADLINE_SECONDS,
    Revoker,
    deadline_rounds,
    probed_rounds,
    summarise,
    victim_tokens,
)
from authmesh.bench.propagation_floor import FloorSampler, create_floor_stream
from authmesh.bench.propagation_replica_view import REPLICA_VIEW_BOUNDS, replica_histograms, share_within
from authmesh.bench.propagation_report import GOAL_P99_MS, GOALS, draw, render
from authmesh.processes import NatsServer
from authmesh.stack import READER_NATS_USER, LocalStack

__all__ = ["REPLICA_COUNTS", "draw", "main", "measure", "render", "run"]

REPLICA_COUNTS = (10, 3, 1)
# The worker process every prober and floor subscriber runs in.
_WORKER_MODULE = "authmesh.bench.propagation_worker"


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
            await create_floor_stream(floor_nats.url)
            prober_workers = [
                await resources.enter_async_context(Worker(_WORKER_MODULE, f"prober {index}"))
                for index in range(prober_count)
            ]
            subscribers = [
                await resources.enter_async_context(Worker(_WORKER_MODULE, f"subscriber {index}"))
                for index in range(most if with_floor else 0)
            ]
            per_level = revocations * (2 if check_at_ms is not None else 1)
            caller, victims = await victim_tokens(stack, per_level * len(counts))
            revoker = await resources.enter_async_context(Revoker(stack.auth_grpc, caller))
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
                before = await replica_histograms([replica.http for replica in replicas])
                batch = victims[level_index * per_level : level_index * per_level + revocations]
                floor = None
                async with contextlib.AsyncExitStack() as level_resources:
                    if with_floor:
                        sampler = await level_resources.enter_async_context(
                            FloorSampler(subscribers[:count], floor_nats.url, level_index)
                        )
                    account = CpuAccount(
                        {**stack.pids(), **{f"prober-{i}": prober.pid for i, prober in enumerate(active)}}
                    )
                    rounds = await probed_rounds(
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
                    cpu_per_round = cpu_ms_per_round(account.used, account.windows)
                    if with_floor:
                        floor = await sampler.results()
                after = await replica_histograms([replica.http for replica in replicas])
                unperturbed = None
                if check_at_ms is not None:
                    unperturbed = await deadline_rounds(
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
                    quiet = await replica_histograms([replica.http for replica in replicas])
                    unperturbed["replica_view_within"] = {
                        f"{bound * 1000:g}": share_within(after, quiet, bound)
                        for bound in REPLICA_VIEW_BOUNDS
                    }
                levels.append(
                    {
                        "replicas": count,
                        "probers": len(active),
                        **summarise(rounds, len(batch)),
                        # The slowest replica's share of events applied within each bound (ms).
                        "replica_view_within": {
                            f"{bound * 1000:g}": share_within(before, after, bound)
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


def run(**options: Any) -> JsonDict:
    """:func:`measure` from synchronous code."""
    return asyncio.run(measure(**options))


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
