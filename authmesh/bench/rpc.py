"""``authmesh bench rpc``: a protected call's throughput and latency, against the same server's health check.

One resource replica runs as its own process (in a :class:`~authmesh.stack.LocalStack`, with NATS,
Redis and the auth service beside it); a load generator in another process keeps ``concurrency`` calls
in flight on one channel, each caller waiting for its previous answer (a closed loop), and times every
call. ``--pin`` pins the replica to one CPU and the load generator to the others.

Contender and baseline: ``WhoAmI`` with a bearer token, which the replica's interceptor verifies locally
(signature with cached keys, claims, denylist), against ``grpc.health.v1.Health/Check`` on the same
server, which passes the same interceptors without a token. The two alternate in short slices (the order
flips every pair), so a burst of background load lands on both; a slice's timed window opens once every
caller has had its first answer. The ratio is the median over slice pairs. The server's CPU time per
call is read from ``/proc`` at each window's edges. Each concurrent caller has its own token (verified
cold once, then from the verifier's cache, as a client that reuses its token for its lifetime sees).
Goal: at every concurrency, at least 0.85 times the health check's throughput.

The same is measured on two more servers protected by one :class:`~authmesh.ResourceGuard` each
(:mod:`authmesh.bench.protected_servers`, joined to the same stack): a sync ``grpc.server`` with the sync
interceptor (``WhoAmI`` against its open health check) and a FastAPI app with
:class:`~authmesh.asgi.BearerAuth` (``GET /whoami`` against its open ``GET /healthz``), with the same goal.

This module is also the load generator: ``python -m authmesh.bench.rpc --worker`` (see
:class:`LoadGenerator`); ``authmesh bench refresh`` drives it too.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.table import Table

from authmesh._shared.dpop import LOGIN_METHOD, REFRESH_METHOD, ProofSigner, default_origin
from authmesh._shared.tls import TlsFiles, grpc_channel_credentials, open_channel
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.bench.common import (
    Goal,
    JsonDict,
    Latency,
    Worker,
    add_goal_rows,
    bar_chart,
    environment,
    judge,
    measure_and_report,
    median,
    pin,
    process_cpu_seconds,
    ratio,
    serve_worker,
    split_cpus,
)
from authmesh.bench.protected_servers import server_process
from authmesh.bench.refresh_floor import ROTATE_METHOD as FLOOR_ROTATE_METHOD
from authmesh.client import AuthApi
from authmesh.processes import LOOPBACK, STOP_TIMEOUT_SECONDS, free_ports
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.stack import SERVICE_START_TIMEOUT_SECONDS, LocalStack

GOAL_OVER_HEALTH = 0.85
GOAL_DPOP_CPU_OVER_BEARER = 1.35
CONCURRENCY = (1, 16, 64)
BENCH_USER = "bench-rpc"
BENCH_PASSWORD = "bench-password-rpc-1"
WHOAMI_METHOD = "/authmesh.resource.v1.ResourceService/WhoAmI"
BENCH_SCOPES = ("docs:read",)
# Deadline of one call: generous, since Login at 64 in flight waits for dozens of Argon2 hashes.
CALL_TIMEOUT_SECONDS = 120.0
# Per concurrent caller: a run's calls never outgrow what a worker keeps (a few MB of floats).
_MAX_SAMPLES = 2_000_000
GOALS = (
    Goal("whoami_over_health", "WhoAmI / health throughput, lowest level", GOAL_OVER_HEALTH, True, "ratio"),
    Goal(
        "dpop_cpu_over_bearer",
        "WhoAmI with DPoP / with a bearer token, server CPU per call, highest level",
        GOAL_DPOP_CPU_OVER_BEARER,
        False,
        "ratio",
    ),
    Goal(
        "sync_whoami_over_health",
        "sync grpc.server: WhoAmI / health, lowest level",
        GOAL_OVER_HEALTH,
        True,
        "ratio",
    ),
    Goal(
        "asgi_whoami_over_open",
        "FastAPI: GET /whoami / GET /healthz, lowest level",
        GOAL_OVER_HEALTH,
        True,
        "ratio",
    ),
)
# The protected servers beside the replica: name → the kinds of call (open, protected) and the ratio.
PROTECTED_SERVERS = {
    "sync": (("health", "whoami"), "sync_whoami_over_health"),
    "asgi": (("http_open", "http_whoami"), "asgi_whoami_over_open"),
}

Call = Callable[[], Awaitable[Any]]


class HttpRefused(Exception):
    """An HTTP call answered with another status than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


# --- the load generator (worker side) -------------------------------------------------------------------


class LoadGenerator:
    """The worker's state: one channel per target, the credentials each caller uses.

    Kinds of call: ``health`` (``Health/Check``), ``health_token`` (the same, carrying caller *i*'s
    bearer token, which the open health service ignores: the token's bytes without its verification),
    ``whoami`` (caller *i* sends ``tokens[i % n]``),
    ``login`` (caller *i* logs in as ``users[i % n]``: distinct users, so the per-user login limit never
    counts one caller against another), ``refresh`` (caller *i* follows its own chain of refresh
    tokens, starting from ``refresh_tokens[i]``), ``refresh_floor`` (a refresh token's bytes to the
    floor server of :mod:`authmesh.bench.refresh_floor`) and ``whoami_dpop`` (caller *i* sends the
    key-bound ``dpop_tokens[i % n]`` with a fresh proof per call, signed here with ``dpop_key``).
    """

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._http: aiohttp.ClientSession | None = None
        self._tokens: list[str] = []
        self._users: list[tuple[str, str]] = []
        self._refresh: list[str] = []
        self._dpop_tokens: list[str] = []
        self._signer: ProofSigner | None = None
        self._origin = ""
        self._tls = TlsFiles()

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = open_channel(target, self._tls)
        return channel

    async def setup(self, command: JsonDict) -> JsonDict:
        """Keep the credentials of a command: ``tokens``, ``users``, ``refresh_tokens``, and
        ``tls_ca_file`` (call over TLS, verifying the servers against it) with ``tls_cert_file`` and
        ``tls_key_file`` (the client certificate an auth service of certificate logins demands)."""
        if command.get("tls_ca_file"):
            cert, key = command.get("tls_cert_file"), command.get("tls_key_file")
            self._tls = TlsFiles(
                ca_file=Path(command["tls_ca_file"]),
                cert_file=Path(cert) if cert else None,
                key_file=Path(key) if key else None,
            )
        if "tokens" in command:
            self._tokens = list(command["tokens"])
        if "users" in command:
            self._users = [(str(name), str(password)) for name, password in command["users"]]
        if "refresh_tokens" in command:
            self._refresh = list(command["refresh_tokens"])
        if "dpop_tokens" in command:
            self._dpop_tokens = list(command["dpop_tokens"])
            key = serialization.load_pem_private_key(str(command["dpop_key"]).encode(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._signer = ProofSigner(key)
            self._origin = str(command["dpop_origin"])
        return {"tokens": len(self._tokens), "users": len(self._users), "refresh_tokens": len(self._refresh)}

    def _caller(self, kind: str, target: str, index: int) -> Call:
        if kind in ("http_open", "http_whoami"):
            return self._http_caller(kind, target, index)
        channel = self._channel(target)
        if kind in ("health", "health_token"):
            health = health_pb2_grpc.HealthStub(channel).Check
            check = health_pb2.HealthCheckRequest()
            if kind == "health":
                return lambda: health(check, timeout=CALL_TIMEOUT_SECONDS)
            # The same bytes on the wire as WhoAmI's metadata, which the open health service ignores.
            carried = (("authorization", f"Bearer {self._tokens[index % len(self._tokens)]}"),)
            return lambda: health(check, metadata=carried, timeout=CALL_TIMEOUT_SECONDS)
        if kind == "whoami":
            whoami = resource_pb2_grpc.ResourceServiceStub(channel).WhoAmI
            request = resource_pb2.WhoAmIRequest()
            metadata = (("authorization", f"Bearer {self._tokens[index % len(self._tokens)]}"),)
            return lambda: whoami(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
        if kind == "whoami_dpop":
            assert self._signer is not None, "setup without dpop_tokens"
            whoami = resource_pb2_grpc.ResourceServiceStub(channel).WhoAmI
            request = resource_pb2.WhoAmIRequest()
            token = self._dpop_tokens[index % len(self._dpop_tokens)]
            proof, origin = self._signer.proof, self._origin

            def with_proof() -> Awaitable[Any]:
                # The client signs a proof per call, as a real one does (this process, not the server).
                metadata = (
                    ("authorization", f"DPoP {token}"),
                    ("dpop", proof(origin, WHOAMI_METHOD, access_token=token)),
                )
                return whoami(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)

            return with_proof
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        if kind == "login":
            username, password = self._users[index % len(self._users)]
            login_request = auth_pb2.LoginRequest(username=username, password=password)
            return lambda: auth.Login(login_request, timeout=CALL_TIMEOUT_SECONDS)
        if kind == "refresh_floor":
            # A refresh token's bytes, to the floor server's one method (raw bytes both ways).
            rotate: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(FLOOR_ROTATE_METHOD)
            spent = self._refresh[index % len(self._refresh)].encode() if self._refresh else bytes(43)
            return lambda: rotate(spent, timeout=CALL_TIMEOUT_SECONDS)
        if kind == "refresh":
            chains = self._refresh

            async def refresh() -> None:
                pair = await auth.Refresh(
                    auth_pb2.RefreshRequest(refresh_token=chains[index]), timeout=CALL_TIMEOUT_SECONDS
                )
                chains[index] = pair.refresh_token

            return refresh
        raise ValueError(f"unknown kind of call {kind!r}")

    def _http_caller(self, kind: str, base: str, index: int) -> Call:
        if self._http is None:
            # One connection per caller in flight, kept alive: as one gRPC channel carries the others.
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            self._http = aiohttp.ClientSession(connector=connector)
        session = self._http
        url = f"{base}/whoami" if kind == "http_whoami" else f"{base}/healthz"
        headers = {"Authorization": f"Bearer {self._tokens[index % len(self._tokens)]}"}

        async def get() -> None:
            async with session.get(url, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise HttpRefused(response.status)

        return get

    async def run(self, command: JsonDict) -> JsonDict:
        """Time one or more kinds of call in alternating slices.

        Command fields: ``kinds`` (their order in the first pair; the order flips every pair), ``target``,
        ``concurrency``, ``slices`` (slices per kind), ``slice_s`` (timed seconds per slice),
        ``server_pid`` (read for CPU time, optional) and ``routes`` (optional: a name in ``kinds`` →
        ``{"kind", "target", "server_pid"}``, so one kind of call can be timed on two servers side by side).

        A slice starts ``concurrency`` closed loops of one kind; its timed window opens once every loop
        has had its first answer (the pipeline is full) and lasts ``slice_s``; then the loops stop and
        the calls in flight are waited for. Only answers that arrive within the window count.

        Returns:
            Per kind: ``per_second`` of each slice, ``latency`` over every timed answer (ms),
            ``server_cpu_us`` per timed answer (None when unknown), ``errors`` by status code.
        """
        kinds = [str(kind) for kind in command["kinds"]]
        target = str(command["target"])
        concurrency = int(command["concurrency"])
        slices = int(command["slices"])
        slice_ns = int(float(command["slice_s"]) * 1e9)
        server_pid = int(command["server_pid"]) if command.get("server_pid") else None
        routes: dict[str, tuple[str, str, int | None]] = {kind: (kind, target, server_pid) for kind in kinds}
        for name, route in (command.get("routes") or {}).items():
            pid = route.get("server_pid")
            routes[name] = (str(route["kind"]), str(route["target"]), int(pid) if pid else None)
        if any(routes[kind][0] == "refresh" for kind in kinds) and len(self._refresh) < concurrency:
            raise ValueError(f"{concurrency} callers need as many refresh tokens, not {len(self._refresh)}")
        figures = {kind: _KindFigures() for kind in kinds}
        for index in range(slices):
            order = kinds if index % 2 == 0 else kinds[::-1]
            for name in order:
                kind, kind_target, pid = routes[name]
                callers = [self._caller(kind, kind_target, caller) for caller in range(concurrency)]
                await _slice(callers, slice_ns, figures[name], pid)
        return {kind: figure.to_json() for kind, figure in figures.items()}

    async def aclose(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
        http, self._http = self._http, None
        if http is not None:
            await http.close()


@dataclass(slots=True)
class _KindFigures:
    """What a worker gathers about one kind of call, slice after slice."""

    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cpu_seconds: float = 0.0
    cpu_known: bool = True
    timed: int = 0

    def to_json(self) -> JsonDict:
        return {
            "per_second": self.rates,
            "latency": Latency.of(self.latencies).to_json(),
            "server_cpu_us": self.cpu_seconds * 1e6 / self.timed if self.cpu_known and self.timed else None,
            "errors": dict(self.errors),
        }


async def _slice(
    callers: Sequence[Call], slice_ns: int, figures: _KindFigures, server_pid: int | None
) -> None:
    """One slice of closed loops (see :meth:`LoadGenerator.run`)."""
    loop = asyncio.get_running_loop()
    window: list[int] = []  # [opens, closes], perf_counter_ns, once every caller has had an answer
    cpu: list[float | None] = []
    waiting = len(callers)
    timed: list[float] = []
    errors = figures.errors

    def read_cpu() -> None:
        cpu.append(process_cpu_seconds(server_pid) if server_pid is not None else None)

    closing: list[asyncio.TimerHandle] = []

    def open_window(now: int) -> None:
        read_cpu()
        window.extend((now, now + slice_ns))
        closing.append(loop.call_later(slice_ns / 1e9, read_cpu))

    async def caller(call: Call) -> None:
        nonlocal waiting
        first = True
        while not window or time.perf_counter_ns() < window[1]:
            started = time.perf_counter_ns()
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
            except HttpRefused as error:
                errors[f"HTTP {error.status}"] += 1
            ended = time.perf_counter_ns()
            if window and window[0] <= ended <= window[1] and len(timed) < _MAX_SAMPLES:
                timed.append((ended - started) / 1e6)
            if first:
                first = False
                waiting -= 1
                if waiting == 0:
                    open_window(ended)

    await asyncio.gather(*(caller(call) for call in callers))
    if len(cpu) < 2:
        # The closing reading is a timer, and the last answers can beat it: read now instead (a late
        # reading only adds the little CPU the server spent since the window closed).
        closing[0].cancel()
        read_cpu()
    before, after = cpu[0], cpu[1]
    if before is None or after is None:
        figures.cpu_known = False
    else:
        figures.cpu_seconds += after - before
    figures.rates.append(len(timed) / (slice_ns / 1e9))
    figures.latencies.extend(timed)
    figures.timed += len(timed)


def worker_main() -> None:
    """The load generator's entry point (``python -m authmesh.bench.rpc --worker``)."""
    generator = LoadGenerator()
    serve_worker({"setup": generator.setup, "run": generator.run})


# --- the driving side ---------------------------------------------------------------------------------


async def alternate(
    load: Worker,
    *,
    kinds: Sequence[str],
    target: str,
    concurrency: int,
    slices: int,
    slice_s: float,
    server_pid: int | None,
    routes: Mapping[str, JsonDict] | None = None,
) -> dict[str, JsonDict]:
    """Have the load generator time ``kinds`` in alternating slices (see :meth:`LoadGenerator.run`).

    Returns:
        Per kind: ``per_second`` (the median over slices), ``slices_per_second``, ``latency`` over every
        timed answer, ``server_cpu_us`` per answer and ``errors``.
    """
    answer = await load.request(
        {
            "op": "run",
            "kinds": list(kinds),
            "target": target,
            "concurrency": concurrency,
            "slices": slices,
            "slice_s": slice_s,
            "server_pid": server_pid,
            "routes": dict(routes or {}),
        },
        timeout=len(kinds) * slices * (slice_s + CALL_TIMEOUT_SECONDS) + 30,
    )
    return {
        kind: {
            "per_second": median(figures["per_second"]),
            "slices_per_second": figures["per_second"],
            "latency": figures["latency"],
            "server_cpu_us": figures["server_cpu_us"],
            "errors": figures["errors"],
        }
        for kind, figures in answer.items()
    }


def paired_ratio(contender: Mapping[str, Any], baseline: Mapping[str, Any]) -> float:
    """The median over slice pairs of contender / baseline throughput (the two ran back to back)."""
    return median(
        ratio(mine, base)
        for mine, base in zip(contender["slices_per_second"], baseline["slices_per_second"], strict=True)
    )


def _cpu_ratio(contender: Mapping[str, Any], baseline: Mapping[str, Any]) -> float | None:
    mine, base = contender["server_cpu_us"], baseline["server_cpu_us"]
    return None if mine is None or not base else float(mine) / float(base)


async def pin_apart(server_pid: int, load_pid: int) -> JsonDict | None:
    """Pin the server to one CPU and the load generator to the others; what was done, or None."""
    split = split_cpus()
    if split is None:
        return None
    server_cpus, load_cpus = split
    if not (pin(server_pid, server_cpus) and pin(load_pid, load_cpus)):
        return None
    return {"server": sorted(server_cpus), "load": sorted(load_cpus)}


async def bench_tokens(stack: LocalStack, count: int, signer: ProofSigner | None = None) -> list[str]:
    """``count`` distinct access tokens of one ordinary user (one login, then refreshes).

    With ``signer`` the session is bound to its key (every token carries ``cnf.jkt``); the user must
    exist already (a first call without one creates it).
    """
    origin = default_origin(stack.auth_grpc, secure=stack.client_tls.ca_file is not None)

    def proof(method: str) -> str | None:
        return None if signer is None else signer.proof(origin, method)

    async with AuthApi(stack.auth_grpc, credentials=grpc_channel_credentials(stack.client_tls)) as auth:
        if signer is None:
            admin = await auth.admin_login(*stack.admin_credentials)
            await auth.create_user(admin.access_token, BENCH_USER, BENCH_PASSWORD, BENCH_SCOPES)
        tokens = await auth.login(BENCH_USER, BENCH_PASSWORD, dpop=proof(LOGIN_METHOD))
        access = [tokens.access_token]
        while len(access) < count:
            tokens = await auth.refresh(tokens.refresh_token, dpop=proof(REFRESH_METHOD))
            access.append(tokens.access_token)
    return access


async def measure(
    *,
    concurrency: Sequence[int] = CONCURRENCY,
    slices: int = 24,
    slice_s: float = 0.25,
    pin_cpus: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    tls: bool = False,
) -> JsonDict:
    """Run the benchmark on a fresh local stack with one replica.

    Args:
        concurrency: Calls in flight, one level after another.
        slices: Timed slices per kind of call and level; WhoAmI and health alternate slice by slice.
        slice_s: Seconds each timed slice lasts.
        pin_cpus: Pin the replica and the load generator to different CPUs where there are two.
        progress: Told what is being measured.
        tls: Run the stack and every call on TLS (``authmesh up --tls``).

    Returns:
        A JSON-ready result (see ``docs/benchmarks.md``).
    """
    if slices < 1 or slice_s <= 0 or not concurrency or min(concurrency) < 1:
        raise ValueError("slices, slice_s and the concurrency levels must be positive")
    progress("starting a local stack with one replica")
    servers: dict[str, list[JsonDict]] = {}
    async with (
        LocalStack(replicas=1, tls=tls) as stack,
        Worker("authmesh.bench.rpc", "load generator") as load,
    ):
        replica = stack.replicas[0]
        server_pid = stack.pids().get(replica.name)
        pinned = await pin_apart(server_pid, load.pid) if pin_cpus and server_pid is not None else None
        tokens = await bench_tokens(stack, max(concurrency))
        await load.request({"op": "setup", "tokens": tokens, **tls_command(stack.client_tls)})
        signer_key = ec.generate_private_key(ec.SECP256R1())
        await load.request(
            {
                "op": "setup",
                "dpop_tokens": await bench_tokens(stack, max(concurrency), ProofSigner(signer_key)),
                "dpop_key": signer_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode(),
                "dpop_origin": default_origin(replica.grpc, secure=stack.client_tls.ca_file is not None),
            }
        )
        levels = await _levels(
            load,
            ("health", "whoami", "whoami_dpop"),
            "whoami_over_health",
            replica.grpc,
            server_pid,
            concurrency,
            slices,
            slice_s,
            progress,
        )
        for level in levels:
            level["dpop_over_whoami"] = paired_ratio(level["whoami_dpop"], level["whoami"])
            level["dpop_cpu_over_bearer"] = _cpu_ratio(level["whoami_dpop"], level["whoami"])
        # The sync and ASGI servers are not set up for TLS: --tls measures the replica only.
        for name in () if tls else PROTECTED_SERVERS:
            kinds, ratio_name = PROTECTED_SERVERS[name]
            (port,) = free_ports(1)
            listen = f"{LOOPBACK}:{port}"
            env = {**os.environ, **stack.service_env(), "PYTHONUNBUFFERED": "1"}
            process = server_process(name, listen, stack.data_dir / f"bench-{name}", env)
            try:
                await process.start(SERVICE_START_TIMEOUT_SECONDS)
                if pinned is not None and process.pid is not None:
                    pin(process.pid, pinned["server"])
                target = listen if name == "sync" else f"http://{listen}"
                servers[name] = await _levels(
                    load,
                    kinds,
                    ratio_name,
                    target,
                    process.pid,
                    concurrency,
                    slices,
                    slice_s,
                    functools.partial(_prefixed, progress, name),
                )
            finally:
                await process.stop(STOP_TIMEOUT_SECONDS)
    lowest: dict[str, float | None] = {
        "whoami_over_health": min(float(level["whoami_over_health"]) for level in levels),
        **{
            ratio_name: min(float(level[ratio_name]) for level in servers[name])
            for name, (_, ratio_name) in PROTECTED_SERVERS.items()
            if name in servers
        },
    }
    dpop_cpu = [level["dpop_cpu_over_bearer"] for level in levels]
    lowest["dpop_cpu_over_bearer"] = None if None in dpop_cpu else max(dpop_cpu)
    return {
        "benchmark": "rpc",
        "environment": environment(),
        "config": {
            "replicas": 1,
            "concurrency": list(concurrency),
            "slices": slices,
            "slice_s": slice_s,
            "pinned": pinned,
            "tls": tls,
        },
        "levels": levels,
        "servers": servers,
        **judge([goal for goal in GOALS if goal.name in lowest], lowest),
    }


def _prefixed(progress: Callable[[str], None], prefix: str, text: str) -> None:
    progress(f"{prefix}: {text}")


async def _levels(
    load: Worker,
    kinds: tuple[str, ...],
    ratio_name: str,
    target: str,
    server_pid: int | None,
    concurrency: Sequence[int],
    slices: int,
    slice_s: float,
    progress: Callable[[str], None],
) -> list[JsonDict]:
    """Each concurrency level: the open call (``kinds[0]``), the protected one (``kinds[1]``) and any
    others, and the ratio of the first two."""
    levels: list[JsonDict] = []
    for level in concurrency:
        progress(f"{level} calls in flight")
        figures = await alternate(
            load,
            kinds=kinds,
            target=target,
            concurrency=level,
            slices=slices,
            slice_s=slice_s,
            server_pid=server_pid,
        )
        open_call, protected = kinds[:2]
        levels.append(
            {
                "concurrency": level,
                **figures,
                ratio_name: paired_ratio(figures[protected], figures[open_call]),
            }
        )
    return levels


def run(**options: Any) -> JsonDict:
    """:func:`measure` from synchronous code."""
    return asyncio.run(measure(**options))


_KIND_LABELS = {
    "health": "health Check (baseline)",
    "whoami": "WhoAmI (verified token)",
    "whoami_dpop": "WhoAmI (DPoP: token + proof)",
}
_SERVER_LABELS = {
    "sync": {"health": "sync: health Check (baseline)", "whoami": "sync: WhoAmI (verified)"},
    "asgi": {
        "http_open": "FastAPI: GET /healthz (baseline)",
        "http_whoami": "FastAPI: GET /whoami (verified)",
    },
}


def level_rows(
    table: Table, level: Mapping[str, Any], kinds: Sequence[str], labels: Mapping[str, str]
) -> None:
    """One row per kind of call at one concurrency: throughput, latency, server CPU."""
    for kind in kinds:
        figures = level[kind]
        latency = figures["latency"]
        cpu = figures.get("server_cpu_us")
        errors = sum(figures["errors"].values())
        table.add_row(
            str(level["concurrency"]),
            labels.get(kind, kind),
            f"{figures['per_second']:,.1f}",
            f"{latency['p50']:.2f}",
            f"{latency['p99']:.2f}",
            "–" if cpu is None else f"{cpu:,.0f}",
            str(errors) if errors else "",
        )


def rate_table(title: str) -> Table:
    """The columns rpc and refresh share."""
    table = Table(title=title)
    for column, justify in (
        ("in flight", "right"),
        ("call", "left"),
        ("calls/s", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("server CPU µs/call", "right"),
        ("errors", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]  # rich's Literal
    return table


def render(result: Mapping[str, Any]) -> Table:
    """The result of :func:`run` as a table."""
    config = result["config"]
    pinned = " (replica and load pinned to separate CPUs)" if config.get("pinned") else ""
    table = rate_table(
        f"protected WhoAmI vs health Check on one replica{pinned}, "
        f"{config['slices']} alternating slices × {config['slice_s']:g} s per call and level"
    )
    for level in result["levels"]:
        level_rows(table, level, ("health", "whoami", "whoami_dpop"), _KIND_LABELS)
        table.add_row("", "WhoAmI / health", f"{level['whoami_over_health']:.2f}×", "", "", "", "")
        cpu = level["dpop_cpu_over_bearer"]
        shown = "–" if cpu is None else f"{cpu:.2f}×"
        table.add_row("", "DPoP / bearer", f"{level['dpop_over_whoami']:.2f}×", "", "", shown, "")
        table.add_section()
    for name, (kinds, ratio_name) in PROTECTED_SERVERS.items():
        labels = _SERVER_LABELS[name]
        for level in result.get("servers", {}).get(name, []):
            level_rows(table, level, kinds, labels)
            ratio_label = f"{labels[kinds[1]]} / {labels[kinds[0]]}".replace(" (baseline)", "")
            table.add_row("", ratio_label, f"{level[ratio_name]:.2f}×", "", "", "", "")
            table.add_section()
    add_goal_rows(table, result, 5)
    return table


def draw(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Charts of :func:`run`'s result: throughput and p99 latency by concurrency."""
    levels = result["levels"]
    groups = [f"{level['concurrency']} in flight" for level in levels]
    throughput = bar_chart(
        directory / "rpc-throughput.png",
        title="WhoAmI (verified bearer token) vs health Check, one replica",
        groups=groups,
        series={_KIND_LABELS[kind]: [level[kind]["per_second"] for level in levels] for kind in _KIND_LABELS},
        ylabel="calls per second",
    )
    latency = bar_chart(
        directory / "rpc-latency.png",
        title="p99 latency, one replica",
        groups=groups,
        series={
            _KIND_LABELS[kind]: [level[kind]["latency"]["p99"] for level in levels] for kind in _KIND_LABELS
        },
        ylabel="ms",
    )
    return [throughput, latency]


def main(
    json_path: Path | None,
    plot_dir: Path | None,
    *,
    slices: int,
    slice_s: float,
    concurrency: Sequence[int] = CONCURRENCY,
    pin_cpus: bool = False,
    tls: bool = False,
) -> int:
    """Run the benchmark, print the table, write JSON and charts if asked.

    Returns:
        The exit status: 0 when the goal is met, 1 otherwise.
    """
    return measure_and_report(
        "rpc",
        "measuring WhoAmI against health…",
        lambda progress: run(
            concurrency=concurrency,
            slices=slices,
            slice_s=slice_s,
            pin_cpus=pin_cpus,
            progress=progress,
            tls=tls,
        ),
        render,
        draw,
        json_path,
        plot_dir,
    )


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()


def tls_command(files: TlsFiles) -> JsonDict:
    """The ``setup`` fields that hand the load generator a stack's client TLS files."""
    named = {"tls_ca_file": files.ca_file, "tls_cert_file": files.cert_file, "tls_key_file": files.key_file}
    return {key: str(path) if path is not None else None for key, path in named.items()}
