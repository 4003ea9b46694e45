"""``authmesh bench replica-ack``: what acknowledging a write only once a Redis replica holds it costs.

The store runs as ``authmesh up --redis-sentinel`` runs it (a :class:`~authmesh.stack.LocalStack` with
``redis_sentinel=True``): a Redis primary, two replicas and three Sentinels, every data node append-only
with ``appendfsync always``. Two auth-service processes join that stack with its own auth service's
environment and differ only in ``AUTHMESH_REDIS_MIN_REPLICAS_ACKED``: ``0`` (**no WAIT**: a write is
acknowledged once the primary has it) and ``1`` (**WAIT**, the default with Sentinel: the answer waits
for ``WAIT 1 <timeout>``, which returns once the first of the two replicas confirms the write). Both
reach the primary through the Sentinels, on the same NATS.

The load generator of :mod:`authmesh.bench.rpc`, with a ``revoke`` kind added
(:class:`~authmesh.bench.replica_ack_load.RevocationLoad`), times, at each concurrency, each RPC on both
services in alternating slices (the order flips every pair), so a burst of background load lands on both:

* **Refresh**: each concurrent caller follows its own session's chain of refresh tokens on both services
  (they share Redis, so a chain rotated on one goes on on the other): the rotation script, then ``WAIT``.
* **RevokeToken**: every call revokes an access token no call has revoked yet. The tokens are minted
  beforehand, untimed, by refreshing those same chains on the no-WAIT service; each is a distinct ``jti``
  of a live session, so every call writes (revoking a token twice writes nothing, and ``WAIT`` then has
  nothing to wait for). The caller is an admin. A call verifies both tokens, runs the revocation script,
  then ``WAIT``, then publishes the event and waits for JetStream's acknowledgement.

Reported per RPC and service: throughput (median over slices), latency p50/p99 over every timed call,
the server's CPU per call; and WAIT / no WAIT: throughput (median over slice pairs), p50, p99 and CPU.
The primary's count of ``WAIT`` commands over the run shows that only one service sent them.

**The floor**: the same write script on the primary, one call at a time through the auth service's own
:class:`~authmesh._auth_service.redis_scripts.ScriptRunner` (no gRPC, no auth service), with and
without ``WAIT 1`` in alternating slices: what waiting for a replica costs in Redis alone.

``--tls`` runs all of it on TLS (``authmesh up --tls --redis-sentinel``: gRPC, NATS, replication and
the Sentinels), the floor's client included.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import grpc_channel_credentials
from authmesh.bench.common import (
    JsonDict,
    Worker,
    bar_chart,
    environment,
    judge,
    measure_and_report,
    ratio,
)
from authmesh.bench.refresh import prepare_users
from authmesh.bench.replica_ack_load import FLOOR_ACKS, REPLICA_ACK_TIMEOUT_SECONDS, redis_client
from authmesh.bench.rpc import (
    CALL_TIMEOUT_SECONDS,
    alternate,
    level_rows,
    paired_ratio,
    rate_table,
    tls_command,
)
from authmesh.client import AuthApi
from authmesh.processes import LOOPBACK, STOP_TIMEOUT_SECONDS, free_ports
from authmesh.stack import SERVICE_START_TIMEOUT_SECONDS, LocalStack, ServiceProcess

CONCURRENCY = (1, 16)
# The two services: name → AUTHMESH_REDIS_MIN_REPLICAS_ACKED.
SERVICES = {"no_wait": 0, "wait": 1}
RPCS = ("refresh", "revoke")
# Access tokens outlive the run: a token minted for revocation must still be live when it is revoked.
ACCESS_TOKEN_TTL_SECONDS = 3600
# Tokens minted for RevokeToken: this many times the faster Refresh's rate over the timed windows, plus
# a few calls per caller and slice for the warm-up and the calls in flight at a window's end.
_MINT_RATE_MARGIN = 1.25
_MINT_CALLS_PER_CALLER_AND_SLICE = 4
# Minting runs at Refresh speed; this is a floor on its rate, for its deadline only.
_MINT_MIN_PER_SECOND = 50.0


def _label(rpc: str, service: str) -> str:
    return f"{rpc}_{service}"


async def _start_auth(stack: LocalStack, service: str) -> ServiceProcess:
    """One more auth service on the stack, with ``AUTHMESH_REDIS_MIN_REPLICAS_ACKED`` of ``service``."""
    grpc_port, http_port = free_ports(2)
    grpc_address, http_address = f"{LOOPBACK}:{grpc_port}", f"{LOOPBACK}:{http_port}"
    name = f"auth-{service.replace('_', '-')}"
    env = {
        **stack.auth_env(grpc_address, http_address),
        "AUTHMESH_INSTANCE": name,
        "AUTHMESH_REDIS_MIN_REPLICAS_ACKED": str(SERVICES[service]),
    }
    process = ServiceProcess(
        name,
        stack.data_dir / name,
        command="auth-server",
        env=env,
        grpc_address=grpc_address,
        http_address=http_address,
        probe_tls=stack.client_tls,
    )
    await process.start(SERVICE_START_TIMEOUT_SECONDS)
    return process


def _primary_port(stack: LocalStack) -> int:
    """The port of the stack's Redis primary (the group's first server: the bench causes no failover)."""
    group = stack.sentinel_group
    if group is None:
        raise ConfigurationError("the stack runs no Sentinel group")
    return group.servers[0].port


async def _wait_commands(stack: LocalStack) -> int:
    """How many ``WAIT`` commands the primary has run since it started."""
    async with redis_client(_primary_port(stack), stack.client_tls) as primary:
        stats = await primary.info("commandstats")
    wait = stats.get("cmdstat_wait")
    return int(wait["calls"]) if isinstance(wait, Mapping) else 0


def tokens_to_mint(refresh: Mapping[str, Any], concurrency: int, slices: int, slice_s: float) -> int:
    """Tokens one level's RevokeToken slices may spend on both services, judged by its Refresh slices."""
    rates = (refresh[_label("refresh", service)]["slices_per_second"] for service in SERVICES)
    fastest = max(float(rate) for slices_of_one in rates for rate in slices_of_one)
    timed = _MINT_RATE_MARGIN * fastest * slices * slice_s
    warmup = _MINT_CALLS_PER_CALLER_AND_SLICE * concurrency * slices
    return len(SERVICES) * math.ceil(timed + warmup)


async def redis_floor(load: Worker, port: int, slices: int, calls: int) -> JsonDict:
    """The load generator's :meth:`RevocationLoad.redis_floor`, with the p50 and p99 WAIT adds."""
    floor = await load.request(
        {"op": "redis_floor", "port": port, "slices": slices, "calls": calls},
        # 2 s a call on average is far beyond a healthy call (WAIT itself gives up after 1 s).
        timeout=slices * calls * len(FLOOR_ACKS) * 2.0 + 30,
    )
    wait, no_wait = floor["wait"]["latency"], floor["no_wait"]["latency"]
    return {
        **floor,
        "calls_per_slice": calls,
        "p50_added_ms": wait["p50"] - no_wait["p50"],
        "p99_added_ms": wait["p99"] - no_wait["p99"],
    }


def compare(level: Mapping[str, Any], rpc: str) -> JsonDict:
    """WAIT / no WAIT for one RPC at one level: throughput (median over slice pairs), p50, p99, CPU."""
    wait, no_wait = level[_label(rpc, "wait")], level[_label(rpc, "no_wait")]
    cpu_wait, cpu_no_wait = wait["server_cpu_us"], no_wait["server_cpu_us"]
    return {
        "throughput": paired_ratio(wait, no_wait),
        "p50": ratio(wait["latency"]["p50"], no_wait["latency"]["p50"]),
        "p99": ratio(wait["latency"]["p99"], no_wait["latency"]["p99"]),
        "p50_added_ms": wait["latency"]["p50"] - no_wait["latency"]["p50"],
        "server_cpu": None if cpu_wait is None or not cpu_no_wait else cpu_wait / cpu_no_wait,
        "server_cpu_added_us": None if cpu_wait is None or cpu_no_wait is None else cpu_wait - cpu_no_wait,
    }


async def measure(
    *,
    concurrency: Sequence[int] = CONCURRENCY,
    slices: int = 24,
    slice_s: float = 0.25,
    floor_calls: int = 100,
    progress: Callable[[str], None] = lambda _: None,
    tls: bool = False,
) -> JsonDict:
    """Run the benchmark on a fresh Sentinel stack with two more auth services (no WAIT and WAIT).

    Args:
        concurrency: Calls in flight, one level after another.
        slices: Timed slices per RPC, service and level; the two services alternate slice by slice.
        slice_s: Seconds each timed slice lasts.
        floor_calls: Calls per slice of the floor (a write script on the primary, with and without
            ``WAIT``, as many slices as ``slices``); 0 skips it.
        progress: Told what is being measured.
        tls: Run the stack and every call on TLS (``authmesh up --tls --redis-sentinel``).

    Returns:
        A JSON-ready result (see ``docs/benchmarks.md``).
    """
    if slices < 1 or slice_s <= 0 or floor_calls < 0 or not concurrency or min(concurrency) < 1:
        raise ValueError("slices, slice_s and the concurrency levels must be positive")
    progress("starting a local stack on Redis with Sentinel")
    env = {
        "AUTHMESH_ACCESS_TOKEN_TTL": str(ACCESS_TOKEN_TTL_SECONDS),
        "AUTHMESH_REDIS_REPLICA_ACK_TIMEOUT": f"{REPLICA_ACK_TIMEOUT_SECONDS:g}",
    }
    minted: list[int] = []
    async with (
        LocalStack(replicas=0, redis_sentinel=True, env=env, tls=tls) as stack,
        contextlib.AsyncExitStack() as services,
        Worker("authmesh.bench.replica_ack_load", "load generator") as load,
    ):
        progress("starting the two auth services")
        started: dict[str, ServiceProcess] = {}
        for service in SERVICES:
            process = started[service] = await _start_auth(stack, service)
            services.push_async_callback(process.stop, STOP_TIMEOUT_SECONDS)
        routes = {
            _label(rpc, service): {"kind": rpc, "target": process.grpc_address, "server_pid": process.pid}
            for rpc in RPCS
            for service, process in started.items()
        }
        progress(f"creating {max(concurrency)} users and sessions (Argon2id)")
        _, refresh_tokens = await prepare_users(stack, max(concurrency))
        credentials = grpc_channel_credentials(stack.client_tls)
        async with AuthApi(stack.auth_grpc, credentials=credentials) as auth:
            admin = await auth.admin_login(*stack.admin_credentials)
        await load.request(
            {
                "op": "setup",
                "refresh_tokens": refresh_tokens,
                "revoker": admin.access_token,
                **tls_command(stack.client_tls),
            }
        )
        waits_before = await _wait_commands(stack)
        levels = []
        for level in concurrency:
            figures: JsonDict = {"concurrency": level}
            for rpc in RPCS:
                if rpc == "revoke":
                    count = tokens_to_mint(figures, level, slices, slice_s)
                    progress(f"minting {count:,} tokens to revoke")
                    target = started["no_wait"].grpc_address
                    await load.request(
                        {"op": "mint", "target": target, "count": count},
                        timeout=count / _MINT_MIN_PER_SECOND + CALL_TIMEOUT_SECONDS,
                    )
                    minted.append(count)
                progress(f"{rpc}, {level} in flight")
                kinds = tuple(_label(rpc, service) for service in SERVICES)
                figures |= await alternate(
                    load,
                    kinds=kinds,
                    target=started["no_wait"].grpc_address,
                    concurrency=level,
                    slices=slices,
                    slice_s=slice_s,
                    server_pid=None,
                    routes={kind: routes[kind] for kind in kinds},
                )
            figures["wait_over_no_wait"] = {rpc: compare(figures, rpc) for rpc in RPCS}
            levels.append(figures)
        wait_commands = await _wait_commands(stack) - waits_before
        left = int((await load.request({"op": "pool"}))["revocable"])
        floor = None
        if floor_calls:
            progress("the floor: a write script on the primary, with and without WAIT")
            floor = await redis_floor(load, _primary_port(stack), slices, floor_calls)
    return {
        "benchmark": "replica_ack",
        "environment": environment(),
        "config": {
            "concurrency": list(concurrency),
            "slices": slices,
            "slice_s": slice_s,
            "tls": tls,
            "redis": "Sentinel: a primary, 2 replicas, 3 Sentinels; appendfsync always on every data node",
            "min_replicas_acked": dict(SERVICES),
            "replica_ack_timeout_s": REPLICA_ACK_TIMEOUT_SECONDS,
            "access_token_ttl_s": ACCESS_TOKEN_TTL_SECONDS,
            "tokens_minted": minted,
            "tokens_left": left,
        },
        "wait_commands": wait_commands,
        "levels": levels,
        "redis_floor": floor,
        **judge((), {}),
    }


def run(**options: Any) -> JsonDict:
    """:func:`measure` from synchronous code."""
    return asyncio.run(measure(**options))


_LABELS = {
    "refresh_no_wait": "Refresh, no WAIT",
    "refresh_wait": "Refresh, WAIT 1",
    "revoke_no_wait": "RevokeToken, no WAIT",
    "revoke_wait": "RevokeToken, WAIT 1",
}
_RPC_NAMES = {"refresh": "Refresh", "revoke": "RevokeToken"}


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def render(result: Mapping[str, Any]) -> Table:
    """The result of :func:`run` as a table."""
    config = result["config"]
    on_tls = ", every hop on TLS" if config.get("tls") else ""
    table = rate_table(
        "auth service acknowledging writes once a Redis replica has them (WAIT 1) vs at once (no WAIT)"
        f"{on_tls}; {config['slices']} alternating slices × {config['slice_s']:g} s "
        "per RPC, service and level"
    )
    for level in result["levels"]:
        for rpc in RPCS:
            level_rows(table, level, [_label(rpc, service) for service in SERVICES], _LABELS)
            ratios = level["wait_over_no_wait"][rpc]
            table.add_row(
                "",
                f"{_RPC_NAMES[rpc]} WAIT / no WAIT (p50 +{ratios['p50_added_ms']:.2f} ms)",
                _times(ratios["throughput"]),
                _times(ratios["p50"]),
                _times(ratios["p99"]),
                _times(ratios["server_cpu"]),
                "",
            )
        table.add_section()
    floor = result.get("redis_floor")
    if floor is not None:
        for service, label in (("no_wait", "no WAIT"), ("wait", "WAIT 1")):
            latency = floor[service]["latency"]
            table.add_row(
                "1",
                f"floor: a write script on the primary, {label}",
                "",
                f"{latency['p50']:.2f}",
                f"{latency['p99']:.2f}",
                "",
                "",
            )
        table.add_row("", f"floor: WAIT adds {floor['p50_added_ms']:.2f} ms at p50", "", "", "", "", "")
        table.add_section()
    table.add_row("", f"WAIT commands the primary ran: {result['wait_commands']:,}", "", "", "", "", "")
    return table


def draw(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """A chart of :func:`run`'s result: p50 latency of each RPC and service, by concurrency."""
    levels = result["levels"]
    chart = bar_chart(
        directory / "replica-ack-latency.png",
        title="p50 latency: acknowledged at once (no WAIT) vs once a replica has it (WAIT 1)",
        groups=[f"{level['concurrency']} in flight" for level in levels],
        series={
            label: [level[kind]["latency"]["p50"] for level in levels] for kind, label in _LABELS.items()
        },
        ylabel="ms",
    )
    return [chart]


def main(
    json_path: Path | None,
    plot_dir: Path | None,
    *,
    slices: int,
    slice_s: float,
    floor_calls: int = 100,
    concurrency: Sequence[int] = CONCURRENCY,
    tls: bool = False,
) -> int:
    """Run the benchmark, print the table, write JSON and charts if asked.

    Returns:
        The exit status: 0 (the bench measures; it sets no goal).
    """
    return measure_and_report(
        "replica-ack",
        "measuring Refresh and RevokeToken with and without WAIT…",
        lambda progress: run(
            concurrency=concurrency,
            slices=slices,
            slice_s=slice_s,
            floor_calls=floor_calls,
            progress=progress,
            tls=tls,
        ),
        render,
        draw,
        json_path,
        plot_dir,
    )
